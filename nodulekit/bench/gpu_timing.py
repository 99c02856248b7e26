"""GPU-side timing for `nodulekit bench ops --device cuda`, and the copy-bandwidth ceiling.

A host clock around ``fn(); synchronize()`` also counts Python's launch overhead and the
synchronisation: tens of microseconds, as long as a whole memory-bound kernel at the
paper's batch (the window kernel moves 25 MB: ~8 us). So on the GPU each sample is timed
with CUDA events, and the GPU is first given a short spin kernel to chew on, long enough
for the host to queue all of ``fn``'s launches behind it: the events then bracket the
op's kernels running back to back, not the host. The same timer serves PyTorch's side
(same device, same default stream), so the ratio compares like with like.

``copy_bandwidth_gbps`` measures the ceiling the memory-bound kernels are held to: a
device-to-device ``cudaMemcpyAsync`` of a buffer far larger than L2, bytes read plus bytes
written over time (METHOD.md's convention; the kernels' GB/s count the same way).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

_SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long ns) {
    long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
"""
_SPIN = {}


def _spin_kernel():
    import cupy

    if "k" not in _SPIN:
        _SPIN["k"] = cupy.RawKernel(_SPIN_SOURCE, "spin", options=("-std=c++17",))
    return _SPIN["k"]


def event_median_ms(fn: Callable[[], object], repeats: int, warmup: int,
                    sync: Callable[[], None] | None = None) -> tuple[float, list[float]]:
    """Median GPU time of fn()'s work in ms (CUDA events, queued behind a spin kernel)."""
    import cupy
    import numpy as np

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    # how long the host takes to queue fn's launches: the spin must outlast it
    t0 = time.perf_counter()
    fn()
    queue_s = time.perf_counter() - t0
    cupy.cuda.Device().synchronize()
    spin_ns = np.int64(min(50e6, max(200e3, 3 * queue_s * 1e9)))
    spin = _spin_kernel()
    stream = cupy.cuda.get_current_stream()
    samples = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        spin((1,), (1,), (spin_ns,))
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(samples), samples


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> dict:
    """Device-to-device copy of ``nbytes``: GB/s counting bytes read + bytes written."""
    import cupy

    buffers = {"src": cupy.full(nbytes, 1, dtype=cupy.uint8)}
    buffers["dst"] = cupy.empty_like(buffers["src"])

    def copy():
        buffers["dst"].data.copy_from_device_async(buffers["src"].data, nbytes)

    ms, _ = event_median_ms(copy, repeats, 3)
    buffers.clear()
    cupy.get_default_memory_pool().free_all_blocks()
    return {"bytes": nbytes, "median_ms": ms, "gbps": 2 * nbytes / ms / 1e6,
            "method": "cudaMemcpyAsync device-to-device, (read + written bytes) / time, "
                      "CUDA events, median"}
