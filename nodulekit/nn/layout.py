"""The U-Net's parameters: names, shapes and their places in one flat buffer.

All parameters live in ONE flat float buffer and each tensor is a view into it; the
gradients likewise. So Adam is one launch and a data-parallel all-reduce is one call.
The order below is fixed: it is the order of the buffer and of He initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def level_widths(depth: int, width: int) -> list[int]:
    """Channels at each level: width * 2**level for level 0..depth (depth+1 levels)."""
    return [width * 2**level for level in range(depth + 1)]


def unet_parameter_shapes(depth: int, width: int, in_channels: int = 1):
    """[(name, shape)] in buffer order. Conv weights [K,R,S,C], up-conv [K,2,2,C], biases [K]."""
    if depth < 1 or width < 1 or in_channels < 1:
        raise ValueError(f"U-Net needs depth >= 1, width >= 1, in_channels >= 1; got "
                         f"depth={depth}, width={width}, in_channels={in_channels}")
    widths = level_widths(depth, width)
    shapes = []

    def conv(name, k, c, r=3):
        shapes.append((f"{name}.w", (k, r, r, c)))
        shapes.append((f"{name}.b", (k,)))

    c = in_channels
    for level in range(depth):
        conv(f"enc{level}.conv1", widths[level], c)
        conv(f"enc{level}.conv2", widths[level], widths[level])
        c = widths[level]
    conv("bottom.conv1", widths[depth], c)
    conv("bottom.conv2", widths[depth], widths[depth])
    for level in reversed(range(depth)):
        k = widths[level]
        shapes.append((f"dec{level}.up.w", (k, 2, 2, widths[level + 1])))
        shapes.append((f"dec{level}.up.b", (k,)))
        conv(f"dec{level}.conv1", k, 2 * k)  # skip (k) + up (k) channels
        conv(f"dec{level}.conv2", k, k)
    conv("head", 1, widths[0], r=1)
    return shapes


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple
    offset: int
    size: int


class ParameterLayout:
    """Where each named tensor sits in the flat buffer."""

    def __init__(self, shapes):
        self.slots: dict[str, Slot] = {}
        offset = 0
        for name, shape in shapes:
            size = math.prod(shape)
            self.slots[name] = Slot(name, tuple(shape), offset, size)
            offset += size
        self.total = offset

    def views(self, flat) -> dict:
        """name -> view of ``flat`` (NumPy or CuPy) with the tensor's shape; no copies."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat buffer must have shape ({self.total},), got {flat.shape}")
        return {s.name: flat[s.offset:s.offset + s.size].reshape(s.shape)
                for s in self.slots.values()}

    def he_normal(self, seed: int) -> np.ndarray:
        """He-normal weights (std sqrt(2 / fan_in)), zero biases, float64, from a seed.

        fan_in is what one output sums over: R*S*C for a convolution, C for the 2x2
        stride-2 up-convolution (each output pixel sees one tap per input channel).
        """
        rng = np.random.default_rng(seed)
        flat = np.zeros(self.total, dtype=np.float64)
        for s in self.slots.values():
            if len(s.shape) == 1:
                continue
            fan_in = s.shape[3] if ".up." in s.name else s.shape[1] * s.shape[2] * s.shape[3]
            flat[s.offset:s.offset + s.size] = rng.standard_normal(s.size) * math.sqrt(2 / fan_in)
        return flat
