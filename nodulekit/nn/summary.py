"""The U-Net layer by layer: output shape, parameters, FLOPs, activation memory.

What `nodulekit inspect` prints. Computed from the architecture alone (nothing runs), in the
order `UNet.forward` runs the layers, with the same names as the parameter layout:

- FLOPs count 2 per multiply-accumulate of the layer's convolution (the bias add, the
  ReLU, max-pool comparisons and copies are not counted); a 3x3 convolution of C to K
  channels on an N x H x W input: ``2 N H W K 9 C``; the 2x2 stride-2 up-convolution:
  ``2 N (2H)(2W) K C``.
- Backward FLOPs: a convolution's weight gradient and input gradient each cost what its
  forward does (the first layer needs no input gradient); a training step is about
  forward + backward.
- Activation bytes: the layer's output in the backend's float (4 bytes), plus the max-pool's
  uint8 argmax: what the forward pass allocates, and keeps for the backward pass.
- With a norm (``norm`` "instance" or "batch") each 3x3 convolution (no bias, no ReLU) is
  followed by its norm layer (``enc0.conv1`` by ``enc0.norm1``: gamma and beta, the ReLU
  fused), whose FLOPs are not counted either (a few per element: memory-bound); its
  output is a second activation kept for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodulekit.nn.layout import check_norm, level_widths, norm_name

NORM_OPS = {"instance": "instnorm+relu", "batch": "batchnorm+relu"}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    output_shape: tuple[int, int, int, int]  # N, H, W, C
    params: int
    flops: int  # forward
    backward_flops: int
    activation_bytes: int


def unet_layers(depth: int = 4, width: int = 64, size=(512, 512), batch: int = 1,
                in_channels: int = 1, float_bytes: int = 4,
                norm: str = "none") -> list[LayerInfo]:
    """Every layer of a U-Net for an N x H x W input; see the module docstring."""
    check_norm(norm)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = 2**depth
    if h % f or w % f or h <= 0 or w <= 0:
        raise ValueError(f"input {h}x{w} is not divisible by 2**depth = {f} (depth {depth})")
    n = int(batch)
    widths = level_widths(depth, width)
    layers: list[LayerInfo] = []

    def conv(name, c, k, hh, ww, r=3, first=False, relu=True):
        macs = n * hh * ww * k * r * r * c
        normed = relu and norm != "none"  # then: no bias, the ReLU in the norm
        layers.append(LayerInfo(name, f"conv{r}x{r}" + ("+relu" if relu and not normed else ""),
                                (n, hh, ww, k), k * r * r * c + (0 if normed else k), 2 * macs,
                                2 * macs * (1 if first else 2), n * hh * ww * k * float_bytes))
        if normed:
            layers.append(LayerInfo(norm_name(name), NORM_OPS[norm], (n, hh, ww, k), 2 * k, 0,
                                    0, n * hh * ww * k * float_bytes))

    c, hh, ww = in_channels, h, w
    for level in range(depth):
        k = widths[level]
        conv(f"enc{level}.conv1", c, k, hh, ww, first=level == 0)
        conv(f"enc{level}.conv2", k, k, hh, ww)
        hh, ww = hh // 2, ww // 2
        layers.append(LayerInfo(f"enc{level}.pool", "maxpool2x2", (n, hh, ww, k), 0, 0, 0,
                                n * hh * ww * k * (float_bytes + 1)))
        c = k
    conv("bottom.conv1", c, widths[depth], hh, ww)
    conv("bottom.conv2", widths[depth], widths[depth], hh, ww)
    c = widths[depth]
    for level in reversed(range(depth)):
        k = widths[level]
        hh, ww = hh * 2, ww * 2
        macs = n * hh * ww * k * c
        layers.append(LayerInfo(f"dec{level}.up", "upconv2x2", (n, hh, ww, k), 4 * c * k + k,
                                2 * macs, 4 * macs, n * hh * ww * k * float_bytes))
        layers.append(LayerInfo(f"dec{level}.concat", "concat", (n, hh, ww, 2 * k), 0, 0, 0,
                                n * hh * ww * 2 * k * float_bytes))
        conv(f"dec{level}.conv1", 2 * k, k, hh, ww)
        conv(f"dec{level}.conv2", k, k, hh, ww)
        c = k
    conv("head", c, 1, hh, ww, r=1, relu=False)
    return layers


def totals(layers: list[LayerInfo]) -> dict:
    params = sum(x.params for x in layers)
    fwd = sum(x.flops for x in layers)
    bwd = sum(x.backward_flops for x in layers)
    act = sum(x.activation_bytes for x in layers)
    return {"params": params, "flops": fwd, "backward_flops": bwd,
            "training_step_flops": fwd + bwd, "activation_bytes": act,
            "param_bytes": 4 * params,
            # params + grads + Adam's m and v, and the activations kept for backward
            "training_bytes": 16 * params + act}


def _human(v: float, unit: str = "", base: float = 1000.0) -> str:
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(v) < base or prefix == "P":
            return f"{v:.1f} {prefix}{unit}" if prefix else f"{v:.0f} {unit}".rstrip()
        v /= base
    raise AssertionError


def _bytes(v: float) -> str:
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or prefix == "TiB":
            return f"{v:.0f} B" if prefix == "B" else f"{v:.1f} {prefix}"
        v /= 1024
    raise AssertionError


def format_layers(layers: list[LayerInfo], title: str = "") -> str:
    ow = max([13] + [len(x.op) + 1 for x in layers])  # the op column: 13, or the longest
    head = (f"{'layer':<14s}{'op':<{ow}s}{'output (N,H,W,C)':<22s}{'params':>11s}"
            f"{'FLOPs':>12s}{'activations':>13s}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for x in layers:
        shape = "(" + ", ".join(map(str, x.output_shape)) + ")"
        lines.append(f"{x.name:<14s}{x.op:<{ow}s}{shape:<22s}{x.params:>11,d}"
                     f"{_human(x.flops, 'FLOP'):>12s}{_bytes(x.activation_bytes):>13s}")
    t = totals(layers)
    lines.append("-" * len(head))
    lines.append(f"{'total':<{36 + ow}s}{t['params']:>11,d}{_human(t['flops'], 'FLOP'):>12s}"
                 f"{_bytes(t['activation_bytes']):>13s}")
    lines.append(f"parameters {t['params']:,} ({_bytes(t['param_bytes'])}); forward "
                 f"{_human(t['flops'], 'FLOP')}, backward {_human(t['backward_flops'], 'FLOP')},"
                 f" training step {_human(t['training_step_flops'], 'FLOP')} (2 per MAC)")
    lines.append(f"activations {_bytes(t['activation_bytes'])}; training memory about "
                 f"{_bytes(t['training_bytes'])} (activations + parameters, gradients, Adam m "
                 "and v)")
    return "\n".join(lines)
