"""`nodulekit bench ops`: every op of our backend against its PyTorch equivalent.

Shapes are the U-Net's own: on the CPU, the `bench step` default (batch 4, 128x128, width
16); on a GPU, the paper's (batch 12, 512x512, width 64). Each case times our op and
PyTorch's (``nodulekit/reference/torch_ops.py``, channels_last, TF32 off) on the same
inputs, median after warm-up, and states napkin math: GFLOP/s for convolutions (2 FLOPs
per multiply-add), GB/s of compulsory traffic (each input read once, each output written
once) for the memory-bound ops.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nodulekit.bench.common import (
    interleaved_median_ms,
    median_ms,
    provenance,
    require_torch,
)
from nodulekit.engine import get_backend, resolve_device
from nodulekit.nn.layout import level_widths


class BenchUnavailableError(RuntimeError):
    """The benchmark cannot run on this machine (the CUDA versions without a usable GPU);
    the message says why. ``nodulekit bench ops`` prints it as an error."""


class UnknownVariantError(ValueError):
    """A convolution version that the backend does not have; the message lists those it
    has. ``nodulekit bench ops --variants`` reports it as a bad option value."""


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

    # normalisation (+ ReLU) after a level-0 convolution and at the bottom
    cases += _norm_cases(backend, arr, "enc0.norm1", (n, s, s, c0))
    cases += _norm_cases(backend, arr, "bottom.norm2",
                         (n, s >> depth, s >> depth, widths[depth]))

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


def _norm_cases(backend, arr, where: str, shape: tuple[int, int, int, int]) -> list[Case]:
    """Instance and batch norm (training), forward and backward, ReLU fused, on an
    activation of ``shape``: the compulsory traffic is x read and y written forward; dy, x,
    y read and dx written backward (torch redoes its forward from x instead of reading y)."""
    n, h, w, c = shape
    x, gamma, beta, dy = arr(*shape), 1 + 0.1 * arr(c), arr(c), arr(*shape)
    xd, gd, bd, dyd = (backend.asarray(a) for a in (x, gamma, beta, dy))
    nbytes = 4.0 * x.size
    label, dims = f"{where} (+ReLU)", f"{n}x{h}x{w}x{c}"
    y, mean, invstd = backend.instance_norm_forward(xd, gd, bd, relu=True)
    cases = [Case("instance_norm_forward", label, dims,
                  lambda: backend.instance_norm_forward(xd, gd, bd, relu=True),
                  (x, gamma, beta), {"relu": True}, bytes=2 * nbytes),
             Case("instance_norm_backward", label, dims,
                  lambda y=y, m=mean, s=invstd: backend.instance_norm_backward(
                      dyd, xd, y, m, s, gd, relu=True),
                  (dy, x, gamma, beta), {"relu": True}, bytes=4 * nbytes)]
    running = (np.zeros(c, backend.dtype), np.ones(c, backend.dtype))
    rm, rv = (backend.asarray(a) for a in running)
    y, mean, invstd = backend.batch_norm_forward(xd, gd, bd, rm, rv, relu=True)
    cases += [Case("batch_norm_forward", label, dims,
                   lambda: backend.batch_norm_forward(xd, gd, bd, rm, rv, relu=True),
                   (x, gamma, beta, *running), {"relu": True}, bytes=2 * nbytes),
              Case("batch_norm_backward", label, dims,
                   lambda y=y, m=mean, s=invstd: backend.batch_norm_backward(
                       dyd, xd, y, m, s, gd, relu=True),
                   (dy, x, gamma, beta, *running), {"relu": True}, bytes=4 * nbytes)]
    return cases


def run_ops_bench(device: str = "cpu", op_filter: str | None = None, repeats: int = 20,
                  warmup: int = 3, batch: int | None = None, size: int | None = None,
                  width: int | None = None, depth: int = 4) -> dict:
    """Every op of the backend on ``device`` against PyTorch at the U-Net's shapes (see the
    module's head), ops whose name contains ``op_filter`` only if given. The inputs are
    random (seed 0)."""
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
    rng = np.random.default_rng(0)

    timer, copy = median_ms, None
    if gpu:  # GPU time by CUDA events; memory-bound ops against the D2D copy ceiling
        from nodulekit.bench.gpu_timing import copy_bandwidth_gbps, event_median_ms

        timer, copy = event_median_ms, copy_bandwidth_gbps()
    rows = []
    for case in _cases(backend, batch, size, width, depth, rng):
        if op_filter and op_filter not in case.op:
            continue
        torch_fn = make_torch_op(case.op, *case.torch_args, device=tdev, **case.torch_kwargs)
        if gpu:
            ours_ms, _ = timer(case.ours, repeats, warmup, backend.synchronize)
            torch_ms, _ = timer(torch_fn, repeats, warmup, tsync)
        else:  # in turns: a passing load on a shared machine hits both alike
            (ours_ms, _), (torch_ms, _) = interleaved_median_ms(
                [case.ours, torch_fn], repeats, warmup, [backend.synchronize, tsync])
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


# ----------------------------------------------------------------- conv versions (--variants)

# Dense peak TFLOP/s (no structured sparsity) from NVIDIA's H100 / H200 datasheets: FP32 is
# the CUDA cores' FMA rate (what fp32 kernels and cuDNN with TF32 off can reach), tf32 and
# bf16 the tensor cores' (the datasheets print twice these, "with sparsity").
PEAK_TFLOPS = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
}


def device_peak(name: str) -> tuple[str, dict] | tuple[None, None]:
    """The PEAK_TFLOPS row for a CUDA device name ("NVIDIA H100 80GB HBM3" is the SXM
    card), or (None, None) for a device not in the table."""
    n = name.upper()
    for chip in ("H200", "H100"):
        if chip in n:
            form = "PCIe" if "PCIE" in n else "NVL" if "NVL" in n else "SXM"
            if chip == "H200" and form == "PCIe":
                form = "NVL"
            key = f"{chip} {form}"
            return key, PEAK_TFLOPS[key]
    return None, None


def conv_variant_shapes(width: int = 64, depth: int = 4, size: int = 512) -> list[tuple]:
    """The U-Net's convolutions, one per kind: (label, H, C, K, R, need_dx)."""
    widths = level_widths(depth, width)
    shapes = [("enc0.conv1 (first layer)", size, 1, widths[0], 3, False)]
    for lvl in range(depth + 1):
        shapes.append((f"enc{lvl}.conv2" if lvl < depth else "bottom.conv2", size >> lvl,
                       widths[lvl], widths[lvl], 3, True))
    shapes.append(("dec0.conv1 (after concat)", size, 2 * widths[0], widths[0], 3, True))
    shapes.append(("head (1x1)", size, widths[0], 1, 1, True))
    return shapes


