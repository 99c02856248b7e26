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
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _limit_blas_to_one_thread() -> None:
    """NumPy's BLAS runs single-threaded: the parallelism is ours (see module doc)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; keep working without it
        return
    threadpool_limits(limits=1, user_api="blas")


# see Workers.plan
BLOCKS_AT_LEAST = 16
BLOCK_ROWS_AT_LEAST = 64


class Workers:
    def __init__(self, count: int | None = None):
        self.count = int(count or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max(1, self.count - 1), thread_name_prefix="nodulekit-cpu")
        self._scratch: dict = {}
        _limit_blas_to_one_thread()

    @staticmethod
    def plan(rows: int, step: int, align: int = 1, blocks_at_least: int = BLOCKS_AT_LEAST,
             rows_at_least: int = BLOCK_ROWS_AT_LEAST) -> tuple[int, int]:
        """(rows per block, number of blocks) that ``run`` will use.

        Several blocks per thread so a busy core can hand work over, but not tiny ones (a
        GEMM on few rows is slow). Blocks are whole multiples of ``align`` rows (an image
        row of pixels, for kernels that work row by row). The plan does not depend on the
        thread count, so sums over blocks come out the same on any machine.
        ``blocks_at_least`` lowers the block count for kernels whose blocks should stay large;
        ``rows_at_least`` lowers the smallest block for jobs whose "rows" are not pixels.
        """
        step = max(rows_at_least, min(step, -(-rows // blocks_at_least)))
        step = -(-step // align) * align
        return step, -(-rows // step)

    def run(self, job, rows: int, step: int, align: int = 1,
            blocks_at_least: int = BLOCKS_AT_LEAST,
            rows_at_least: int = BLOCK_ROWS_AT_LEAST) -> None:
        """job(m0, m1, worker) over [0, rows) in blocks of ``step`` rows, all threads.

        Blocks go to whichever thread is free (a busy core just takes fewer). Results
        that are sums over blocks must therefore be kept per block (``m0 // step`` of
        ``plan``) and added in block order by the caller: that keeps them bit-identical
        from run to run, which exact resume relies on.
        """
        step, _ = self.plan(rows, step, align, blocks_at_least, rows_at_least)
        blocks = iter(range(0, rows, step))
        lock = threading.Lock()

        def loop(worker):
            while True:
                with lock:
                    m0 = next(blocks, None)
                if m0 is None:
                    return
                job(m0, min(rows, m0 + step), worker)

        if self.count == 1 or rows <= step:
            loop(0)
            return
        # the calling thread is worker 0: one thread fewer to wake and wait for
        futures = [self._pool.submit(loop, i) for i in range(1, self.count)]
        try:
            loop(0)
        finally:
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
