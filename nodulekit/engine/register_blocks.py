"""The register blocks the CPU's register_blocked and packed kernels are made of
(``cpu_conv``, ``cpu_upconv``, ``cpu_conv_packed``).

A register block is a small tile of output sums kept in vector registers (``simd``) while
a long reduction runs through it, like the micro-kernel at the heart of BLIS or any BLAS
SGEMM. Two shapes serve every register_blocked kernel:

- 6 x 16 (12 vectors): 6 rows (pixels) x 16 columns (channels). Each reduction step loads
  two vectors of the 16 columns' weights and broadcasts one input value per row: 8 loads
  feed 12 fused multiply-adds, so the FMA units (2 per core, 8 lanes each) set the pace,
  not the loads. 12 of the 16 AVX2 registers hold sums; the rest hold the weights and
  the broadcast. 6 x 8 is the same for a last block of 8 channels.
- 4 x 16 (8 vectors): turned around for weight gradients: 4 consecutive values of one
  input row (4 taps, or 4 output channels) x 16 channels of the other operand, one pixel
  per step. 4 x 8 likewise.

With AVX-512 a core has 32 vector registers, and ``cpu_conv_packed`` uses blocks of 16
accumulators instead (4 x 64, 8 x 32 and 16 x 16 of 16 lanes, 8 x 8 of 8: end of this
file); with 16 registers they would spill, and it uses the 6 x 16 and 6 x 8 blocks above.
``cpu_weight_grad_taps`` turns the weight gradient's block around, 48 (or 32) consecutive
taps in 3 (or 2) vectors x 8 channels of dz: 24 (16) accumulators of 16 lanes (the very
end of this file).

Accumulators travel as tuples (block[2r], block[2r + 1]: row r's channels 0-7 and 8-15);
``inline='always'`` puts each step into its caller before LLVM sees it, and the tuple
then lives in registers like separate variables would (measured: the same speed and
bit-identical results as the written-out form). Addresses are flat element indices; the
six rows of a 6 x 16 or 6 x 8 block are given as one tuple ``rows`` of six of them (a
tuple built at the call and taken apart here costs nothing once inlined).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, uint64

from nodulekit.engine.simd import (
    fma8,
    fma16,
    load8,
    load16,
    relu8,
    relu16,
    splat8,
    splat16,
    store8,
    store16,
)

_INLINE = {"inline": "always", "cache": True}

# (for the annotations) a simd.float32x8 value, which exists only inside njit code; a block
# of accumulators is a tuple of them, an index a flat element index (uint64 or int)
Vec8 = Any
Rows = tuple[int, int, int, int, int, int]


@njit(**_INLINE)
def fma_6x16(xf: np.ndarray, rows: Rows, w0: Vec8, w1: Vec8, a: tuple) -> tuple:
    """a += (xf[rows[r]] broadcast) * (w0, w1) for the six rows r."""
    i0, i1, i2, i3, i4, i5 = rows
    s0, s1, s2 = splat8(xf, i0), splat8(xf, i1), splat8(xf, i2)
    s3, s4, s5 = splat8(xf, i3), splat8(xf, i4), splat8(xf, i5)
    return (fma8(s0, w0, a[0]), fma8(s0, w1, a[1]), fma8(s1, w0, a[2]), fma8(s1, w1, a[3]),
            fma8(s2, w0, a[4]), fma8(s2, w1, a[5]), fma8(s3, w0, a[6]), fma8(s3, w1, a[7]),
            fma8(s4, w0, a[8]), fma8(s4, w1, a[9]), fma8(s5, w0, a[10]), fma8(s5, w1, a[11]))


@njit(**_INLINE)
def fma_6x8(xf: np.ndarray, rows: Rows, w0: Vec8, a: tuple) -> tuple:
    """a += (xf[rows[r]] broadcast) * w0 for the six rows r. One FMA per broadcast: the
    loads (7 per 6 FMAs), not the FMA units, set the pace."""
    i0, i1, i2, i3, i4, i5 = rows
    return (fma8(splat8(xf, i0), w0, a[0]), fma8(splat8(xf, i1), w0, a[1]),
            fma8(splat8(xf, i2), w0, a[2]), fma8(splat8(xf, i3), w0, a[3]),
            fma8(splat8(xf, i4), w0, a[4]), fma8(splat8(xf, i5), w0, a[5]))


@njit(**_INLINE)
def fma_4x16(xf: np.ndarray, i: int, d0: Vec8, d1: Vec8, a: tuple) -> tuple:
    """a += (xf[i + r] broadcast) * (d0, d1) for r = 0..3 (four consecutive values)."""
    s0, s1 = splat8(xf, i), splat8(xf, i + uint64(1))
    s2, s3 = splat8(xf, i + uint64(2)), splat8(xf, i + uint64(3))
    return (fma8(s0, d0, a[0]), fma8(s0, d1, a[1]), fma8(s1, d0, a[2]), fma8(s1, d1, a[3]),
            fma8(s2, d0, a[4]), fma8(s2, d1, a[5]), fma8(s3, d0, a[6]), fma8(s3, d1, a[7]))


@njit(**_INLINE)
def fma_4x8(xf: np.ndarray, i: int, d0: Vec8, a: tuple) -> tuple:
    """a += (xf[i + r] broadcast) * d0 for r = 0..3."""
    return (fma8(splat8(xf, i), d0, a[0]), fma8(splat8(xf, i + uint64(1)), d0, a[1]),
            fma8(splat8(xf, i + uint64(2)), d0, a[2]), fma8(splat8(xf, i + uint64(3)), d0, a[3]))


@njit(**_INLINE)
def relu_6x16(a: tuple) -> tuple:
    return (relu8(a[0]), relu8(a[1]), relu8(a[2]), relu8(a[3]), relu8(a[4]), relu8(a[5]),
            relu8(a[6]), relu8(a[7]), relu8(a[8]), relu8(a[9]), relu8(a[10]), relu8(a[11]))


@njit(**_INLINE)
def relu_6x8(a: tuple) -> tuple:
    return (relu8(a[0]), relu8(a[1]), relu8(a[2]), relu8(a[3]), relu8(a[4]), relu8(a[5]))


@njit(**_INLINE)
def store_6x16(yf: np.ndarray, rows: Rows, hi: int, a: tuple) -> None:
    """Row r's channels 0-7 to yf[rows[r]:], channels 8-15 to yf[rows[r] + hi:]."""
    i0, i1, i2, i3, i4, i5 = rows
    h = uint64(hi)
    store8(yf, i0, a[0])
    store8(yf, i0 + h, a[1])
    store8(yf, i1, a[2])
    store8(yf, i1 + h, a[3])
    store8(yf, i2, a[4])
    store8(yf, i2 + h, a[5])
    store8(yf, i3, a[6])
    store8(yf, i3 + h, a[7])
    store8(yf, i4, a[8])
    store8(yf, i4 + h, a[9])
    store8(yf, i5, a[10])
    store8(yf, i5 + h, a[11])