def _conv_call(be, what: str, arrays, need_dx: bool) -> Callable[[], object]:
    xd, wd, bd, dyd, y = arrays
    if what == "forward":
        return lambda: be.conv2d_forward(xd, wd, bd, relu=True)
    return lambda: be.conv2d_backward(dyd, xd, wd, y, relu=True, need_dx=need_dx)


def _upconv_call(be, what: str, arrays) -> Callable[[], object]:
    xd, wd, bd, dyd = arrays
    if what == "forward":
        return lambda: be.upconv2x2_forward(xd, wd, bd)
    return lambda: be.upconv2x2_backward(dyd, xd, wd)


def variant_names(variants: str | Sequence[str] | None, known: Sequence[str],
                  what: str = "convolution") -> list[str]:
    """``'all'`` (or None) -> every name in ``known``; else the names given (a list, or one
    comma-separated string), each checked: an unknown one is an UnknownVariantError."""
    if variants in ("all", None):
        return list(known)
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    for name in names:
        if name not in known:
            raise UnknownVariantError(f"unknown {what} variant {name!r}; the variants are: "
                                      f"{', '.join(known)} (or 'all')")
    return names


def _require_gpu() -> str:
    """The CUDA device's name, or BenchUnavailableError saying why there is none."""
    from nodulekit.engine import cuda_usable

    ok, why = cuda_usable()
    if not ok:
        raise BenchUnavailableError(f"bench ops --variants times the CUDA convolution versions "
                                    f"and needs a GPU: {why}")
    return why


