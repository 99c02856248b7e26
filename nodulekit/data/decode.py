"""The work of one preprocessing worker: a slice and its mask, decoded and measured.

Kept apart from the cache writer so that a worker process imports only what it uses
(pydicom, Pillow, NumPy, scipy.ndimage, and Numba for the chunk checksum; not h5py). A
worker writes each slice's HU straight into the cache file, followed by the chunk's
Fletcher-32 checksum (`nodulekit.data.checksum`), at the byte offset of the slice's HDF5
chunk that the parent allocated and looked up beforehand (`nodulekit.data.preprocess`);
what goes back through the pipe is small: the metadata, the mask as the bounding box of its
nodules, the components. Half a megabyte per slice through a pipe, or through a shared
buffer that the parent then copies into the file, costs as much as decoding it. A write
that fails (a full disk) comes back as `Decoded.write_error`, which the parent reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage  # noqa: F401  the components' labelling: loaded once, in the fork server

from nodulekit.data import resample
from nodulekit.data.dicom import DicomError, DicomWarning, NotCTError, read_slice
from nodulekit.data.masks import MaskBox, MaskError, read_mask_box
from nodulekit.data.nodules import box_components, section_diameter_mm


@dataclass(frozen=True)
class Task:
    row: int  # position in the layout's record list
    image: str
    mask: str | None
    allow_non_ct: bool
    spacing_mm: float | None = None  # resample in-plane to this (`resample`); None: native
    shape: tuple[int, int] | None = None  # with spacing_mm: pad / crop to this (H, W)


@dataclass
class Decoded:
    row: int
    hu: np.ndarray | None = None  # int16 (H, W); None when `error` or `written`
    mask: np.ndarray | None = None  # uint8 {0,1}; None: no nodule (all zeros) or `mask_box`
    mask_box: MaskBox | None = None  # the mask as its bounding box (from a worker)
    parts: list[np.ndarray] = field(default_factory=list)  # components, flat indices
    section_mm: list[float] = field(default_factory=list)  # largest component first
    instance_number: int = -1
    slice_position: float = math.nan
    pixel_spacing: tuple[float, float] = (math.nan, math.nan)
    slice_thickness: float = math.nan
    # LPS mm of pixel (0, 0), and the row and column directions (NaN: unknown)
    image_position: tuple[float, float, float] = (math.nan,) * 3
    image_orientation: tuple[float, ...] = (math.nan,) * 6
    source_pixel_spacing: tuple[float, float] = (math.nan, math.nan)  # before resampling
    source: str | None = None  # the cache's `source` for this slice; None: the record's
    fixups: tuple[str, ...] = ()
    error: str | None = None
    shape: tuple[int, int] | None = None  # the slice's (H, W); None when `error`
    written: bool = False  # the HU are in the cache file already (at the task's offset)
    write_error: str | None = None  # why writing the HU into the cache file failed


def decode(task: Task, hu_out: np.ndarray | None = None,
           mask_out: np.ndarray | None = None, *, full_mask: bool = True) -> Decoded:
    """Read one slice and its mask; every failure becomes `error` (never raised).

    hu_out, mask_out: where to put the HU (int16) and the mask (uint8) if the slice has
    their shape (then `Decoded.hu` / `Decoded.mask` are them).
    full_mask: False gives a slice's mask as `Decoded.mask_box` instead of `Decoded.mask`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DicomWarning)  # kept in meta.warnings instead
            s = read_slice(task.image, allow_non_ct=task.allow_non_ct, out=hu_out,
                           identifiers=False)  # the layout has the patient
        box = read_mask_box(task.mask, s.hu.shape) if task.mask else None
    except NotCTError as e:
        return Decoded(task.row, error=f"{e.what}, not CT (--allow-non-ct / "
                                       "allow_non_ct=True reads it anyway)")
    except (DicomError, MaskError) as e:
        return Decoded(task.row, error=e.reason if Path(e.path) == Path(task.image)
                       else f"mask {e.path}: {e.reason}")
    except Exception as e:  # a bug or an exotic file: report it, do not kill the run
        return Decoded(task.row, error=f"unexpected {type(e).__name__}: {e}")
    m = s.meta
    mask = None
    parts = []
    if box is not None and box.empty:
        box = None  # an all-zero mask file: a slice without nodule
    hu, spacing = s.hu, m.pixel_spacing
    position = m.image_position or (math.nan,) * 3
    orientation = m.image_orientation or (math.nan,) * 6
    if task.spacing_mm is not None:
        if not spacing:
            return Decoded(task.row, error=f"no PixelSpacing: cannot resample to "
                                           f"{task.spacing_mm:g} mm")
        regridded = resample.regrid(hu, None if box is None else box.full(), spacing,
                                    task.spacing_mm, task.shape)
        if regridded.hu is None:
            return Decoded(task.row, error=resample_refusal(regridded, task.shape))
        position = resample.shifted_position(position, orientation, spacing,
                                             regridded.offset)
        hu, box = regridded.hu, resample.mask_box(regridded.mask)
        spacing = (task.spacing_mm, task.spacing_mm)
    if box is not None:
        parts = box_components(box.pixels, box.top, box.left, box.shape[1])
        parts.sort(key=len, reverse=True)
        if full_mask:
            if mask_out is not None and mask_out.shape != box.shape:
                mask_out = None
            mask, box = box.full(out=mask_out), None
    return Decoded(
        row=task.row, hu=hu, mask=mask, mask_box=box, parts=parts,
        section_mm=[section_diameter_mm(len(p), spacing) if spacing else math.nan
                    for p in parts],
        instance_number=-1 if m.instance_number is None else m.instance_number,
        slice_position=math.nan if m.slice_position is None else m.slice_position,
        pixel_spacing=spacing if spacing else (math.nan, math.nan),
        slice_thickness=math.nan if m.slice_thickness is None else m.slice_thickness,
        image_position=tuple(position), image_orientation=tuple(orientation),
        source_pixel_spacing=m.pixel_spacing or (math.nan, math.nan),
        fixups=m.warnings, shape=tuple(hu.shape))