@njit(**_INLINE)
def store_6x8(yf: np.ndarray, rows: Rows, a: tuple) -> None:
    i0, i1, i2, i3, i4, i5 = rows
    store8(yf, i0, a[0])
    store8(yf, i1, a[1])
    store8(yf, i2, a[2])
    store8(yf, i3, a[3])
    store8(yf, i4, a[4])
    store8(yf, i5, a[5])


@njit(**_INLINE)
def load_4x16(of: np.ndarray, i: int, stride: int) -> tuple:
    """The 4 x 16 block at of[i + r * stride : + 16], r = 0..3 (a weight gradient's rows)."""
    s, e = uint64(stride), uint64(8)
    return (load8(of, i), load8(of, i + e), load8(of, i + s), load8(of, i + s + e),
            load8(of, i + uint64(2) * s), load8(of, i + uint64(2) * s + e),
            load8(of, i + uint64(3) * s), load8(of, i + uint64(3) * s + e))


@njit(**_INLINE)
def store_4x16(of: np.ndarray, i: int, stride: int, a: tuple) -> None:
    s, e = uint64(stride), uint64(8)
    store8(of, i, a[0])
    store8(of, i + e, a[1])
    store8(of, i + s, a[2])
    store8(of, i + s + e, a[3])
    store8(of, i + uint64(2) * s, a[4])
    store8(of, i + uint64(2) * s + e, a[5])
    store8(of, i + uint64(3) * s, a[6])
    store8(of, i + uint64(3) * s + e, a[7])


