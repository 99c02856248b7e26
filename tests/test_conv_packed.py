"""The CPU's packed convolution kernels (``cpu_conv_packed.py``) on their own.

test_ops.py checks the op on backend ``cpu-packed`` against the reference and torch, with
the block family this machine compiles for (``WIDE_BLOCKS``). Here both families run on
any machine (a 4 x 64 block of 16-lane vectors is still correct on a core without AVX-512,
only slow), at the shapes where the blocks meet their edges: rows narrower than a block
(one pixel at a time), rows that are not a multiple of the block's pixels (a last block
overlapping the one before), K made of 64-, 32-, 16- and 8-channel blocks, and 3C not a
multiple of the weight gradient's tap groups (taps left over, one at a time).
"""

from __future__ import annotations

import numpy as np
import pytest
from opcheck import TOLERANCES, rand, reference

from nodulekit.engine import cpu_conv_packed as packed
from nodulekit.engine.cpu import CPUBackend

CHUNK = packed.PIXEL_CHUNK

SHAPES = [  # N, H, W, C, K
    (1, 1, 1, 4, 8), (2, 3, 2, 5, 40), (1, 4, 3, 8, 16),  # rows narrower than any block
    (2, 5, 9, 3, 56), (1, 3, 13, 1, 24), (2, 6, 11, 16, 48),  # overlapping last blocks
    (1, 4, 16, 12, 32), (2, 2, 8, 32, 64), (1, 3, 7, 7, 8),
    (1, 3, 9, 8, 120), (2, 2, 3, 16, 64),  # every block width; a 64-block on short rows
    (1, 3, 21, 8, 16), (2, 2, 16, 5, 48),  # 16-pixel blocks (16 channels, 32 registers)
]


def _padded(x):
    n, h, w, c = x.shape
    xp = np.full((n, h + 2, w + 2, c), np.nan, dtype=np.float32)
    packed.pad_rows(x, xp, 0, n * (h + 2))
    return xp


def test_pad_rows_is_a_zero_border(rng):
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    assert np.array_equal(_padded(x), np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))


@pytest.mark.parametrize("k,wide,blocks", [
    (8, True, [(0, 8)]), (56, True, [(0, 32), (32, 16), (48, 8)]),
    (128, True, [(0, 64), (64, 64)]), (120, True, [(0, 64), (64, 32), (96, 16), (112, 8)]),
    (40, False, [(0, 16), (16, 16), (32, 8)]),
])
def test_channel_blocks_tile_k(k, wide, blocks):
    assert packed.channel_blocks(k, wide) == blocks


def test_channel_blocks_need_k_a_multiple_of_8():
    with pytest.raises(ValueError, match="K % 8 == 0, got K = 12"):
        packed.channel_blocks(12, True)


@pytest.mark.parametrize("n,h,w,c,k", SHAPES)
@pytest.mark.parametrize("wide", [True, False], ids=["wide", "narrow"])
def test_packed_kernels_against_float64(rng, n, h, w, c, k, wide):
    """Forward (with and without the fused ReLU) and the weight gradient, against the
    float64 reference within opcheck's fp32 tolerance (rounding of a sum of 9C or N*H*W
    terms); the weight gradient also in two tap ranges and in one partial per image row,
    which must give what the whole gives."""
    rtol, atol = TOLERANCES["fp32"]
    x64, w64 = rand(rng, n, h, w, c), rand(rng, k, 3, 3, c, scale=(2 / (9 * c)) ** .5)
    b64, dz64 = rand(rng, k, scale=0.5), rand(rng, n, h, w, k)
    ref = reference()
    x, wt, b, dz = (a.astype(np.float32) for a in (x64, w64, b64, dz64))
    xp = _padded(x)
    w_packed = packed.pack_weights(np.ascontiguousarray(wt.reshape(k, -1).T), wide)
    for relu in (False, True):
        want_y = ref.conv2d_forward(x64, w64, b64, relu)
        y = np.full((n, h, w, k), np.nan, dtype=np.float32)
        packed.conv3x3_packed_rows(xp, w_packed, b, relu, y, 0, n * h, wide)
        np.testing.assert_allclose(y, want_y, rtol=rtol,
                                   atol=atol * (9 * c) ** .5 * np.abs(want_y).max())

    _, want_dw, _ = ref.conv2d_backward(dz64, x64, w64, want_y, False, False)
    want_tk = want_dw.reshape(k, -1).T
    whole = np.full((9 * c, k), np.nan, dtype=np.float32)
    packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, 0, 9 * c, whole, wide, CHUNK)
    np.testing.assert_allclose(whole, want_tk, rtol=rtol,
                               atol=atol * (n * h * w) ** .5 * np.abs(want_tk).max())
    split = np.full((9 * c, k), np.nan, dtype=np.float32)
    middle = 9 * c // 2 + 1  # a range boundary inside a kernel row and a tap group
    packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, 0, middle, split, wide, CHUNK)
    packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, middle, 9 * c, split, wide,
                                      CHUNK)
    assert np.array_equal(split, whole)  # the same sums in the same order
    chunked = np.full((9 * c, k), np.nan, dtype=np.float32)
    packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, 0, 9 * c, chunked, wide, 1)
    assert np.array_equal(chunked, whole)  # sums resumed from out, chunk by chunk


