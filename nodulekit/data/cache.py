"""The HDF5 slice cache: its layout, and reading it back.

`nodulekit preprocess` (`nodulekit.data.preprocess`) writes it; the loader reads it. Layout::

    /                         attrs: format = "nodulekit-cache", format_version = 1,
                                     created_by ("nodulekit X.Y.Z"), created_at (UTC ISO),
                                     window_center = -500, window_width = 1600 (the paper's),
                                     height, width, layout ("unitochest" / "folder"),
                                     source_root
    /<split>/                 one group per split: "train", "val", "test" (all three exist;
                              a split without slices has N = 0)
        hu        int16 (N, H, W), chunks (1, H, W), uncompressed: HU of each slice
                  (with preprocessing workers, every chunk is allocated when the
                  dataset is created and the workers write them in place; a skipped
                  file leaves one chunk's worth of unused space in the file)
        mask      uint8 (N, H, W), chunks (1, H, W): 0 background, 1 nodule; the chunk
                  of a slice without nodule is never written (HDF5 fill value 0), so
                  read it through HDF5, or raw only where meta/has_nodule is true
        meta/     parallel datasets, row i describes slice i:
            patient            str    patient ID (UniToChest patientID / DICOM PatientID)
            exam               str    exam within the patient
            slice              int32  slice number within the exam (-1: unknown)
            instance_number    int32  DICOM InstanceNumber (-1: absent)
            slice_position     float32 mm, ImagePositionPatient z (NaN: absent)
            pixel_spacing      float32 (N, 2) mm, (row, column) (NaN: absent)
            slice_thickness    float32 mm (NaN: absent)
            has_nodule         bool   the mask has a set pixel
            n_nodules          int16  8-connected components in the mask
            section_diameter_mm  float32 (N, K) each component's equal-area circle
                                 diameter in this slice, largest first; NaN padding
            nodule_diameter_mm   float32 (N, K) diameter of the 3-D nodule each component
                                 belongs to (largest section over consecutive slices);
                                 same order as section_diameter_mm; NaN padding
            max_diameter_mm    float32 the slice's largest nodule_diameter_mm (NaN: none):
                               the value `nodules.diameter_bin` bins for per-slice metrics
            source             str    DICOM path relative to the data root
            mask_source        str    mask path relative to the data root ("" if none)
    /skipped/                 what was left out: path (str), reason (str), one row each

Rows are ordered by patient, exam and slice number.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from nodulekit.data.layout import SPLITS
from nodulekit.data.nodules import diameter_bin

FORMAT_NAME = "nodulekit-cache"
FORMAT_VERSION = 1
WINDOW_CENTER = -500.0
WINDOW_WIDTH = 1600.0
META_FIELDS = ("patient", "exam", "slice", "instance_number", "slice_position",
               "pixel_spacing", "slice_thickness", "has_nodule", "n_nodules",
               "section_diameter_mm", "nodule_diameter_mm", "max_diameter_mm", "source",
               "mask_source")
_STRING_FIELDS = ("patient", "exam", "source", "mask_source")


class CacheError(ValueError):
    """A file that is not a usable nodulekit cache; the message says why."""


class CacheSplit:
    """One split of an open cache: `hu` and `mask` are h5py datasets, `meta` NumPy arrays."""

    def __init__(self, name: str, group: h5py.Group):
        self.name = name
        self.hu: h5py.Dataset = group["hu"]
        self.mask: h5py.Dataset = group["mask"]
        self._meta_group = group["meta"]
        self._meta: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.hu.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.hu.shape[1]), int(self.hu.shape[2])

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """All metadata columns, read once (strings as Python str objects)."""
        if self._meta is None:
            meta = {}
            for name in META_FIELDS:
                ds = self._meta_group[name]
                meta[name] = ds.asstr()[()] if name in _STRING_FIELDS else ds[()]
            self._meta = meta
        return self._meta

    def nodule_rows(self) -> np.ndarray:
        """Row indices (int64) of the slices with a nodule, ascending."""
        return np.flatnonzero(self.meta["has_nodule"]).astype(np.int64)

    def empty_rows(self) -> np.ndarray:
        """Row indices (int64) of the slices without a nodule, ascending."""
        return np.flatnonzero(~self.meta["has_nodule"].astype(bool)).astype(np.int64)

    def diameter_bins(self) -> list[str | None]:
        """Per row: the Table 3 bin of its largest nodule, None for an empty slice."""
        return [diameter_bin(d) for d in self.meta["max_diameter_mm"].tolist()]


class Cache:
    """An open cache file (read-only). Use as a context manager, or call `close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path}: no such file (build it with `nodulekit "
                             "preprocess DATA OUT.h5`)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path}: not an HDF5 file ({e})") from None
        try:
            _validate(self.file, self.path)
        except CacheError:
            self.file.close()
            raise

    @property
    def attrs(self) -> dict:
        return {k: (v.item() if isinstance(v, np.generic) else v)
                for k, v in self.file.attrs.items()}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.file)

    def split(self, name: str) -> CacheSplit:
        if name not in self.file:
            raise CacheError(f"{self.path}: no split {name!r} (has: {', '.join(self.splits)})")
        return CacheSplit(name, self.file[name])

    def skipped(self) -> list[tuple[str, str]]:
        if "skipped" not in self.file:
            return []
        g = self.file["skipped"]
        return list(zip(g["path"].asstr()[()].tolist(), g["reason"].asstr()[()].tolist(),
                        strict=True))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | os.PathLike) -> Cache:
    return Cache(path)


def _validate(f: h5py.File, path: Path) -> None:
    name = f.attrs.get("format")
    if isinstance(name, bytes):
        name = name.decode()
    if name != FORMAT_NAME:
        raise CacheError(f"{path}: not a nodulekit cache (format attribute {name!r})")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {version}; this nodulekit reads "
                         f"version {FORMAT_VERSION} (rebuild it with `nodulekit preprocess "
                         "--overwrite`)")
    for split in SPLITS:
        if split not in f:
            continue
        for ds in ("hu", "mask", "meta"):
            if ds not in f[split]:
                raise CacheError(f"{path}: split {split!r} has no {ds!r}: incomplete cache")