@njit(**_INLINE)
def load_4x8(of: np.ndarray, i: int, stride: int) -> tuple:
    s = uint64(stride)
    return (load8(of, i), load8(of, i + s), load8(of, i + uint64(2) * s),
            load8(of, i + uint64(3) * s))


@njit(**_INLINE)
def store_4x8(of: np.ndarray, i: int, stride: int, a: tuple) -> None:
    s = uint64(stride)
    store8(of, i, a[0])
    store8(of, i + s, a[1])
    store8(of, i + uint64(2) * s, a[2])
    store8(of, i + uint64(3) * s, a[3])


# ---- the wide blocks of cpu_conv_packed: 16 accumulators, for cores with 32 vector
# registers (AVX-512). A block's pixels are consecutive pixels of a zero-padded image row,
# C floats apart, so a pixel's operand is xf[i + r * c] (i: the first pixel's, c: C as
# uint64). Accumulators: pixel r's vectors are a[V r] .. a[V r + V - 1]. 4 x 64, 8 x 32 and
# 16 x 16 hold 16 lanes a vector (simd.float32x16: one AVX-512 register), 8 x 16 and 8 x 8
# eight (8 x 16: the weight gradient's blocks of 16 channels).


@njit(**_INLINE)
def fma_4x64(xf: np.ndarray, i: int, c: int, w: tuple, a: tuple) -> tuple:
    """a += (xf[i + r c] broadcast) * (w[0], .., w[3]) for pixels r = 0..3 (16 lanes)."""
    w0, w1, w2, w3 = w
    s0, s1 = splat16(xf, i), splat16(xf, i + c)
    s2, s3 = splat16(xf, i + uint64(2) * c), splat16(xf, i + uint64(3) * c)
    return (fma16(s0, w0, a[0]), fma16(s0, w1, a[1]), fma16(s0, w2, a[2]), fma16(s0, w3, a[3]),
            fma16(s1, w0, a[4]), fma16(s1, w1, a[5]), fma16(s1, w2, a[6]), fma16(s1, w3, a[7]),
            fma16(s2, w0, a[8]), fma16(s2, w1, a[9]), fma16(s2, w2, a[10]), fma16(s2, w3, a[11]),
            fma16(s3, w0, a[12]), fma16(s3, w1, a[13]), fma16(s3, w2, a[14]),
            fma16(s3, w3, a[15]))


@njit(**_INLINE)
def fma_8x32(xf: np.ndarray, i: int, c: int, w: tuple, a: tuple) -> tuple:
    """a += (xf[i + r c] broadcast) * (w[0], w[1]) for pixels r = 0..7 (16 lanes)."""
    w0, w1 = w
    s0, s1 = splat16(xf, i), splat16(xf, i + c)
    s2, s3 = splat16(xf, i + uint64(2) * c), splat16(xf, i + uint64(3) * c)
    s4, s5 = splat16(xf, i + uint64(4) * c), splat16(xf, i + uint64(5) * c)
    s6, s7 = splat16(xf, i + uint64(6) * c), splat16(xf, i + uint64(7) * c)
    return (fma16(s0, w0, a[0]), fma16(s0, w1, a[1]), fma16(s1, w0, a[2]), fma16(s1, w1, a[3]),
            fma16(s2, w0, a[4]), fma16(s2, w1, a[5]), fma16(s3, w0, a[6]), fma16(s3, w1, a[7]),
            fma16(s4, w0, a[8]), fma16(s4, w1, a[9]), fma16(s5, w0, a[10]), fma16(s5, w1, a[11]),
            fma16(s6, w0, a[12]), fma16(s6, w1, a[13]), fma16(s7, w0, a[14]),
            fma16(s7, w1, a[15]))