def test_packed_relu_keeps_nan():
    """A NaN stays NaN through the fused ReLU (training's NaN check relies on seeing it)."""
    x = np.zeros((1, 3, 8, 1), dtype=np.float32)
    x[0, 1, 4, 0] = np.nan
    for wide in (True, False):
        y = np.empty((1, 3, 8, 32), dtype=np.float32)
        packed.conv3x3_packed_rows(_padded(x), packed.pack_weights(np.ones((9, 32), np.float32),
                                                                   wide),
                                   np.zeros(32, np.float32), True, y, 0, 3, wide)
        assert np.isnan(y[0, :, 3:6]).all() and not np.isnan(y[0, :, :3]).any()


@pytest.mark.parametrize("hw,c,k", [((40, 37), 32, 32), ((9, 7), 64, 96), ((4, 16), 16, 64)])
def test_packed_backward_is_bit_identical_for_any_thread_count(rng, hw, c, k):
    """Per-block partials added in block order (40 x 37), or the taps split over threads
    (9 x 7: partials would outweigh the data): either way the result cannot depend on the
    thread count (exact resume relies on it)."""
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = rng.standard_normal((k, 3, 3, c)).astype(np.float32)
    y = np.maximum(rng.standard_normal((2, *hw, k)), 0).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    results = [CPUBackend(threads=t, conv_variant="packed").conv2d_backward(dy, x, w, y, True)
               for t in (1, 2, 3)]
    for dx, dw, db in results[1:]:
        assert np.array_equal(dw, results[0][1])
        assert np.array_equal(dx, results[0][0])
        assert np.array_equal(db, results[0][2])


def test_block_family_follows_the_cpu_numba_compiles_for(monkeypatch):
    """WIDE_BLOCKS (32-register blocks) comes from the features Numba compiles for: given
    ones win over the host's, and a named CPU without features gets the 16-register ones."""
    from numba import config

    monkeypatch.setattr(config, "CPU_NAME", "haswell")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not packed._compiles_for_avx512()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+avx512vl")
    assert packed._compiles_for_avx512()
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    assert not packed._compiles_for_avx512()


def test_an_avx2_host_gets_the_16_register_blocks(monkeypatch):
    """The host's feature list names the features it lacks too ("-avx512f" on an AVX2
    core such as Zen 3): only "+avx512f" means 32 registers."""
    from numba import config

    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", None)

    class Host:
        def __init__(self, flat):
            self.flat = flat

        def flatten(self):
            return self.flat

    avx2 = "+64bit,+avx,+avx2,-avx512bw,-avx512f,-avx512vl,+fma"
    monkeypatch.setattr(packed.llvm, "get_host_cpu_features", lambda: Host(avx2))
    assert not packed._compiles_for_avx512()
    monkeypatch.setattr(packed.llvm, "get_host_cpu_features",
                        lambda: Host(avx2.replace("-avx512f", "+avx512f")))
    assert packed._compiles_for_avx512()
    assert not packed.enables_avx512("+avx2,+fma,-avx512f,+avx512fp16")


@pytest.mark.parametrize("n,h,w,c,k", SHAPES)
def test_both_block_families_give_the_same_bits(rng, n, h, w, c, k):
    """Every output is one chain of FMAs in the same order whatever the block (bias, then
    the taps in order; dW: the pixels in order), so a machine with 16 vector registers
    computes what one with 32 does, bit for bit: a run's numbers do not depend on it."""
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    w_tk = rng.standard_normal((9 * c, k)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    dz = rng.standard_normal((n, h, w, k)).astype(np.float32)
    xp = _padded(x)
    ys, dws = [], []
    for wide in (True, False):
        y = np.empty((n, h, w, k), dtype=np.float32)
        packed.conv3x3_packed_rows(xp, packed.pack_weights(w_tk, wide), b, True, y, 0, n * h,
                                   wide)
        dw = np.empty((9 * c, k), dtype=np.float32)
        packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, 0, 9 * c, dw, wide, CHUNK)
        ys.append(y)
        dws.append(dw)
    assert np.array_equal(ys[0], ys[1])
    assert np.array_equal(dws[0], dws[1])