@dataclass
class _Pass:
    """One timed case of the sweep: a pass (forward / backward) of one layer at one batch."""

    what: str  # "forward" or "backward"
    label: str  # the layer, as the U-Net names it
    batch: int
    shape: str  # human-readable shape
    flops: float  # 2 per multiply-add


@dataclass
class _Sweep:
    """What the conv-versions sweep collects as it goes, and its time budget."""

    repeats: int
    warmup: int
    budget_s: float
    peak: dict | None  # PEAK_TFLOPS row of the device, if it is in the table
    t_start: float = field(default_factory=time.perf_counter)
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.budget_s

    def out_of_time(self, case: str) -> bool:
        """Past the budget: the case is listed as skipped (True) instead of timed."""
        if self.over_budget():
            self.skipped.append(case)
            return True
        return False

    def add_row(self, variant: str, precision: str, case: _Pass, ours_ms: float,
                torch_ms: float, reps: int) -> None:
        row = {"variant": variant, "precision": precision, "pass": case.what,
               "label": case.label, "batch": case.batch, "shape": case.shape,
               "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": ours_ms / torch_ms,
               "repeats": reps, "ours_tflops": case.flops / ours_ms / 1e9,
               "torch_tflops": case.flops / torch_ms / 1e9}
        if self.peak:
            row["ours_pct_peak"] = 100 * row["ours_tflops"] / self.peak[precision]
            row["torch_pct_peak"] = 100 * row["torch_tflops"] / self.peak[precision]
        self.rows.append(row)


def _torch_precision(precision: str) -> dict:
    """make_torch_op's keywords for cuDNN at one of our precisions: fp32 with TF32 off, TF32
    on (cudnn and matmul), or bf16 tensors (fp32 accumulation)."""
    import torch

    return {"dtype": torch.bfloat16 if precision == "bf16" else torch.float32,
            "allow_tf32": precision == "tf32"}


def _time_torch(fn: Callable[[], object], sweep: _Sweep) -> float:
    import torch

    from nodulekit.bench.gpu_timing import event_median_ms

    return event_median_ms(fn, sweep.repeats, sweep.warmup, torch.cuda.synchronize)[0]


# The sweep's order: fastest versions first (the reverse of the reading order), so a budget
# that runs out cuts the slow ones, never the tensor-core timings.
FAST_FIRST = ("mma_bf16", "mma_tf32", "register_blocked", "smem_tiled", "direct")
# direct's weight gradient has each thread sum over every pixel of the batch (3.1 M at the
# paper's batch 12, 512x512): it is timed only where the batch has at most this many.
DIRECT_MAX_PIXELS = 65536


def fast_first(names: Sequence[str]) -> list[str]:
    """``names`` in FAST_FIRST's order (names it does not know last, as given)."""
    rank = {v: i for i, v in enumerate(FAST_FIRST)}
    return sorted(names, key=lambda v: rank.get(v, len(rank)))


@functools.cache
def _conv_inputs(batch: int, layer: tuple, seed: int) -> tuple:
    """Seeded random x, w, b, dy for one U-Net convolution at one batch. Made once and kept
    for every version (the paper's shapes at batch 12 hold about 7 GB of them: drawing them
    again per version cost the first GPU sweep a third of its budget); read only."""
    rng = np.random.default_rng([seed, batch, layer[1], layer[2], layer[3], layer[4]])
    _, h, c, k, r, _ = layer
    x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
    w = (rng.standard_normal((k, r, r, c), dtype=np.float32)
         * np.float32((2.0 / (r * r * c)) ** 0.5))
    b = rng.standard_normal(k, dtype=np.float32) * np.float32(0.1)
    dy = rng.standard_normal((batch, h, h, k), dtype=np.float32)
    return x, w, b, dy


