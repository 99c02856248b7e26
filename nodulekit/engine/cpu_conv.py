"""3x3 convolutions on the CPU as register-blocked micro-kernels (the CPU's "v2").

What they compute (NHWC float32, stride 1, zero 'same' padding; w_tk is the weight as
[9*C, K]: tap (r, s, c) major, output channel k inner, i.e. ``w.reshape(K, -1).T``):

    conv3x3_rows:              y[p, k]  = relu?(b[k] + sum_t patch(x, p)[t] * w_tk[t, k])
    conv3x3_weight_grad_rows:  dW_tk[t, k] = sum_p patch(x, p)[t] * dz[p, k]

where patch(x, p) is the 9*C input values pixel p's output reads. v1 (``cpu.py``) copies
those patches into a matrix and calls BLAS SGEMM. That is fine for deep layers, but at
the U-Net's top levels K is 16 or 32, a shape BLAS handles badly (~45 GFLOP/s per core
here, half of peak), and the copy itself costs 13% of a step.

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
channels) stay with v1.

Run it: ``nodulekit bench ops --op conv --variants all`` times v1, v2 and the per-shape
choice against PyTorch (oneDNN) on every layer of the U-Net; ``pytest tests/test_ops.py
-k "register or cpu_versions"`` checks each kernel against the float64 reference and
torch, borders, odd sizes and 8-channel blocks included.

Requirements: K % 8 == 0 (blocks of 16 channels, and one of 8 where K % 16 == 8; the
caller falls back to v1 otherwise). Serial, nogil: the caller runs blocks of image rows
on its threads (``cpu_workers.Workers``). The order of every sum is fixed, so results
are the same on every run and any thread count.
"""

from __future__ import annotations

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


@njit(**_JIT)
def _one_pixel16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x, j0, dy0, dy1):
    """y[n, yy, x, j0:j0+16]: one pixel, over the part of each kernel row inside the image
    (the border pixels and what the 6-pixel blocks leave over).

    Two sums alone would wait on each other's FMA latency (4 cycles): a quarter of the
    FMA units' rate. Patch values t % 4 go to four pairs of sums, added at the end, so
    eight FMAs are in flight and the loads (3 per 2 FMAs) set the pace instead.
    """
    t_lo = c_ if x == 0 else 0
    t_hi = 2 * c_ if x == w_ - 1 else 3 * c_
    kk = uint64(k_)
    a0, a1 = load8(b, j0), load8(b, j0 + 8)
    z = zeros8()
    e0, e1, f0, f1, g0, g1 = z, z, z, z, z, z
    length = uint64(t_hi - t_lo)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x - 1) * c_ + t_lo)
        wi = uint64((dy * 3 * c_ + t_lo) * k_ + j0)
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
    o = uint64(((n * h_ + yy) * w_ + x) * k_ + j0)
    store8(yf, o, a0)
    store8(yf, o + uint64(8), a1)


@njit(**_JIT)
def _one_pixel8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x, j0, dy0, dy1):
    """y[n, yy, x, j0:j0+8]: as _one_pixel16, for the last 8 channels where K % 16 == 8."""
    t_lo = c_ if x == 0 else 0
    t_hi = 2 * c_ if x == w_ - 1 else 3 * c_
    kk = uint64(k_)
    a0 = load8(b, j0)
    e0 = f0 = g0 = zeros8()
    length = uint64(t_hi - t_lo)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x - 1) * c_ + t_lo)
        wi = uint64((dy * 3 * c_ + t_lo) * k_ + j0)
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
    store8(yf, uint64(((n * h_ + yy) * w_ + x) * k_ + j0), a0)


@njit(**_INLINE)
def _six_pixels16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1):
    """y[n, yy, x0:x0+6, j0:j0+16], all six pixels inside the image: the register block.

    Pixel x0+r's patch values for kernel row dy are one run of 3C input values starting
    at xi + r*C, so step t of the reduction broadcasts x[xi + t + r*C] for r = 0..5.
    """
    kk = uint64(k_)
    c1, c2, c3 = uint64(c_), uint64(2 * c_), uint64(3 * c_)
    c4, c5 = uint64(4 * c_), uint64(5 * c_)
    b0, b1 = load8(b, j0), load8(b, j0 + 8)
    a = (b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x0 - 1) * c_)
        wi = uint64(dy * 3 * c_ * k_ + j0)
        for t in range(c3):  # one kernel row's patch values: 3 pixels x C channels
            wt = wi + t * kk
            xt = xi + t
            a = fma_6x16(xf, xt, xt + c1, xt + c2, xt + c3, xt + c4, xt + c5,
                         load8(wf, wt), load8(wf, wt + uint64(8)), a)
    if relu:
        a = relu_6x16(a)
    o = uint64(((n * h_ + yy) * w_ + x0) * k_ + j0)
    store_6x16(yf, o, o + kk, o + uint64(2) * kk, o + uint64(3) * kk, o + uint64(4) * kk,
               o + uint64(5) * kk, 8, a)