@njit(**_INLINE)
def fma_16x16(xf: np.ndarray, i: int, c: int, w: tuple, a: tuple) -> tuple:
    """a += (xf[i + r c] broadcast) * w[0] for pixels r = 0..15: 16 channels, one 16-lane
    vector a pixel (1 weight load and 16 broadcasts feed 16 FMAs)."""
    w0 = w[0]
    return (fma16(splat16(xf, i), w0, a[0]), fma16(splat16(xf, i + c), w0, a[1]),
            fma16(splat16(xf, i + uint64(2) * c), w0, a[2]),
            fma16(splat16(xf, i + uint64(3) * c), w0, a[3]),
            fma16(splat16(xf, i + uint64(4) * c), w0, a[4]),
            fma16(splat16(xf, i + uint64(5) * c), w0, a[5]),
            fma16(splat16(xf, i + uint64(6) * c), w0, a[6]),
            fma16(splat16(xf, i + uint64(7) * c), w0, a[7]),
            fma16(splat16(xf, i + uint64(8) * c), w0, a[8]),
            fma16(splat16(xf, i + uint64(9) * c), w0, a[9]),
            fma16(splat16(xf, i + uint64(10) * c), w0, a[10]),
            fma16(splat16(xf, i + uint64(11) * c), w0, a[11]),
            fma16(splat16(xf, i + uint64(12) * c), w0, a[12]),
            fma16(splat16(xf, i + uint64(13) * c), w0, a[13]),
            fma16(splat16(xf, i + uint64(14) * c), w0, a[14]),
            fma16(splat16(xf, i + uint64(15) * c), w0, a[15]))


@njit(**_INLINE)
def store_16x16(yf: np.ndarray, o: int, k: int, a: tuple) -> None:
    """Pixel r's 16 channels (a[r]) to yf[o + r k:]."""
    for r in range(16):
        store16(yf, o + uint64(r) * k, a[r])


@njit(**_INLINE)
def relu_16x16(a: tuple) -> tuple:
    return (relu16(a[0]), relu16(a[1]), relu16(a[2]), relu16(a[3]), relu16(a[4]),
            relu16(a[5]), relu16(a[6]), relu16(a[7]), relu16(a[8]), relu16(a[9]),
            relu16(a[10]), relu16(a[11]), relu16(a[12]), relu16(a[13]), relu16(a[14]),
            relu16(a[15]))


@njit(**_INLINE)
def store_4x64(yf: np.ndarray, o: int, k: int, a: tuple) -> None:
    """Pixel r's 64 channels (a[4r] .. a[4r + 3]) to yf[o + r k:] (k: the image's channel
    count, uint64)."""
    for r in range(4):  # constant trip count: LLVM unrolls it, the tuple stays in registers
        p = o + uint64(r) * k
        store16(yf, p, a[4 * r])
        store16(yf, p + uint64(16), a[4 * r + 1])
        store16(yf, p + uint64(32), a[4 * r + 2])
        store16(yf, p + uint64(48), a[4 * r + 3])


@njit(**_INLINE)
def store_8x32(yf: np.ndarray, o: int, k: int, a: tuple) -> None:
    for r in range(8):
        p = o + uint64(r) * k
        store16(yf, p, a[2 * r])
        store16(yf, p + uint64(16), a[2 * r + 1])


@njit(**_INLINE)
def load_4x64(yf: np.ndarray, o: int, k: int) -> tuple:
    """The block store_4x64 writes, read back (a sum resumed where it stopped)."""
    p0, p1, p2, p3 = o, o + k, o + uint64(2) * k, o + uint64(3) * k
    e1, e2, e3 = uint64(16), uint64(32), uint64(48)
    return (load16(yf, p0), load16(yf, p0 + e1), load16(yf, p0 + e2), load16(yf, p0 + e3),
            load16(yf, p1), load16(yf, p1 + e1), load16(yf, p1 + e2), load16(yf, p1 + e3),
            load16(yf, p2), load16(yf, p2 + e1), load16(yf, p2 + e2), load16(yf, p2 + e3),
            load16(yf, p3), load16(yf, p3 + e1), load16(yf, p3 + e2), load16(yf, p3 + e3))


