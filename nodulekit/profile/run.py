"""`nodulekit profile`: one training step, op by op, against the device's own ceilings.

The step is `bench step`'s (``nn.TrainStep``: forward, sigmoid + Dice loss, backward, Adam),
on the same synthetic batch (``steps.StepProfiler``). After ``warmup`` steps (Numba
compiles, CuPy loads its modules), ``repeats`` steps run with the backend wrapped in
``timing.TimedBackend``, each followed by one without it: each op's time is the median over
the timed steps of that call, the step's the median wall time of the timed steps
(synchronised), and the plain steps' median says what the timers themselves cost. The ops'
sum is set against the step's wall time: the difference is what runs outside the ops (the
network's Python, gradient copies into the flat buffer, the skip gradients' additions),
shown, not hidden.

Each op then gets its FLOPs and least bytes (``counts``), its place on the roofline
(``roofline.place``: GFLOP/s, GB/s, intensity, % of roofline) and its share of the step.
``variants=True`` profiles the step again with each convolution version of the backend
(``cpu.CONV_VARIANTS`` and 'auto', the per-shape choice; on the GPU ``cuda.CONV_VARIANTS``,
each at its own precision), the versions taking turns step by step, and sets the
convolutions side by side.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from nodulekit.bench.common import provenance
from nodulekit.engine import get_backend, resolve_device
from nodulekit.nn.layout import ParameterLayout, unet_parameter_shapes
from nodulekit.profile import layers, roofline
from nodulekit.profile.peaks import device_peaks
from nodulekit.profile.steps import StepProfiler, StepTimes, take_turns
from nodulekit.profile.timing import clock_for

SCHEMA = 1
CONV_KINDS = ("conv3x3", "conv1x1", "upconv2x2")


@dataclass(frozen=True)
class ProfileOptions:
    device: str = "cpu"
    width: int = 16
    depth: int = 4
    size: int = 128
    batch: int = 4
    norm: str = "none"
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    lr: float = 1e-4
    variants: bool = False
    remeasure_peaks: bool = False


def summarise(times: StepTimes, expected: list, peaks: dict) -> tuple[dict, list[dict]]:
    """(step, ops): the step's totals and every op call's row; see the module docstring."""
    per_call = [statistics.median(col) for col in zip(*times.op_ms, strict=True)]
    wall = statistics.median(times.wall_ms)
    op_sums = [sum(step) for step in times.op_ms]
    labels = layers.label_calls([c[0] for c in times.calls], expected)
    ops = []
    kernels = times.kernels or [None] * len(times.calls)
    for i, ((op, n, kind, shapes), label, ms, kernel) in enumerate(
            zip(times.calls, labels, per_call, kernels, strict=True)):
        ops.append({"index": i, "phase": label.phase, "layer": label.layer, "op": op,
                    "kind": kind, "kernel": kernel or None,
                    "shapes": {k: list(v) for k, v in shapes.items()},
                    "ms": ms, "share": ms / wall, "flops": n.flops, "bytes": n.bytes,
                    "bytes_read": n.bytes_read, "bytes_written": n.bytes_written,
                    **roofline.place(n.flops, n.bytes, ms, peaks)})
    flops = sum(o["flops"] for o in ops)
    nbytes = sum(o["bytes"] for o in ops)
    ops_ms = statistics.median(op_sums)
    step = {"wall_ms": wall, "ops_ms": ops_ms,
            "outside_ops_ms": wall - ops_ms, "outside_ops_share": (wall - ops_ms) / wall,
            # per step, against that step's own wall time: a passing load falls on both
            "ops_over_wall": statistics.median(s / w for s, w in zip(op_sums, times.wall_ms,
                                                                      strict=True)),
            "uninstrumented_ms": statistics.median(times.plain_ms),
            "flops": flops, "bytes": nbytes, "gflops": flops / wall / 1e6,
            "calls": len(ops), "wall_ms_samples": times.wall_ms, "ops_ms_samples": op_sums,
            "uninstrumented_ms_samples": times.plain_ms}
    return step, ops


def by_kind(ops: list[dict], wall_ms: float, peaks: dict) -> list[dict]:
    """The ops grouped by kind and phase (conv3x3 forward, conv3x3 backward, ...), the
    largest share first."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for o in ops:
        groups.setdefault((o["kind"], o["phase"]), []).append(o)
    rows = []
    for (kind, phase), members in groups.items():
        ms = sum(o["ms"] for o in members)
        flops, nbytes = sum(o["flops"] for o in members), sum(o["bytes"] for o in members)
        rows.append({"kind": kind, "phase": phase, "calls": len(members), "ms": ms,
                     "share": ms / wall_ms, "flops": flops, "bytes": nbytes,
                     **roofline.place(flops, nbytes, ms, peaks)})
    return sorted(rows, key=lambda r: -r["ms"])


