"""The work of one preprocessing worker: a slice and its mask, decoded and measured.

Kept apart from the cache writer so that a worker process imports only what it uses
(pydicom, Pillow, NumPy; not h5py). Pixels go back to the parent through a shared buffer
of fixed-size slots rather than through the result pipe: pickling half a megabyte per slice
through a pipe costs more than decoding it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.data.dicom import DicomError, DicomWarning, read_slice
from nodulekit.data.masks import MaskError, read_mask
from nodulekit.data.nodules import components, section_diameter_mm


@dataclass(frozen=True)
class Task:
    row: int  # position in the layout's record list
    image: str
    mask: str | None
    allow_non_ct: bool


@dataclass
class Decoded:
    row: int
    hu: np.ndarray | None = None  # int16 (H, W); None when `error` or when in a slot
    mask: np.ndarray | None = None  # uint8 {0,1}; None: no nodule (all zeros)
    parts: list[np.ndarray] = field(default_factory=list)  # components, flat indices
    section_mm: list[float] = field(default_factory=list)  # largest component first
    instance_number: int = -1
    slice_position: float = math.nan
    pixel_spacing: tuple[float, float] = (math.nan, math.nan)
    slice_thickness: float = math.nan
    fixups: tuple[str, ...] = ()
    error: str | None = None
    slot: int | None = None  # shared-buffer slot holding hu (and mask), see decode_chunk
    has_mask: bool = False


def decode(task: Task, hu_out: np.ndarray | None = None) -> Decoded:
    """Read one slice and its mask; every failure becomes `error` (never raised).

    hu_out: where to put the HU if the slice has its shape (then `Decoded.hu` is it).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DicomWarning)  # kept in meta.warnings instead
            s = read_slice(task.image, allow_non_ct=task.allow_non_ct, out=hu_out)
        mask = read_mask(task.mask, s.hu.shape) if task.mask else None
    except (DicomError, MaskError) as e:
        return Decoded(task.row, error=e.reason if Path(e.path) == Path(task.image)
                       else f"mask {e.path}: {e.reason}")
    except Exception as e:  # a bug or an exotic file: report it, do not kill the run
        return Decoded(task.row, error=f"unexpected {type(e).__name__}: {e}")
    m = s.meta
    parts = components(mask) if mask is not None else []
    if not parts:
        mask = None  # an all-zero mask file: a slice without nodule
    parts.sort(key=len, reverse=True)
    spacing = m.pixel_spacing
    return Decoded(
        row=task.row, hu=s.hu, mask=mask, parts=parts,
        section_mm=[section_diameter_mm(len(p), spacing) if spacing else math.nan
                    for p in parts],
        instance_number=-1 if m.instance_number is None else m.instance_number,
        slice_position=math.nan if m.slice_position is None else m.slice_position,
        pixel_spacing=spacing if spacing else (math.nan, math.nan),
        slice_thickness=math.nan if m.slice_thickness is None else m.slice_thickness,
        fixups=m.warnings, has_mask=mask is not None)


# ----------------------------------------------------------------------------- slots

_slots: np.ndarray | None = None  # this worker's view of the shared buffer
_slot_shape: tuple[int, int] = (0, 0)


def worker_main(conn, buffer, slot_shape: tuple[int, int]) -> None:
    """A decoding process: chunks of (task, slot) in, lists of `Decoded` out, in order.

    None asks it to stop. Plain pipes and no pool: a pool's helper threads in the parent
    cost more than they give at a few milliseconds per task.
    """
    global _slots, _slot_shape
    _slot_shape = tuple(slot_shape)
    _slots = np.frombuffer(buffer, dtype=np.uint8)
    try:
        while True:
            items = conn.recv()
            if items is None:
                break
            conn.send(decode_chunk(items))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away or was interrupted: nothing left to do
    finally:
        conn.close()


def slot_views(buffer: np.ndarray, slot: int, shape: tuple[int, int]):
    """(hu int16, mask uint8) views of one slot: HU first, then the mask."""
    h, w = shape
    size = h * w * 3
    base = buffer[slot * size:(slot + 1) * size]
    return base[:h * w * 2].view(np.int16).reshape(h, w), base[h * w * 2:].reshape(h, w)


def decode_chunk(items: list[tuple[Task, int]]) -> list[Decoded]:
    """Decode each task into its slot; a slice of another size travels in the result."""
    out = []
    for task, slot in items:
        hu_view, mask_view = slot_views(_slots, slot, _slot_shape)
        d = decode(task, hu_out=hu_view)
        if d.hu is not None and d.hu.shape == _slot_shape:
            if d.hu is not hu_view:  # clipped or rescaled by float: made its own array
                hu_view[...] = d.hu
            if d.mask is not None:
                mask_view[...] = d.mask
            d.hu, d.mask, d.slot = None, None, slot
        out.append(d)
    return out
