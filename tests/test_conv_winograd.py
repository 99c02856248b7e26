"""Winograd's convolutions (nodulekit/engine/cpu_conv_winograd.py): the transforms' algebra
in float64, each stage against a direct computation, the layer against the float64
reference at the sizes where 'auto' takes it, and the same bits whatever the threads and
register blocks. The op itself against torch and the reference, on every shape class the
kernel has (one tile, channel blocks of 64 + 8 and 16 + 8): tests/test_ops.py, backend
``cpu-winograd``."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.engine import cpu, cpu_conv_packed, get_backend
from nodulekit.engine import cpu_conv_winograd as wg
from nodulekit.engine.cpu import CPUBackend


def correlate_1d(d, g):
    return np.array([d[i:i + len(g)] @ g for i in range(len(d) - len(g) + 1)])


def test_the_transforms_compute_the_correlations():
    """F(4, 3): A^T [(G g) * (B^T d)] is the correlation of 6 inputs with 3 taps; F(3, 4),
    the weight gradient's: A_W^T [(G_W z) * (B^T d)] that of 6 inputs with 4; and in 2-D
    the same with each matrix on both sides (float64: only rounding, ~1e-15)."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, g, z = rng.standard_normal(6), rng.standard_normal(3), rng.standard_normal(4)
        np.testing.assert_allclose(wg.A_T @ ((wg.G @ g) * (wg.B_T @ d)), correlate_1d(d, g),
                                   atol=1e-13)
        np.testing.assert_allclose(wg.A_W_T @ ((wg.G_W @ z) * (wg.B_T @ d)),
                                   correlate_1d(d, z), atol=1e-13)
    d, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    y = wg.A_T @ ((wg.G @ g @ wg.G.T) * (wg.B_T @ d @ wg.B_T.T)) @ wg.A_T.T
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y, want, atol=1e-12)


def packed_weights(w_tk, wide):
    """What the backend hands the products: U in its packed layout, in blocks of rows."""
    c, k = w_tk.shape[0] // 9, w_tk.shape[1]
    out = np.empty(wg.PLANES * c * k, dtype=np.float32)
    offsets = wg.packed_offsets(k, wide)
    for c0 in range(0, c, 5):
        wg.transform_and_pack_rows(w_tk, out, offsets, c0, min(c, c0 + 5))
    return out


@pytest.mark.parametrize("c,k", [(8, 8), (24, 56), (128, 72)])
def test_the_weights_transform_and_packing(c, k):
    """U = G g G^T for every channel pair, against float64 (float32 FMAs in tap order: a
    few ulps); and the packed layout, in blocks of rows as the backend runs it, holds in
    each plane exactly what cpu_conv_packed packs from that plane's [C, K], for both
    register-block families."""
    rng = np.random.default_rng(1)
    w_tk = rng.standard_normal((9 * c, k)).astype(np.float32)
    u = wg.transform_weights(w_tk)
    g = w_tk.astype(np.float64).reshape(3, 3, c, k)
    want = np.einsum("ir,js,rsck->ijck", wg.G, wg.G, g).reshape(wg.PLANES, c, k)
    np.testing.assert_allclose(u, want, rtol=0, atol=1e-6 * np.abs(want).max())
    for wide in (True, False):
        packed = packed_weights(w_tk, wide)
        for xi in (0, 17, 35):
            np.testing.assert_array_equal(
                packed[xi * c * k:(xi + 1) * c * k], cpu_conv_packed.pack_weights(u[xi], wide))


def reference_conv(x, w, dy):
    ref = get_backend("reference")
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    y = ref.conv2d_forward(x64, w64, np.zeros(w.shape[0]), False)
    dx, dw, _ = ref.conv2d_backward(dy64, x64, w64, y, False, True)
    return y, dx, dw


# layer shapes where 'auto' takes winograd for all three (forward, data and weight gradient):
# several blocks of tile rows, several passes of the weight gradient's products, channel
# blocks of 64 + 32 (K = 96) and a C of 40 (blocks of 8 rows ending early for 4-row ones)
LAYERS = {
    "4x32x32-c64-k64": (4, 32, 32, 64, 64),
    "2x48x32-c40-k96": (2, 48, 32, 40, 96),
    "1x64x64-c32-k32": (1, 64, 64, 32, 32),
}


