"""3x3 convolutions on the CPU as register-blocked micro-kernels (``register_blocked`` in
cpu.CONV_VARIANTS, the same technique as the CUDA backend's ``register_blocked``).

What they compute (NHWC float32, stride 1, zero 'same' padding; w_tk is the weight as
[9*C, K]: tap (r, s, c) major, output channel k inner, i.e. ``w.reshape(K, -1).T``):

    conv3x3_rows:              y[p, k]  = relu?(b[k] + sum_t patch(x, p)[t] * w_tk[t, k])
    conv3x3_weight_grad_rows:  dW_tk[t, k] = sum_p patch(x, p)[t] * dz[p, k]

where patch(x, p) is the 9*C input values pixel p's output reads. ``patches_gemm``
(``cpu.py``) copies those patches into a matrix and calls BLAS SGEMM. That is fine for
deep layers, but at the U-Net's top levels K is 16 or 32, a shape BLAS handles badly (~45
GFLOP/s per core here, half of peak), and the copy itself costs 13% of a step.

How: no patch matrix. In NHWC the 3*C values of one kernel row r for pixel x are one
contiguous run of the input row, and pixel x+1's run starts C floats later. So a block
of 6 neighbouring output pixels x 16 output channels keeps its 12 accumulators in
vector registers (``simd.float32x8``, two per pixel) and, for each input value t of the
run, does: 2 vector loads of w_tk[t, k0:k0+16], 6 broadcasts of x (one per pixel), 12
fused multiply-adds. That is 192 FLOP per 8 loads, so the FMA units, not the loads,
set the pace (the BLIS micro-kernel idea, written with Numba). The border pixels (x = 0
and x = W-1, where a kernel column hangs over the edge) and leftovers go one pixel at
a time over the valid part of the run; border rows just skip the missing kernel row.

The weight gradient turns the same block around: 4 consecutive patch values t x 16
channels (8 accumulators), and the loop runs over the pixels of an image row, each one
adding 4 broadcasts of x times 2 vectors of dz. A group of 4 never straddles two kernel
columns (C % 4 == 0; otherwise groups of 1), so one pixel range is valid for all of it.

Napkin math (2-core AMD EPYC, AVX2, 2 FMA units/core; peak ~ 2 x 8 x 2 x 3 GHz = 96
GFLOP/s per core): 16 -> 16 channels at 4x128x128 is 2*65536*144*16 = 302 MFLOP. On one
core the 6x16 block ran it in 3.1 ms (94 GFLOP/s over the interior) where patches +
OpenBLAS took 7.3 ms (41 GFLOP/s). Over the border pixels the block is idle; they take
a quarter of a 16-pixel row, which is why the deep layers (8 and 16 pixels wide, many
channels) stay with patches_gemm.

Run it: ``nodulekit bench ops --op conv --variants all`` times patches_gemm,
register_blocked and the per-shape choice against PyTorch (oneDNN) on every layer of the
U-Net; ``pytest tests/test_ops.py -k "register or cpu_versions"`` checks each kernel
against the float64 reference and torch, borders, odd sizes and 8-channel blocks included.

Requirements: K % 8 == 0 (blocks of 16 channels, and one of 8 where K % 16 == 8; the
caller falls back to patches_gemm otherwise). Serial, nogil: the caller runs blocks of
image rows on its threads (``cpu_workers.Workers``). The order of every sum is fixed, so
results are the same on every run and any thread count. The micro-kernels take their sizes
and positions as small named tuples (``Sizes``, ``Block``, ``PixelRun``): Numba passes a
tuple's fields as separate scalars, so this costs nothing (measured: same speed, same bits).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, uint64

from nodulekit.engine.register_blocks import (
    fma_4x8,
    fma_4x16,
    fma_6x8,
    fma_6x16,
    load_4x8,
    load_4x16,
    relu_6x8,
    relu_6x16,
    store_4x8,
    store_4x16,
    store_6x8,
    store_6x16,
)
from nodulekit.engine.simd import add8, fma8, load8, relu8, splat8, store8, zeros8

_JIT = {"cache": True, "nogil": True}
_INLINE = {"cache": True, "inline": "always"}


def supports(c: int, k: int) -> bool:
    """Whether these kernels handle a 3x3 convolution with C inputs and K outputs."""
    return k % 8 == 0 and c >= 1


class Sizes(NamedTuple):
    """The sizes a forward micro-kernel call needs (its caller reads them off the arrays)."""

    width: int  # W, pixels per image row
    channels: int  # C, input channels
    out_channels: int  # K


class Block(NamedTuple):
    """Which outputs one forward micro-kernel call computes: one pixel (``_one_pixel*``) or
    six neighbouring pixels of an image row (``_six_pixels*``) x 16 (or 8) channels."""

    pixel: int  # flat index (n * H + h) * W + w of its (first) output pixel
    column: int  # that pixel's w: the border pixels read only part of each kernel row
    channel: int  # its first output channel
    first_row: int  # kernel rows first_row..end_row-1 lie inside the image (0..3, or 1..3
    end_row: int  # in the image's first row, 0..2 in its last)


class PixelRun(NamedTuple):
    """A weight-gradient micro-kernel call: a run of neighbouring pixels of an image row,
    and where its operands start (flat indices, uint64)."""

    x_start: int  # x at the run's first pixel and the block's first tap value
    dz_start: int  # dz at the run's first pixel and the block's first channel
    out_start: int  # the block's first sum in out [9C, K]
    pixels: int  # how many pixels


@njit(**_JIT)
def _one_pixel16(xf, wf, b, yf, relu, sizes, block):
    """y[block.pixel, block.channel : +16]: one pixel, over the part of each kernel row
    inside the image (the border pixels and what the 6-pixel blocks leave over).

    Two sums alone would wait on each other's FMA latency (4 cycles): a quarter of the
    FMA units' rate. Patch values t % 4 go to four pairs of sums, added at the end, so
    eight FMAs are in flight and the loads (3 per 2 FMAs) set the pace instead.
    """
    width, channels, out_channels = sizes
    t_lo = channels if block.column == 0 else 0
    t_hi = 2 * channels if block.column == width - 1 else 3 * channels
    kk = uint64(out_channels)
    a0, a1 = load8(b, block.channel), load8(b, block.channel + 8)
    z = zeros8()
    e0, e1, f0, f1, g0, g1 = z, z, z, z, z, z
    length = uint64(t_hi - t_lo)
    for dy in range(block.first_row, block.end_row):
        xi = uint64((block.pixel + (dy - 1) * width - 1) * channels + t_lo)
        wi = uint64((dy * 3 * channels + t_lo) * out_channels + block.channel)
        for q in range(length // uint64(4)):
            t = q * uint64(4)
            wt = wi + t * kk
            s = splat8(xf, xi + t)
            a0 = fma8(s, load8(wf, wt), a0)
            a1 = fma8(s, load8(wf, wt + uint64(8)), a1)
            wt += kk
            s = splat8(xf, xi + t + uint64(1))
            e0 = fma8(s, load8(wf, wt), e0)
            e1 = fma8(s, load8(wf, wt + uint64(8)), e1)
            wt += kk
            s = splat8(xf, xi + t + uint64(2))
            f0 = fma8(s, load8(wf, wt), f0)
            f1 = fma8(s, load8(wf, wt + uint64(8)), f1)
            wt += kk
            s = splat8(xf, xi + t + uint64(3))
            g0 = fma8(s, load8(wf, wt), g0)
            g1 = fma8(s, load8(wf, wt + uint64(8)), g1)
        for t in range(length - length % uint64(4), length):
            wt = wi + t * kk
            s = splat8(xf, xi + t)
            a0 = fma8(s, load8(wf, wt), a0)
            a1 = fma8(s, load8(wf, wt + uint64(8)), a1)
    a0 = add8(add8(a0, e0), add8(f0, g0))
    a1 = add8(add8(a1, e1), add8(f1, g1))
    if relu:
        a0 = relu8(a0)
        a1 = relu8(a1)
    o = uint64(block.pixel * out_channels + block.channel)
    store8(yf, o, a0)
    store8(yf, o + uint64(8), a1)


@njit(**_JIT)
def _one_pixel8(xf, wf, b, yf, relu, sizes, block):
    """y[block.pixel, block.channel : +8]: as _one_pixel16, for the last 8 channels where
    K % 16 == 8."""
    width, channels, out_channels = sizes
    t_lo = channels if block.column == 0 else 0
    t_hi = 2 * channels if block.column == width - 1 else 3 * channels
    kk = uint64(out_channels)
    a0 = load8(b, block.channel)
    e0 = f0 = g0 = zeros8()
    length = uint64(t_hi - t_lo)
    for dy in range(block.first_row, block.end_row):
        xi = uint64((block.pixel + (dy - 1) * width - 1) * channels + t_lo)
        wi = uint64((dy * 3 * channels + t_lo) * out_channels + block.channel)
        for q in range(length // uint64(4)):
            t = q * uint64(4)
            wt = wi + t * kk
            a0 = fma8(splat8(xf, xi + t), load8(wf, wt), a0)
            e0 = fma8(splat8(xf, xi + t + uint64(1)), load8(wf, wt + kk), e0)
            f0 = fma8(splat8(xf, xi + t + uint64(2)), load8(wf, wt + uint64(2) * kk), f0)
            g0 = fma8(splat8(xf, xi + t + uint64(3)), load8(wf, wt + uint64(3) * kk), g0)
        for t in range(length - length % uint64(4), length):
            a0 = fma8(splat8(xf, xi + t), load8(wf, wi + t * kk), a0)
    a0 = add8(add8(a0, e0), add8(f0, g0))
    if relu:
        a0 = relu8(a0)
    store8(yf, uint64(block.pixel * out_channels + block.channel), a0)


@njit(**_INLINE)
def _six_pixels16(xf, wf, b, yf, relu, sizes, block):
    """y[block.pixel : +6, block.channel : +16], all six pixels inside the image: the
    register block.

    Pixel block.pixel + r's patch values for kernel row dy are one run of 3C input values
    starting at xi + r*C, so step t of the reduction broadcasts x[xi + t + r*C] for r = 0..5.
    """
    width, channels, out_channels = sizes
    kk = uint64(out_channels)
    c1, c2, c3 = uint64(channels), uint64(2 * channels), uint64(3 * channels)
    c4, c5 = uint64(4 * channels), uint64(5 * channels)
    b0, b1 = load8(b, block.channel), load8(b, block.channel + 8)
    a = (b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1)
    for dy in range(block.first_row, block.end_row):
        xi = uint64((block.pixel + (dy - 1) * width - 1) * channels)
        wi = uint64(dy * 3 * channels * out_channels + block.channel)
        for t in range(c3):  # one kernel row's patch values: 3 pixels x C channels
            wt = wi + t * kk
            xt = xi + t
            a = fma_6x16(xf, (xt, xt + c1, xt + c2, xt + c3, xt + c4, xt + c5),
                         load8(wf, wt), load8(wf, wt + uint64(8)), a)
    if relu:
        a = relu_6x16(a)
    o = uint64(block.pixel * out_channels + block.channel)
    store_6x16(yf, (o, o + kk, o + uint64(2) * kk, o + uint64(3) * kk, o + uint64(4) * kk,
                    o + uint64(5) * kk), 8, a)


@njit(**_INLINE)
def _six_pixels8(xf, wf, b, yf, relu, sizes, block):
    """As _six_pixels16 for the last 8 channels where K % 16 == 8 (load-bound: ~40
    GFLOP/s a core at 8 -> 8 channels; two sets of sums for more FMAs in flight were
    slower)."""
    width, channels, out_channels = sizes
    kk = uint64(out_channels)
    c1, c2, c3 = uint64(channels), uint64(2 * channels), uint64(3 * channels)
    c4, c5 = uint64(4 * channels), uint64(5 * channels)
    b0 = load8(b, block.channel)
    a = (b0, b0, b0, b0, b0, b0)
    for dy in range(block.first_row, block.end_row):
        xi = uint64((block.pixel + (dy - 1) * width - 1) * channels)
        wi = uint64(dy * 3 * channels * out_channels + block.channel)
        for t in range(c3):
            xt = xi + t
            a = fma_6x8(xf, (xt, xt + c1, xt + c2, xt + c3, xt + c4, xt + c5),
                        load8(wf, wi + t * kk), a)
    if relu:
        a = relu_6x8(a)
    o = uint64(block.pixel * out_channels + block.channel)
    store_6x8(yf, (o, o + kk, o + uint64(2) * kk, o + uint64(3) * kk, o + uint64(4) * kk,
                   o + uint64(5) * kk), a)


@njit(**_JIT)
def conv3x3_rows(x: np.ndarray, w_tk: np.ndarray, b: np.ndarray, relu: bool, y: np.ndarray,
                 row0: int, row1: int) -> None:
    """y = relu?(conv3x3(x, w) + b) for image rows row0..row1 (row = n * H + h)."""
    _, height, width, channels = x.shape
    out_channels = y.shape[3]
    sizes = Sizes(width, channels, out_channels)
    xf, wf, yf = x.ravel(), w_tk.ravel(), y.ravel()
    for row in range(row0, row1):
        h = row % height
        dy0 = 1 if h == 0 else 0  # kernel rows inside the image
        dy1 = 2 if h == height - 1 else 3
        p0 = row * width  # the row's first pixel
        for j0 in range(0, out_channels, 16):
            # border pixel, blocks of six interior pixels, then what is left (the right
            # border pixel included); 16 channels at a time, 8 for the last ones if K % 16.
            # The two widths are written out as two loops: one loop choosing the width per
            # block was 10-30% slower (LLVM no longer specialises the inlined block).
            if j0 + 16 <= out_channels:
                _one_pixel16(xf, wf, b, yf, relu, sizes, Block(p0, 0, j0, dy0, dy1))
                x0 = 1
                while x0 + 6 <= width - 1:
                    _six_pixels16(xf, wf, b, yf, relu, sizes, Block(p0 + x0, x0, j0, dy0, dy1))
                    x0 += 6
                while x0 < width:
                    _one_pixel16(xf, wf, b, yf, relu, sizes, Block(p0 + x0, x0, j0, dy0, dy1))
                    x0 += 1
            else:
                _one_pixel8(xf, wf, b, yf, relu, sizes, Block(p0, 0, j0, dy0, dy1))
                x0 = 1
                while x0 + 6 <= width - 1:
                    _six_pixels8(xf, wf, b, yf, relu, sizes, Block(p0 + x0, x0, j0, dy0, dy1))
                    x0 += 6
                while x0 < width:
                    _one_pixel8(xf, wf, b, yf, relu, sizes, Block(p0 + x0, x0, j0, dy0, dy1))
                    x0 += 1


@njit(**_JIT)
def _grad16(xf, dzf, outf, run, channels, out_channels, group):
    """out[tap t0 .. t0+group-1, j0:j0+16] += sum over the run's pixels p of x[p, tap t] *
    dz[p, j0:j0+16] (run: where the operands start; channels, out_channels: the pixel
    strides of x and dz, as uint64; out's row stride is out_channels too)."""
    xi, dj, oi, pixels = run
    cc, kk = channels, out_channels
    if group == 4:
        a = load_4x16(outf, oi, kk)
        for p in range(pixels):
            dp = dj + p * kk
            a = fma_4x16(xf, xi + p * cc, load8(dzf, dp), load8(dzf, dp + uint64(8)), a)
        store_4x16(outf, oi, kk, a)
        return
    # one tap (C % 4 != 0, e.g. the first layer): even and odd pixels in two sets of
    # sums, so that four FMA chains, not two, are in flight
    a0, a1 = load8(outf, oi), load8(outf, oi + uint64(8))
    e0 = e1 = zeros8()
    for p2 in range(pixels // uint64(2)):
        dp = dj + p2 * uint64(2) * kk
        xp = xi + p2 * uint64(2) * cc
        s = splat8(xf, xp)
        a0 = fma8(s, load8(dzf, dp), a0)
        a1 = fma8(s, load8(dzf, dp + uint64(8)), a1)
        s = splat8(xf, xp + cc)
        e0 = fma8(s, load8(dzf, dp + kk), e0)
        e1 = fma8(s, load8(dzf, dp + kk + uint64(8)), e1)
    if pixels % uint64(2) == uint64(1):
        dp = dj + (pixels - uint64(1)) * kk
        s = splat8(xf, xi + (pixels - uint64(1)) * cc)
        a0 = fma8(s, load8(dzf, dp), a0)
        a1 = fma8(s, load8(dzf, dp + uint64(8)), a1)
    store8(outf, oi, add8(a0, e0))
    store8(outf, oi + uint64(8), add8(a1, e1))


@njit(**_JIT)
def _grad8(xf, dzf, outf, run, channels, out_channels, group):
    """As _grad16 for the last 8 channels where K % 16 == 8; even and odd pixels (or, for
    one tap, pixel p % 4) go to separate sets of sums, added at the end."""
    xi, dj, oi, pixels = run
    cc, kk = channels, out_channels
    if group == 4:
        a = load_4x8(outf, oi, kk)
        e = (zeros8(), zeros8(), zeros8(), zeros8())
        for p2 in range(pixels // uint64(2)):
            p = p2 * uint64(2)
            a = fma_4x8(xf, xi + p * cc, load8(dzf, dj + p * kk), a)
            e = fma_4x8(xf, xi + p * cc + cc, load8(dzf, dj + p * kk + kk), e)
        if pixels % uint64(2) == uint64(1):
            p = pixels - uint64(1)
            a = fma_4x8(xf, xi + p * cc, load8(dzf, dj + p * kk), a)
        store_4x8(outf, oi, kk, (add8(a[0], e[0]), add8(a[1], e[1]), add8(a[2], e[2]),
                                 add8(a[3], e[3])))
        return
    a0 = load8(outf, oi)
    e1 = e2 = e3 = zeros8()
    for p4 in range(pixels // uint64(4)):
        p = p4 * uint64(4)
        a0 = fma8(splat8(xf, xi + p * cc), load8(dzf, dj + p * kk), a0)
        p += uint64(1)
        e1 = fma8(splat8(xf, xi + p * cc), load8(dzf, dj + p * kk), e1)
        p += uint64(1)
        e2 = fma8(splat8(xf, xi + p * cc), load8(dzf, dj + p * kk), e2)
        p += uint64(1)
        e3 = fma8(splat8(xf, xi + p * cc), load8(dzf, dj + p * kk), e3)
    for p in range(pixels - pixels % uint64(4), pixels):
        a0 = fma8(splat8(xf, xi + p * cc), load8(dzf, dj + p * kk), a0)
    store8(outf, oi, add8(add8(a0, e1), add8(e2, e3)))


@njit(**_JIT)
def conv3x3_weight_grad_rows(x: np.ndarray, dz: np.ndarray, row0: int, row1: int,
                             out: np.ndarray) -> None:
    """out[9C, K] = sum of patch(x, p)^T dz[p] over the pixels p of image rows row0..row1.

    out is overwritten: one partial sum per block of rows; the caller adds them in order.
    The sums wait in out between image rows (a row's x and dz stay in L1 meanwhile).
    """
    _, height, width, channels = x.shape
    out_channels = dz.shape[3]
    xf, dzf, outf = x.ravel(), dz.ravel(), out.ravel()
    for i in range(outf.size):
        outf[i] = 0.0
    kk = uint64(out_channels)
    cc = uint64(channels)
    group = 4 if channels % 4 == 0 else 1
    for row in range(row0, row1):
        h = row % height
        for dy in range(3):
            hs = h + dy - 1  # the input row kernel row dy reads
            if hs < 0 or hs >= height:
                continue
            for t0 in range(0, 3 * channels, group):
                dx = t0 // channels
                x_lo = 1 if dx == 0 else 0  # pixels whose tap dx lies inside the image
                x_hi = width - 1 if dx == 2 else width
                if x_hi <= x_lo:
                    continue
                xi = uint64(((row + dy - 1) * width + x_lo - 1) * channels + t0)
                di = uint64((row * width + x_lo) * out_channels)
                pixels = uint64(x_hi - x_lo)
                for j0 in range(0, out_channels, 16):
                    run = PixelRun(xi, di + uint64(j0),
                                   uint64((dy * 3 * channels + t0) * out_channels + j0), pixels)
                    if j0 + 16 <= out_channels:
                        _grad16(xf, dzf, outf, run, cc, kk, group)
                    else:
                        _grad8(xf, dzf, outf, run, cc, kk, group)
