"""From a folder of CT files to batches of int16 HU slices with masks.

    dicom.py       one DICOM slice -> HU int16 + metadata, with clear errors
    masks.py       PNG masks -> uint8 {0, 1}, checked
    nodules.py     connected components (2-D, 3-D), diameters in mm, the paper's bins
    volumes.py     whole scans: NIfTI, MetaImage, DICOM series in and out, in LPS mm
    seg.py         DICOM SEG out and in (highdicom)
    layout.py      UniToChest and plain folder trees -> slice records with splits;
                   layout_series.py, layout_msd.py, layout_luna16.py: the scan layouts
    scans.py       a scan layout's scans: headers, reading, labels, the axial turn
    resample.py    in-plane resampling to a pixel size (`preprocess --spacing`)
    synth.py       a synthetic chest CT data set in the UniToChest layout
                   (synth_export.py: the same patients as MSD, LUNA16 or DICOM series)
    decode.py      the work of one preprocessing worker (scan_decode.py: of one scan)
    preprocess.py  decoding in parallel into the HDF5 cache
    cache.py       the cache's layout, and reading it
    checksum.py    HDF5's Fletcher-32 chunk checksum, for chunks written and read raw
    loader.py      batches with augmentation parameters, prefetched by worker threads

Names below are imported on first use, so that `import nodulekit.data` stays cheap (the
preprocessing workers import only what they need).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DicomError": "dicom", "read_slice": "dicom", "read_slices": "dicom",
    "MaskError": "masks", "read_mask": "masks",
    "diameter_bin": "nodules", "DIAMETER_BINS": "nodules", "BIN_LABELS": "nodules",
    "read_layout": "layout", "split_patients": "layout", "SPLITS": "layout",
    "SynthConfig": "synth", "synthesize": "synth", "render_slice": "synth",
    "PreprocessError": "preprocess", "PreprocessReport": "preprocess",
    "Cache": "cache", "open_cache": "cache", "CacheError": "cache",
    "PreprocessOptions": "preprocess", "NotCTError": "dicom",
    "Loader": "loader", "Batch": "loader", "train_loader": "loader",
    "eval_loader": "loader", "LoaderError": "loader", "SampleOptions": "loader",
    "ReadOptions": "loader", "fits_in_memory": "loader", "CropOptions": "loader",
    "context_table": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"nodulekit.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'nodulekit.data' has no attribute {name!r}")
