"""The network's input from a batch of HU slices: the centre crop, and the windowing and
augmentation of every input channel (the slice itself, or it and its context slices) on a
backend. Training, evaluation and inference all prepare their input here."""

from __future__ import annotations

import numpy as np


def window_input(be, hu, mask, aug, center: float, width: float):
    """(image float [B, H, W, C], target uint8 [B, H, W, 1]) on `be` from a batch's HU
    (int16 [B, H, W], or [B, C, H, W] with context slices: C = 2K + 1), mask and
    augmentation: `window_augment` per channel, the same flips and rotation for each, the
    channels interleaved (NHWC) with the backend's array module; the target is the centre
    channel's. One channel: `window_augment` itself."""
    if hu.ndim == 3:
        return be.window_augment(be.asarray(hu), be.asarray(mask), be.asarray(aug), center,
                                 width)
    # be.asarray around xp's results: a no-op for NumPy and CuPy, and what makes them the
    # runtime's arrays under the CUDA emulator (whose xp is NumPy)
    xp = be.xp
    hu, mask, aug = be.asarray(hu), be.asarray(mask), be.asarray(aug)
    images, target = [], None
    for c in range(hu.shape[1]):
        image, t = be.window_augment(be.asarray(xp.ascontiguousarray(hu[:, c])), mask, aug,
                                     center, width)
        images.append(image)
        if c == hu.shape[1] // 2:
            target = t
    return be.asarray(xp.ascontiguousarray(xp.concatenate(images, axis=3))), target


def center_crop(hu, mask, shape):
    """Centre crop of [N, H, W] (or context slices' [N, C, H, W]) HU and [N, H, W] mask
    arrays to `shape` (H, W), C-contiguous."""
    h, w = hu.shape[-2:]
    th, tw = (int(v) for v in shape)
    if (h, w) == (th, tw):
        return hu, mask
    r0, c0 = (h - th) // 2, (w - tw) // 2
    window = np.s_[r0:r0 + th, c0:c0 + tw]
    return (np.ascontiguousarray(hu[(..., *window)]),
            np.ascontiguousarray(mask[(slice(None), *window)]))