def _time_conv_layer(sweep: _Sweep, variant: str, batch: int, layer: tuple,
                     torch_ms: dict) -> None:
    """One version on one U-Net convolution (conv_variant_shapes' row) at one batch,
    forward (and, at a training batch, backward), against cuDNN at its precision (timed
    once per layer, batch, precision and pass: ``torch_ms`` keeps them across versions)."""
    from nodulekit.bench.gpu_timing import event_median_ms
    from nodulekit.engine.cuda import CONV_VARIANTS, CudaBackend
    from nodulekit.reference.torch_ops import make_torch_op

    label, h, c, k, r, need_dx = layer
    shape = f"{batch}x{h}x{h}x{c} -> {k}, {r}x{r}"
    if variant == "direct" and batch * h * h > DIRECT_MAX_PIXELS:
        sweep.skipped.append(f"direct {label} batch {batch}: only at {DIRECT_MAX_PIXELS} "
                             f"pixels a batch or fewer")
        return
    flops = 2.0 * batch * h * h * k * r * r * c
    cases = [_Pass("forward", label, batch, shape, flops)]
    if batch > 1:
        cases.append(_Pass("backward", label, batch, shape, flops * (2 if need_dx else 1)))
    # past the budget: list the cases without drawing inputs or running anything
    if sweep.over_budget():
        for case in cases:
            sweep.out_of_time(f"{variant} {case.what} {label} batch {batch}")
        return
    x, w, b, dy = _conv_inputs(batch, layer, 0)
    precision = CONV_VARIANTS[variant][0]
    be = CudaBackend(precision=precision, conv_variant=variant)
    xd, wd, bd, dyd = (be.asarray(a) for a in (x, w, b, dy))
    y = be.conv2d_forward(xd, wd, bd, relu=True)
    for case in cases:
        if sweep.out_of_time(f"{variant} {case.what} {label} batch {batch}"):
            continue
        # direct is slow: one timed run is enough
        reps = 1 if variant == "direct" else sweep.repeats
        ours = _conv_call(be, case.what, (xd, wd, bd, dyd, y), need_dx)
        ours_ms, _ = event_median_ms(ours, reps, min(sweep.warmup, reps), be.synchronize)
        key = (label, batch, precision, case.what)
        if key not in torch_ms:
            kw = {"device": "cuda", "relu": True, **_torch_precision(precision)}
            fn = (make_torch_op("conv2d_forward", x, w, b, **kw) if case.what == "forward"
                  else make_torch_op("conv2d_backward", dy, x, w, b, need_dx=need_dx, **kw))
            torch_ms[key] = _time_torch(fn, sweep)
        sweep.add_row(variant, precision, case, ours_ms, torch_ms[key], reps)


def _time_upconv_level(sweep: _Sweep, precisions: list[str], batch: int, level: tuple,
                       rng: np.random.Generator) -> None:
    """The 2x2 up-convolution into one decoder level, (label, H, C, K), at each precision
    (its default version's kernels: upconv.cu in fp32, conv_mma.cu's otherwise)."""
    from nodulekit.bench.gpu_timing import event_median_ms
    from nodulekit.engine.cuda import DEFAULT_CONV_VARIANT, CudaBackend
    from nodulekit.reference.torch_ops import make_torch_op

    label, h, c, k = level
    if sweep.over_budget():
        for precision in precisions:
            sweep.out_of_time(f"upconv {precision} {label} batch {batch}")
        return
    x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
    w = rng.standard_normal((k, 2, 2, c), dtype=np.float32) * np.float32(c ** -0.5)
    b = rng.standard_normal(k, dtype=np.float32) * np.float32(0.1)
    dy = rng.standard_normal((batch, 2 * h, 2 * h, k), dtype=np.float32)
    flops = 2.0 * batch * h * h * 4 * k * c
    shape = f"{batch}x{h}x{h}x{c} -> {k}, 2x2 s2"
    cases = [_Pass("forward", label, batch, shape, flops)]
    if batch > 1:
        cases.append(_Pass("backward", label, batch, shape, 2 * flops))
    for precision in precisions:
        be = CudaBackend(precision=precision, conv_variant=DEFAULT_CONV_VARIANT[precision])
        xd, wd, bd, dyd = (be.asarray(a) for a in (x, w, b, dy))
        for case in cases:
            if sweep.out_of_time(f"upconv {precision} {case.what} {label} batch {batch}"):
                continue
            ours = _upconv_call(be, case.what, (xd, wd, bd, dyd))
            ours_ms, _ = event_median_ms(ours, sweep.repeats, sweep.warmup, be.synchronize)
            kw = {"device": "cuda", **_torch_precision(precision)}
            fn = (make_torch_op("upconv2x2_forward", x, w, b, **kw) if case.what == "forward"
                  else make_torch_op("upconv2x2_backward", dy, x, w, **kw))
            sweep.add_row(f"upconv_{precision}", precision, case, ours_ms,
                          _time_torch(fn, sweep), sweep.repeats)


