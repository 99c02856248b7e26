"""`nodulekit bench ops`: every op of our backend against its PyTorch equivalent.

Shapes are the U-Net's own: on the CPU, the `bench step` default (batch 4, 128x128, width
16); on a GPU, the paper's (batch 12, 512x512, width 64). Each case times our op and
PyTorch's (``nodulekit/reference/torch_ops.py``, channels_last, TF32 off) on the same
inputs, median after warm-up, and states napkin math: GFLOP/s for convolutions (2 FLOPs
per multiply-add), GB/s of compulsory traffic (each input read once, each output written
once) for the memory-bound ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nodulekit.bench.common import median_ms, provenance, require_torch
from nodulekit.engine import get_backend, resolve_device
from nodulekit.nn.layout import level_widths


@dataclass
class Case:
    op: str            # engine op name
    label: str         # what it is in the U-Net
    shape: str         # human-readable shape
    ours: object       # () -> result
    torch_args: tuple  # arguments for torch_ops.make_torch_op(op, ...)
    torch_kwargs: dict
    flops: float = 0.0
    bytes: float = 0.0


def _cases(backend, batch: int, size: int, width: int, depth: int, rng) -> list[Case]:
    # (lambdas bind their arrays as default arguments: names below are reused per case)
    f32 = backend.dtype
    widths = level_widths(depth, width)

    def arr(*shape):
        return rng.standard_normal(shape).astype(f32)

    cases = []

    def conv_cases(label, n, h, c, k, r=3, relu=True):
        x, w, b = arr(n, h, h, c), arr(k, r, r, c) * np.float32(0.1), arr(k)
        xd, wd, bd = (backend.asarray(a) for a in (x, w, b))
        y = backend.conv2d_forward(xd, wd, bd, relu=relu)
        dy = backend.asarray(arr(n, h, h, k))
        flops = 2.0 * n * h * h * k * r * r * c
        shape = f"{n}x{h}x{h}x{c} -> {k}, {r}x{r}"
        cases.append(Case("conv2d_forward", label, shape,
                          lambda: backend.conv2d_forward(xd, wd, bd, relu=relu),
                          (x, w, b), {"relu": relu}, flops))
        cases.append(Case("conv2d_backward", label, shape,
                          lambda: backend.conv2d_backward(dy, xd, wd, y, relu=relu),
                          (backend.to_host(dy), x, w, b), {"relu": relu}, 2 * flops))

    n, s = batch, size
    conv_cases("enc0.conv1 (first layer)", n, s, 1, widths[0])
    conv_cases("enc0.conv2", n, s, widths[0], widths[0])
    conv_cases("dec0.conv1 (after concat)", n, s, 2 * widths[0], widths[0])
    mid = min(2, depth)
    conv_cases(f"enc{mid}.conv2", n, s >> mid, widths[mid], widths[mid])
    conv_cases("bottom.conv2", n, s >> depth, widths[depth], widths[depth])
    conv_cases("head (1x1)", n, s, widths[0], 1, r=1, relu=False)

    # max-pool at level 0
    c0 = widths[0]
    x = arr(n, s, s, c0)
    xd = backend.asarray(x)
    y, argmax = backend.maxpool2x2_forward(xd)
    dy = backend.asarray(arr(*y.shape))
    nbytes = x.nbytes
    cases.append(Case("maxpool2x2_forward", "enc0.pool", f"{n}x{s}x{s}x{c0}",
                      lambda xd=xd: backend.maxpool2x2_forward(xd), (x,), {},
                      bytes=nbytes + nbytes / 4 * 1.25))
    cases.append(Case("maxpool2x2_backward", "enc0.pool", f"{n}x{s}x{s}x{c0}",
                      lambda dy=dy: backend.maxpool2x2_backward(dy, argmax, (s, s)),
                      (backend.to_host(dy), x), {}, bytes=nbytes / 4 * 1.25 + nbytes))

    # up-convolution into level 0
    c1 = widths[1]
    x, w, b = arr(n, s // 2, s // 2, c1), arr(c0, 2, 2, c1) * np.float32(0.1), arr(c0)
    xd, wd, bd = (backend.asarray(a) for a in (x, w, b))
    dy = backend.asarray(arr(n, s, s, c0))
    flops = 2.0 * n * s * s * c0 * c1
    shape = f"{n}x{s // 2}x{s // 2}x{c1} -> {c0}"
    cases.append(Case("upconv2x2_forward", "dec0.up", shape,
                      lambda xd=xd, wd=wd, bd=bd: backend.upconv2x2_forward(xd, wd, bd),
                      (x, w, b), {}, flops))
    cases.append(Case("upconv2x2_backward", "dec0.up", shape,
                      lambda dy=dy, xd=xd, wd=wd: backend.upconv2x2_backward(dy, xd, wd),
                      (backend.to_host(dy), x, w), {}, 2 * flops))

    # concat / split at level 0
    a, bb = backend.asarray(arr(n, s, s, c0)), backend.asarray(arr(n, s, s, c0))
    cat = backend.asarray(arr(n, s, s, 2 * c0))
    nbytes = 4.0 * n * s * s * 2 * c0 * 2
    cases.append(Case("concat_channels", "dec0 concat", f"2 x {n}x{s}x{s}x{c0}",
                      lambda: backend.concat_channels(a, bb),
                      (backend.to_host(a), backend.to_host(bb)), {}, bytes=nbytes))
    cases.append(Case("split_channels", "dec0 concat (backward)", f"{n}x{s}x{s}x{2 * c0}",
                      lambda: backend.split_channels(cat, c0),
                      (backend.to_host(cat), c0), {}, bytes=nbytes))

    # loss, metrics, optimiser, input pipeline
    logits = arr(n, s, s, 1)
    target = (rng.random((n, s, s, 1)) > 0.9).astype(np.uint8)
    ld, td = backend.asarray(logits), backend.asarray(target)
    px = n * s * s
    cases.append(Case("sigmoid_dice_loss", "loss", f"{n}x{s}x{s}x1",
                      lambda: backend.sigmoid_dice_loss(ld, td), (logits, target), {},
                      bytes=px * (4 + 1 + 4)))
    cases.append(Case("confusion_counts", "metrics", f"{n}x{s}x{s}x1",
                      lambda: backend.confusion_counts(ld, td), (logits, target), {},
                      bytes=px * 5))
    from nodulekit.nn.layout import ParameterLayout, unet_parameter_shapes

    total = ParameterLayout(unet_parameter_shapes(depth, width)).total
    p, g = arr(total), arr(total)
    m, v = np.zeros(total, f32), np.abs(arr(total))
    pd, gd, md, vd = (backend.asarray(t) for t in (p, g, m, v))
    cases.append(Case("adam_step", "Adam, all parameters", f"{total:,}",
                      lambda: backend.adam_step(pd, gd, md, vd, 10, 1e-4),
                      (p, g, m, v, 10, 1e-4), {}, bytes=total * 4 * 7))
    hu = rng.integers(-1024, 2000, (n, s, s)).astype(np.int16)
    mask = (rng.random((n, s, s)) > 0.9).astype(np.uint8)
    aug = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n),
                    rng.uniform(-20, 20, n)], axis=1).astype(np.float32)
    hud, maskd, augd = (backend.asarray(t) for t in (hu, mask, aug))
    cases.append(Case("window_augment", "input: window+flip+rotate", f"{n}x{s}x{s}",
                      lambda: backend.window_augment(hud, maskd, augd), (hu, mask, aug), {},
                      bytes=px * (2 + 1 + 4 + 1)))
    return cases


def run_ops_bench(device: str = "cpu", op_filter: str | None = None, repeats: int = 20,
                  warmup: int = 3, batch: int | None = None, size: int | None = None,
                  width: int | None = None, depth: int = 4, seed: int = 0) -> dict:
    require_torch()
    import torch

    from nodulekit.reference.torch_ops import make_torch_op

    backend_name, why = resolve_device(device)
    backend = get_backend(backend_name)
    gpu = backend_name == "cuda"
    batch = batch or (12 if gpu else 4)
    size = size or (512 if gpu else 128)
    width = width or (64 if gpu else 16)
    tdev = "cuda" if gpu else "cpu"
    tsync = torch.cuda.synchronize if gpu else (lambda: None)
    rng = np.random.default_rng(seed)

    timer, copy = median_ms, None
    if gpu:  # GPU time by CUDA events; memory-bound ops against the D2D copy ceiling
        from nodulekit.bench.gpu_timing import copy_bandwidth_gbps, event_median_ms

        timer, copy = event_median_ms, copy_bandwidth_gbps()
    rows = []
    for case in _cases(backend, batch, size, width, depth, rng):
        if op_filter and op_filter not in case.op:
            continue
        ours_ms, _ = timer(case.ours, repeats, warmup, backend.synchronize)
        torch_fn = make_torch_op(case.op, *case.torch_args, device=tdev, **case.torch_kwargs)
        torch_ms, _ = timer(torch_fn, repeats, warmup, tsync)
        row = {"op": case.op, "label": case.label, "shape": case.shape,
               "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": ours_ms / torch_ms}
        if case.flops:
            row["ours_gflops"] = case.flops / ours_ms / 1e6
            row["torch_gflops"] = case.flops / torch_ms / 1e6
        if case.bytes:
            row["ours_gbps"] = case.bytes / ours_ms / 1e6
            row["torch_gbps"] = case.bytes / torch_ms / 1e6
            if copy:
                row["ours_pct_copy"] = 100 * row["ours_gbps"] / copy["gbps"]
                row["torch_pct_copy"] = 100 * row["torch_gbps"] / copy["gbps"]
        rows.append(row)
    return {"benchmark": "ops", **provenance(backend_name), "backend": backend_name,
            "device_choice": why,
            "config": {"batch": batch, "size": size, "width": width, "depth": depth,
                       "repeats": repeats, "warmup": warmup, "precision": backend.precision,
                       "timing": "CUDA events" if gpu else "host clock"},
            **({"copy_bandwidth": copy} if copy else {}), "ops": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"device: {result['device']}  ({result['device_choice']})",
             f"U-Net shapes: batch {c['batch']}, {c['size']}x{c['size']}, width {c['width']}, "
             f"{c['precision']}; median of {c['repeats']}; ratio = ours / torch",
             *([f"device-to-device copy: {result['copy_bandwidth']['gbps']:.0f} GB/s (read + "
                f"written); memory-bound ops show % of it"] if "copy_bandwidth" in result
               else []),
             f"{'op':<20} {'where':<26} {'shape':<26} {'ours ms':>9} {'torch ms':>9} "
             f"{'ratio':>6}  napkin (ours | torch)"]
    for r in result["ops"]:
        if "ours_gflops" in r:
            napkin = f"{r['ours_gflops']:.1f} | {r['torch_gflops']:.1f} GFLOP/s"
        elif "ours_gbps" in r:
            napkin = f"{r['ours_gbps']:.1f} | {r['torch_gbps']:.1f} GB/s"
            if "ours_pct_copy" in r:
                napkin += f" ({r['ours_pct_copy']:.0f}% | {r['torch_pct_copy']:.0f}% of copy)"
        else:
            napkin = ""
        lines.append(f"{r['op']:<20} {r['label']:<26} {r['shape']:<26} {r['ours_ms']:9.3f} "
                     f"{r['torch_ms']:9.3f} {r['ratio']:6.2f}  {napkin}")
    return "\n".join(lines)
