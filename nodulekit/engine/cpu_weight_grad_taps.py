"""The weight gradient of a 3x3 convolution with few channels, vectorised over the taps
(``cpu._taps_weight_grad``: where K or C is at most 16 and 16-lane FMAs run full width).

What it computes, NHWC float32 (the same sums as ``cpu_conv_packed``'s weight gradient):

    dW[k, dy, dx, c] = sum over pixels p = (n, h, w) of xp[n, h + dy, w + dx, c] dz[p, k]

with xp = x zero-padded by one pixel all round (``cpu_conv_packed.pad_rows``).

Why another kernel. The other two vectorise over the output channels k: a block holds
vectors of 8 or 16 channels of dz and broadcasts one tap of x per row. With K = 8 or 16 a
block is then one or two 8-lane vectors wide, and on a core whose FMAs are 16 lanes wide
(Intel's server cores, Zen 5) half of every instruction is idle; register_blocked's 4 x 16
block also keeps only 8 sums in flight, which its FMAs' latency leaves waiting. Measured on
the 2-core Xeon (family 6 model 207), 8 images at the demo's shapes: 8 -> 8 at 128 x 128
and 16 -> 16 at 64 x 64 ran at 111-122 GFLOP/s on both cores, against a peak of 350-490.

Turned around: for one kernel row dy the 3C taps of pixel w, xp[n, h + dy, w:w + 3, :],
are 3C consecutive floats of the padded input. So a block holds 3 vectors of 16 taps (48
consecutive taps) x 8 channels of dz: 24 sums of 16 lanes. Each pixel loads the 3 tap
vectors and broadcasts 8 values of dz (AVX-512 folds each broadcast into its FMA) for 24
FMAs, and 24 chains are in flight. The sums are dW's own rows: dW[k, dy] is 3C floats,
so the block stores straight into dW's layout, [K, 3, 3C] (no transpose after).

Where 3C is not a multiple of 16 (C = 8, 24, 40, ...: 24 taps a kernel row at C = 8, a
vector and a half) the last block is 2 x 8 and its second vector's last 8 lanes (the next
pixel's first taps) are thrown away; the rows of the output are padded to whole vectors
(``padded_taps``) and the caller drops the padding. Those lanes read up to 8 floats past a
padded row, so the padded input needs that much room after its end (``SLACK``).

Napkin math, one core of the 2-core Xeon (16-lane FMA peak 167-246 GFLOP/s a core,
depending on the neighbours), 8 images, against register_blocked and packed in turns:

    8 -> 8 at 128 x 128: 2 x 131072 x 72 x 8 = 151 MFLOP; 123-144 GFLOP/s (1.1 ms),
      register_blocked 52-59, packed 61-66 (the 2 x 8 block: 24 of 32 lanes used)
    16 -> 16 at 64 x 64: 164-177 against 57-62 and 74-90
    32 -> 16 at 64 x 64: 161-176 against 57-61 and 77-86
    16 -> 8 at 128 x 128: 171-191 against 55-59 and 66-76

Order of the sums: every output is one chain of FMAs over the pixels of a call's image rows,
in order, starting from 0; the caller adds the calls' partial sums in block order. The
bits depend on the shape and the block plan only, never on threads.

Run it: ``python -m nodulekit.engine.cpu_weight_grad_taps`` times it against
register_blocked and packed on one core; ``tests/test_weight_grad_taps.py`` checks it
against the float64 reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from nodulekit.engine.register_blocks import (
    fma_32x8,
    fma_48x8,
    load_32x8,
    load_48x8,
    store_32x8,
    store_48x8,
)
from nodulekit.engine.simd import zeros16

_JIT = {"cache": True, "nogil": True}
_INLINE = {"cache": True, "inline": "always"}

LANES = 16
CHANNELS = 8  # dz channels a block
SLACK = 8  # floats the padded input needs after its end (the C = 8 block's extra lanes)
# image rows per pass over the blocks: about this many pixels, so that their x and dz stay
# in L1/L2 while the blocks go over them
PIXEL_CHUNK = 256


def supports(c: int, k: int) -> bool:
    return c % 8 == 0 and k % CHANNELS == 0


def padded_taps(c: int) -> int:
    """A kernel row's 3C taps, rounded up to whole vectors: the output's row length."""
    return -(-3 * c // LANES) * LANES


@njit(**_INLINE)
def _block(fma, load, store, zeros, arrays, span, at):
    """One block (``register_blocks``: fma_48x8 and its load and store, or the 32 x 8
    ones) over a chunk's pixels, from 0 on its first chunk, else from what it stored.
    arrays = (xpf, dzf, outf); at = (first tap, first channel, output index, first?)."""
    xpf, dzf, outf = arrays
    r0, r1, height, ph, pw, width, c, k, dy, tp = span
    xi, d0, o, first = at
    row = uint64(3) * tp  # channel j's output row: 3 kernel rows of padded taps
    a = zeros if first else load(outf, o, row)
    for r in range(r0, r1):
        n, h = r // height, r % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = d0 + uint64(r * width) * k
        for x in range(width):
            a = fma(xpf, xr + uint64(x) * c, dzf, dr + uint64(x) * k, a)
    store(outf, o, row, a)


@njit(**_JIT)
def weight_grad_taps(xp: np.ndarray, dz: np.ndarray, row0: int, row1: int,
                     out: np.ndarray, pixel_chunk: int) -> None:
    """out[k, dy, t] = sum over the pixels of image rows row0..row1 (row = n H + h) of
    xp's tap t of kernel row dy (t = dx C + c) times dz[., k]; out [K, 3, padded_taps(C)]
    is written, not added to. xp = pad_rows(x) with SLACK floats of room after it;
    pixel_chunk: PIXEL_CHUNK (required, not a default: see tests/test_numba_dispatch.py)."""
    _, ph, pw, channels = xp.shape
    height, width = ph - 2, pw - 2
    out_channels = dz.shape[3]
    tp = uint64(out.shape[2])
    xpf, dzf, outf = xp.ravel(), dz.ravel(), out.ravel()
    c, k = uint64(channels), uint64(out_channels)
    z = zeros16()
    z8 = (z, z, z, z, z, z, z, z)
    z16, z24 = z8 + z8, z8 + z8 + z8
    arrays = (xpf, dzf, outf)
    chunk = max(1, pixel_chunk // width)
    for r0 in range(row0, row1, chunk):
        r1 = min(row1, r0 + chunk)
        first = r0 == row0
        for dy in range(3):
            span = (r0, r1, height, ph, pw, width, c, k, dy, tp)
            for j0 in range(0, out_channels, CHANNELS):
                for t0 in range(0, int(tp), 48):
                    o = uint64(j0) * uint64(3) * tp + uint64(dy) * tp + uint64(t0)
                    at = (uint64(t0), uint64(j0), o, first)
                    if int(tp) - t0 >= 48:
                        _block(fma_48x8, load_48x8, store_48x8, z24, arrays, span, at)
                    else:  # the last 32 (padded taps = 32 mod 48: C = 8, 24, 40)
                        _block(fma_32x8, load_32x8, store_32x8, z16, arrays, span, at)


def _time_shape(rng, n: int, h: int, c: int, k: int) -> str:
    from nodulekit.engine import cpu_conv, cpu_conv_packed
    from nodulekit.engine.cpu_conv_packed import _best_ms
    from nodulekit.engine.simd import aligned_empty

    x = rng.standard_normal((n, h, h, c), dtype=np.float32)
    dz = aligned_empty((n, h, h, k))
    dz[...] = rng.standard_normal((n, h, h, k), dtype=np.float32)
    count = n * (h + 2) * (h + 2) * c
    xp = aligned_empty((count + SLACK,))[:count].reshape(n, h + 2, h + 2, c)
    cpu_conv_packed.pad_rows(x, xp, 0, n * (h + 2))
    out = np.empty((k, 3, padded_taps(c)), dtype=np.float32)
    acc = np.empty((9 * c, k), dtype=np.float32)
    mflop = 2 * n * h * h * 9 * c * k / 1e6  # per ms: GFLOP/s
    t = _best_ms(lambda: weight_grad_taps(xp, dz, 0, n * h, out, PIXEL_CHUNK), 7)
    r = _best_ms(lambda: cpu_conv.conv3x3_weight_grad_rows(x, dz, 0, n * h, acc))
    p = _best_ms(lambda: cpu_conv_packed.conv3x3_weight_grad_packed(
        xp, dz, 0, n * h, 0, 9 * c, acc, cpu_conv_packed.WIDE_BLOCKS,
        cpu_conv_packed.PIXEL_CHUNK))
    return (f"{n}x{h}x{h} {c:3d} -> {k:3d}: taps {mflop / t:6.1f}  register_blocked "
            f"{mflop / r:6.1f}  packed {mflop / p:6.1f}")


def _time_one_core() -> None:
    """This kernel against register_blocked's and packed's weight gradients on the calling
    thread (one core), in GFLOP/s, at the demo's shapes of K = 8 and 16 (8 images)."""
    rng = np.random.default_rng(0)
    print("one core; weight gradient GFLOP/s")
    for n, h, c, k in ((8, 128, 8, 8), (8, 64, 16, 16), (8, 64, 32, 16), (8, 128, 16, 8)):
        print(_time_shape(rng, n, h, c, k))


if __name__ == "__main__":
    _time_one_core()
