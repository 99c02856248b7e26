"""What every benchmark shares: timing, the device's name, the run's provenance."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

from nodulekit import host_memory
from nodulekit.host import cpu_identity, cpu_name  # noqa: F401 (bench's callers use them here)


def device_description(backend_name: str) -> str:
    """A sentence naming the hardware a benchmark ran on."""
    if backend_name == "cuda":
        from nodulekit.engine import cuda_usable

        ok, name = cuda_usable()
        return f"GPU {name}" if ok else "GPU (unknown)"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores"


def device_slug(backend_name: str) -> str:
    """Short file-name-safe device name, for bench/results/<slug>-<date>.json."""
    text = device_description(backend_name).lower()
    keep = "".join(ch if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in keep.split("-") if part)[:60]


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def worktree_differs(where: str | None = None) -> bool | None:
    """Whether the tracked files differ from the commit ``git_commit`` names (then that
    commit is not what ran: a copied tree with a stale .git, as on the GPU machine, or
    uncommitted edits); None where git cannot tell. ``where``: a folder in the work tree
    (default: this package's)."""
    here = where or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here,
                             capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: False, 1: True}.get(out.returncode)


# The variables that make both sides compile for less than the host has: Numba's target CPU
# and features for ours, ATen's kernels and oneDNN's JIT for torch. README, "Benchmarks":
# an AVX2 core measured on an AVX-512 one with all four set.
ISA_ENV = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NODULEKIT_FMA_WIDTH",
           "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def provenance(backend_name: str) -> dict:
    import numpy

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(backend_name),
        "commit": git_commit(),
        "worktree_differs_from_commit": worktree_differs(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        # other work on the machine skews CPU timings: say how busy it was
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu": cpu_identity(),  # the host's, for a GPU run too
        "malloc": host_memory.policy(),  # nodulekit.host_memory: freed memory kept or not
    }
    if backend_name == "cpu":  # what picks the CPU's convolution kernels
        from nodulekit.engine.cpu import kernel_choices

        info["cpu_kernels"] = kernel_choices()
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    restricted = {name: os.environ[name] for name in ISA_ENV if name in os.environ}
    if restricted:  # a run compiled for less than the host has (an AVX2 proxy): say so
        info["instruction_sets_restricted_by"] = restricted
    return info


def median_ms(fn: Callable[[], object], repeats: int, warmup: int,
              sync: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """Median wall time of fn() in milliseconds after warm-up, and every sample."""
    return interleaved_median_ms([fn], repeats, warmup, [sync])[0]


def interleaved_median_ms(fns: list[Callable[[], object]], repeats: int, warmup: int,
                          syncs: list[Callable[[], None]]) -> list[tuple[float, list[float]]]:
    """Median wall time in ms (and every sample) of each function after warm-up, timed in
    turns (a, b, a, b, ...): a load that comes and goes on a shared machine then falls on
    all of them alike, not on one."""
    for fn, sync in zip(fns, syncs, strict=True):
        for _ in range(warmup):
            fn()
        sync()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, sync, out in zip(fns, syncs, samples, strict=True):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
    return [(statistics.median(s), s) for s in samples]


def require_torch():
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            "the benchmarks time against PyTorch, which is not installed here: "
            "pip install 'nodulekit[bench]'  (pins torch==2.13.0)") from exc
    return torch


# ---- what `bench step` and `bench infer` share: both time ours and the PyTorch reference
# of one U-Net in turns


def phase_logger(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """phase(what): a line to ``log`` with the seconds since this call (a run cut short by
    a time limit still shows where its time went); nothing without a log."""
    t_start = time.perf_counter()

    def phase(what: str) -> None:
        if log is not None:
            log(f"  {time.perf_counter() - t_start:6.1f} s  {what}")

    return phase


def torch_alone_settings(requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The settings torch is timed alone under: None means all of them."""
    if requested is not None:
        return requested
    from nodulekit.bench.torch_alone import SETTINGS

    return tuple(SETTINGS)


def torch_copy(ours, image, device: str = "cpu", cudnn_benchmark: bool = True):
    """(PyTorch's U-Net with `ours`' architecture, weights and buffers; the NHWC batch
    `image` as its input): channels_last, float32, TF32 off on a GPU (so both sides
    compute the same thing)."""
    torch = require_torch()
    from nodulekit.reference.torch_unet import TorchUNet

    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = cudnn_benchmark
    model = TorchUNet(ours.depth, ours.width, norm=ours.norm).load_ours(
        ours.state_dict(), ours.buffer_dict()).to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device)
    return model, x.contiguous(memory_format=torch.channels_last)


def time_in_turns(ours: Callable[[], object], theirs: Callable[[], object], backend,
                  torch_device: str, repeats: int, warmup: int) -> dict:
    """ours and torch in turns (a passing load on a shared machine hits both alike): the
    result's timing fields, medians, ratio and every sample."""
    import torch

    tsync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    (ours_ms, ours_all), (torch_ms, torch_all) = interleaved_median_ms(
        [ours, theirs], repeats, warmup, [backend.synchronize, tsync])
    return {
        "ours_ms": ours_ms,
        "torch_ms": torch_ms,
        "ratio": ours_ms / torch_ms,
        # each turn's ratio shares the machine's state of the moment with its partner
        "ratio_per_turn_median": statistics.median(o / t for o, t in zip(ours_all, torch_all,
                                                                          strict=True)),
        "ours_ms_samples": ours_all,
        "torch_ms_samples": torch_all,
    }


def shape_config(model, backend, torch_device: str, cudnn_benchmark: bool, **shape) -> dict:
    """The result's "config": the shape given, the model's size, how torch ran."""
    return {**shape, "parameters": model.num_parameters, "precision": backend.precision,
            "torch_memory_format": "channels_last", "timing": "interleaved",
            "cudnn_benchmark": cudnn_benchmark if torch_device == "cuda" else None}


def network_lines(r: dict, batch_text: str) -> list[str]:
    """The first two lines of a `bench step` / `bench infer` report: the device, and the
    network with ``batch_text`` (what one timed call runs) after it."""
    c = r["config"]
    return [
        f"device: {r['device']}  ({r['device_choice']})",
        f"U-Net depth {c['depth']} width {c['width']}"
        + (f", {c['norm']} norm" if c.get("norm", "none") != "none" else "")
        + f" ({c['parameters']:,} parameters), " + batch_text,
    ]
