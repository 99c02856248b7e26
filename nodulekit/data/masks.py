"""Nodule masks from PNG files, checked: binary, one channel, the slice's size.

UniToChest stores masks as 8-bit PNG with 0 (background) and 255 (nodule). Copies in the
wild also use 0/1, 1-bit PNG, or grey RGB; those are read as the same thing. Anything
else (grey levels from resampling, colours, a size other than the slice's) is a
`MaskError` naming the file and what is wrong: a mask is never thresholded by guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    return read_mask_box(path, shape).full()


@dataclass(frozen=True)
class MaskBox:
    """A mask as the bounding box of its set pixels: what the pipeline needs of a mostly
    empty mask, without whole-image passes over it."""

    shape: tuple[int, int]  # the whole mask's (H, W)
    top: int
    left: int
    pixels: np.ndarray  # uint8 {0, 1}: the box, shape (0, 0) for an empty mask

    @property
    def empty(self) -> bool:
        return self.pixels.size == 0

    def full(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole mask, uint8 (H, W) in {0, 1}; into `out` when given (same shape)."""
        if out is None:
            out = np.zeros(self.shape, dtype=np.uint8)
        else:
            out.fill(0)
        h, w = self.pixels.shape
        out[self.top:self.top + h, self.left:self.left + w] = self.pixels
        return out


def read_mask_box(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> MaskBox:
    """`read_mask`, as the bounding box of the set pixels (same checks, same errors).

    For a grey or 1-bit image (UniToChest's masks) only the bounding box that Pillow finds
    is turned into an array and checked: PNG inflation is then the only whole-image work.
    """
    box = None
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "1"):
                width, height = im.size
                bbox = im.getbbox()
                if bbox is not None:
                    box = np.asarray(im.crop(bbox))
            else:
                # A palette image's indices mean nothing by themselves: use its grey values.
                pixels = np.asarray(im.convert("L") if mode == "P" else im)
    except FileNotFoundError:
        raise MaskError(path, "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MaskError(path, f"not a readable image ({e})") from None

    if mode in ("L", "1"):
        _check_shape(path, (height, width), shape)
        if box is None:
            return MaskBox((height, width), 0, 0, np.zeros((0, 0), dtype=np.uint8))
        left, top, right, bottom = bbox
        whole = (right - left, bottom - top) == (width, height)
        return MaskBox((height, width), top, left,
                       binarize(box, path, zeros_elsewhere=not whole))
    if pixels.ndim == 3:
        # Grey saved as RGB(A): equal colour channels are one channel; alpha is ignored.
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
        if not (colour == colour[..., :1]).all():
            raise MaskError(path, f"colour mask (mode {mode}): channels differ, so it is "
                                  "not a binary mask")
        pixels = colour[..., 0]
    if pixels.ndim != 2:
        raise MaskError(path, f"unexpected image shape {pixels.shape} (mode {mode})")
    _check_shape(path, pixels.shape, shape)
    mask = binarize(pixels, path)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return MaskBox(mask.shape, 0, 0, np.zeros((0, 0), dtype=np.uint8))
    top, left = int(rows[0]), int(cols[0])
    box = mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1]
    return MaskBox(mask.shape, top, left, np.ascontiguousarray(box))


def _check_shape(path, found: tuple[int, int], shape: tuple[int, int] | None) -> None:
    if shape is not None and tuple(found) != tuple(shape):
        raise MaskError(path, f"size {found[0]}x{found[1]} differs from its slice's "
                              f"{shape[0]}x{shape[1]}")


def binarize(pixels: np.ndarray, path: str | os.PathLike = "<array>", *,
             zeros_elsewhere: bool = False) -> np.ndarray:
    """{0, 255}, {0, 1} or boolean pixels as uint8 {0, 1}; anything else is a MaskError.

    zeros_elsewhere: `pixels` is a part of a mask whose other pixels are all 0 (for the
    error message, which lists the values found).
    """
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
    zeros = zeros_elsewhere or values.size < pixels.size
    found = ([0] if zeros else []) + np.unique(values).tolist()
    shown = ", ".join(str(v) for v in found[:6]) + (", ..." if len(found) > 6 else "")
    raise MaskError(path, f"not a binary mask: values {{{shown}}} ({len(found)} distinct); "
                          "expected 0/255 or 0/1")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Save a {0, 1} mask as an 8-bit PNG with 0 / 255, as UniToChest does."""
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(path)
