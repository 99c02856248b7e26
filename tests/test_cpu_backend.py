"""What only the CPU backend has: its kernels on their own, at the shapes where their blocks
meet borders, and the determinism that exact resume relies on.

Every op of the CPU backend, and each of its convolution versions (backends
``cpu-<version>``), is checked against the reference and torch in test_ops.py; here are
the pieces below the op contract: the register-blocked kernels of ``cpu_conv.py`` called
directly, the weight gradient's independence of the thread count, the SIMD helpers' typing,
and the names of the convolution versions.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from opcheck import TOLERANCES, rand, reference

from nodulekit.engine.cpu import CONV_VARIANTS, CPUBackend


def test_cpu_conv_variant_must_be_known():
    choices = ", ".join(["auto", *CONV_VARIANTS])
    with pytest.raises(ValueError, match=re.escape(
            f"unknown cpu convolution variant 'v3'; choose {choices}")):
        CPUBackend(conv_variant="v3")


@pytest.mark.parametrize("hw,c,k,r", [((40, 37), 16, 16, 3), ((40, 37), 32, 8, 3),
                                       ((4, 16), 4, 64, 3),
                                       ((40, 37), 16, 4, 1), ((9, 7), 64, 96, 3),
                                       ((9, 7), 64, 96, 1)])
def test_cpu_weight_gradient_is_bit_identical_for_any_thread_count(rng, hw, c, k, r):
    """dW is a sum over pixels; the CPU backend splits it the same way whatever the
    threads do (per-block partials added in block order at 40x37; at 9x7 the product is
    split over its columns instead), so the result cannot depend on how many threads
    there are or which thread took which block (exact resume relies on this)."""
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = rng.standard_normal((k, r, r, c)).astype(np.float32)
    y = np.maximum(rng.standard_normal((2, *hw, k)), 0).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    results = [CPUBackend(threads=t).conv2d_backward(dy, x, w, y, relu=True)
               for t in (1, 2, 3, 2)]
    for dx, dw, db in results[1:]:
        assert np.array_equal(dw, results[0][1])
        assert np.array_equal(db, results[0][2])
        assert np.array_equal(dx, results[0][0])


@pytest.mark.parametrize("variant", ["packed", "register_blocked"])
def test_cpu_convolution_blocks_do_not_change_a_bit(rng, monkeypatch, variant):
    """The 3x3 convolutions' blocks of image rows (``cpu.CONV_BLOCK_BYTES``) are a matter
    of speed only: every output pixel is summed on its own, so the forward pass and the
    data gradient are the same bits with one image row a block or 16 blocks a call."""
    import nodulekit.engine.cpu as cpu

    x = rng.standard_normal((3, 21, 19, 16)).astype(np.float32)
    w = rng.standard_normal((32, 3, 3, 16)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    dy = rng.standard_normal((3, 21, 19, 32)).astype(np.float32)
    be = CPUBackend(conv_variant=variant)
    results = []
    for size in (1, 64 << 20):  # a block as small as Workers.plan lets it be; the largest
        monkeypatch.setattr(cpu, "CONV_BLOCK_BYTES", size)
        y = be.conv2d_forward(x, w, b, relu=True)
        results.append((y, be.conv2d_backward(dy, x, w, y, relu=True)[0]))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


# The register-blocked CPU kernels on their own, at the shapes where borders meet: one-pixel
# and one-row images, rows shorter than one 6-pixel block, leftovers after the last block,
# C not a multiple of 4 (weight-gradient groups of 1), K of several 16-channel blocks, and
# K % 16 == 8 (a last block of 8 channels).
V2_SHAPES = [  # N, H, W, C, K
    (1, 1, 1, 4, 16), (2, 1, 7, 3, 16), (1, 5, 2, 1, 32), (3, 4, 8, 8, 16),
    (1, 3, 13, 5, 32), (2, 7, 20, 16, 16), (1, 2, 9, 12, 48),
    (1, 4, 15, 8, 8), (2, 3, 9, 3, 24), (1, 1, 2, 16, 8),  # K % 16 == 8: an 8-channel block
]


@pytest.mark.parametrize("n,h,w,c,k", V2_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_cpu_register_blocked_conv_kernels(rng, n, h, w, c, k, relu):
    """cpu_conv.conv3x3_rows and conv3x3_weight_grad_rows against the float64 reference,
    with the fp32 tolerance of opcheck (rounding of a sum of 9C or N*H*W terms)."""
    from nodulekit.engine import cpu_conv

    rtol, atol = TOLERANCES["fp32"]
    x64, w64 = rand(rng, n, h, w, c), rand(rng, k, 3, 3, c, scale=(2 / (9 * c)) ** .5)
    b64, dz64 = rand(rng, k, scale=0.5), rand(rng, n, h, w, k)
    ref = reference()
    want_y = ref.conv2d_forward(x64, w64, b64, relu)
    _, want_dw, _ = ref.conv2d_backward(dz64, x64, w64, want_y, False, False)
    x, wt, b, dz = (a.astype(np.float32) for a in (x64, w64, b64, dz64))

    y = np.full((n, h, w, k), np.nan, dtype=np.float32)
    cpu_conv.conv3x3_rows(x, np.ascontiguousarray(wt.reshape(k, -1).T), b, relu, y, 0, n * h)
    scale = np.abs(want_y).max()
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol * (9 * c) ** .5 * scale)

    # all rows at once, and one partial per row added up: both must agree
    whole = np.full((9 * c, k), np.nan, dtype=np.float32)
    cpu_conv.conv3x3_weight_grad_rows(x, dz, 0, n * h, whole)
    parts = np.zeros((9 * c, k))
    out = np.full((9 * c, k), np.nan, dtype=np.float32)
    for row in range(n * h):
        cpu_conv.conv3x3_weight_grad_rows(x, dz, row, row + 1, out)
        parts += out
    want_tk = want_dw.reshape(k, -1).T
    tol = atol * (n * h * w) ** .5 * np.abs(want_tk).max()
    np.testing.assert_allclose(whole, want_tk, rtol=rtol, atol=tol)
    np.testing.assert_allclose(parts, want_tk, rtol=rtol, atol=tol)


def test_cpu_register_blocked_relu_keeps_nan():
    """A NaN stays NaN through the fused ReLU (training's NaN check relies on seeing it)."""
    from nodulekit.engine import cpu_conv

    x = np.zeros((1, 3, 8, 1), dtype=np.float32)
    x[0, 1, 4, 0] = np.nan
    y = np.empty((1, 3, 8, 16), dtype=np.float32)
    cpu_conv.conv3x3_rows(x, np.ones((9, 16), dtype=np.float32), np.zeros(16, np.float32),
                          True, y, 0, 3)
    assert np.isnan(y[0, :, 3:6]).all() and not np.isnan(y[0, :, :3]).any()


def test_simd_refuses_arrays_its_flat_index_would_misread():
    """The vector loads index the data pointer flatly: a strided array must be refused
    when the kernel compiles, not read wrong."""
    from numba import njit
    from numba.core.errors import TypingError

    from nodulekit.engine.simd import load8, store8

    @njit
    def copy8(a, out):
        store8(out, 0, load8(a, 0))

    out = np.zeros(8, np.float32)
    copy8(np.arange(8, dtype=np.float32), out)
    assert np.array_equal(out, np.arange(8))
    with pytest.raises(TypingError, match="C-contiguous float32"):
        copy8(np.arange(16, dtype=np.float32)[::2], out)
    with pytest.raises(TypingError, match="C-contiguous float32"):
        copy8(np.arange(8, dtype=np.float64), out)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (1, 130, 130, 32), (0, 4)])
def test_aligned_empty_starts_on_a_cache_line(shape):
    from nodulekit.engine.simd import CACHE_LINE, aligned_copy, aligned_empty

    held = [aligned_empty(shape) for _ in range(8)]  # kept alive: malloc gives new places
    for a in held:
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous
        assert a.size == 0 or a.ctypes.data % CACHE_LINE == 0
    src = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    copy = aligned_copy(src.T if src.ndim > 1 else src)  # a strided view, too
    np.testing.assert_array_equal(copy, src.T if src.ndim > 1 else src)
    assert copy.size == 0 or copy.ctypes.data % CACHE_LINE == 0


@pytest.mark.parametrize("rows, cols", [(4608, 512), (33, 17), (1, 40), (40, 1), (64, 32)])
def test_tiled_transpose_is_exact(rng, rows, cols):
    from nodulekit.engine import cpu_kernels as kern

    a = rng.standard_normal((rows, cols), dtype=np.float32)
    out = np.empty((cols, rows), dtype=np.float32)
    kern.transpose(a, out)
    np.testing.assert_array_equal(out, a.T)
