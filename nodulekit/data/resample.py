"""A slice resampled in its own plane to square pixels of a chosen size, and fitted to the
cache's one slice size (`nodulekit preprocess --spacing MM`).

Only in-plane: slices are never resampled across (their thickness and the spacing between
them stay as they were).

**Grid rule.** The field of view and its centre stay. An axis of n pixels of s mm becomes
m = max(1, round(n * s / MM)) pixels of exactly MM mm, centred where the old ones were:
output pixel i samples the input at pixel coordinate ``(n - 1) / 2 + (i - (m - 1) / 2) * MM / s``
(`source_coordinates`). The image is interpolated linearly, the mask takes the nearest pixel
(`scipy.ndimage.affine_transform`, orders 1 and 0); a sample up to half a pixel outside the
old grid takes the edge pixel's value.

**Size rule.** A cache holds one slice size. After resampling, scans of another field of view
have other sizes: each slice is padded about its centre with air (-1024 HU, mask 0) or
cropped about its centre to the cache's size, which is the most common size among the scans
(`common_size`: one vote per scan; a tie goes to the larger). A crop that would cut nodule
pixels is refused (`Regridded.lost_nodule_pixels`; the caller skips that slice and says so),
so a mask is never silently cut.

Where a pixel lies in the patient moves with the grid: `shifted_position` gives the new
position of pixel (0, 0) from the old one, the orientation and the offset in old pixels.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nodulekit.data.masks import MaskBox

AIR_HU = -1024


def resampled_shape(shape: tuple[int, int], spacing: tuple[float, float],
                    target_mm: float) -> tuple[int, int]:
    """(rows, columns) of a slice of `shape` at `spacing` (row, column) mm after resampling
    to `target_mm` pixels (the grid rule)."""
    return tuple(max(1, int(round(n * float(s) / target_mm)))  # type: ignore[return-value]
                 for n, s in zip(shape, spacing, strict=True))


def source_coordinates(n: int, spacing: float, target_mm: float, m: int) -> tuple[float, float]:
    """(input pixel coordinate of output pixel 0, input pixels per output pixel) of one axis."""
    step = target_mm / float(spacing)
    return (n - 1) / 2 - (m - 1) / 2 * step, step


def common_size(sizes: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
    """The most common (rows, columns) (one per scan), ties to the larger; None for none."""
    counts = Counter(tuple(s) for s in sizes)
    if not counts:
        return None
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s))


@dataclass
class Regridded:
    hu: np.ndarray | None  # int16 (H, W), the cache's size; None when a crop cuts a nodule
    mask: np.ndarray | None  # uint8 {0, 1}; None: no nodule (or hu is None)
    offset: tuple[float, float]  # input (row, column) coordinate of output pixel (0, 0)
    lost_nodule_pixels: int  # nodule pixels a crop would cut (then hu and mask are None)
    resampled_shape: tuple[int, int]  # before padding / cropping


def regrid(hu: np.ndarray, mask: np.ndarray | None, spacing: tuple[float, float],
           target_mm: float, shape: tuple[int, int] | None) -> Regridded:
    """`hu` (and `mask`) resampled to `target_mm` pixels, then padded or cropped to `shape`
    (None: kept as resampled). The module doc has the rules."""
    from scipy import ndimage

    sr, sc = (float(v) for v in spacing)
    if not (math.isfinite(sr) and math.isfinite(sc) and sr > 0 and sc > 0):
        raise ValueError(f"pixel spacing {spacing} mm: cannot resample")
    m = resampled_shape(hu.shape, (sr, sc), target_mm)
    (r0, r_step), (c0, c_step) = (source_coordinates(hu.shape[0], sr, target_mm, m[0]),
                                  source_coordinates(hu.shape[1], sc, target_mm, m[1]))
    same = m == tuple(hu.shape) and r0 == 0 and c0 == 0 and r_step == 1 and c_step == 1
    if same:
        out_hu, out_mask = hu, mask
    else:
        out_hu = sample_hu(hu, (r0, c0), (r_step, c_step), m)
        out_mask = None
        if mask is not None:
            out_mask = ndimage.affine_transform(mask, (r_step, c_step), offset=(r0, c0),
                                                output_shape=m, order=0, mode="nearest")
    if shape is None or tuple(shape) == m:
        return Regridded(np.ascontiguousarray(out_hu, dtype=np.int16), _or_none(out_mask),
                         (r0, c0), 0, m)
    fitted, top_left, lost = fit(out_hu, out_mask, tuple(shape))
    offset = (r0 + top_left[0] * r_step, c0 + top_left[1] * c_step)
    if lost:
        return Regridded(None, None, offset, lost, m)
    return Regridded(fitted[0], _or_none(fitted[1]), offset, 0, m)


def sample_hu(hu: np.ndarray, origin: tuple[float, float], step: tuple[float, float],
              shape: tuple[int, int]) -> np.ndarray:
    """One slice's HU sampled linearly at input coordinates origin + i * step (per axis) on
    an output grid of `shape`, rounded to int16 (between neighbours: inside int16)."""
    from scipy import ndimage

    image = ndimage.affine_transform(hu.astype(np.float32), step, offset=origin,
                                     output_shape=shape, order=1, mode="nearest",
                                     prefilter=False)
    return np.rint(image).astype(np.int16)


def fit(hu: np.ndarray, mask: np.ndarray | None, shape: tuple[int, int]):
    """((hu, mask) padded with air / 0 or cropped about the centre to `shape`, (row, column)
    of the new pixel (0, 0) in the old pixels, nodule pixels the crop cuts)."""
    top_left = tuple((n - t) // 2 for n, t in zip(hu.shape, shape, strict=True))
    out_hu = np.full(shape, AIR_HU, dtype=np.int16)
    out_mask = None if mask is None else np.zeros(shape, dtype=np.uint8)
    # the overlap, in old (src) and new (dst) pixels, per axis
    src, dst = [], []
    for n, t, o in zip(hu.shape, shape, top_left, strict=True):
        lo, hi = max(o, 0), min(o + t, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out_hu[tuple(dst)] = hu[tuple(src)]
    lost = 0
    if mask is not None:
        kept = mask[tuple(src)]
        out_mask[tuple(dst)] = kept
        lost = int(np.count_nonzero(mask)) - int(np.count_nonzero(kept))
    return (out_hu, out_mask), top_left, lost


def shifted_position(position, orientation, spacing: tuple[float, float],
                     offset: tuple[float, float]) -> tuple[float, float, float]:
    """LPS mm of the point at (row, column) `offset` in old pixels of a slice whose pixel
    (0, 0) lies at `position`, with `orientation` (row direction, column direction) and
    old `spacing` (row, column); NaN where any of them is unknown."""
    p = np.asarray(position, dtype=np.float64)
    o = np.asarray(orientation, dtype=np.float64)
    moved = p + o[:3] * (offset[1] * float(spacing[1])) + o[3:] * (offset[0] * float(spacing[0]))
    return tuple(float(v) for v in moved)  # type: ignore[return-value]


def mask_box(mask: np.ndarray | None) -> MaskBox | None:
    """A full mask as the bounding box of its set pixels (None for None or no set pixel)."""
    if mask is None:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, left = int(rows[0]), int(cols[0])
    box = mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1]
    return MaskBox(tuple(mask.shape), top, left, np.ascontiguousarray(box, dtype=np.uint8))


def _or_none(mask: np.ndarray | None) -> np.ndarray | None:
    """A mask, or None when it has no set pixel (a slice without nodule)."""
    if mask is None or not mask.any():
        return None
    return np.ascontiguousarray(mask, dtype=np.uint8)