def upconv_levels(width: int = 64, depth: int = 4, size: int = 512) -> list[tuple]:
    """The U-Net's 2x2 up-convolutions, one per decoder level: (label, H, C, K) with H the
    input's size, C its channels and K the output's."""
    widths = level_widths(depth, width)
    return [(f"dec{lvl}.up (2x2 up-conv)", size >> (lvl + 1), widths[lvl + 1], widths[lvl])
            for lvl in range(depth)]


def run_conv_variants_bench(variants: str | Sequence[str] | None = "all",
                            batches: Sequence[int] = (12, 1), repeats: int = 5,
                            warmup: int = 1, width: int = 64, depth: int = 4,
                            size: int = 512, budget_s: float = 240.0,
                            progress: Callable[[dict], None] | None = None) -> dict:
    """Every convolution version (cuda.CONV_VARIANTS) on the U-Net's shapes against cuDNN
    (PyTorch, channels_last) at the same precision: fp32 versions against torch with TF32
    off, tf32 against torch with TF32 on (cudnn and matmul), bf16 against torch on bf16
    tensors (fp32 accumulation in both; ours keeps fp32 tensors and rounds operands as it
    stages them). Training batch (12): forward and backward (dx, dw, db and the ReLU mask);
    inference batch (1): forward. Then the 2x2 up-convolution at each of those precisions
    (rows "upconv_<precision>"). TFLOP/s at 2 FLOPs per multiply-add, and the fraction of
    the device's peak for that precision (PEAK_TFLOPS). Cases past ``budget_s`` seconds are
    skipped and listed. The versions run fastest first (FAST_FIRST: a budget that runs out
    cuts the slow ones), each over every layer and batch; ``direct`` only where a batch has
    at most DIRECT_MAX_PIXELS pixels. ``progress``, if given, gets the result so far after
    every version's layers (a JSON file written as the sweep goes keeps what finished).
    The inputs are random (seeded per layer). Raises BenchUnavailableError where there is
    no usable GPU, UnknownVariantError for a name not in CONV_VARIANTS."""
    from nodulekit.engine.cuda import CONV_VARIANTS

    device = _require_gpu()
    require_torch()
    names = fast_first(variant_names(variants, list(CONV_VARIANTS)))
    peak_key, peak = device_peak(device)
    sweep = _Sweep(repeats, warmup, budget_s, peak)
    config = {"variants": names, "batches": list(batches), "width": width, "depth": depth,
              "size": size, "repeats": repeats, "warmup": warmup, "timing": "CUDA events",
              "budget_s": budget_s, "direct_max_pixels": DIRECT_MAX_PIXELS,
              "torch": "cuDNN via torch, channels_last, same precision"}

    def result() -> dict:
        return {"benchmark": "conv-variants", **provenance("cuda"), "config": config,
                "peak": {"device": peak_key, "tflops": peak,
                         "source": "NVIDIA datasheets, dense (half the 'with sparsity' "
                                   "figure)"},
                "variants": {v: CONV_VARIANTS[v] for v in names},
                "rows": list(sweep.rows), "skipped": list(sweep.skipped)}

    torch_ms: dict = {}
    for v in names:
        for batch in batches:
            for layer in conv_variant_shapes(width, depth, size):
                _time_conv_layer(sweep, v, batch, layer, torch_ms)
        if progress is not None:
            progress(result())
    precisions = [p for p in ("bf16", "tf32", "fp32")
                  if any(CONV_VARIANTS[v][0] == p for v in names)]
    _conv_inputs.cache_clear()
    rng = np.random.default_rng(0)
    for batch in batches:
        for level in upconv_levels(width, depth, size):
            _time_upconv_level(sweep, precisions, batch, level, rng)
    return result()