@njit(**_INLINE)
def load_8x32(yf: np.ndarray, o: int, k: int) -> tuple:
    """The block store_8x32 writes, read back."""
    e = uint64(16)
    p = (o, o + k, o + uint64(2) * k, o + uint64(3) * k, o + uint64(4) * k, o + uint64(5) * k,
         o + uint64(6) * k, o + uint64(7) * k)
    return (load16(yf, p[0]), load16(yf, p[0] + e), load16(yf, p[1]), load16(yf, p[1] + e),
            load16(yf, p[2]), load16(yf, p[2] + e), load16(yf, p[3]), load16(yf, p[3] + e),
            load16(yf, p[4]), load16(yf, p[4] + e), load16(yf, p[5]), load16(yf, p[5] + e),
            load16(yf, p[6]), load16(yf, p[6] + e), load16(yf, p[7]), load16(yf, p[7] + e))


@njit(**_INLINE)
def fma_8x16(xf: np.ndarray, i: int, c: int, w: tuple, a: tuple) -> tuple:
    """a += (xf[i + r c] broadcast) * (w[0], w[1]) for pixels r = 0..7."""
    w0, w1 = w
    s0, s1 = splat8(xf, i), splat8(xf, i + c)
    s2, s3 = splat8(xf, i + uint64(2) * c), splat8(xf, i + uint64(3) * c)
    s4, s5 = splat8(xf, i + uint64(4) * c), splat8(xf, i + uint64(5) * c)
    s6, s7 = splat8(xf, i + uint64(6) * c), splat8(xf, i + uint64(7) * c)
    return (fma8(s0, w0, a[0]), fma8(s0, w1, a[1]), fma8(s1, w0, a[2]), fma8(s1, w1, a[3]),
            fma8(s2, w0, a[4]), fma8(s2, w1, a[5]), fma8(s3, w0, a[6]), fma8(s3, w1, a[7]),
            fma8(s4, w0, a[8]), fma8(s4, w1, a[9]), fma8(s5, w0, a[10]), fma8(s5, w1, a[11]),
            fma8(s6, w0, a[12]), fma8(s6, w1, a[13]), fma8(s7, w0, a[14]), fma8(s7, w1, a[15]))


@njit(**_INLINE)
def fma_8x8(xf: np.ndarray, i: int, c: int, w: tuple, a: tuple) -> tuple:
    """a += (xf[i + r c] broadcast) * w[0] for pixels r = 0..7 (9 loads per 8 FMAs: the
    loads set the pace)."""
    w0 = w[0]
    return (fma8(splat8(xf, i), w0, a[0]), fma8(splat8(xf, i + c), w0, a[1]),
            fma8(splat8(xf, i + uint64(2) * c), w0, a[2]),
            fma8(splat8(xf, i + uint64(3) * c), w0, a[3]),
            fma8(splat8(xf, i + uint64(4) * c), w0, a[4]),
            fma8(splat8(xf, i + uint64(5) * c), w0, a[5]),
            fma8(splat8(xf, i + uint64(6) * c), w0, a[6]),
            fma8(splat8(xf, i + uint64(7) * c), w0, a[7]))


@njit(**_INLINE)
def relu_16(a: tuple) -> tuple:
    return (relu8(a[0]), relu8(a[1]), relu8(a[2]), relu8(a[3]), relu8(a[4]), relu8(a[5]),
            relu8(a[6]), relu8(a[7]), relu8(a[8]), relu8(a[9]), relu8(a[10]), relu8(a[11]),
            relu8(a[12]), relu8(a[13]), relu8(a[14]), relu8(a[15]))


@njit(**_INLINE)
def relu_8(a: tuple) -> tuple:
    return (relu8(a[0]), relu8(a[1]), relu8(a[2]), relu8(a[3]), relu8(a[4]), relu8(a[5]),
            relu8(a[6]), relu8(a[7]))


@njit(**_INLINE)
def store_8x16(yf: np.ndarray, o: int, k: int, a: tuple) -> None:
    e = uint64(8)
    for r in range(8):
        p = o + uint64(r) * k
        store8(yf, p, a[2 * r])
        store8(yf, p + e, a[2 * r + 1])


@njit(**_INLINE)
def store_8x8(yf: np.ndarray, o: int, k: int, a: tuple) -> None:
    for r in range(8):
        store8(yf, o + uint64(r) * k, a[r])


