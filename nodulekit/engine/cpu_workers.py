"""The CPU backend's threads: blocks of a convolution, one block per job, on N threads.

Why not BLAS's own threads plus Numba's: the two pools take turns on the same cores many
times per convolution, and each GEMM split over two threads waits for the slower one. On
this 2-core machine that was fine when idle (~0.4 s for the bench step) but, with one
other busy process, a step took 2 to 13 s: every wait became a scheduler time slice.
Here each thread runs whole blocks (gather patches, single-threaded SGEMM, epilogue) and
takes the next block when done, so a slow core only means fewer blocks for it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _limit_blas_to_one_thread() -> None:
    """NumPy's BLAS runs single-threaded: the parallelism is ours (see module doc)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; keep working without it
        return
    threadpool_limits(limits=1, user_api="blas")


class Workers:
    def __init__(self, count: int | None = None):
        self.count = int(count or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="nodulekit-cpu")
        self._scratch: dict = {}
        _limit_blas_to_one_thread()

    def run(self, job, rows: int, step: int) -> None:
        """job(m0, m1, worker) over [0, rows) in blocks of ``step`` rows, all threads."""
        step = max(1, min(step, -(-rows // self.count)))  # at least one block per thread
        starts = range(0, rows, step)

        def loop(worker):
            # static assignment: worker i takes blocks i, i+count, ... so per-worker sums
            # (weight gradients) add up in the same order every run: deterministic
            for m0 in starts[worker::self.count]:
                job(m0, min(rows, m0 + step), worker)

        if self.count == 1 or rows <= step:
            loop(0)
            return
        futures = [self._pool.submit(loop, i) for i in range(self.count)]
        for f in futures:
            f.result()

    def scratch(self, name: str, specs: list[tuple[tuple[int, ...], type]]):
        """Per-thread buffers, kept between calls: [worker][i] -> array of specs[i]."""
        key = (name, tuple((tuple(s), np.dtype(d).str) for s, d in specs))
        bufs = self._scratch.get(key)
        if bufs is None:
            # keep only the latest few shapes: a U-Net has about ten distinct layers
            if len(self._scratch) > 32:
                self._scratch.clear()
            bufs = [[np.empty(s, dtype=d) for s, d in specs] for _ in range(self.count)]
            self._scratch[key] = bufs
        return bufs
