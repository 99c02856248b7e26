"""The HDF5 slice cache: its layout, and reading it back.

`nodulekit preprocess` (`nodulekit.data.preprocess`) writes it; the loader reads it. Layout::

    /                         attrs: format = "nodulekit-cache", format_version = 2,
                                     created_by ("nodulekit X.Y.Z"), created_at (UTC ISO),
                                     window_center = -500, window_width = 1600 (the paper's),
                                     height, width, layout ("unitochest", "folder",
                                     "series", "msd", "luna16"), source_root,
                                     spacing_mm (`preprocess --spacing`: every slice
                                     resampled in-plane to this many mm per pixel;
                                     absent: native pixels, as read)
    /<split>/                 one group per split: "train", "val", "test" (all three exist;
                              a split without slices has N = 0)
        hu        int16 (N, H, W), chunks (1, H, W): HU of each slice
                  (with preprocessing workers, every chunk is allocated when the
                  dataset is created and the workers write them in place; a skipped
                  file leaves one chunk's worth of unused space in the file)
        mask      uint8 (N, H, W), chunks (1, H, W): 0 background, 1 nodule; the chunk
                  of a slice without nodule is never written (HDF5 fill value 0), so
                  read it through HDF5, or raw only where meta/has_nodule is true
        meta/     parallel datasets, row i describes slice i:
            patient            str    patient ID (UniToChest patientID / DICOM PatientID;
                                      a scan layout's, see nodulekit.data.layout)
            exam               str    exam within the patient
            slice              int32  slice number within the exam (-1: unknown); a scan
                                      layout's count from 1, feet to head
            instance_number    int32  DICOM InstanceNumber (-1: absent; scan layouts: -1)
            slice_position     float32 mm: DICOM slices ImagePositionPatient z (NaN:
                                      absent); scan layouts the position along the slice
                                      normal (row x column direction), which is z for
                                      an axial slice
            pixel_spacing      float32 (N, 2) mm, (row, column) (NaN: absent), in the
                                      cache: after resampling where it was resampled
            slice_thickness    float32 mm (NaN: absent); scan layouts: the spacing of
                                      the slices
            image_position     float64 (N, 3) LPS mm of pixel (0, 0)'s centre, in the
                                      cache (after resampling and padding) (NaN: unknown)
            image_orientation  float64 (N, 6) the row direction (+column) and the column
                                      direction (+row), LPS cosines, as DICOM's
                                      ImageOrientationPatient (NaN: unknown)
            source_pixel_spacing float32 (N, 2) mm, (row, column) as read, before any
                                      resampling (NaN: absent)
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

Everything is checksummed, so that a damaged file gives an error, never other numbers:

- every dataset is chunked with HDF5's Fletcher-32 filter (each chunk stored with the
  checksum of its bytes, checked on every read; uncompressed otherwise). Strings are
  fixed-length UTF-8, so they sit in those chunks too (variable-length strings would sit
  in HDF5's global heap, which has no checksum). `nodulekit.data.checksum` computes the
  same checksum for the chunks written and read raw (the preprocessing workers, the loader);
- the file is written in HDF5 1.10's format (`LIBVER`): superblock version 3, version-2
  object headers (attributes included) and chunk indexes, all with checksums of their own.

Version 1 caches (before the checksums) are refused, with the command that rebuilds them.
Version 2 caches written before `image_position`, `image_orientation` and
`source_pixel_spacing` existed open all the same: `CacheSplit.meta` gives NaN for the first
two and the (never resampled) `pixel_spacing` for the third (`OPTIONAL_FIELDS`).

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
FORMAT_VERSION = 2
# HDF5 file format bounds: 1.10's, whose metadata carries checksums (see the module doc).
LIBVER = ("v110", "v110")
WINDOW_CENTER = -500.0
WINDOW_WIDTH = 1600.0
META_FIELDS = ("patient", "exam", "slice", "instance_number", "slice_position",
               "pixel_spacing", "slice_thickness", "has_nodule", "n_nodules",
               "section_diameter_mm", "nodule_diameter_mm", "max_diameter_mm", "source",
               "mask_source", "image_position", "image_orientation", "source_pixel_spacing")
# Columns that older caches lack: name -> values per row (float64 NaN, or another column's).
OPTIONAL_FIELDS = {"image_position": 3, "image_orientation": 6,
                   "source_pixel_spacing": "pixel_spacing"}
_STRING_FIELDS = ("patient", "exam", "source", "mask_source")
# What h5py raises for a damaged file: OSError from HDF5 (a checksum that does not match,
# an address past the end of the file, ...), and on some paths these.
READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)
# Reads with the caller's selection: a bad selection (IndexError, TypeError, ValueError) is
# the caller's mistake, not damage, and stays as h5py says it.
_DATA_ERRORS = (OSError, RuntimeError)


class CacheError(ValueError):
    """A file that is not a usable nodulekit cache; the message says why."""


def damaged(path: str | os.PathLike, what: str, error: BaseException) -> CacheError:
    """The error for a cache that fails a read: names the file, what was read, the cause,
    and how to rebuild it."""
    if isinstance(error, CacheError):
        return error
    cause = " ".join(str(error).split()) or type(error).__name__
    return CacheError(f"{path}: cannot read {what}: the file is damaged ({cause}); rebuild "
                      f"it with `nodulekit preprocess DATA {path} --overwrite`")


class CacheDataset:
    """One of a split's pixel datasets (`hu`, `mask`): the h5py dataset, whose reads raise
    `CacheError` naming the file when the file is damaged. Everything else (shape, dtype,
    chunks, id, ...) is the h5py dataset's."""

    def __init__(self, dataset: h5py.Dataset, path: Path, name: str):
        self.dataset = dataset
        self.path = path
        self.name = name  # "train/hu", ...

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except _DATA_ERRORS as e:
            raise damaged(self.path, f"{self.name} {_rows(key)}", e) from None

    def read_direct(self, dest: np.ndarray, source_sel=None, dest_sel=None) -> None:
        try:
            self.dataset.read_direct(dest, source_sel, dest_sel)
        except _DATA_ERRORS as e:
            raise damaged(self.path, f"{self.name} {_rows(source_sel)}", e) from None

    def __len__(self) -> int:
        return len(self.dataset)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[()]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)


