"""The weight gradient vectorised over taps (``cpu_weight_grad_taps.py``) on its own and in
the backend.

The kernel runs on any machine (its 16-lane vectors are correct without AVX-512, only
slow), so it is checked here wherever the tests run, though ``auto`` picks it only where
16-lane FMAs run at full width. The shapes meet its edges: C = 8 and 24 (a kernel row of
24 or 72 taps, not whole vectors: the last block's extra lanes are read past the padded
input's end and thrown away), C = 16, 32 and 48 (blocks of 48 taps, one or several), K = 8
and 16 (one or two blocks of channels), rows of one pixel, and chunks of image rows that
do not divide the call's rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from opcheck import TOLERANCES, rand, reference

from nodulekit.engine import cpu, cpu_conv_packed
from nodulekit.engine import cpu_weight_grad_taps as taps
from nodulekit.engine.cpu import CPUBackend
from nodulekit.engine.simd import aligned_empty
from nodulekit.reference import torch_ops as T

SHAPES = [  # N, H, W, C, K
    (2, 5, 7, 8, 8), (1, 3, 11, 24, 8), (3, 6, 9, 16, 16), (2, 4, 5, 8, 16),
    (2, 6, 6, 32, 16), (1, 2, 1, 48, 8), (2, 3, 4, 40, 16),
]


def _padded_with_nan_slack(x):
    """pad_rows(x) in a buffer whose SLACK floats after the end are NaN: a kernel that used
    them would give NaN."""
    n, h, w, c = x.shape
    count = n * (h + 2) * (w + 2) * c
    flat = aligned_empty((count + taps.SLACK,))
    flat[:] = np.nan
    xp = flat[:count].reshape(n, h + 2, w + 2, c)
    cpu_conv_packed.pad_rows(x, xp, 0, n * (h + 2))
    return xp


@pytest.mark.parametrize("c,padded", [(8, 32), (16, 48), (24, 80), (32, 96), (40, 128)])
def test_padded_taps_are_whole_vectors(c, padded):
    assert taps.padded_taps(c) == padded


@pytest.mark.parametrize("n,h,w,c,k", SHAPES)
def test_weight_grad_taps_against_float64(rng, n, h, w, c, k):
    """Against the float64 reference within opcheck's fp32 tolerance (a sum of N*H*W
    terms); in chunks of one image row and in two calls over halves of the rows (added),
    which must give what one call gives, bit for bit where the sums are the same."""
    rtol, atol = TOLERANCES["fp32"]
    x64, dz64 = rand(rng, n, h, w, c), rand(rng, n, h, w, k)
    w64 = rand(rng, k, 3, 3, c)
    ref = reference()
    want_y = ref.conv2d_forward(x64, w64, np.zeros(k), False)
    _, want_dw, _ = ref.conv2d_backward(dz64, x64, w64, want_y, False, False)
    x, dz = x64.astype(np.float32), dz64.astype(np.float32)
    xp = _padded_with_nan_slack(x)
    tp = taps.padded_taps(c)

    def run(row0, row1, chunk=taps.PIXEL_CHUNK):
        out = np.full((k, 3, tp), np.nan, dtype=np.float32)
        taps.weight_grad_taps(xp, dz, row0, row1, out, chunk)
        return out[:, :, :3 * c]  # the rest: lanes thrown away (NaN here: see above)

    whole = run(0, n * h)
    got = whole.reshape(k, 3, 3, c)
    np.testing.assert_allclose(got, want_dw, rtol=rtol,
                               atol=atol * (n * h * w) ** .5 * np.abs(want_dw).max())
    assert np.array_equal(run(0, n * h, 1), whole)  # sums resumed from out, row by row
    half = n * h // 2
    if half:
        parts = run(0, half) + run(half, n * h)
        np.testing.assert_allclose(parts.reshape(k, 3, 3, c), want_dw, rtol=rtol,
                                   atol=atol * (n * h * w) ** .5 * np.abs(want_dw).max())


def _force_taps(monkeypatch, on: bool):
    monkeypatch.setattr(cpu, "_taps_weight_grad",
                        lambda variant, c, k: on and taps.supports(c, k))


@pytest.mark.parametrize("n,h,w,c,k", [(2, 9, 7, 8, 8), (3, 5, 16, 16, 16), (2, 4, 4, 24, 8),
                                       (2, 3, 5, 16, 40)])
def test_backend_weight_grad_with_taps_matches_without(rng, monkeypatch, n, h, w, c, k):
    """conv2d_backward with the taps kernel against the same backend without it (the
    transposed kernels), the float64 reference and torch; dx and db do not change."""
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((k, 3, 3, c)).astype(np.float32)
    y = np.maximum(rng.standard_normal((n, h, w, k)), 0).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    _force_taps(monkeypatch, True)
    dx, dw, db = CPUBackend(threads=2).conv2d_backward(dy, x, wt, y, True)
    _force_taps(monkeypatch, False)
    dx0, dw0, db0 = CPUBackend(threads=2).conv2d_backward(dy, x, wt, y, True)
    assert dw.shape == wt.shape and dw.dtype == np.float32
    assert np.array_equal(dx, dx0) and np.array_equal(db, db0)
    rtol, atol = TOLERANCES["fp32"]
    scale = (n * h * w) ** .5 * np.abs(dw0).max()
    np.testing.assert_allclose(dw, dw0, rtol=rtol, atol=2 * atol * scale)
    ref = reference()
    _, want_dw, _ = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64),
                                        wt.astype(np.float64), y.astype(np.float64), True,
                                        False)
    np.testing.assert_allclose(dw, want_dw, rtol=rtol, atol=atol * scale)
    dz = dy * (y > 0)  # the ReLU's mask as the backend applies it (y is not conv(x) here)
    _, torch_dw, _ = T.conv2d_backward(dz, x, wt, np.zeros(k, np.float32), False, False)
    np.testing.assert_allclose(dw, np.asarray(torch_dw), rtol=rtol, atol=atol * scale)


def test_backend_weight_grad_with_taps_is_bit_identical_for_any_thread_count(rng,
                                                                              monkeypatch):
    """One partial per block of image rows, added in block order: the thread count cannot
    change a bit (exact resume relies on it)."""
    _force_taps(monkeypatch, True)
    x = rng.standard_normal((2, 40, 37, 16)).astype(np.float32)
    wt = rng.standard_normal((16, 3, 3, 16)).astype(np.float32)
    y = np.maximum(rng.standard_normal((2, 40, 37, 16)), 0).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    results = [CPUBackend(threads=t).conv2d_backward(dy, x, wt, y, True)[1] for t in (1, 2, 3)]
    assert all(np.array_equal(r, results[0]) for r in results[1:])


def test_auto_takes_taps_only_for_few_output_channels_on_full_width_cores(monkeypatch):
    monkeypatch.setattr(cpu_conv_packed, "WIDE_BLOCKS", True)
    monkeypatch.setattr(cpu.fma_width, "full_width", lambda: True)
    assert cpu._taps_weight_grad("auto", 16, 16) and cpu._taps_weight_grad("auto", 8, 8)
    assert cpu._taps_weight_grad("packed", 32, 16)
    assert cpu._taps_weight_grad("auto", 16, 32) and cpu._taps_weight_grad("auto", 8, 64)
    assert not cpu._taps_weight_grad("auto", 32, 32)  # level with packed there
    assert not cpu._taps_weight_grad("auto", 1, 8)  # C = 1: 3 taps a kernel row
    assert not cpu._taps_weight_grad("register_blocked", 16, 16)
    monkeypatch.setattr(cpu.fma_width, "full_width", lambda: False)
    assert not cpu._taps_weight_grad("auto", 16, 16)  # not measured there: kept as it was
    monkeypatch.setattr(cpu.fma_width, "full_width", lambda: True)
    monkeypatch.setattr(cpu_conv_packed, "WIDE_BLOCKS", False)
    assert not cpu._taps_weight_grad("auto", 16, 16)  # 24 sums need 32 registers
