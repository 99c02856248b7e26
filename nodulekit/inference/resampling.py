"""Inference at the pixel size a model was trained at: slices resampled in-plane to it, and
the network's outputs mapped back onto the input's own pixels.

A model trained on a cache that `preprocess --spacing MM` resampled (its configuration's
``spacing_mm``) saw MM x MM pixels, so `predict` gives it the same: each slice resampled by
the cache's grid rule (`nodulekit.data.resample`: the field of view and its centre kept,
round(n s / MM) pixels of exactly MM mm, image linear). The logits come back to the input
grid by linear interpolation (output pixel i of an axis reads the model grid at
(i - origin) / step) and are thresholded there, so masks, SEG objects and nodules.csv are on
the input's pixels. A model trained at native pixels (no ``spacing_mm``) runs on the input
as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelGrid:
    """Where the model's pixels lie on one input grid: per axis (row, column), the input
    coordinate of model pixel 0 and input pixels per model pixel."""

    source_shape: tuple[int, int]
    shape: tuple[int, int]
    origin: tuple[float, float]
    step: tuple[float, float]

    @property
    def identity(self) -> bool:
        return self.shape == self.source_shape and self.origin == (0.0, 0.0) \
            and self.step == (1.0, 1.0)


def model_grid(shape: tuple[int, int], spacing: tuple[float, float],
               target_mm: float) -> ModelGrid:
    """The grid `nodulekit.data.resample` puts a slice of `shape` at `spacing` (row,
    column) mm on for `target_mm` pixels."""
    from nodulekit.data.resample import resampled_shape, source_coordinates

    m = resampled_shape(tuple(shape), tuple(spacing), target_mm)
    (r0, rs), (c0, cs) = (source_coordinates(shape[0], spacing[0], target_mm, m[0]),
                          source_coordinates(shape[1], spacing[1], target_mm, m[1]))
    return ModelGrid(tuple(int(n) for n in shape), m, (float(r0), float(c0)),
                     (float(rs), float(cs)))


def to_model(hu: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """HU [..., H, W] (int16) resampled onto the model's grid, each slice as the cache's
    preprocessing resamples it (`nodulekit.data.resample.sample_hu`)."""
    from nodulekit.data.resample import sample_hu

    if grid.identity:
        return hu
    flat = hu.reshape(-1, *hu.shape[-2:])
    out = np.empty((flat.shape[0], *grid.shape), dtype=np.int16)
    for i, image in enumerate(flat):
        out[i] = sample_hu(image, grid.origin, grid.step, grid.shape)
    return out.reshape(*hu.shape[:-2], *grid.shape)


def to_source(values: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Model-grid values [..., H', W'] (logits, the windowed image) back on the input's
    pixels [..., H, W], linearly interpolated (float32)."""
    from scipy import ndimage

    if grid.identity:
        return values
    inverse = tuple(1.0 / s for s in grid.step)
    offset = tuple(-o / s for o, s in zip(grid.origin, grid.step, strict=True))
    flat = values.reshape(-1, *values.shape[-2:])
    out = np.empty((flat.shape[0], *grid.source_shape), dtype=np.float32)
    for i, image in enumerate(flat):
        out[i] = ndimage.affine_transform(image.astype(np.float32), inverse, offset=offset,
                                          output_shape=grid.source_shape, order=1,
                                          mode="nearest", prefilter=False)
    return out.reshape(*values.shape[:-2], *grid.source_shape)