def _backend(backend_name: str, conv_variant: str | None = None):
    if conv_variant is None:
        return get_backend(backend_name)
    if backend_name == "cuda":
        from nodulekit.engine.cuda import CONV_VARIANTS, CudaBackend

        return CudaBackend(precision=CONV_VARIANTS[conv_variant][0], conv_variant=conv_variant)
    from nodulekit.engine.cpu import CPUBackend

    return CPUBackend(conv_variant=conv_variant)


def variant_names(backend_name: str) -> list[str]:
    """The convolution versions of a backend: the CPU's per-shape choice ('auto') first."""
    if backend_name == "cuda":
        from nodulekit.engine.cuda import CONV_VARIANTS

        return list(CONV_VARIANTS)
    from nodulekit.engine.cpu import CONV_VARIANTS

    return ["auto", *CONV_VARIANTS]


def compare_variants(backend_name: str, opts: ProfileOptions, peaks: dict) -> dict:
    """The step with each convolution version, all in turns; the convolution ops side by
    side (the same calls in the same order: only the kernels behind them differ)."""
    names = variant_names(backend_name)
    expected = layers.step_calls(opts.depth, opts.width, opts.size, opts.batch, opts.norm)
    profilers = [StepProfiler(_backend(backend_name, v), backend_name, opts) for v in names]
    runs = dict(zip(names, (summarise(t, expected, peaks) for t in take_turns(
        profilers, repeats=max(3, opts.repeats // 2), warmup=1)), strict=True))
    rows = []
    for i, o in enumerate(runs[names[0]][1]):
        if o["kind"] not in CONV_KINDS:
            continue
        rows.append({"layer": o["layer"], "op": o["op"], "kind": o["kind"],
                     "phase": o["phase"], "flops": o["flops"],
                     "ms": {v: runs[v][1][i]["ms"] for v in names},
                     "roofline_pct": {v: runs[v][1][i]["roofline_pct"] for v in names}})
    return {"names": names, "repeats": max(3, opts.repeats // 2),
            "steps": {v: {"wall_ms": runs[v][0]["wall_ms"], "ops_ms": runs[v][0]["ops_ms"],
                          "conv_ms": sum(o["ms"] for o in runs[v][1]
                                         if o["kind"] in CONV_KINDS)} for v in names},
            "ops": rows}


def run_profile(opts: ProfileOptions, peaks: dict | None = None) -> dict:
    """The profile's result (a JSON-able dict; ``SCHEMA`` names its layout)."""
    backend_name, why = resolve_device(opts.device)
    if backend_name == "reference":
        raise ValueError("the reference backend is float64 NumPy, the spec: profile the cpu "
                         "or cuda backend")
    # the shape (a size not divisible by 2**depth) and the device (a GPU asked for where
    # there is none) are checked before anything is measured
    expected = layers.step_calls(opts.depth, opts.width, opts.size, opts.batch, opts.norm)
    backend = _backend(backend_name)
    peaks = peaks if peaks is not None else device_peaks(backend_name, opts.remeasure_peaks)
    (times,) = take_turns([StepProfiler(backend, backend_name, opts)], opts.repeats,
                          opts.warmup)
    step, ops = summarise(times, expected, peaks)
    result = {
        "profile": "training_step",
        "schema": SCHEMA,
        **provenance(backend_name),
        "backend": backend_name,
        "device_choice": why,
        "config": {**asdict(opts), "precision": backend.precision,
                   "conv_variant": getattr(backend, "conv_variant", None),
                   "threads": getattr(getattr(backend, "workers", None), "count", None),
                   "timer": clock_for(backend_name).name,
                   "parameters": ParameterLayout(unet_parameter_shapes(
                       opts.depth, opts.width, 1, opts.norm)).total},
        "peaks": peaks,
        "step": step,
        "kinds": by_kind(ops, step["wall_ms"], peaks),
        "ops": ops,
    }
    if opts.variants:
        result["variants"] = compare_variants(backend_name, opts, peaks)
    return result