def resample_refusal(regridded: resample.Regridded, shape) -> str:
    """Why a resampled slice is skipped: its crop to the cache's size cuts a nodule."""
    h, w = regridded.resampled_shape
    return (f"resampled to {h}x{w}, cropping it to the cache's {shape[0]}x{shape[1]} would "
            f"cut {regridded.lost_nodule_pixels} nodule pixel(s); skipped (a mask is never "
            "cut)")


# ----------------------------------------------------------------------------- worker


def worker_main(conn, out_path: str, lock) -> None:
    """A decoding process: numbered chunks of (task, byte offset) in, with the cache's
    slice shape, and the same numbers with lists of `Decoded` out.

    Each slice of the cache's shape has its HU written into `out_path` (opened when the
    first chunk comes: the parent creates it meanwhile) at its offset (the cache's datasets
    are little-endian int16, one chunk per slice, uncompressed); a slice of another size is
    only measured (the parent skips it). None asks it to stop. `lock` is held for each
    write: processes writing one file at the same time contend for its inode in the
    kernel, which spins, and costs more CPU than the writes themselves. Plain pipes and no
    pool: a pool's helper threads in the parent cost more than they give at a millisecond
    per task.
    """
    from pydicom import config

    # pydicom's check of every decimal string against the standard's format only warns
    # (the values are the same), and its warnings from a worker would only scribble over
    # the progress bar: skipped here, where it is a third of the header values' cost.
    config.settings.reading_validation_mode = config.IGNORE
    fd = None
    hu_buffer = None  # reused: fresh memory costs page faults
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            number, shape, items = message
            if fd is None:
                fd = os.open(out_path, os.O_WRONLY)
            if hu_buffer is None or hu_buffer.shape != tuple(shape):
                hu_buffer = np.empty(tuple(shape), dtype=np.int16)
            conn.send((number, [decode_to_file(task, fd, offset, hu_buffer, lock)
                                for task, offset in items]))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away or was interrupted: nothing left to do
    finally:
        if fd is not None:
            os.close(fd)
        conn.close()


def decode_to_file(task: Task, fd: int, offset: int, hu_buffer: np.ndarray,
                   lock=None) -> Decoded:
    """`decode` one task, its HU and their chunk checksum written to the open file `fd` at
    `offset` (holding `lock`) when the slice has the shape of `hu_buffer`; the mask comes
    back as its bounding box. A failed write is `write_error`, the system's reason."""
    from nodulekit.data.checksum import chunk_checksum  # preloaded by the fork server

    d = decode(task, hu_out=hu_buffer, full_mask=False)
    if d.hu is not None:
        if d.shape == hu_buffer.shape:
            checksum = chunk_checksum(np.ascontiguousarray(d.hu, dtype="<i2"))
            try:
                with lock if lock is not None else contextlib.nullcontext():
                    write_at(fd, d.hu, offset)
                    write_at(fd, checksum, offset + d.hu.nbytes)
                d.written = True
            except OSError as e:
                d.write_error = (f"{e.strerror} (errno {e.errno})" if e.errno
                                 else str(e))
        d.hu = None
    return d


def write_at(fd: int, array: np.ndarray, offset: int) -> None:
    """All bytes of `array` as little-endian, C order, into file `fd` at byte `offset`."""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    view = memoryview(data).cast("B")
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, view)
        if n <= 0:
            raise OSError(f"could not write to the cache file at byte {offset}")
        view, offset = view[n:], offset + n