def format_variants(result: dict) -> str:
    p = result["peak"]
    peak = (f"peak ({p['device']}): " + ", ".join(f"{k} {v:g}" for k, v in p["tflops"].items())
            + " TFLOP/s" if p["tflops"] else "peak: device not in PEAK_TFLOPS, no % shown")
    lines = [f"device: {result['device']}; {peak}",
             "ratio = ours / torch at the same precision (below 1 is faster)",
             f"{'variant':<16} {'pass':<8} {'where':<26} {'b':>2} {'ours ms':>9} "
             f"{'torch ms':>9} {'ratio':>6} {'TFLOP/s ours | torch':>21} {'% peak':>13}"]
    for r in result["rows"]:
        pct = (f"{r['ours_pct_peak']:5.1f} | {r['torch_pct_peak']:5.1f}"
               if "ours_pct_peak" in r else "")
        lines.append(f"{r['variant']:<16} {r['pass']:<8} {r['label']:<26} {r['batch']:>2} "
                     f"{r['ours_ms']:9.3f} {r['torch_ms']:9.3f} {r['ratio']:6.2f} "
                     f"{r['ours_tflops']:9.1f} | {r['torch_tflops']:9.1f} {pct:>13}")
    if result["skipped"]:
        lines.append(f"skipped past the {result['config']['budget_s']:.0f} s budget: "
                     f"{len(result['skipped'])} cases, from {result['skipped'][0]}")
    return "\n".join(lines)



# ------------------------------------------------------- CPU conv versions (--variants, cpu)


def unet_conv3x3_shapes(width: int, depth: int, size: int,
                        in_channels: int = 1) -> list[tuple]:
    """Every distinct 3x3 convolution of the U-Net: (label, H, C, K, need_dx, count), count
    being how many layers of one forward pass have that shape (dec<l>.conv2 is enc<l>.conv2's
    shape)."""
    widths = level_widths(depth, width)
    shapes, c = [], in_channels
    for lvl in range(depth + 1):
        name, h = (f"enc{lvl}" if lvl < depth else "bottom"), size >> lvl
        shapes.append((f"{name}.conv1", h, c, widths[lvl], lvl > 0, 1))
        shapes.append((f"{name}.conv2", h, widths[lvl], widths[lvl], True,
                       2 if lvl < depth else 1))
        c = widths[lvl]
    for lvl in reversed(range(depth)):
        shapes.append((f"dec{lvl}.conv1", size >> lvl, 2 * widths[lvl], widths[lvl], True, 1))
    return shapes


