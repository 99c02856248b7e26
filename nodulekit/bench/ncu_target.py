"""What ``ncu`` profiles in ``bench/gpu_check.sh bench``: the three heaviest kernels, once each.

A training step's arithmetic is almost all convolution: the 3x3 forward (which also gives
the data gradient, on flipped weights) and the weight gradient, at the default fp32
precision (conv.cu's register-blocked kernels), and the same forward on tensor cores at
tf32 (conv_mma.cu), the fast path. This program launches each of :data:`KERNELS` exactly
once, in that order, on the paper's first full-width layer (enc0.conv2: 64 -> 64 channels,
3x3, 512x512) at batch 4, so that

    ncu --kernel-name "regex:^(A|B|C)$" --launch-count 3 python -m nodulekit.bench.ncu_target

profiles exactly those three launches (``ncu_regex()`` gives the pattern).
"""

from __future__ import annotations

import numpy as np

# (kernel, how this program launches it)
KERNELS = ("conv_forward_128x64_vec4", "conv_weight_grad_64x128_vec4",
           "conv_forward_mma_tf32_vec4")
LAYER = (4, 512, 64, 64)  # batch, H = W, C, K


def ncu_regex() -> str:
    return "regex:^(" + "|".join(KERNELS) + ")$"


def launch_all(layer: tuple = LAYER, runtime=None) -> None:
    """Launch each of KERNELS once (and the small kernels around them) on ``layer``."""
    from nodulekit.engine.cuda import CudaBackend

    n, h, c, k = layer
    rng = np.random.default_rng(0)
    fp32 = CudaBackend(precision="fp32", runtime=runtime)
    tf32 = CudaBackend(precision="tf32", runtime=fp32.rt)
    x = fp32.asarray(rng.standard_normal((n, h, h, c), dtype=np.float32))
    w = fp32.asarray(rng.standard_normal((k, 3, 3, c), dtype=np.float32) * np.float32(0.06))
    b = fp32.zeros((k,))
    dy = fp32.asarray(rng.standard_normal((n, h, h, k), dtype=np.float32))
    fp32.conv2d_forward(x, w, b, relu=False)                  # conv_forward_128x64_vec4
    fp32.conv2d_backward(dy, x, w, need_dx=False)             # conv_weight_grad_64x128_vec4
    tf32.conv2d_forward(x, w, b, relu=False)                  # conv_forward_mma_tf32_vec4
    fp32.synchronize()


def main() -> int:
    launch_all()
    n, h, c, k = LAYER
    print("launched", ", ".join(KERNELS), f"on {n}x{h}x{h}x{c} -> {k}, 3x3")
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--regex"]:
        print(ncu_regex())
        raise SystemExit(0)
    raise SystemExit(main())
