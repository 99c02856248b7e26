"""A cache written straight from arrays (no tests): slices whose every pixel a test chooses.

`write_cache` writes the layout `nodulekit.data.cache` reads (format attributes, per split
``hu``, ``mask`` and ``meta/``), chunked one slice per chunk with the Fletcher-32 checksum as
`nodulekit preprocess` writes them, so the loader takes its raw-chunk path; ``raw=False``
chunks them otherwise, so it reads through HDF5.
"""

from __future__ import annotations

import h5py
import numpy as np

from nodulekit.data.cache import FORMAT_NAME, FORMAT_VERSION
from nodulekit.data.layout import SPLITS


def scan_meta(n_scans: int, per_scan: int) -> dict:
    """Metadata of `n_scans` scans of `per_scan` slices each, in cache order (patient,
    exam, slice number), positions descending with the slice number as synth writes them."""
    k = np.arange(n_scans * per_scan)
    return {"patient": [f"{p:04d}" for p in k // per_scan],
            "exam": ["1"] * len(k),
            "slice": (k % per_scan + 1).astype(np.int32),
            "slice_position": (-100.0 - 2.5 * (k % per_scan)).astype(np.float32)}


def write_cache(path, splits: dict, raw: bool = True):
    """splits: name -> dict(hu int16 [N, H, W], mask uint8 [N, H, W], and optionally
    patient, exam (lists of str), slice (int), slice_position (float)); the splits not named
    are written empty."""
    shape = next(iter(splits.values()))["hu"].shape[1:]
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["height"], f.attrs["width"] = shape
        for name in SPLITS:
            given = splits.get(name, {"hu": np.zeros((0, *shape), np.int16),
                                      "mask": np.zeros((0, *shape), np.uint8)})
            _write_split(f.create_group(name), given, raw)
    return path


def _write_split(g, d: dict, raw: bool) -> None:
    hu, mask = np.asarray(d["hu"], np.int16), np.asarray(d["mask"], np.uint8)
    n, h, w = hu.shape
    chunks = (1, h, w) if raw else (1, max(1, h // 2), w)
    for key, a in (("hu", hu), ("mask", mask)):
        g.create_dataset(key, data=a, dtype=a.dtype.newbyteorder("<"),
                         chunks=chunks if n else None, maxshape=(None, h, w),
                         fletcher32=bool(n))
    has = mask.reshape(n, h * w).any(axis=1)
    m = g.create_group("meta")
    text = h5py.string_dtype("utf-8", 16)
    default = scan_meta(1, n) if n else {"patient": [], "exam": [],
                                         "slice": np.zeros(0, np.int32),
                                         "slice_position": np.zeros(0, np.float32)}
    for key in ("patient", "exam"):
        m.create_dataset(key, data=np.array([s.encode() for s in d.get(key, default[key])],
                                            dtype=text))
    m.create_dataset("slice", data=np.asarray(d.get("slice", default["slice"]), np.int32))
    m.create_dataset("instance_number",
                     data=np.asarray(d.get("slice", default["slice"]), np.int32))
    m.create_dataset("slice_position", data=np.asarray(
        d.get("slice_position", default["slice_position"]), np.float32))
    m.create_dataset("pixel_spacing", data=np.full((n, 2), 0.7, np.float32))
    m.create_dataset("slice_thickness", data=np.full(n, 2.5, np.float32))
    m.create_dataset("has_nodule", data=has)
    m.create_dataset("n_nodules", data=has.astype(np.int16))
    diam = np.where(has, 5.0, np.nan).astype(np.float32)
    m.create_dataset("section_diameter_mm", data=diam[:, None])
    m.create_dataset("nodule_diameter_mm", data=diam[:, None])
    m.create_dataset("max_diameter_mm", data=diam)
    for key in ("source", "mask_source"):
        m.create_dataset(key, data=np.array([f"s{i}.dcm".encode() for i in range(n)],
                                            dtype=text))