def run_cpu_conv_variants_bench(variants: str | Sequence[str] | None = "all",
                                batch: int = 4, size: int = 128, width: int = 16,
                                depth: int = 4, repeats: int = 10, warmup: int = 2,
                                seed: int = 0) -> dict:
    """The CPU convolution versions (cpu.CONV_VARIANTS, and 'auto', the per-shape choice
    training uses) on every 3x3 convolution of the ``bench step`` U-Net against PyTorch
    (oneDNN, channels_last), all timed in turns. Forward with bias + ReLU; backward is dx
    (except the first layer), dW, db and the ReLU mask. GFLOP/s at 2 FLOPs per multiply-add.
    ``totals`` adds each version's passes over one training step's layers.
    UnknownVariantError for a name that is neither in CONV_VARIANTS nor 'auto'."""
    require_torch()
    from nodulekit.engine.cpu import CONV_VARIANTS, CPUBackend
    from nodulekit.reference.torch_ops import make_torch_op

    names = variant_names(variants, [*CONV_VARIANTS, "auto"], what="cpu convolution")
    backends = [CPUBackend(conv_variant=v) for v in names]
    rng = np.random.default_rng(seed)
    rows = []
    totals = {v: 0.0 for v in [*names, "torch"]}
    for label, h, c, k, need_dx, count in unet_conv3x3_shapes(width, depth, size):
        x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
        w = rng.standard_normal((k, 3, 3, c), dtype=np.float32) * np.float32((2 / (9 * c)) ** .5)
        b = rng.standard_normal(k, dtype=np.float32) * np.float32(0.1)
        dy = rng.standard_normal((batch, h, h, k), dtype=np.float32)
        y = backends[0].conv2d_forward(x, w, b, relu=True)
        flops = 2.0 * batch * h * h * k * 9 * c
        for what in ("forward", "backward"):
            ours = [_conv_call(be, what, (x, w, b, dy, y), need_dx) for be in backends]
            torch_fn = (make_torch_op("conv2d_forward", x, w, b, device="cpu", relu=True)
                        if what == "forward" else
                        make_torch_op("conv2d_backward", dy, x, w, b, device="cpu", relu=True,
                                      need_dx=need_dx))
            times = interleaved_median_ms([*ours, torch_fn], repeats, warmup,
                                          [lambda: None] * (len(ours) + 1))
            torch_ms = times[-1][0]
            fl = flops * (1 + (what == "backward" and need_dx))
            totals["torch"] += count * torch_ms
            for v, (ms, _) in zip(names, times, strict=False):
                totals[v] += count * ms
                rows.append({"variant": v, "pass": what, "label": label, "layers": count,
                             "shape": f"{batch}x{h}x{h}x{c} -> {k}, 3x3", "ours_ms": ms,
                             "torch_ms": torch_ms, "ratio": ms / torch_ms,
                             "ours_gflops": fl / ms / 1e6, "torch_gflops": fl / torch_ms / 1e6})
    return {"benchmark": "cpu-conv-variants", **provenance("cpu"),
            "config": {"variants": names, "batch": batch, "size": size, "width": width,
                       "depth": depth, "repeats": repeats, "warmup": warmup,
                       "timing": "interleaved (every version and torch in turns)",
                       "torch": "oneDNN via torch, channels_last, fp32"},
            "variants": {v: CONV_VARIANTS.get(v, "per shape, as training runs") for v in names},
            "rows": rows, "totals_ms": totals}


def format_cpu_variants(result: dict) -> str:
    lines = [f"device: {result['device']}",
             "ratio = ours / torch (below 1 is faster); GFLOP/s at 2 FLOPs per multiply-add",
             f"{'variant':<20} {'pass':<8} {'where':<13} {'shape':<24} {'ours ms':>8} "
             f"{'torch ms':>8} {'ratio':>6} {'GFLOP/s ours | torch':>21}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<20} {r['pass']:<8} {r['label']:<13} {r['shape']:<24} "
                     f"{r['ours_ms']:8.2f} {r['torch_ms']:8.2f} {r['ratio']:6.2f} "
                     f"{r['ours_gflops']:9.1f} | {r['torch_gflops']:9.1f}")
    t = result["totals_ms"]
    lines.append("all 3x3 convolutions of one training step (forward + backward): "
                 + ", ".join(f"{v} {ms:.1f} ms" for v, ms in t.items())
                 + "; " + ", ".join(f"{v}/torch {t[v] / t['torch']:.2f}"
                                    for v in t if v != "torch"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nodulekit.bench.ops --op conv --variants all [--json F]``: the conv
    versions' sweep (what ``nodulekit bench ops --op conv --variants all`` runs)."""
    import argparse
    import json
    import os
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--op", default="conv", choices=["conv"])
    from nodulekit.engine.cuda import CONV_VARIANTS

    ap.add_argument("--variants", default="all",
                    help=f"'all' or names, comma-separated: {', '.join(CONV_VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batches", default="12,1")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the sweep")
    ap.add_argument("--json", dest="json_path", default=None, help="file, or '-': stdout")
    args = ap.parse_args(argv)
    def write(result: dict) -> None:  # after every version, and at the end
        if args.json_path and args.json_path != "-":
            tmp = f"{args.json_path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, args.json_path)

    try:
        result = run_conv_variants_bench(args.variants, tuple(int(b) for b in
                                                              args.batches.split(",")),
                                         args.repeats, args.warmup, budget_s=args.budget,
                                         progress=write)
    except (BenchUnavailableError, UnknownVariantError) as exc:
        raise SystemExit(str(exc)) from exc  # the message, exit status 1
    print(format_variants(result))
    if args.json_path == "-":  # one line, after the table
        print("conv-variants JSON:", json.dumps(result))
    else:
        write(result)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
