"""The 2x2 stride-2 up-convolution on the CPU as register-blocked micro-kernels
(``register_blocked`` in cpu.CONV_VARIANTS).

What it computes (NHWC float32; w is [K, 2, 2, C]; the decoder's concat buffer y holds the
skip connection in channels [0, cs) and the up-convolution in [cs, cs + K)):

    forward:  y[n, 2i+a, 2j+b, cs+k] = bias[k] + sum_c x[n, i, j, c] * w[k, a, b, c]
    backward: dx[n, i, j, c]  = sum_{a,b,k} g[n, 2i+a, 2j+b, k] * w[k, a, b, c]
              dW[k, a, b, c]  = sum_{n,i,j} g[n, 2i+a, 2j+b, k] * x[n, i, j, c]
              (g = the concat gradient's up-convolution part, read where it lies)

Each output pixel depends on one input pixel only, so this is a plain GEMM over input
pixels: [pixels, C] x [C, (a, b, k)]. patches_gemm (``cpu.py``) runs it through BLAS into a
temporary and then scattered the temporary into the concat buffer (and, backward,
gathered the gradient out of it first). Here the same 6-pixel x 16-channel register block
as ``cpu_conv`` (12 accumulators: 2 weight vectors and 6 broadcasts per reduction step)
reads and writes the concat buffer in place: no temporary, no scatter or gather pass.

The weight gradient turns the block around (4 k's x 16 c's, 8 accumulators, one pass
per pixel) and walks the pixels in chunks of PIXEL_CHUNK whose rows stay in L1 while
every (a, b, k-group, c-block) passes over them: 2.5x faster than one pass over a whole
block of pixels. No kernel here finds a pixel's output position by division in its inner
loop (``_next_pixel``): four integer divisions cost more than a 32-channel dot product.

Napkin math (one core of the 2-core EPYC, dec0.up of the bench step: 4x64x64x32 -> 16,
67 MFLOP a pass): forward 1.3 ms into the concat buffer against 2.2 ms for BLAS plus the
scatter pass; it moves ~20 MB (the skip read, the concat buffer read for ownership and
written), so it is bound by memory, not by the FMAs. ``nodulekit bench ops --op upconv``
times it against PyTorch; ``pytest tests/test_ops.py -k upconv`` checks it.

Requirements: forward K % 8 == 0, backward C % 16 == 0 (the caller falls back to BLAS
otherwise). Serial and nogil: the caller runs blocks of input pixels on its threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from nodulekit.engine.register_blocks import fma_6x16, store_6x16
from nodulekit.engine.simd import fma8, load8, splat8, store8, zeros8

_JIT = {"cache": True, "nogil": True}
PIXEL_CHUNK = 32  # weight gradient: pixels per pass (x + gradient rows ~20 KB at C = 32)


@njit(**_JIT)
def _out_pixel(p, height, width):
    """Input pixel p of an [N, height, width] image -> (its column j, the flat index of its
    output pixel (2i, 2j) in the 2H x 2W image)."""
    hw = height * width
    n = p // hw
    r = p - n * hw
    i = r // width
    j = r - i * width
    return j, (n * 2 * height + 2 * i) * 2 * width + 2 * j


@njit(**_JIT)
def _column_offset(col, out_channels, row, ct, cs):
    """GEMM column (a, b, k) -> its offset in the concat buffer from output pixel (2i, 2j)
    times ct: output row a (row: output pixels per output row), column b, channel cs + k.
    A block of 16 columns may hold two (a, b) positions when K % 16 == 8, so each half of it
    is placed on its own."""
    ab = col // out_channels
    return ((ab // 2) * row + (ab % 2)) * ct + cs + col - ab * out_channels


@njit(**_JIT)
def _next_pixel(j, o, width):
    """The next input pixel's (j, output index), without a division: two output pixels
    on, or past the odd output row at the end of an input row (or image: the same step)."""
    if j + 1 < width:
        return j + 1, o + 2
    return 0, o + 2 + 2 * width


@njit(**_JIT)
def _copy_skip(src, dst, p0, p1):
    """The skip connection's channels (the first min(src, dst) channels) of the four output
    pixels of input pixels p0..p1, from src to dst, both [N, 2H, 2W, *]: into or out of
    the concat buffer."""
    _, out_height, out_width, src_ld = src.shape
    dst_ld = dst.shape[3]
    cs = min(src_ld, dst_ld)
    sf, df = src.ravel(), dst.ravel()
    j, o = _out_pixel(p0, out_height // 2, out_width // 2)
    for _ in range(p0, p1):
        for q in (o, o + 1, o + out_width, o + out_width + 1):
            s, d = uint64(q * src_ld), uint64(q * dst_ld)
            for t in range(uint64(cs)):
                df[d + t] = sf[s + t]
        j, o = _next_pixel(j, o, out_width // 2)


@njit(**_JIT)
def upconv2x2_concat_pixels(skip: np.ndarray, x: np.ndarray, w_cabk: np.ndarray, b: np.ndarray,
                            y: np.ndarray, p0: int, p1: int) -> None:
    """y = [skip | upconv(x)] for the output pixels of input pixels p0..p1.

    w_cabk is w as [C, (a, b, k)] (``w.transpose(3, 1, 2, 0)``, contiguous).
    """
    _, height, width, channels = x.shape
    out_channels = b.shape[0]
    cs = skip.shape[3]
    ct = cs + out_channels
    k4 = 4 * out_channels
    row = 2 * width  # output pixels per output row
    xf, wf, yf = x.ravel(), w_cabk.ravel(), y.ravel()
    cc, kk4 = uint64(channels), uint64(k4)
    _copy_skip(skip, y, p0, p1)  # the skip half
    j, o0 = _out_pixel(p0, height, width)
    p = p0
    while p < p1:
        if p + 6 <= p1:  # six pixels: the register block, each output index found once
            j, o1 = _next_pixel(j, o0, width)
            j, o2 = _next_pixel(j, o1, width)
            j, o3 = _next_pixel(j, o2, width)
            j, o4 = _next_pixel(j, o3, width)
            j, o5 = _next_pixel(j, o4, width)
            for col0 in range(0, k4, 16):  # 16 columns (a, b, k) at a time
                d = _column_offset(col0, out_channels, row, ct, cs)
                b0, b1 = load8(b, col0 % out_channels), load8(b, (col0 + 8) % out_channels)
                a = (b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1)
                xi = uint64(p * channels)
                for c in range(cc):
                    wt = c * kk4 + uint64(col0)
                    xt = xi + c
                    a = fma_6x16(xf, (xt, xt + cc, xt + uint64(2) * cc, xt + uint64(3) * cc,
                                      xt + uint64(4) * cc, xt + uint64(5) * cc),
                                 load8(wf, wt), load8(wf, wt + uint64(8)), a)
                # the two halves of a block may lie at different (a, b) when K % 16 == 8
                hi = _column_offset(col0 + 8, out_channels, row, ct, cs) - d
                store_6x16(yf, (uint64(o0 * ct + d), uint64(o1 * ct + d), uint64(o2 * ct + d),
                                uint64(o3 * ct + d), uint64(o4 * ct + d), uint64(o5 * ct + d)),
                           hi, a)
            j, o0 = _next_pixel(j, o5, width)
            p += 6
        else:  # the last few pixels one at a time
            for col0 in range(0, k4, 16):
                d = _column_offset(col0, out_channels, row, ct, cs)
                d8 = _column_offset(col0 + 8, out_channels, row, ct, cs)
                a00 = load8(b, col0 % out_channels)
                a01 = load8(b, (col0 + 8) % out_channels)
                xi = uint64(p * channels)
                for c in range(cc):
                    wt = c * kk4 + uint64(col0)
                    s = splat8(xf, xi + c)
                    a00 = fma8(s, load8(wf, wt), a00)
                    a01 = fma8(s, load8(wf, wt + uint64(8)), a01)
                store8(yf, uint64(o0 * ct + d), a00)
                store8(yf, uint64(o0 * ct + d8), a01)
            j, o0 = _next_pixel(j, o0, width)
            p += 1


@njit(**_JIT)
def upconv2x2_split_dx_pixels(dcat: np.ndarray, w_abkc: np.ndarray, dskip: np.ndarray,
                              dx: np.ndarray, p0: int, p1: int) -> None:
    """dx for input pixels p0..p1, and dskip = dcat[..., :cs] at their output pixels.

    w_abkc is w as [(a, b, k), C] (``w.transpose(1, 2, 0, 3)``, contiguous); C % 16 == 0.
    """
    _, height, width, channels = dx.shape
    cs = dskip.shape[3]
    ct = dcat.shape[3]
    out_channels = ct - cs
    row = 2 * width
    df, wf, xf = dcat.ravel(), w_abkc.ravel(), dx.ravel()
    cc = uint64(channels)
    _copy_skip(dcat, dskip, p0, p1)  # the skip's gradient
    j, o0 = _out_pixel(p0, height, width)
    p = p0
    while p < p1:
        if p + 6 <= p1:
            j, o1 = _next_pixel(j, o0, width)
            j, o2 = _next_pixel(j, o1, width)
            j, o3 = _next_pixel(j, o2, width)
            j, o4 = _next_pixel(j, o3, width)
            j, o5 = _next_pixel(j, o4, width)
            for c0 in range(0, channels, 16):
                z = zeros8()
                a = (z, z, z, z, z, z, z, z, z, z, z, z)
                for ab in range(4):
                    d = ((ab // 2) * row + (ab % 2)) * ct + cs
                    g0, g1 = uint64(o0 * ct + d), uint64(o1 * ct + d)
                    g2, g3 = uint64(o2 * ct + d), uint64(o3 * ct + d)
                    g4, g5 = uint64(o4 * ct + d), uint64(o5 * ct + d)
                    wrow = uint64(ab * out_channels * channels + c0)
                    for k in range(uint64(out_channels)):
                        wt = wrow + k * cc
                        a = fma_6x16(df, (g0 + k, g1 + k, g2 + k, g3 + k, g4 + k, g5 + k),
                                     load8(wf, wt), load8(wf, wt + uint64(8)), a)
                o = uint64(p * channels + c0)
                store_6x16(xf, (o, o + cc, o + uint64(2) * cc, o + uint64(3) * cc,
                                o + uint64(4) * cc, o + uint64(5) * cc), 8, a)
            j, o0 = _next_pixel(j, o5, width)
            p += 6
        else:
            for c0 in range(0, channels, 16):
                a00 = a01 = zeros8()
                for ab in range(4):
                    g0 = uint64(o0 * ct + ((ab // 2) * row + (ab % 2)) * ct + cs)
                    wrow = uint64(ab * out_channels * channels + c0)
                    for k in range(uint64(out_channels)):
                        wt = wrow + k * cc
                        s = splat8(df, g0 + k)
                        a00 = fma8(s, load8(wf, wt), a00)
                        a01 = fma8(s, load8(wf, wt + uint64(8)), a01)
                o = uint64(p * channels + c0)
                store8(xf, o, a00)
                store8(xf, o + uint64(8), a01)
            j, o0 = _next_pixel(j, o0, width)
            p += 1


@njit(**_JIT)
def upconv2x2_weight_grad_pixels(dcat: np.ndarray, x: np.ndarray, p0: int, p1: int,
                                 out: np.ndarray) -> None:
    """out[(a, b, k), C] = sum over input pixels p0..p1 of g[out(p, a, b), k] * x[p, :].

    out is overwritten: one partial per block of pixels, added in order by the caller.
    C % 16 == 0; groups of 4 k's (8 accumulators), or 1 where K % 4 != 0.
    """
    _, height, width, channels = x.shape
    ct = dcat.shape[3]
    out_channels = out.shape[0] // 4
    cs = ct - out_channels
    row = 2 * width
    df, xf, of = dcat.ravel(), x.ravel(), out.ravel()
    cc = uint64(channels)
    group = 4 if out_channels % 4 == 0 else 1
    for i in range(of.size):
        of[i] = 0.0
    # chunks of pixels small enough that their x and gradient rows stay in L1 while every
    # (a, b, k-group, c-block) passes over them; the sums wait in out between chunks
    j_chunk, q_chunk = _out_pixel(p0, height, width)
    for c_lo in range(p0, p1, PIXEL_CHUNK):
        c_hi = min(p1, c_lo + PIXEL_CHUNK)
        for ab in range(4):
            shift = (ab // 2) * row + (ab % 2)
            for k0 in range(0, out_channels, group):
                for c0 in range(0, channels, 16):
                    o = uint64((ab * out_channels + k0) * channels + c0)
                    a00, a01 = load8(of, o), load8(of, o + uint64(8))
                    a10, a11 = a00, a01
                    a20, a21, a30, a31 = a00, a01, a00, a01
                    if group == 4:
                        a10, a11 = load8(of, o + cc), load8(of, o + cc + uint64(8))
                        a20 = load8(of, o + uint64(2) * cc)
                        a21 = load8(of, o + uint64(2) * cc + uint64(8))
                        a30 = load8(of, o + uint64(3) * cc)
                        a31 = load8(of, o + uint64(3) * cc + uint64(8))
                    j, q = j_chunk, q_chunk
                    for p in range(c_lo, c_hi):
                        g = uint64((q + shift) * ct + cs + k0)
                        j, q = _next_pixel(j, q, width)
                        xi = uint64(p * channels + c0)
                        x0 = load8(xf, xi)
                        x1 = load8(xf, xi + uint64(8))
                        s = splat8(df, g)
                        a00 = fma8(s, x0, a00)
                        a01 = fma8(s, x1, a01)
                        if group == 4:
                            s = splat8(df, g + uint64(1))
                            a10 = fma8(s, x0, a10)
                            a11 = fma8(s, x1, a11)
                            s = splat8(df, g + uint64(2))
                            a20 = fma8(s, x0, a20)
                            a21 = fma8(s, x1, a21)
                            s = splat8(df, g + uint64(3))
                            a30 = fma8(s, x0, a30)
                            a31 = fma8(s, x1, a31)
                    store8(of, o, a00)
                    store8(of, o + uint64(8), a01)
                    if group == 4:
                        store8(of, o + cc, a10)
                        store8(of, o + cc + uint64(8), a11)
                        store8(of, o + uint64(2) * cc, a20)
                        store8(of, o + uint64(2) * cc + uint64(8), a21)
                        store8(of, o + uint64(3) * cc, a30)
                        store8(of, o + uint64(3) * cc + uint64(8), a31)
        for _ in range(c_lo, c_hi):
            j_chunk, q_chunk = _next_pixel(j_chunk, q_chunk, width)
