"""Nodule masks from PNG files, checked: binary, one channel, the slice's size.

UniToChest stores masks as 8-bit PNG with 0 (background) and 255 (nodule). Copies in the
wild also use 0/1, 1-bit PNG, or grey RGB; those are read as the same thing. Anything
else (grey levels from resampling, colours, a size other than the slice's) is a
`MaskError` naming the file and what is wrong: a mask is never thresholded by guess.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError


class MaskError(ValueError):
    """A mask that cannot be used as-is; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG mask as uint8 (H, W) in {0, 1}; `shape` is the slice's (H, W) to match."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            # A palette image's indices mean nothing by themselves: use its grey values.
            pixels = np.asarray(im.convert("L") if mode == "P" else im)
    except FileNotFoundError:
        raise MaskError(path, "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MaskError(path, f"not a readable image ({e})") from None

    if pixels.ndim == 3:
        # Grey saved as RGB(A): equal colour channels are one channel; alpha is ignored.
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
        if not (colour == colour[..., :1]).all():
            raise MaskError(path, f"colour mask (mode {mode}): channels differ, so it is "
                                  "not a binary mask")
        pixels = colour[..., 0]
    if pixels.ndim != 2:
        raise MaskError(path, f"unexpected image shape {pixels.shape} (mode {mode})")
    if shape is not None and tuple(pixels.shape) != tuple(shape):
        raise MaskError(path, f"size {pixels.shape[0]}x{pixels.shape[1]} differs from its "
                              f"slice's {shape[0]}x{shape[1]}")
    return binarize(pixels, path)


def binarize(pixels: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """{0, 255}, {0, 1} or boolean pixels as uint8 {0, 1}; anything else is a MaskError."""
    if pixels.dtype == bool:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    # Masks are mostly zeros: look at the set pixels only (one pass over the image).
    nodule = pixels != 0
    values = pixels[nodule]
    if values.size == 0:
        return nodule.view(np.uint8)
    top = values.max()
    if values.min() == top and top in (1, 255):
        return nodule.view(np.uint8)  # bool and uint8 share their layout: no copy
    found = ([0] if values.size < pixels.size else []) + np.unique(values).tolist()
    shown = ", ".join(str(v) for v in found[:6]) + (", ..." if len(found) > 6 else "")
    raise MaskError(path, f"not a binary mask: values {{{shown}}} ({len(found)} distinct); "
                          "expected 0/255 or 0/1")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Save a {0, 1} mask as an 8-bit PNG with 0 / 255, as UniToChest does."""
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(path)
