"""Whole slices of any size through the U-Net: padding with air, and tiles where memory asks.

The U-Net is fully convolutional, so validation, `evaluate` and `predict` run it on the whole
slice at its native size (training may use crops). Two things stand between a slice and the
network:

- **Size.** The network takes H and W that are multiples of 2**depth (its poolings). A slice
  of another size is padded, centred, with air (-1000 HU, what the training augmentation
  fills with outside the image; 0 in the mask) up to the next multiple, run, and the logits
  cropped back (`pad_to_multiple`, `crop`): the metrics and the masks see the slice's own
  pixels only.
- **Memory.** The forward pass's activations grow with the pixels (a width-64 depth-4 U-Net
  makes 3.5 kB of them per input pixel, 0.9 GB for one 512 x 512 slice, as `nodulekit
  inspect` counts them). `plan` estimates a batch's bytes from the layer widths
  (`nodulekit.nn.summary`) and, over a budget (`default_budget`: a quarter of the free
  memory, or ``NODULEKIT_INFER_MEMORY_MB``), runs fewer slices per pass, and where even one
  slice is too big, tiles it.

Tiles give the same logits as the whole slice, up to float rounding. A logit depends on the
input within the network's receptive field; what differs between a tile and the whole slice
is only the zero padding of every 3x3 convolution at the tile's border, which moves inwards
layer by layer. `halo` follows it through the network: each 3x3 convolution at level l
(pixels 2**l input pixels wide) moves it 2**l input pixels, a 2x2 max-pool rounds it up to
its own pixel, an up-convolution takes each output pixel from one input pixel (no spread),
and the skip joining it carries less. For depth D that is 3 * 2**(D+1) - 4 (depth 4: 92) plus
the poolings' rounding (depth 4: 94 pixels). Each tile is read with `tile_halo` (the halo
rounded up to a multiple of 2**depth, so every tile starts on the pooling grid) of real
pixels around it on every side that is not the slice's own border (where the whole slice is
zero-padded too), and only its centre is kept.

Normalisation: batch norm evaluates with its running statistics, per pixel, so tiling is
exact. Instance norm takes statistics over the whole input: it is never tiled (auto runs the
whole slice whatever the budget; an explicit tile size is refused); padding a slice with air
changes its statistics a little too.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from nodulekit.nn.inputs import window_input

AIR_HU = -1000  # what pads a slice (and what the training augmentation fills with)
MEMORY_ENV = "NODULEKIT_INFER_MEMORY_MB"
TILE_MODES = ("auto", "off")


def parse_tile(value) -> str | int:
    """A `--tile` value: "auto" (tile when the estimate exceeds the budget), "off" (never),
    or a tile size in pixels (each tile's kept centre; rounded up to a multiple of
    2**depth)."""
    if value is None:
        return "auto"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        size = int(value)
    else:
        text = str(value).strip().lower()
        if text in TILE_MODES:
            return text
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"--tile must be 'auto', 'off' or a tile size in pixels, got "
                             f"{value!r}") from None
    if size < 1:
        raise ValueError(f"--tile size must be >= 1 pixel, got {size}")
    return size


def halo(depth: int) -> int:
    """How far (in input pixels) a tile's border zero padding reaches into its logits, for a
    depth-`depth` U-Net (see the module docstring)."""
    d = 0
    for level in range(depth):
        d += 2 * 2**level  # two 3x3 convolutions at this level
        pixel = 2 ** (level + 1)
        d = -(-d // pixel) * pixel  # max-pool: a pooled pixel with one touched input is touched
    d += 2 * 2**depth  # the bottom's two convolutions
    for level in reversed(range(depth)):
        d += 2 * 2**level  # up-convolution: no spread; then two 3x3 convolutions
    return d


def tile_halo(depth: int) -> int:
    """`halo` rounded up to a multiple of 2**depth: the real pixels read around each tile."""
    f = 2**depth
    return -(-halo(depth) // f) * f


@functools.lru_cache(maxsize=64)
def _bytes_per_pixel(depth: int, width: int, in_channels: int, norm: str) -> float:
    from nodulekit.nn.summary import totals, unet_layers

    f = 2**depth
    layers = unet_layers(depth, width, size=(f, f), batch=1, in_channels=in_channels, norm=norm)
    return totals(layers)["activation_bytes"] / (f * f)


def bytes_per_pixel(model) -> float:
    """The forward pass's activation bytes per input pixel (every layer's output, as
    `nodulekit inspect` counts them: an upper bound of what inference holds at once)."""
    return _bytes_per_pixel(model.depth, model.width, model.in_channels, model.norm)


def default_budget(backend) -> int:
    """Bytes the forward pass may take: ``NODULEKIT_INFER_MEMORY_MB`` if set, else a quarter
    of the device's free memory (the GPU's, or the host's available RAM), at least 256 MiB."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={env!r}: not a number of MiB") from None
        if not mb > 0:
            raise ValueError(f"{MEMORY_ENV}={env!r}: must be > 0 MiB")
        return int(mb * 2**20)
    free = None
    if getattr(backend, "name", "cpu") == "cuda":
        try:
            # CuPy's pool keeps freed blocks for reuse: free to us, used to the driver
            free = (int(backend.xp.cuda.runtime.memGetInfo()[0])
                    + int(backend.xp.get_default_memory_pool().free_bytes()))
        except Exception:  # no runtime to ask: assume a small GPU
            free = 4 << 30
    else:
        free = _host_available()
    return max(256 << 20, free // 4)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass(frozen=True)
class Plan:
    """How one batch of N x H x W goes through the network."""

    slices_per_pass: int  # slices per forward pass (N: all at once)
    tile: int | None  # the kept centre of each tile, pixels (None: whole slices)
    halo: int  # real pixels read around each tile
    estimate: int  # activation bytes of the whole batch in one pass
    budget: int | None  # None: not asked (tile given, or "off")

    def describe(self) -> str:
        if self.tile is None:
            return "whole slices"
        return (f"{self.tile}x{self.tile} tiles read with {self.halo} pixels around them, "
                "the network's reach, one slice at a time")


def plan(model, shape, tile="auto", budget: int | None = None) -> Plan:
    """The plan for a batch of `shape` (N, H, W[, C]) already padded to multiples of
    2**depth. tile: "auto", "off" or a size (`parse_tile`); budget: bytes (default
    `default_budget`)."""
    n, h, w = (int(v) for v in shape[:3])
    f = 2**model.depth
    if h % f or w % f:
        raise ValueError(f"plan: {h}x{w} is not a multiple of 2**depth = {f}; pad it first")
    tile = parse_tile(tile)
    per_pixel = bytes_per_pixel(model)
    estimate = int(math.ceil(n * h * w * per_pixel))
    pad = tile_halo(model.depth)
    if isinstance(tile, int):
        if model.norm == "instance":
            raise ValueError("--tile: instance norm takes its statistics over the whole slice, "
                             "so tiles would not give the untiled result; use --tile auto or off")
        size = max(f, -(-tile // f) * f)
        return Plan(1, size, pad, estimate, None)
    if tile == "off":
        return Plan(n, None, pad, estimate, None)
    budget = int(budget) if budget is not None else default_budget(model.backend)
    if estimate <= budget:
        return Plan(n, None, pad, estimate, budget)
    per_slice = h * w * per_pixel
    if per_slice <= budget or model.norm == "instance":
        return Plan(max(1, int(budget // per_slice)), None, pad, estimate, budget)
    side = math.isqrt(max(1, int(budget / per_pixel)))  # the largest window that fits
    size = max(f, (side - 2 * pad) // f * f)
    return Plan(1, size, pad, estimate, budget)


def run_hu(model, hu: np.ndarray, mask: np.ndarray, window=(-500.0, 1600.0), tile="auto",
           budget: int | None = None):
    """(logits, target, image) on the device for host HU [N, H, W] (int16; with context
    slices [N, C, H, W]) and masks [N, H, W] at any size: padded with air to a multiple of
    2**depth (`pad_to_multiple`), windowed (window = (center, width); no augmentation),
    through the network whole or in tiles (`plan`, `forward`), and cropped back to H x W."""
    be = model.backend
    center, width = (float(v) for v in window)
    hu, mask, box = pad_to_multiple(hu, mask, 2**model.depth)
    aug = np.zeros((hu.shape[0], 3), np.float32)
    image, target = window_input(be, hu, mask, aug, center, width)  # context: as channels
    logits = forward(model, image, plan(model, image.shape, tile, budget))
    return crop(be, logits, box), crop(be, target, box), crop(be, image, box)


def forward(model, image, how: Plan | None = None):
    """Logits [N, H, W, 1] of `image` [N, H, W, C] (H, W multiples of 2**depth) as `how`
    says (default: `plan` with its defaults)."""
    how = how if how is not None else plan(model, image.shape)
    n = image.shape[0]
    xp = model.backend.xp
    if how.tile is None and how.slices_per_pass >= n:
        return model.forward(image, keep_for_backward=False)
    step = how.slices_per_pass
    parts = []
    for j in range(0, n, step):
        part = image[j:j + step] if n > step else image
        if how.tile is None:
            parts.append(model.forward(xp.ascontiguousarray(part), keep_for_backward=False))
        else:
            parts.append(forward_tiled(model, part, how.tile, how.halo))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)


def forward_tiled(model, image, tile: int, pad: int | None = None):
    """Logits of `image` [N, H, W, C] computed tile by tile: each `tile` x `tile` block (a
    multiple of 2**depth) read with `pad` real pixels around it (default `tile_halo`, the
    least that gives the untiled logits), only its centre kept."""
    be = model.backend
    xp = be.xp
    f = 2**model.depth
    n, h, w = image.shape[:3]
    pad = tile_halo(model.depth) if pad is None else int(pad)
    if tile % f or pad % f:
        raise ValueError(f"tile {tile} and overlap {pad} must be multiples of 2**depth = {f}")
    out = be.empty((n, h, w, 1))
    for y0 in range(0, h, tile):
        y1 = min(h, y0 + tile)
        a, b = max(0, y0 - pad), min(h, y1 + pad)
        for x0 in range(0, w, tile):
            x1 = min(w, x0 + tile)
            c, d = max(0, x0 - pad), min(w, x1 + pad)
            window = xp.ascontiguousarray(image[:, a:b, c:d, :])
            z = model.forward(window, keep_for_backward=False)
            out[:, y0:y1, x0:x1, :] = z[:, y0 - a:y1 - a, x0 - c:x1 - c, :]
    return out


def padded_size(shape, multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `multiple`: what a slice of `shape` runs at."""
    return tuple(-(-int(v) // multiple) * multiple for v in shape)


def pad_to_multiple(hu: np.ndarray, mask: np.ndarray, multiple: int):
    """(hu, mask, box): host HU [..., H, W] (slices [N, H, W] or with context channels
    [N, C, H, W]) and masks [N, H, W] padded, centred, to multiples of `multiple` with air
    (`AIR_HU`) and 0; box = (row, col, H, W) of the original inside (the arrays themselves
    when no padding is needed)."""
    h, w = hu.shape[-2:]
    ph, pw = padded_size((h, w), multiple)
    if (ph, pw) == (h, w):
        return hu, mask, (0, 0, h, w)
    r0, c0 = (ph - h) // 2, (pw - w) // 2
    big = np.full((*hu.shape[:-2], ph, pw), AIR_HU, dtype=hu.dtype)
    big[..., r0:r0 + h, c0:c0 + w] = hu
    big_mask = np.zeros((mask.shape[0], ph, pw), dtype=mask.dtype)
    big_mask[:, r0:r0 + h, c0:c0 + w] = mask
    return big, big_mask, (r0, c0, h, w)


def crop(backend, a, box):
    """`a` [N, H', W', ...] (a backend array) cropped to box = (row, col, H, W), contiguous;
    `a` itself when the box is all of it."""
    r0, c0, h, w = box
    if a.shape[1:3] == (h, w):
        return a
    return backend.xp.ascontiguousarray(a[:, r0:r0 + h, c0:c0 + w])


def padded_shape(shape, depth: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of 2**depth."""
    f = 2**depth
    h, w = (int(v) for v in shape[:2])
    return -(-h // f) * f, -(-w // f) * f