def _rows(key) -> str:
    """A selection in words, for messages."""
    if isinstance(key, tuple):
        key = key[0] if key else Ellipsis
    if isinstance(key, (int, np.integer)):
        return f"row {int(key)}"
    if isinstance(key, slice) and key != slice(None):
        return f"rows {key.start or 0}:{'' if key.stop is None else key.stop}"
    return "rows"


class CacheSplit:
    """One split of an open cache: `hu` and `mask` are its datasets (`CacheDataset`), `meta`
    NumPy arrays."""

    def __init__(self, name: str, group: h5py.Group, path: Path | None = None):
        self.name = name
        self.path = Path(group.file.filename) if path is None else path
        try:
            self.hu = CacheDataset(group["hu"], self.path, f"{name}/hu")
            self.mask = CacheDataset(group["mask"], self.path, f"{name}/mask")
            self._meta_group = group["meta"]
        except READ_ERRORS as e:
            raise damaged(self.path, f"split {name!r}", e) from None
        if self.hu.shape != self.mask.shape or len(self.hu.shape) != 3:
            raise CacheError(f"{self.path}: split {name!r}: hu {self.hu.shape} and mask "
                             f"{self.mask.shape} differ: not a nodulekit cache")
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
                try:
                    if name in OPTIONAL_FIELDS and name not in self._meta_group:
                        meta[name] = _missing_column(meta, name, len(self))
                        continue
                    ds = self._meta_group[name]
                    meta[name] = ds.asstr()[()] if name in _STRING_FIELDS else ds[()]
                except READ_ERRORS as e:
                    raise damaged(self.path, f"{self.name}/meta/{name}", e) from None
                if meta[name].shape[:1] != (len(self),):
                    raise CacheError(f"{self.path}: {self.name}/meta/{name} has "
                                     f"{meta[name].shape[0]} rows for {len(self)} slices: "
                                     "the file is damaged")
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
    """An open cache file (read-only). Use as a context manager, or call `close`.

    Every read of a damaged file (a checksum that does not match, a truncated file, ...)
    raises `CacheError` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path}: no such file (build it with `nodulekit "
                             "preprocess DATA OUT.h5`)")
        try:
            self.file = h5py.File(self.path, "r")
        except READ_ERRORS as e:
            raise CacheError(f"{self.path}: not an HDF5 file, or a damaged one "
                             f"({' '.join(str(e).split())})") from None
        try:
            _validate(self.file, self.path)
        except BaseException as e:
            self.file.close()
            if isinstance(e, READ_ERRORS):
                raise damaged(self.path, "its header", e) from None
            raise

    @property
    def attrs(self) -> dict:
        try:
            return {k: _plain(v) for k, v in self.file.attrs.items()}
        except READ_ERRORS as e:
            raise damaged(self.path, "its attributes", e) from None

    @property
    def splits(self) -> tuple[str, ...]:
        try:
            return tuple(s for s in SPLITS if s in self.file)
        except READ_ERRORS as e:
            raise damaged(self.path, "its list of splits", e) from None

    def split(self, name: str) -> CacheSplit:
        if name not in self.splits:
            raise CacheError(f"{self.path}: no split {name!r} (has: {', '.join(self.splits)})")
        try:
            group = self.file[name]
        except READ_ERRORS as e:
            raise damaged(self.path, f"split {name!r}", e) from None
        return CacheSplit(name, group, self.path)

    def skipped(self) -> list[tuple[str, str]]:
        try:
            if "skipped" not in self.file:
                return []
            g = self.file["skipped"]
            return list(zip(g["path"].asstr()[()].tolist(), g["reason"].asstr()[()].tolist(),
                            strict=True))
        except READ_ERRORS as e:
            raise damaged(self.path, "skipped/", e) from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _missing_column(meta: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """An optional column an older cache lacks: NaN, or the column it defaults to."""
    default = OPTIONAL_FIELDS[name]
    if isinstance(default, str):
        return meta[default].copy()
    return np.full((n, default), np.nan, dtype=np.float64)


def _plain(value):
    """An attribute as Python: numbers as int / float, strings as str (the writer stores
    them as fixed-length UTF-8, which h5py gives as bytes)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def open_cache(path: str | os.PathLike) -> Cache:
    return Cache(path)


