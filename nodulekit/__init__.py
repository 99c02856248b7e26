"""nodulekit: lung-nodule segmentation on a hand-written engine (CUDA kernels + Numba)."""

__version__ = "0.1.0"
