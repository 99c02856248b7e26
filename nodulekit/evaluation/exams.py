"""A split's exams as volumes, for the nodule-level results (`nodulekit.evaluation.detection`).

A scan is one exam (patient, exam): its slices are consecutive cache rows (the cache is
sorted by patient, exam and slice number), stacked in row order into a (Z, H, W) volume;
slice k is the exam's k-th row. Its voxel spacing (`voxel_spacing`): between slices the
median |difference| of the finite slice positions, else the median slice thickness, else
1 mm; in the plane the median pixel spacing, else 1 mm. Missing slices are not filled in:
rows either side of a gap are stacked as neighbours.

Both masks stay sparse (flat voxel indices): the truth read from the cache's nodule slices,
the prediction from `infer_split`'s per-slice predicted pixels; only the bounding box of
one scan's voxels is ever labelled densely (`nodules.label_voxels`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nodulekit.data.nodules import label_voxels
from nodulekit.evaluation import detection

if TYPE_CHECKING:
    from nodulekit.data.cache import CacheSplit
    from nodulekit.evaluation.evaluate import SplitResult


def exam_ranges(patient, exam) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the runs of equal (patient, exam), in row order."""
    patient, exam = np.asarray(patient).reshape(-1), np.asarray(exam).reshape(-1)
    if patient.size == 0:
        return []
    change = (patient[1:] != patient[:-1]) | (exam[1:] != exam[:-1])
    bounds = [0, *(np.flatnonzero(change) + 1).tolist(), patient.size]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def voxel_spacing(meta: dict, start: int, stop: int) -> tuple[tuple[float, float, float], str]:
    """((slice, row, column) spacing in mm, where it came from) of rows [start, stop)."""
    position = np.asarray(meta["slice_position"][start:stop], dtype=np.float64)
    steps = np.abs(np.diff(position))
    steps = steps[np.isfinite(steps) & (steps > 0)]
    thickness = _positive(meta["slice_thickness"][start:stop])
    if steps.size:
        dz, z_from = float(np.median(steps)), "slice positions"
    elif thickness.size:
        dz, z_from = float(np.median(thickness)), "slice thickness"
    else:
        dz, z_from = 1.0, "1 mm (no slice position or thickness)"
    pixel = np.asarray(meta["pixel_spacing"][start:stop], dtype=np.float64).reshape(-1, 2)
    pixel = pixel[np.all(np.isfinite(pixel) & (pixel > 0), axis=1)]
    if pixel.size:
        (dy, dx), xy_from = np.median(pixel, axis=0).tolist(), "pixel spacing"
    else:
        (dy, dx), xy_from = (1.0, 1.0), "1 mm (no pixel spacing)"
    return (dz, float(dy), float(dx)), f"{z_from}; {xy_from}"


def _positive(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v) & (v > 0)]


def scan_results(split: CacheSplit, result: SplitResult,
                 image_shape: tuple[int, int]) -> list[detection.ScanResult]:
    """Every exam of `split` with the predictions of `result` (which must hold them:
    `infer_split(..., predictions=True)`), truth and prediction in the `image_shape` centre
    crop the model saw."""
    if result.predictions is None:
        raise ValueError("the split was inferred without its predictions "
                         "(infer_split(..., predictions=True))")
    meta = split.meta
    h, w = (int(v) for v in image_shape)
    # position in result of each cache row (-1: not inferred)
    where = np.full(len(split), -1, dtype=np.int64)
    where[result.rows] = np.arange(len(result.rows))
    out = []
    for start, stop in exam_ranges(meta["patient"], meta["exam"]):
        spacing, spacing_from = voxel_spacing(meta, start, stop)
        shape = (stop - start, h, w)
        truth = label_voxels(_truth_voxels(split, start, stop, (h, w)), shape)
        flat, probability = _predicted_voxels(result, where[start:stop], h * w)
        predicted = label_voxels(flat, shape)
        nodules, candidates, m = detection.detect(truth, predicted, spacing, probability)
        out.append(detection.ScanResult(
            patient=str(meta["patient"][start]), exam=str(meta["exam"][start]),
            rows=(start, stop - 1), spacing_mm=spacing, spacing_from=spacing_from,
            truth=nodules, candidates=candidates, match=m))
    return out


def _truth_voxels(split: CacheSplit, start: int, stop: int, shape) -> np.ndarray:
    """Flat voxel indices of the truth mask of rows [start, stop), centre-cropped to shape."""
    has = np.asarray(split.meta["has_nodule"][start:stop], dtype=bool)
    ks = np.flatnonzero(has)
    if ks.size == 0:
        return np.zeros(0, np.int64)
    masks = split.mask[(start + ks).tolist()]  # only the nodule slices are stored
    h, w = shape
    r0, c0 = (masks.shape[1] - h) // 2, (masks.shape[2] - w) // 2
    masks = masks[:, r0:r0 + h, c0:c0 + w]
    parts = [k * (h * w) + np.flatnonzero(m) for k, m in zip(ks.tolist(), masks, strict=True)]
    return np.concatenate(parts).astype(np.int64, copy=False)


def _predicted_voxels(result: SplitResult, positions: np.ndarray, area: int):
    """(flat voxel indices, probabilities) of one scan's predicted pixels; `positions`: each
    of its slices' place in `result` (-1: not inferred, an empty slice)."""
    flats, probabilities = [], []
    for k, j in enumerate(positions.tolist()):
        if j < 0:
            continue
        pixels, p = result.predictions[j][:2]
        if pixels.size:
            flats.append(k * area + pixels.astype(np.int64))
            probabilities.append(p)
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(flats), np.concatenate(probabilities)