def is_cache_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that `nodulekit preprocess` wrote, also a damaged one or one
    of an older format: HDF5 with the format name in its root's attributes (which the
    writer puts first, so they sit in the first kilobytes whatever else is damaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 << 10)
    except OSError:
        return False
    if not head.startswith(b"\x89HDF\r\n\x1a\n"):
        return False
    if FORMAT_NAME.encode() in head:
        return True
    try:  # an older cache keeps it elsewhere
        with h5py.File(path, "r") as f:
            return _plain(f.attrs.get("format")) == FORMAT_NAME
    except Exception:  # not readable as HDF5: not ours to tell
        return False


def _validate(f: h5py.File, path: Path) -> None:
    name = f.attrs.get("format")
    if isinstance(name, bytes):
        name = name.decode()
    if name != FORMAT_NAME:
        raise CacheError(f"{path}: not a nodulekit cache (format attribute {name!r})")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        older = (" (written before caches had checksums)" if 0 < version < FORMAT_VERSION
                 else "")
        raise CacheError(f"{path}: cache format version {version}{older}; this nodulekit "
                         f"reads version {FORMAT_VERSION}: rebuild it with `nodulekit "
                         f"preprocess DATA {path} --overwrite`")
    for split in SPLITS:
        if split not in f:
            continue
        for ds in ("hu", "mask", "meta"):
            if ds not in f[split]:
                raise CacheError(f"{path}: split {split!r} has no {ds!r}: incomplete cache")
