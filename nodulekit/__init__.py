"""nodulekit: lung-nodule segmentation on a hand-written engine (CUDA kernels + Numba)."""

import os

# The CPU backend alternates Numba's OpenMP pool (im2col, epilogues) with OpenBLAS's
# threads (SGEMM) on the same cores. With OpenMP's default spin-waiting the idle pool
# keeps spinning through each GEMM: measured here as a 15x slower convolution on 2 cores.
# It must be set before any OpenMP runtime loads (torch loads one too), hence here, at
# the package's first import. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Keep the memory a training step frees for the next step, instead of faulting it in again
# page by page every step (23% of the demo's step on this project's VM): see host_memory.py.
# NODULEKIT_MALLOC=system leaves glibc's defaults.
from nodulekit.host_memory import retain_freed_memory  # noqa: E402

retain_freed_memory()

__version__ = "0.1.0"
