"""The CPU's ceilings, measured: FMA throughput, copy bandwidth, OpenBLAS SGEMM.

FMA throughput: ``engine.fma_loop``'s loop (``chains`` independent vector accumulators,
no loads, no stores), one copy per core (``prange``), each its share of the work.

The same loop with one scalar chain takes one FMA latency an iteration, which gives the
clock the cores run at: ``latency cycles / seconds per iteration``.

Copy bandwidth: ``dst[:] = src`` split over the cores (each part a memcpy), bytes read plus
bytes written over time (the convention the ops' GB/s follow): once with buffers 8x the
last-level cache (DRAM) and once with both buffers in a quarter of it (the L3).

All three report the best of a few runs: a ceiling is what the machine can do, and on a
shared machine the median measures the neighbours too.
"""

from __future__ import annotations

import os
import time

import numpy as np
from numba import njit, prange

from nodulekit.engine.fma_loop import FMA_CHAINS, START, C, M, fma_kernels

FMA_WIDTHS = (8, 16)  # float32 lanes: AVX2 (what the engine's kernels use), AVX-512
REPEATS = 5


def _best_seconds(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fma_throughput(lanes: int, threads: int, chains: int = FMA_CHAINS,
                   flops_per_thread: float = 4e9) -> dict:
    """GFLOP/s of ``threads`` cores each running ``chains`` FMA chains of ``lanes`` floats."""
    on_every_core, _ = fma_kernels(lanes, chains)
    out = np.zeros(threads, dtype=np.float32)
    on_every_core(16, START, M, C, out)  # compile
    per_iteration = 2 * lanes * chains
    iterations = max(1, int(flops_per_thread // per_iteration))
    seconds = _best_seconds(lambda: on_every_core(iterations, START, M, C, out))
    return {"lanes": lanes, "chains": chains, "threads": threads,
            "gflops": threads * iterations * per_iteration / seconds / 1e9}


def fma_latency_ns(iterations: int = 20_000_000) -> float:
    """Nanoseconds per step of one dependent scalar FMA chain: the FMA latency."""
    _, on_one_core = fma_kernels(1, 1)
    on_one_core(16, START, M, C)
    return _best_seconds(lambda: on_one_core(iterations, START, M, C)) / iterations * 1e9


@njit(parallel=True)
def _copy_parts(src, dst, parts, rounds):
    # each core copies its own part ``rounds`` times: no start-up and join between rounds
    # (tens of microseconds, as long as a whole copy of a cache-sized buffer)
    n = src.size
    for p in prange(parts):
        lo, hi = n * p // parts, n * (p + 1) // parts
        for _ in range(rounds):
            dst[lo:hi] = src[lo:hi]


def copy_bandwidth(total_bytes: int, threads: int, repeats: int = REPEATS) -> dict:
    """GB/s of a copy whose two buffers take ``total_bytes`` together (read + written)."""
    n = max(1024, total_bytes // 8)  # float32: two buffers of n
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros_like(src)
    _copy_parts(src, dst, threads, 1)  # compile, and touch the pages
    # at least ~1 GB of traffic a run, so small copies are not timer noise
    rounds = max(1, int(1e9 // (2 * src.nbytes)))
    seconds = _best_seconds(lambda: _copy_parts(src, dst, threads, rounds), repeats)
    return {"bytes": 2 * src.nbytes, "threads": threads,
            "gbps": rounds * 2 * src.nbytes / seconds / 1e9}


def gemm_throughput(n: int, threads: int, repeats: int = 3) -> dict:
    """OpenBLAS (numpy's) SGEMM of n x n on ``threads`` threads: GFLOP/s."""
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    # the CPU backend holds BLAS to one thread (cpu_workers.py); a ceiling uses every core
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=c)
        seconds = _best_seconds(lambda: np.matmul(a, b, out=c), repeats)
        # numpy's own BLAS (scipy or torch may have loaded others)
        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"
                and "numpy" in str(i.get("filepath", ""))]
    library = (f"{blas[0].get('internal_api', 'BLAS')} {blas[0].get('version', '')} via numpy "
               f"({blas[0].get('architecture', '?')} kernels)") if blas else "numpy's BLAS"
    return {"n": n, "threads": threads, "library": library.replace("openblas", "OpenBLAS"),
            "gflops": 2 * n**3 / seconds / 1e9}


def last_level_cache_bytes() -> int | None:
    """The largest cache's size from sysfs (Linux), or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
            best = size if best is None else max(best, size)
    except (OSError, ValueError):
        return None
    return best


# ---------------------------------------------------------------------- the theoretical peak

# AMD cores by family: fp32 FLOPs per cycle of the FMA pipes (2 pipes x lanes x 2) and the
# FMA latency in cycles (AMD's Software Optimization Guides, per family). Zen 4 runs a
# 512-bit FMA on its two 256-bit pipes in two halves: 32, with AVX2 or AVX-512 alike.
AMD_FMA = {
    23: ("Zen / Zen 2", 32, 5),   # Zen 1 (models < 0x30) has 128-bit pipes: see _amd_core
    25: ("Zen 3 / Zen 4", 32, 4),
    26: ("Zen 5", 64, 4),         # server and desktop parts: two 512-bit FMA pipes
}


def _amd_core(family: int | None, model: int | None):
    if family not in AMD_FMA:
        return None
    name, flops, latency = AMD_FMA[family]
    if family == 23 and model is not None and model < 0x30:
        return "Zen / Zen+", 16, 5
    return name, flops, latency


def theoretical(identity: dict, latency_ns: float) -> dict | None:
    """cores x clock x FLOP per cycle, the clock taken from the measured FMA latency;
    None for a core this table does not know (only AMD's, so far)."""
    core = _amd_core(identity["family"], identity["model"]) \
        if identity["vendor"] == "AuthenticAMD" else None
    if core is None:
        return None
    name, flops_per_cycle, latency_cycles = core
    clock_ghz = latency_cycles / latency_ns
    gflops = identity["cores"] * clock_ghz * flops_per_cycle
    return {"gflops": gflops, "clock_ghz": clock_ghz, "flops_per_cycle": flops_per_cycle,
            "core": name, "fma_latency_ns": latency_ns,
            "basis": f"{identity['cores']} cores x {clock_ghz:.2f} GHz x {flops_per_cycle} FLOP "
                     f"per cycle ({name}, family {identity['family']} model "
                     f"{identity['model']}: two FMA pipes); the clock from one FMA chain, "
                     f"{latency_ns:.3f} ns a step at {latency_cycles} cycles of latency"}


def measure() -> dict:
    """Every CPU ceiling; a few seconds (the Numba kernels compile first)."""
    threads = os.cpu_count() or 1
    fma = [fma_throughput(lanes, threads) for lanes in FMA_WIDTHS]
    llc = last_level_cache_bytes()
    dram = copy_bandwidth(8 * llc if llc else 1 << 28, threads)
    cache = copy_bandwidth(llc // 4, threads) if llc else None
    gemm = gemm_throughput(2048, threads)
    from nodulekit.bench.common import cpu_identity

    identity = cpu_identity()
    best = max(f["gflops"] for f in fma)
    ideal = theoretical(identity, fma_latency_ns())
    if ideal is not None:
        ideal["fraction_reached"] = best / ideal["gflops"]
    return {"fma_gflops": best, "fma": fma,
            "copy_gbps": dram["gbps"], "copy": dram,
            "cache_copy_gbps": cache["gbps"] if cache else None,
            "cache": {"level": "L3", "bytes": llc, "copy": cache},
            "gemm_gflops": gemm["gflops"], "gemm": gemm,
            "theoretical": ideal, "hardware": identity}
