"""The up-convolution's version 3 (``cpu_upconv_packed.py``) on its own.

It must give version 2's bits (``cpu_upconv.py``: the same chain of FMAs per output, which
keeps the default run's tables) wherever version 2 runs (forward K % 8 == 0, backward
C % 16 == 0), and the float64 reference's values within fp32 rounding where only
it runs (C % 16 == 8). Both block families run on any machine (16-lane vectors are still
correct without AVX-512, only slow), at the shapes where the blocks meet their edges: rows
narrower than a block (one pixel at a time), rows that are not a multiple of the block's
pixels (a last block overlapping the one before), K and C made of 64-, 32-, 16- and
8-channel blocks, weight-gradient ranges that start and end inside image rows, and
chunks of pixels that span rows. test_ops.py checks the backend's ops (every variant)
against the reference and torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from opcheck import TOLERANCES

from nodulekit.engine import cpu_upconv as v2
from nodulekit.engine import cpu_upconv_packed as v3
from nodulekit.engine.cpu import CPUBackend
from nodulekit.engine.simd import aligned_copy

SHAPES = [  # N, H, W, C, K, skip channels
    (1, 3, 5, 16, 16, 16), (2, 3, 7, 32, 48, 5), (1, 4, 20, 64, 24, 0),
    (2, 5, 9, 16, 8, 8), (1, 2, 3, 16, 120, 3), (2, 3, 17, 48, 64, 64),
    (1, 2, 6, 128, 40, 1), (2, 4, 8, 8, 16, 16), (1, 3, 33, 24, 8, 2),
]
WIDE = pytest.mark.parametrize("wide", [True, False], ids=["wide", "narrow"])


def _inputs(rng, n, h, w, c, k, cs):
    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return dict(x=r(n, h, w, c), w=r(k, 2, 2, c, scale=c ** -.5), b=r(k),
                skip=r(n, 2 * h, 2 * w, cs), dcat=r(n, 2 * h, 2 * w, cs + k))


def _grad_part(dcat, k):
    """g[n, i, j, a, b, k] of the concat gradient's up-convolution channels, float64."""
    n, h2, w2, ct = dcat.shape
    g = dcat[..., ct - k:].astype(np.float64)
    return g.reshape(n, h2 // 2, 2, w2 // 2, 2, k).transpose(0, 1, 3, 2, 4, 5)


def _v3_all(inputs, wide, k_parts=1):
    x, w, b, skip, dcat = (inputs[key] for key in ("x", "w", "b", "skip", "dcat"))
    n, h, wd, c = x.shape
    k, cs = w.shape[0], skip.shape[3]
    y = np.full(skip.shape[:3] + (cs + k,), np.nan, dtype=np.float32)
    w_fwd = v3.pack_forward_weights(w, wide)
    for ab in range(4):  # the backend's (a, b) parts
        v3.upconv2x2_concat_rows(skip, x, w_fwd, b, y, 0, n * h, ab, ab + 1, wide)
    out = dict(y=y)
    if c % 8 == 0:
        dskip = np.full(skip.shape, np.nan, dtype=np.float32)
        dx = np.full(x.shape, np.nan, dtype=np.float32)
        w_dx = v3.pack_data_grad_weights(w, wide)
        zeros = np.zeros(c, dtype=np.float32)
        for r0, r1 in ((0, 1), (1, n * h)):  # blocks of rows
            v3.upconv2x2_split_dx_rows(dcat, w_dx, zeros, dskip, dx, r0, r1, 0, c, wide)
        dw = np.full((4 * k, c), np.nan, dtype=np.float32)
        bounds = [8 * (k // 8 * i // k_parts) for i in range(k_parts + 1)]
        for k0, k1 in zip(bounds, bounds[1:], strict=False):  # the backend's k ranges
            v3.upconv2x2_weight_grad_pixels(dcat, x, 0, n * h * wd, k0, k1, dw, wide)
        out.update(dskip=dskip, dx=dx, dw=dw)
    return out


@pytest.mark.parametrize("n,h,w,c,k,cs", SHAPES)
@WIDE
def test_version_3_gives_version_2s_bits(rng, n, h, w, c, k, cs, wide):
    inputs = _inputs(rng, n, h, w, c, k, cs)
    got = _v3_all(inputs, wide, k_parts=2 if k >= 16 else 1)
    x, wt, b, skip, dcat = (inputs[key] for key in ("x", "w", "b", "skip", "dcat"))
    pixels = n * h * w
    y = np.empty_like(got["y"])
    v2.upconv2x2_concat_pixels(skip, x, aligned_copy(wt.transpose(3, 1, 2, 0)), b, y, 0,
                               pixels)
    np.testing.assert_array_equal(got["y"], y)
    if c % 16:
        return  # version 2's backward needs C % 16 == 0; checked against float64 below
    dskip, dx = np.empty_like(skip), np.empty_like(x)
    v2.upconv2x2_split_dx_pixels(dcat, aligned_copy(wt.transpose(1, 2, 0, 3)), dskip, dx, 0,
                                 pixels)
    np.testing.assert_array_equal(got["dskip"], dskip)
    np.testing.assert_array_equal(got["dx"], dx)
    dw = np.empty((4 * k, c), dtype=np.float32)
    v2.upconv2x2_weight_grad_pixels(dcat, x, 0, pixels, dw)
    np.testing.assert_array_equal(got["dw"], dw)


@pytest.mark.parametrize("n,h,w,c,k,cs", SHAPES)
@WIDE
def test_version_3_against_float64(rng, n, h, w, c, k, cs, wide):
    inputs = _inputs(rng, n, h, w, c, k, cs)
    got = _v3_all(inputs, wide)
    x, wt, b = (inputs[key].astype(np.float64) for key in ("x", "w", "b"))
    g = _grad_part(inputs["dcat"], k)
    up = np.einsum("nijc,kabc->nijabk", x, wt) + b
    up = up.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, k)
    rtol, atol = TOLERANCES["fp32"]
    np.testing.assert_array_equal(got["y"][..., :cs], inputs["skip"])
    np.testing.assert_allclose(got["y"][..., cs:], up, rtol=rtol, atol=atol * np.sqrt(c))
    if c % 8:
        return
    np.testing.assert_array_equal(got["dskip"], inputs["dcat"][..., :cs])
    np.testing.assert_allclose(got["dx"], np.einsum("nijabk,kabc->nijc", g, wt), rtol=rtol,
                               atol=atol * np.sqrt(4 * k))
    dw = np.einsum("nijabk,nijc->abkc", g, x).reshape(4 * k, c)
    np.testing.assert_allclose(got["dw"], dw, rtol=rtol, atol=atol * np.sqrt(n * h * w))


@WIDE
def test_weight_gradient_over_any_range_of_pixels(rng, wide):
    """Ranges that start and end inside image rows, summed in order as one chain: the
    same bits as one range over all pixels when resumed (version 2's partial blocks are
    the backend's other plan), and rows of out outside k0..k1 left alone."""
    inputs = _inputs(rng, 2, 3, 7, 16, 24, 4)
    x, dcat = inputs["x"], inputs["dcat"]
    whole = np.empty((96, 16), dtype=np.float32)
    v3.upconv2x2_weight_grad_pixels(dcat, x, 5, 37, 0, 24, whole, wide)
    old = np.empty_like(whole)
    v2.upconv2x2_weight_grad_pixels(dcat, x, 5, 37, old)
    np.testing.assert_array_equal(whole, old)
    part = np.full_like(whole, 7.0)
    v3.upconv2x2_weight_grad_pixels(dcat, x, 5, 37, 8, 16, part, wide)
    rows = np.zeros(96, dtype=bool)
    for ab in range(4):
        rows[ab * 24 + 8: ab * 24 + 16] = True
    np.testing.assert_array_equal(part[rows], whole[rows])
    assert (part[~rows] == 7.0).all()


@pytest.mark.parametrize("n,h,w,c,k,cs", [(2, 16, 16, 512, 256, 256), (1, 8, 8, 64, 32, 32),
                                          (2, 6, 10, 256, 24, 8)])
def test_backend_plans_give_one_result(rng, n, h, w, c, k, cs):
    """The backend splits version 3's work into parts of (a, b) positions or channels where
    the weights are large and into ranges of k for the weight gradient: every output is
    still one chain in one order, so 'packed' and 'auto' equal one whole call, bit for bit,
    with one thread or two."""
    inputs = _inputs(rng, n, h, w, c, k, cs)
    want = _v3_all(inputs, v3.WIDE_BLOCKS)
    for threads in (1, 2):
        be = CPUBackend(threads=threads, conv_variant="packed")
        x, wt, b, skip, dcat = (inputs[key] for key in ("x", "w", "b", "skip", "dcat"))
        np.testing.assert_array_equal(be.upconv2x2_concat_forward(skip, x, wt, b), want["y"])
        dskip, dx, dw, _ = be.upconv2x2_split_backward(dcat, cs, x, wt)
        np.testing.assert_array_equal(dskip, want["dskip"])
        np.testing.assert_array_equal(dx, want["dx"])
        # (these shapes have too few pixels for the backend's per-block partials, which sum
        # in version 2's blocks instead: test_ops holds those to the reference)
        np.testing.assert_array_equal(dw.transpose(1, 2, 0, 3).reshape(4 * k, c), want["dw"])
