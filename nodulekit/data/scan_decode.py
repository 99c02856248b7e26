"""The slices of a scan layout's scans as `decode.Decoded`, a scan at a time.

`preprocess` decodes a DICOM slice per task in worker processes; a scan layout's slices
come from whole scans instead, and reading a scan once per slice would cost the scan's size
times its slices. So these are decoded in the preprocessing process itself, one scan at a
time (`decode_scans`: read with its truth by `scans.load_scan`, then cut into slices),
and go to the same cache writer as the DICOM slices (`Decoded`), so masks, components,
nodule diameters, splits, the report and the skipped list work the same way. Only one scan
(and its mask) is in memory at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.data import resample
from nodulekit.data.decode import Decoded, resample_refusal
from nodulekit.data.layout import DataIndex, SliceRecord
from nodulekit.data.nodules import components, section_diameter_mm
from nodulekit.data.scans import LoadedScan, ScanError, ScanSpec, load_scan, slice_geometry


@dataclass
class DecodedScan:
    """One scan's slices (`rows`, in the records' order), or why the scan is left out."""

    spec: ScanSpec
    rows: list[Decoded] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # kept with these
    error: str | None = None
    slice_shape: tuple[int, int] | None = None  # its slices' (H, W) in the cache


def decode_scans(index: DataIndex, *, allow_non_ct: bool = False,
                 spacing_mm: float | None = None,
                 shape: tuple[int, int] | None = None) -> Iterator[DecodedScan]:
    """Every scan of `index` in the records' order (each scan's records follow each other),
    decoded; resampled in-plane to `spacing_mm` and fitted to `shape` when given
    (`resample`)."""
    numbered = enumerate(index.records)
    for path, group in itertools.groupby(numbered, key=lambda item: item[1].image):
        yield decode_scan(index.scans[path], list(group), allow_non_ct=allow_non_ct,
                          spacing_mm=spacing_mm, shape=shape)


def decode_scan(spec: ScanSpec, records: list[tuple[int, SliceRecord]], *,
                allow_non_ct: bool = False, spacing_mm: float | None = None,
                shape: tuple[int, int] | None = None) -> DecodedScan:
    """One scan's `records` (row numbers and records) decoded; never raises for a bad
    scan: that is `DecodedScan.error`."""
    try:
        loaded = load_scan(spec, allow_non_ct=allow_non_ct)
    except ScanError as e:
        return DecodedScan(spec, error=str(e))
    except Exception as e:  # a bug or an exotic file: report it, do not stop the run
        return DecodedScan(spec, error=f"unexpected {type(e).__name__}: {e}")
    found = loaded.volume.shape[0]
    if found != spec.slices:
        return DecodedScan(spec, error=f"has {found} slices where its header said "
                                       f"{spec.slices} (changed while it was read?)")
    out = DecodedScan(spec, notes=list(loaded.notes))
    for row, record in records:
        d = _slice(loaded, row, record, spec, spacing_mm, shape)
        out.rows.append(d)
        if d.error is None and out.slice_shape is None:
            out.slice_shape = d.shape
    return out


def _slice(loaded: LoadedScan, row: int, record: SliceRecord, spec: ScanSpec,
           spacing_mm: float | None, shape: tuple[int, int] | None) -> Decoded:
    volume = loaded.volume
    k = int(record.volume_slice)
    hu = volume.array[k]
    mask = None if loaded.mask is None else loaded.mask[k]
    position, orientation, along_normal = slice_geometry(volume, k)
    thickness, sr, sc = volume.spacing
    native = (sr, sc)
    spacing = native
    if spacing_mm is not None:
        regridded = resample.regrid(hu, mask, native, spacing_mm, shape)
        if regridded.hu is None:
            return Decoded(row, error=resample_refusal(regridded, shape))
        position = resample.shifted_position(position, orientation, native, regridded.offset)
        hu, mask, spacing = regridded.hu, regridded.mask, (spacing_mm, spacing_mm)
    hu = np.ascontiguousarray(hu)
    parts = []
    if mask is not None and mask.any():
        parts = components(mask)
        parts.sort(key=len, reverse=True)
    else:
        mask = None
    return Decoded(
        row=row, hu=hu, mask=None if mask is None else np.ascontiguousarray(mask),
        parts=parts, section_mm=[section_diameter_mm(len(p), spacing) for p in parts],
        slice_position=along_normal, pixel_spacing=spacing, slice_thickness=thickness,
        image_position=tuple(position), image_orientation=tuple(orientation),
        source_pixel_spacing=native, source=_source(volume.files, k, spec, record),
        shape=tuple(hu.shape))


def _source(files: list[str] | None, k: int, spec: ScanSpec, record: SliceRecord) -> str:
    """A slice's source: its DICOM file under the data root where it has one of its own,
    else the record's (``scan#k``)."""
    if not files:
        return record.source
    scan_source = record.source.rsplit("#", 1)[0]
    return (Path(scan_source) / Path(files[k]).name).as_posix()

