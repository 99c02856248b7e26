"""The CPU backend's instance and batch norm do the per-channel arithmetic between their
passes in Numba (cpu_norm.instance_statistics, instance_grad_coefficients, batch_sums,
batch_statistics, batch_grad_coefficients) where ops.Backend does it in NumPy: they must
give the same bits, not just close ones (the CPU backend promises the same results run
after run, and the demo's tables were recorded before the change). Batch norm also with a
stand-in for the cross-rank sum between the halves, in training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.engine import get_backend
from nodulekit.engine.ops import Backend

SHAPES = {  # (N, H, W, C): one block a sample, several blocks (block_pixels), C off 8
    "n1-7x9-c3": (1, 7, 9, 3),
    "n8-8x8-c128": (8, 8, 8, 128),
    "n4-128x128-c8": (4, 128, 128, 8),
    "n3-64x48-c16": (3, 64, 48, 16),
    "n2-33x31-c5": (2, 33, 31, 5),
}


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_instance_norm_numba_arithmetic_is_numpys_bit_for_bit(shape, relu):
    be = get_backend("cpu")
    rng = np.random.default_rng(sum(shape))
    n, h, w, c = shape
    x = (rng.standard_normal(shape) * 2 + rng.standard_normal(c) * 3).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.5 * rng.standard_normal(c)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    ours = be.instance_norm_forward(x, gamma, beta, relu=relu)
    generic = Backend._instance_norm_forward(be, x, gamma, beta, 1e-5, relu)
    for name, a, b in zip(("y", "mean", "invstd"), ours, generic, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)

    y, mean, invstd = ours
    ours_b = be.instance_norm_backward(dy, x, y, mean, invstd, gamma, relu=relu)
    generic_b = Backend._instance_norm_backward(be, dy, x, y if relu else None, mean, invstd,
                                                gamma, relu)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), ours_b, generic_b, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def _other_rank(c):
    """A stand-in cross-rank sum: adds a fixed second rank's sums and count to the buffer."""
    rng = np.random.default_rng(c)
    other = np.concatenate([rng.standard_normal(c) * 50, 400 + rng.random(c) * 100, [300.0]])

    def sum_across(buf):
        buf[...] = buf + other
    return sum_across


@pytest.mark.parametrize("across", [False, True], ids=["one-rank", "two-ranks"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_batch_norm_numba_arithmetic_is_numpys_bit_for_bit(shape, relu, training, across):
    be = get_backend("cpu")
    rng = np.random.default_rng(sum(shape) + 1)
    n, h, w, c = shape
    x = (rng.standard_normal(shape) * 2 + rng.standard_normal(c) * 3).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.5 * rng.standard_normal(c)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    running = (rng.standard_normal(c).astype(np.float32),
               (0.5 + rng.random(c)).astype(np.float32))
    sum_across = _other_rank(c) if across else None

    run_ours, run_generic = [r.copy() for r in running], [r.copy() for r in running]
    ours = be._batch_norm_forward(x, gamma, beta, run_ours, training, relu, sum_across,
                                  0.1, 1e-5)
    generic = Backend._batch_norm_forward(be, x, gamma, beta, run_generic, training, relu,
                                          sum_across, 0.1, 1e-5)
    for name, a, b in zip(("y", "mean", "invstd", "running_mean", "running_var"),
                          (*ours, *run_ours), (*generic, *run_generic), strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    if training:  # the running statistics moved
        assert not np.array_equal(run_ours[0], running[0])

    y, mean, invstd = ours
    args = (dy, x, y if relu else None, mean, invstd, gamma, training, relu, sum_across)
    ours_b = be._batch_norm_backward(*args)
    generic_b = Backend._batch_norm_backward(be, *args)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), ours_b, generic_b, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