@njit(**_INLINE)
def _six_pixels8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1):
    """As _six_pixels16 for the last 8 channels where K % 16 == 8 (load-bound: ~40
    GFLOP/s a core at 8 -> 8 channels; two sets of sums for more FMAs in flight were
    slower)."""
    kk = uint64(k_)
    c1, c2, c3 = uint64(c_), uint64(2 * c_), uint64(3 * c_)
    c4, c5 = uint64(4 * c_), uint64(5 * c_)
    b0 = load8(b, j0)
    a = (b0, b0, b0, b0, b0, b0)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x0 - 1) * c_)
        wi = uint64(dy * 3 * c_ * k_ + j0)
        for t in range(c3):
            xt = xi + t
            a = fma_6x8(xf, xt, xt + c1, xt + c2, xt + c3, xt + c4, xt + c5,
                        load8(wf, wi + t * kk), a)
    if relu:
        a = relu_6x8(a)
    o = uint64(((n * h_ + yy) * w_ + x0) * k_ + j0)
    store_6x8(yf, o, o + kk, o + uint64(2) * kk, o + uint64(3) * kk, o + uint64(4) * kk,
              o + uint64(5) * kk, a)


@njit(**_JIT)
def conv3x3_rows(x, w_tk, b, relu, y, row0, row1):
    """y = relu?(conv3x3(x, w) + b) for image rows row0..row1 (row = n * H + h)."""
    n_, h_, w_, c_ = x.shape
    k_ = y.shape[3]
    xf, wf, yf = x.ravel(), w_tk.ravel(), y.ravel()
    for row in range(row0, row1):
        n = row // h_
        yy = row - n * h_
        dy0 = 1 if yy == 0 else 0  # kernel rows inside the image
        dy1 = 2 if yy == h_ - 1 else 3
        for j0 in range(0, k_, 16):
            # border pixel, blocks of six interior pixels, then what is left (the right
            # border pixel included); 16 channels at a time, 8 for the last ones if K % 16.
            # The two widths are written out as two loops: one loop choosing the width per
            # block was 10-30% slower (LLVM no longer specialises the inlined block).
            if j0 + 16 <= k_:
                _one_pixel16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, 0, j0, dy0, dy1)
                x0 = 1
                while x0 + 6 <= w_ - 1:
                    _six_pixels16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1)
                    x0 += 6
                while x0 < w_:
                    _one_pixel16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1)
                    x0 += 1
            else:
                _one_pixel8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, 0, j0, dy0, dy1)
                x0 = 1
                while x0 + 6 <= w_ - 1:
                    _six_pixels8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1)
                    x0 += 6
                while x0 < w_:
                    _one_pixel8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1)
                    x0 += 1


@njit(**_JIT)
def _grad16(xf, dzf, outf, kk, cc, xi, dj, oi, pixels, group):
    """out[t0:t0+group, j0:j0+16] += sum over pixels of x[tap t] * dz[pixel, j0:j0+16]."""
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
def _grad8(xf, dzf, outf, kk, cc, xi, dj, oi, pixels, group):
    """As _grad16 for the last 8 channels where K % 16 == 8; even and odd pixels (or, for
    one tap, pixel p % 4) go to separate sets of sums, added at the end."""
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
def conv3x3_weight_grad_rows(x, dz, row0, row1, out):
    """out[9C, K] = sum of patch(x, p)^T dz[p] over the pixels p of image rows row0..row1.

    out is overwritten: one partial sum per block of rows; the caller adds them in order.
    The sums wait in out between image rows (a row's x and dz stay in L1 meanwhile).
    """
    n_, h_, w_, c_ = x.shape
    k_ = dz.shape[3]
    xf, dzf, outf = x.ravel(), dz.ravel(), out.ravel()
    for i in range(outf.size):
        outf[i] = 0.0
    kk = uint64(k_)
    cc = uint64(c_)
    group = 4 if c_ % 4 == 0 else 1
    for row in range(row0, row1):
        n = row // h_
        yy = row - n * h_
        for dy in range(3):
            ys = yy + dy - 1
            if ys < 0 or ys >= h_:
                continue
            for t0 in range(0, 3 * c_, group):
                dx = t0 // c_
                x_lo = 1 if dx == 0 else 0  # pixels whose tap dx lies inside the image
                x_hi = w_ - 1 if dx == 2 else w_
                if x_hi <= x_lo:
                    continue
                xi = uint64(((n * h_ + ys) * w_ + x_lo - 1) * c_ + t0)
                di = uint64(((n * h_ + yy) * w_ + x_lo) * k_)
                pixels = uint64(x_hi - x_lo)
                for j0 in range(0, k_, 16):
                    oi = uint64((dy * 3 * c_ + t0) * k_ + j0)
                    if j0 + 16 <= k_:
                        _grad16(xf, dzf, outf, kk, cc, xi, di + uint64(j0), oi, pixels, group)
                    else:
                        _grad8(xf, dzf, outf, kk, cc, xi, di + uint64(j0), oi, pixels, group)