@njit(**_INLINE)
def load_8x16(yf: np.ndarray, o: int, k: int) -> tuple:
    e = uint64(8)
    p = (o, o + k, o + uint64(2) * k, o + uint64(3) * k, o + uint64(4) * k, o + uint64(5) * k,
         o + uint64(6) * k, o + uint64(7) * k)
    return (load8(yf, p[0]), load8(yf, p[0] + e), load8(yf, p[1]), load8(yf, p[1] + e),
            load8(yf, p[2]), load8(yf, p[2] + e), load8(yf, p[3]), load8(yf, p[3] + e),
            load8(yf, p[4]), load8(yf, p[4] + e), load8(yf, p[5]), load8(yf, p[5] + e),
            load8(yf, p[6]), load8(yf, p[6] + e), load8(yf, p[7]), load8(yf, p[7] + e))


@njit(**_INLINE)
def load_8x8(yf: np.ndarray, o: int, k: int) -> tuple:
    return (load8(yf, o), load8(yf, o + k), load8(yf, o + uint64(2) * k),
            load8(yf, o + uint64(3) * k), load8(yf, o + uint64(4) * k),
            load8(yf, o + uint64(5) * k), load8(yf, o + uint64(6) * k),
            load8(yf, o + uint64(7) * k))


@njit(**_INLINE)
def load_6x16(yf: np.ndarray, rows: Rows, hi: int) -> tuple:
    """The block store_6x16 writes, read back."""
    i0, i1, i2, i3, i4, i5 = rows
    h = uint64(hi)
    return (load8(yf, i0), load8(yf, i0 + h), load8(yf, i1), load8(yf, i1 + h),
            load8(yf, i2), load8(yf, i2 + h), load8(yf, i3), load8(yf, i3 + h),
            load8(yf, i4), load8(yf, i4 + h), load8(yf, i5), load8(yf, i5 + h))


@njit(**_INLINE)
def load_6x8(yf: np.ndarray, rows: Rows) -> tuple:
    i0, i1, i2, i3, i4, i5 = rows
    return (load8(yf, i0), load8(yf, i1), load8(yf, i2), load8(yf, i3), load8(yf, i4),
            load8(yf, i5))


# ---- the weight gradient over taps (cpu_weight_grad_taps). Accumulator a[V j + v] holds
# channel j's taps 16 v .. 16 v + 15 (V = 3 vectors: 48 taps, or 2: 32); in the output,
# channel j's row starts ``row`` floats after channel j - 1's. Each pixel step loads the V
# tap vectors once and broadcasts 8 values of dz: 3 + 8 loads feed 24 FMAs.


@njit(**_INLINE)
def fma_48x8(xf: np.ndarray, i: int, df: np.ndarray, d: int, a: tuple) -> tuple:
    """a[3 j + v] += xf[i + 16 v:][:16] * df[d + j] for v < 3, j < 8."""
    x0, x1, x2 = load16(xf, i), load16(xf, i + uint64(16)), load16(xf, i + uint64(32))
    s0, s1 = splat16(df, d), splat16(df, d + uint64(1))
    s2, s3 = splat16(df, d + uint64(2)), splat16(df, d + uint64(3))
    s4, s5 = splat16(df, d + uint64(4)), splat16(df, d + uint64(5))
    s6, s7 = splat16(df, d + uint64(6)), splat16(df, d + uint64(7))
    return (fma16(x0, s0, a[0]), fma16(x1, s0, a[1]), fma16(x2, s0, a[2]),
            fma16(x0, s1, a[3]), fma16(x1, s1, a[4]), fma16(x2, s1, a[5]),
            fma16(x0, s2, a[6]), fma16(x1, s2, a[7]), fma16(x2, s2, a[8]),
            fma16(x0, s3, a[9]), fma16(x1, s3, a[10]), fma16(x2, s3, a[11]),
            fma16(x0, s4, a[12]), fma16(x1, s4, a[13]), fma16(x2, s4, a[14]),
            fma16(x0, s5, a[15]), fma16(x1, s5, a[16]), fma16(x2, s5, a[17]),
            fma16(x0, s6, a[18]), fma16(x1, s6, a[19]), fma16(x2, s6, a[20]),
            fma16(x0, s7, a[21]), fma16(x1, s7, a[22]), fma16(x2, s7, a[23]))


