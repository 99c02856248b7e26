"""The U-Net's parameters: names, shapes and their places in one flat buffer.

All parameters live in ONE flat float buffer and each tensor is a view into it; the
gradients likewise. So Adam is one launch and a data-parallel all-reduce is one call.
The order below is fixed: it is the order of the buffer and of He initialisation.

With a normalisation layer (``norm`` "instance" or "batch", after every 3x3 convolution)
the convolution has no bias (the norm's mean subtraction would cancel it: its gradient is
zero up to rounding, which Adam would blow up into lr-sized steps of noise) and the norm
has ``gamma`` (1 at start) and ``beta`` (0), named after the convolution: ``enc0.conv1``
is followed by ``enc0.norm1``. Batch norm's running mean and variance are not parameters
(no gradient, no Adam): they live in a second flat buffer (`unet_buffer_shapes`), saved
in checkpoints beside the parameters. ``norm`` "none" is the paper's U-Net, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def level_widths(depth: int, width: int) -> list[int]:
    """Channels at each level: width * 2**level for level 0..depth (depth+1 levels)."""
    return [width * 2**level for level in range(depth + 1)]


NORMS = ("none", "instance", "batch")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    return norm


def norm_name(conv: str) -> str:
    """The normalisation layer after a 3x3 convolution: enc0.conv1 -> enc0.norm1."""
    block, _, layer = conv.rpartition(".")
    return f"{block}.{layer.replace('conv', 'norm')}"


def _normalised_convs(depth: int) -> list[str]:
    """The 3x3 convolutions, in forward order: each is followed by the norm (if any)."""
    names = [f"enc{level}.conv{i}" for level in range(depth) for i in (1, 2)]
    names += ["bottom.conv1", "bottom.conv2"]
    return names + [f"dec{level}.conv{i}" for level in reversed(range(depth)) for i in (1, 2)]


def unet_parameter_shapes(depth: int, width: int, in_channels: int = 1, norm: str = "none"):
    """[(name, shape)] in buffer order. Conv weights [K,R,S,C], up-conv [K,2,2,C], biases [K];
    with a norm, each 3x3 convolution's bias gives way to its norm's gamma and beta [K]."""
    if depth < 1 or width < 1 or in_channels < 1:
        raise ValueError(f"U-Net needs depth >= 1, width >= 1, in_channels >= 1; got "
                         f"depth={depth}, width={width}, in_channels={in_channels}")
    check_norm(norm)
    widths = level_widths(depth, width)
    shapes = []

    def conv(name, k, c, r=3):
        shapes.append((f"{name}.w", (k, r, r, c)))
        if norm == "none" or r == 1:
            shapes.append((f"{name}.b", (k,)))
        else:
            shapes.append((f"{norm_name(name)}.gamma", (k,)))
            shapes.append((f"{norm_name(name)}.beta", (k,)))

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


def unet_buffer_shapes(depth: int, width: int, norm: str = "none"):
    """[(name, shape)] of the buffers that are not parameters: batch norm's running mean
    and variance [K] per norm layer, in forward order; none for the other norms."""
    if check_norm(norm) != "batch":
        return []
    params, shapes = dict(unet_parameter_shapes(depth, width, 1, norm)), []
    for conv in _normalised_convs(depth):
        k = params[f"{conv}.w"][0]
        shapes += [(f"{norm_name(conv)}.running_mean", (k,)),
                   (f"{norm_name(conv)}.running_var", (k,))]
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
        """He-normal weights (std sqrt(2 / fan_in)), zero biases, float64, from a seed;
        a norm's gamma 1 and beta 0 (vectors draw nothing: the weights are the same
        draws with or without a norm).

        fan_in is what one output sums over: R*S*C for a convolution, C for the 2x2
        stride-2 up-convolution (each output pixel sees one tap per input channel).
        """
        rng = np.random.default_rng(seed)
        flat = np.zeros(self.total, dtype=np.float64)
        for s in self.slots.values():
            if len(s.shape) == 1:
                if s.name.endswith(".gamma"):
                    flat[s.offset:s.offset + s.size] = 1.0
                continue
            fan_in = s.shape[3] if ".up." in s.name else s.shape[1] * s.shape[2] * s.shape[3]
            flat[s.offset:s.offset + s.size] = rng.standard_normal(s.size) * math.sqrt(2 / fan_in)
        return flat

    def initial_buffers(self) -> np.ndarray:
        """The buffers' start, float64: running means 0, running variances 1 (PyTorch's)."""
        flat = np.zeros(self.total, dtype=np.float64)
        for s in self.slots.values():
            if s.name.endswith(".running_var"):
                flat[s.offset:s.offset + s.size] = 1.0
        return flat