@pytest.mark.parametrize("shape", LAYERS.values(), ids=LAYERS.keys())
def test_a_layer_against_float64(shape):
    """The forward pass, data and weight gradients of a layer 'auto' gives to Winograd,
    against the float64 reference, within the fp32 rule of tests/opcheck.py: 1e-6 x
    sqrt(L) of the output's scale, L its reduction length (measured: 6x the direct
    kernels' error, still 3-4x inside it)."""
    n, h, w, c, k = shape
    assert cpu._winograd_conv("auto", c, k, h, w, n)
    assert cpu._winograd_conv("auto", k, c, h, w, n)  # the data gradient's convolution
    assert cpu._winograd_weight_grad("auto", c, k, h, w, n)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = (rng.standard_normal((k, 3, 3, c)) * (2 / (9 * c)) ** .5).astype(np.float32)
    dy = rng.standard_normal((n, h, w, k)).astype(np.float32)
    be = CPUBackend()
    y = be.conv2d_forward(x, wt, np.zeros(k, dtype=np.float32), False)
    dx, dw, _ = be.conv2d_backward(dy, x, wt, y, False, True)
    for name, got, want, length in zip(("y", "dx", "dw"), (y, dx, dw), reference_conv(x, wt, dy),
                                       (9 * c, 9 * k, n * h * w), strict=True):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-6 * length ** .5, f"{name}: error {err:.2e} of the scale"


def test_the_same_bits_with_any_threads_and_either_block_family():
    """Every output is one fixed chain of operations: one thread or two, 32-register or
    16-register blocks, the same bits (the blocks of tile rows do not depend on the
    threads; the weight gradient's partial sums are added in block order)."""
    n, h, w, c, k = 2, 32, 48, 48, 40
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((k, 3, 3, c)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    dy = rng.standard_normal((n, h, w, k)).astype(np.float32)
    results = []
    for threads in (1, 2):
        be = CPUBackend(threads=threads, conv_variant="winograd")
        y = be.conv2d_forward(x, wt, b, True)
        results.append((y, *be.conv2d_backward(dy, x, wt, y, True, True)[:2]))
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)

    w_tk = np.ascontiguousarray(wt.transpose(1, 2, 3, 0).reshape(9 * c, k))
    tiles = n * h // 4 * (w // 4)
    outputs = []
    for wide in (True, False):
        y = np.empty((n, h, w, k), dtype=np.float32)
        v = np.empty(wg.PLANES * wg.plane_floats(tiles, c), dtype=np.float32)
        m = np.empty(wg.PLANES * wg.plane_floats(tiles, k), dtype=np.float32)
        wg.conv3x3_winograd_tile_rows(x, packed_weights(w_tk, wide), b, True, y, 0,
                                      n * h // 4, v, m, wide)
        pass_tiles = max(1, wg.WEIGHT_GRAD_TILES // (w // 4)) * (w // 4)
        vz = [np.empty(wg.PLANES * wg.plane_floats(pass_tiles, ch), dtype=np.float32)
              for ch in (c, k)]
        mw = np.empty(wg.PLANES * c * k, dtype=np.float32)
        wg.weight_grad_tile_rows(x, dy, 0, n * h // 4, mw, *vz, wide)
        outputs.append((y, mw))
    for one, two in zip(*outputs, strict=True):
        np.testing.assert_array_equal(one, two)


def test_auto_takes_winograd_only_where_it_measured_faster():
    auto = cpu._winograd_conv
    assert auto("auto", 64, 64, 128, 128, 4)
    assert auto("auto", 16, 32, 64, 64, 8)
    assert auto("auto", 512, 256, 32, 32, 4)
    assert not auto("auto", 16, 16, 128, 128, 8)  # 16 channels in and out
    assert not auto("auto", 8, 16, 128, 128, 8)
    assert not auto("auto", 512, 512, 16, 16, 4)  # 64 tiles
    assert not auto("auto", 64, 64, 126, 128, 4)  # a side no multiple of 4
    assert not auto("auto", 60, 64, 128, 128, 4)  # C no multiple of 8
    assert auto("winograd", 8, 8, 4, 4, 1) and not auto("packed", 64, 64, 128, 128, 4)
    grad = cpu._winograd_weight_grad
    assert grad("auto", 32, 32, 256, 256, 4) and grad("auto", 128, 128, 64, 64, 4)
    assert not grad("auto", 16, 32, 64, 64, 8)  # cpu_weight_grad_taps is quicker there
    assert not grad("auto", 512, 512, 16, 16, 4)


def test_a_shape_it_cannot_take_falls_back_to_auto():
    """The named version on sides that are no multiple of 4 (or channels of no multiple
    of 8): what 'auto' computes, bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)
    wt = rng.standard_normal((24, 3, 3, 16)).astype(np.float32)
    b = np.zeros(24, dtype=np.float32)
    dy = rng.standard_normal((2, 6, 10, 24)).astype(np.float32)
    got, want = (be.conv2d_backward(dy, x, wt, be.conv2d_forward(x, wt, b, True), True, True)
                 for be in (CPUBackend(conv_variant="winograd"), CPUBackend()))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