@njit(**_INLINE)
def fma_32x8(xf: np.ndarray, i: int, df: np.ndarray, d: int, a: tuple) -> tuple:
    """a[2 j + v] += xf[i + 16 v:][:16] * df[d + j] for v < 2, j < 8."""
    x0, x1 = load16(xf, i), load16(xf, i + uint64(16))
    s0, s1 = splat16(df, d), splat16(df, d + uint64(1))
    s2, s3 = splat16(df, d + uint64(2)), splat16(df, d + uint64(3))
    s4, s5 = splat16(df, d + uint64(4)), splat16(df, d + uint64(5))
    s6, s7 = splat16(df, d + uint64(6)), splat16(df, d + uint64(7))
    return (fma16(x0, s0, a[0]), fma16(x1, s0, a[1]), fma16(x0, s1, a[2]), fma16(x1, s1, a[3]),
            fma16(x0, s2, a[4]), fma16(x1, s2, a[5]), fma16(x0, s3, a[6]), fma16(x1, s3, a[7]),
            fma16(x0, s4, a[8]), fma16(x1, s4, a[9]), fma16(x0, s5, a[10]),
            fma16(x1, s5, a[11]), fma16(x0, s6, a[12]), fma16(x1, s6, a[13]),
            fma16(x0, s7, a[14]), fma16(x1, s7, a[15]))


@njit(**_INLINE)
def store_48x8(of: np.ndarray, o: int, row: int, a: tuple) -> None:
    for j in range(8):  # constant trip count: unrolled, the tuple stays in registers
        p = o + uint64(j) * row
        store16(of, p, a[3 * j])
        store16(of, p + uint64(16), a[3 * j + 1])
        store16(of, p + uint64(32), a[3 * j + 2])


@njit(**_INLINE)
def store_32x8(of: np.ndarray, o: int, row: int, a: tuple) -> None:
    for j in range(8):
        p = o + uint64(j) * row
        store16(of, p, a[2 * j])
        store16(of, p + uint64(16), a[2 * j + 1])


@njit(**_INLINE)
def load_48x8(of: np.ndarray, o: int, row: int) -> tuple:
    """The block store_48x8 writes, read back (a sum resumed where it stopped)."""
    e1, e2 = uint64(16), uint64(32)
    p = (o, o + row, o + uint64(2) * row, o + uint64(3) * row, o + uint64(4) * row,
         o + uint64(5) * row, o + uint64(6) * row, o + uint64(7) * row)
    return (load16(of, p[0]), load16(of, p[0] + e1), load16(of, p[0] + e2),
            load16(of, p[1]), load16(of, p[1] + e1), load16(of, p[1] + e2),
            load16(of, p[2]), load16(of, p[2] + e1), load16(of, p[2] + e2),
            load16(of, p[3]), load16(of, p[3] + e1), load16(of, p[3] + e2),
            load16(of, p[4]), load16(of, p[4] + e1), load16(of, p[4] + e2),
            load16(of, p[5]), load16(of, p[5] + e1), load16(of, p[5] + e2),
            load16(of, p[6]), load16(of, p[6] + e1), load16(of, p[6] + e2),
            load16(of, p[7]), load16(of, p[7] + e1), load16(of, p[7] + e2))


@njit(**_INLINE)
def load_32x8(of: np.ndarray, o: int, row: int) -> tuple:
    """The block store_32x8 writes, read back."""
    e1 = uint64(16)
    p = (o, o + row, o + uint64(2) * row, o + uint64(3) * row, o + uint64(4) * row,
         o + uint64(5) * row, o + uint64(6) * row, o + uint64(7) * row)
    return (load16(of, p[0]), load16(of, p[0] + e1), load16(of, p[1]), load16(of, p[1] + e1),
            load16(of, p[2]), load16(of, p[2] + e1), load16(of, p[3]), load16(of, p[3] + e1),
            load16(of, p[4]), load16(of, p[4] + e1), load16(of, p[5]), load16(of, p[5] + e1),
            load16(of, p[6]), load16(of, p[6] + e1), load16(of, p[7]), load16(of, p[7] + e1))
