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
OpenBLAS took 7.3 ms (41 GFLOP/s). Run ``nodulekit bench ops --device cpu`` for the
ratios against PyTorch (oneDNN) measured side by side.

Requirements: K % 8 == 0 (blocks of 16 channels, and one of 8 where K % 16 == 8; the
caller falls back to v1 otherwise). Serial, nogil: the caller runs blocks of image rows
on its threads (``cpu_workers.Workers``). The order of every sum is fixed, so results
are the same on every run and any thread count.
"""

from __future__ import annotations

from numba import njit, uint64

from nodulekit.engine.simd import add8, fma8, load8, relu8, splat8, store8, zeros8

_JIT = {"cache": True, "nogil": True}


def supports(c: int, k: int) -> bool:
    """Whether these kernels handle a 3x3 convolution with C inputs and K outputs."""
    return k % 8 == 0 and c >= 1


@njit(**_JIT)
def _one_pixel16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x, j0, dy0, dy1):
    """y[n, yy, x, j0:j0+16]: one pixel, over the part of each kernel row inside the image."""
    t_lo = c_ if x == 0 else 0
    t_hi = 2 * c_ if x == w_ - 1 else 3 * c_
    kk = uint64(k_)
    acc0 = load8(b, j0)
    acc1 = load8(b, j0 + 8)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x - 1) * c_ + t_lo)
        wi = uint64((dy * 3 * c_ + t_lo) * k_ + j0)
        for t in range(uint64(t_hi - t_lo)):
            s = splat8(xf, xi + t)
            wt = wi + t * kk
            acc0 = fma8(s, load8(wf, wt), acc0)
            acc1 = fma8(s, load8(wf, wt + uint64(8)), acc1)
    if relu:
        acc0 = relu8(acc0)
        acc1 = relu8(acc1)
    o = uint64(((n * h_ + yy) * w_ + x) * k_ + j0)
    store8(yf, o, acc0)
    store8(yf, o + uint64(8), acc1)


@njit(**_JIT)
def _one_pixel8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x, j0, dy0, dy1):
    """y[n, yy, x, j0:j0+8]: as _one_pixel16, for the last 8 channels where K % 16 == 8."""
    t_lo = c_ if x == 0 else 0
    t_hi = 2 * c_ if x == w_ - 1 else 3 * c_
    kk = uint64(k_)
    acc0 = load8(b, j0)
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x - 1) * c_ + t_lo)
        wi = uint64((dy * 3 * c_ + t_lo) * k_ + j0)
        for t in range(uint64(t_hi - t_lo)):
            acc0 = fma8(splat8(xf, xi + t), load8(wf, wi + t * kk), acc0)
    if relu:
        acc0 = relu8(acc0)
    store8(yf, uint64(((n * h_ + yy) * w_ + x) * k_ + j0), acc0)


@njit(**_JIT)
def _six_pixels16(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1):
    """y[n, yy, x0:x0+6, j0:j0+16], all six pixels inside the image: the register block."""
    kk = uint64(k_)
    c1, c2, c3 = uint64(c_), uint64(2 * c_), uint64(3 * c_)
    c4, c5 = uint64(4 * c_), uint64(5 * c_)
    a00 = load8(b, j0)
    a01 = load8(b, j0 + 8)
    a10, a11, a20, a21, a30, a31 = a00, a01, a00, a01, a00, a01
    a40, a41, a50, a51 = a00, a01, a00, a01
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x0 - 1) * c_)
        wi = uint64(dy * 3 * c_ * k_ + j0)
        for t in range(c3):  # one kernel row's patch values: 3 pixels x C channels
            wt = wi + t * kk
            w0 = load8(wf, wt)
            w1 = load8(wf, wt + uint64(8))
            xt = xi + t
            s = splat8(xf, xt)
            a00 = fma8(s, w0, a00)
            a01 = fma8(s, w1, a01)
            s = splat8(xf, xt + c1)
            a10 = fma8(s, w0, a10)
            a11 = fma8(s, w1, a11)
            s = splat8(xf, xt + c2)
            a20 = fma8(s, w0, a20)
            a21 = fma8(s, w1, a21)
            s = splat8(xf, xt + c3)
            a30 = fma8(s, w0, a30)
            a31 = fma8(s, w1, a31)
            s = splat8(xf, xt + c4)
            a40 = fma8(s, w0, a40)
            a41 = fma8(s, w1, a41)
            s = splat8(xf, xt + c5)
            a50 = fma8(s, w0, a50)
            a51 = fma8(s, w1, a51)
    if relu:
        a00, a01, a10, a11 = relu8(a00), relu8(a01), relu8(a10), relu8(a11)
        a20, a21, a30, a31 = relu8(a20), relu8(a21), relu8(a30), relu8(a31)
        a40, a41, a50, a51 = relu8(a40), relu8(a41), relu8(a50), relu8(a51)
    o = uint64(((n * h_ + yy) * w_ + x0) * k_ + j0)
    o8 = o + uint64(8)
    store8(yf, o, a00)
    store8(yf, o8, a01)
    store8(yf, o + kk, a10)
    store8(yf, o8 + kk, a11)
    store8(yf, o + uint64(2) * kk, a20)
    store8(yf, o8 + uint64(2) * kk, a21)
    store8(yf, o + uint64(3) * kk, a30)
    store8(yf, o8 + uint64(3) * kk, a31)
    store8(yf, o + uint64(4) * kk, a40)
    store8(yf, o8 + uint64(4) * kk, a41)
    store8(yf, o + uint64(5) * kk, a50)
    store8(yf, o8 + uint64(5) * kk, a51)


@njit(**_JIT)
def _six_pixels8(xf, wf, b, relu, yf, h_, w_, c_, k_, n, yy, x0, j0, dy0, dy1):
    """As _six_pixels16 for the last 8 channels where K % 16 == 8. Each broadcast now
    feeds one FMA, not two: 7 loads per 6 FMAs, so the loads set the pace (measured ~40
    GFLOP/s a core at 8 -> 8 channels; splitting the sums into even and odd patch values,
    for more FMAs in flight, was slower)."""
    kk = uint64(k_)
    c1, c2, c3 = uint64(c_), uint64(2 * c_), uint64(3 * c_)
    c4, c5 = uint64(4 * c_), uint64(5 * c_)
    a0 = load8(b, j0)
    a1, a2, a3, a4, a5 = a0, a0, a0, a0, a0
    for dy in range(dy0, dy1):
        xi = uint64(((n * h_ + yy + dy - 1) * w_ + x0 - 1) * c_)
        wi = uint64(dy * 3 * c_ * k_ + j0)
        for t in range(c3):
            w0 = load8(wf, wi + t * kk)
            xt = xi + t
            a0 = fma8(splat8(xf, xt), w0, a0)
            a1 = fma8(splat8(xf, xt + c1), w0, a1)
            a2 = fma8(splat8(xf, xt + c2), w0, a2)
            a3 = fma8(splat8(xf, xt + c3), w0, a3)
            a4 = fma8(splat8(xf, xt + c4), w0, a4)
            a5 = fma8(splat8(xf, xt + c5), w0, a5)
    if relu:
        a0, a1, a2, a3, a4, a5 = relu8(a0), relu8(a1), relu8(a2), relu8(a3), relu8(a4), relu8(a5)
    o = uint64(((n * h_ + yy) * w_ + x0) * k_ + j0)
    store8(yf, o, a0)
    store8(yf, o + kk, a1)
    store8(yf, o + uint64(2) * kk, a2)
    store8(yf, o + uint64(3) * kk, a3)
    store8(yf, o + uint64(4) * kk, a4)
    store8(yf, o + uint64(5) * kk, a5)


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
            # border pixel included); 16 channels at a time, 8 for the last ones if K % 16
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
    o8 = oi + uint64(8)
    a00, a01 = load8(outf, oi), load8(outf, o8)
    if group == 4:
        a10, a11 = load8(outf, oi + kk), load8(outf, o8 + kk)
        a20 = load8(outf, oi + uint64(2) * kk)
        a21 = load8(outf, o8 + uint64(2) * kk)
        a30 = load8(outf, oi + uint64(3) * kk)
        a31 = load8(outf, o8 + uint64(3) * kk)
        for p in range(pixels):
            dp = dj + p * kk
            d0 = load8(dzf, dp)
            d1 = load8(dzf, dp + uint64(8))
            xp = xi + p * cc
            s = splat8(xf, xp)
            a00 = fma8(s, d0, a00)
            a01 = fma8(s, d1, a01)
            s = splat8(xf, xp + uint64(1))
            a10 = fma8(s, d0, a10)
            a11 = fma8(s, d1, a11)
            s = splat8(xf, xp + uint64(2))
            a20 = fma8(s, d0, a20)
            a21 = fma8(s, d1, a21)
            s = splat8(xf, xp + uint64(3))
            a30 = fma8(s, d0, a30)
            a31 = fma8(s, d1, a31)
        store8(outf, oi + kk, a10)
        store8(outf, o8 + kk, a11)
        store8(outf, oi + uint64(2) * kk, a20)
        store8(outf, o8 + uint64(2) * kk, a21)
        store8(outf, oi + uint64(3) * kk, a30)
        store8(outf, o8 + uint64(3) * kk, a31)
    else:  # one tap (C % 4 != 0, e.g. the first layer): even and odd pixels apart
        e00 = e01 = zeros8()
        for p2 in range(pixels // uint64(2)):
            dp = dj + p2 * uint64(2) * kk
            xp = xi + p2 * uint64(2) * cc
            s = splat8(xf, xp)
            a00 = fma8(s, load8(dzf, dp), a00)
            a01 = fma8(s, load8(dzf, dp + uint64(8)), a01)
            s = splat8(xf, xp + cc)
            e00 = fma8(s, load8(dzf, dp + kk), e00)
            e01 = fma8(s, load8(dzf, dp + kk + uint64(8)), e01)
        if pixels % uint64(2) == uint64(1):
            dp = dj + (pixels - uint64(1)) * kk
            s = splat8(xf, xi + (pixels - uint64(1)) * cc)
            a00 = fma8(s, load8(dzf, dp), a00)
            a01 = fma8(s, load8(dzf, dp + uint64(8)), a01)
        a00, a01 = add8(a00, e00), add8(a01, e01)
    store8(outf, oi, a00)
    store8(outf, o8, a01)


@njit(**_JIT)
def _grad8(xf, dzf, outf, kk, cc, xi, dj, oi, pixels, group):
    """As _grad16 for the last 8 channels where K % 16 == 8; even and odd pixels go to
    two sets of sums (see _six_pixels8), added at the end."""
    a0 = load8(outf, oi)
    e0 = zeros8()
    half = pixels // uint64(2)
    if group == 4:
        a1 = load8(outf, oi + kk)
        a2 = load8(outf, oi + uint64(2) * kk)
        a3 = load8(outf, oi + uint64(3) * kk)
        e1 = e2 = e3 = e0
        for p2 in range(half):
            p = p2 * uint64(2)
            d0 = load8(dzf, dj + p * kk)
            d1 = load8(dzf, dj + p * kk + kk)
            xp = xi + p * cc
            a0 = fma8(splat8(xf, xp), d0, a0)
            a1 = fma8(splat8(xf, xp + uint64(1)), d0, a1)
            a2 = fma8(splat8(xf, xp + uint64(2)), d0, a2)
            a3 = fma8(splat8(xf, xp + uint64(3)), d0, a3)
            xp = xp + cc
            e0 = fma8(splat8(xf, xp), d1, e0)
            e1 = fma8(splat8(xf, xp + uint64(1)), d1, e1)
            e2 = fma8(splat8(xf, xp + uint64(2)), d1, e2)
            e3 = fma8(splat8(xf, xp + uint64(3)), d1, e3)
        if pixels % uint64(2) == uint64(1):
            p = pixels - uint64(1)
            d0 = load8(dzf, dj + p * kk)
            xp = xi + p * cc
            a0 = fma8(splat8(xf, xp), d0, a0)
            a1 = fma8(splat8(xf, xp + uint64(1)), d0, a1)
            a2 = fma8(splat8(xf, xp + uint64(2)), d0, a2)
            a3 = fma8(splat8(xf, xp + uint64(3)), d0, a3)
        store8(outf, oi + kk, add8(a1, e1))
        store8(outf, oi + uint64(2) * kk, add8(a2, e2))
        store8(outf, oi + uint64(3) * kk, add8(a3, e3))
    else:  # one tap: four sets of sums, pixel p going to set p % 4
        e1 = e2 = e3 = e0
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
        e0 = add8(add8(e1, e2), e3)
    store8(outf, oi, add8(a0, e0))


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
