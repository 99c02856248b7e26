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
    except ImportError:
        pass
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
