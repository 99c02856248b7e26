"""Numba kernels behind the CPU backend (``cpu.py``).

Each kernel is one loop nest over NHWC float32 data, parallel over its outermost
independent axis with ``prange``. The heavy arithmetic (convolutions) is left to BLAS
SGEMM; these kernels do the data movement around it (patch gathering, scatter, fused
epilogues) and the memory-bound ops. ``cache=True`` keeps the compiled code on disk, so
only the first run pays for compilation.
"""

from __future__ import annotations

import math

from numba import njit, prange

_JIT = {"cache": True, "nogil": True}


# ----------------------------------------------------------------------- convolution


@njit(**_JIT)
def im2col_t(x, m0, m1, r_size, cols_t):
    """The transposed patch matrix of pixels m0..m1: cols_t[(r*R + s)*C + c, i].

    Transposed because BLAS runs W[K, R*R*C] @ cols_t far faster than cols @ W^T when K
    is narrow (16 channels at the U-Net's top level): the long pixel axis becomes the
    GEMM's wide N dimension (measured here: ~60 vs ~37 GFLOP/s for K = 16). Serial: the
    caller runs one block per thread.
    """
    n_, h_, w_, c_ = x.shape
    pad = r_size // 2
    hw = h_ * w_
    for i in range(m1 - m0):
        m = m0 + i
        n = m // hw
        rem = m - n * hw
        h = rem // w_
        w = rem - h * w_
        for r in range(r_size):
            hh = h + r - pad
            for s in range(r_size):
                ww = w + s - pad
                base = (r * r_size + s) * c_
                if 0 <= hh < h_ and 0 <= ww < w_:
                    for c in range(c_):
                        cols_t[base + c, i] = x[n, hh, ww, c]
                else:
                    for c in range(c_):
                        cols_t[base + c, i] = 0.0


@njit(**_JIT)
def transpose_bias_relu(y_t, b, relu, m0, y2d):
    """y2d[m0 + i, k] = relu(y_t[k, i] + b[k]): back to NHWC, epilogue fused. Serial."""
    k_, rows = y_t.shape
    for i in range(rows):
        for k in range(k_):
            v = y_t[k, i] + b[k]
            if relu and v < 0.0:
                v = 0.0
            y2d[m0 + i, k] = v


@njit(parallel=True, **_JIT)
def bias_relu_inplace(y2d, b, relu):
    """y += b per column, then max(y, 0) if relu: the convolution's fused epilogue."""
    rows, k_ = y2d.shape
    for i in prange(rows):
        for k in range(k_):
            v = y2d[i, k] + b[k]
            if relu and v < 0.0:
                v = 0.0
            y2d[i, k] = v


@njit(parallel=True, **_JIT)
def relu_grad_and_bias_grad(dy2d, y2d, relu, dz2d, db_partial):
    """dz = dy * (y > 0) (or dy), and per-thread-block partial sums of dz for db.

    db_partial is [blocks, K]; block j sums its own contiguous run of rows, so the
    reduction parallelises without atomics; the caller adds the blocks up.
    """
    rows, k_ = dy2d.shape
    blocks = db_partial.shape[0]
    per = (rows + blocks - 1) // blocks
    for j in prange(blocks):
        for k in range(k_):
            db_partial[j, k] = 0.0
        for i in range(j * per, min(rows, (j + 1) * per)):
            for k in range(k_):
                g = dy2d[i, k]
                if relu and y2d[i, k] <= 0.0:
                    g = 0.0
                dz2d[i, k] = g
                db_partial[j, k] += g


@njit(parallel=True, **_JIT)
def column_sums(a2d, partial):
    """partial[j, k] = sum of block j's contiguous rows of a2d (caller sums the blocks)."""
    rows, k_ = a2d.shape
    blocks = partial.shape[0]
    per = (rows + blocks - 1) // blocks
    for j in prange(blocks):
        for k in range(k_):
            partial[j, k] = 0.0
        for i in range(j * per, min(rows, (j + 1) * per)):
            for k in range(k_):
                partial[j, k] += a2d[i, k]


# ----------------------------------------------------------------------- max-pool


@njit(parallel=True, **_JIT)
def maxpool2x2_forward(x, y, argmax):
    n_, ho, wo, c_ = y.shape
    for nh in prange(n_ * ho):
        n = nh // ho
        i = nh - n * ho
        for j in range(wo):
            for c in range(c_):
                best = x[n, 2 * i, 2 * j, c]
                arg = 0
                v = x[n, 2 * i, 2 * j + 1, c]
                if v > best:
                    best = v
                    arg = 1
                v = x[n, 2 * i + 1, 2 * j, c]
                if v > best:
                    best = v
                    arg = 2
                v = x[n, 2 * i + 1, 2 * j + 1, c]
                if v > best:
                    best = v
                    arg = 3
                y[n, i, j, c] = best
                argmax[n, i, j, c] = arg


@njit(parallel=True, **_JIT)
def maxpool2x2_backward(dy, argmax, dx):
    n_, h_, w_, c_ = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    for nh in prange(n_ * h_):
        n = nh // h_
        h = nh - n * h_
        i = h // 2
        a = h - 2 * i
        for w in range(w_):
            j = w // 2
            b = w - 2 * j
            for c in range(c_):
                if i < ho and j < wo and argmax[n, i, j, c] == 2 * a + b:
                    dx[n, h, w, c] = dy[n, i, j, c]
                else:
                    dx[n, h, w, c] = 0.0


# ----------------------------------------------------------------------- up-convolution


@njit(parallel=True, **_JIT)
def upconv_scatter(tmp, b, y):
    """tmp [N,H,W,2,2,K] (the GEMM's output) + b -> y [N,2H,2W,K]."""
    n_, h_, w_ = tmp.shape[0], tmp.shape[1], tmp.shape[2]
    k_ = y.shape[3]
    for nh in prange(n_ * h_):
        n = nh // h_
        i = nh - n * h_
        for j in range(w_):
            for a in range(2):
                for bb in range(2):
                    for k in range(k_):
                        y[n, 2 * i + a, 2 * j + bb, k] = tmp[n, i, j, a, bb, k] + b[k]


@njit(parallel=True, **_JIT)
def upconv_gather(dy, g):
    """dy [N,2H,2W,K] -> g [N,H,W,2,2,K], the layout the backward GEMMs want."""
    n_, h_, w_ = g.shape[0], g.shape[1], g.shape[2]
    k_ = dy.shape[3]
    for nh in prange(n_ * h_):
        n = nh // h_
        i = nh - n * h_
        for j in range(w_):
            for a in range(2):
                for bb in range(2):
                    for k in range(k_):
                        g[n, i, j, a, bb, k] = dy[n, 2 * i + a, 2 * j + bb, k]


# ----------------------------------------------------------------------- concat


@njit(parallel=True, **_JIT)
def concat_channels(a, b, y):
    ca = a.shape[3]
    n_, h_, w_, cb = b.shape
    for nh in prange(n_ * h_):
        n = nh // h_
        h = nh - n * h_
        for w in range(w_):
            for c in range(ca):
                y[n, h, w, c] = a[n, h, w, c]
            for c in range(cb):
                y[n, h, w, ca + c] = b[n, h, w, c]


@njit(parallel=True, **_JIT)
def split_channels(dy, da, db):
    ca = da.shape[3]
    n_, h_, w_, cb = db.shape
    for nh in prange(n_ * h_):
        n = nh // h_
        h = nh - n * h_
        for w in range(w_):
            for c in range(ca):
                da[n, h, w, c] = dy[n, h, w, c]
            for c in range(cb):
                db[n, h, w, c] = dy[n, h, w, ca + c]


# ----------------------------------------------------------------------- loss


@njit(parallel=True, **_JIT)
def sigmoid_dice_loss(z2d, t2d, smooth, dice, dz2d):
    """z2d, t2d: [N, pixels]. Writes dice [N] and dz2d; returns nothing (loss by caller).

    Sums accumulate in float64 so a 512x512 slice loses nothing to rounding.
    """
    n_, p_ = z2d.shape
    for n in prange(n_):
        inter = 0.0
        total = 0.0
        for i in range(p_):
            p = 1.0 / (1.0 + math.exp(-z2d[n, i]))
            t = float(t2d[n, i])
            inter += p * t
            total += p + t
        den = total + smooth
        num = 2.0 * inter + smooth
        dice[n] = num / den
        scale = -1.0 / (n_ * den * den)
        for i in range(p_):
            p = 1.0 / (1.0 + math.exp(-z2d[n, i]))
            t = float(t2d[n, i])
            dz2d[n, i] = scale * (2.0 * t * den - num) * p * (1.0 - p)


@njit(parallel=True, **_JIT)
def confusion_counts(z2d, t2d, counts):
    n_, p_ = z2d.shape
    for n in prange(n_):
        tp = 0
        fp = 0
        fn = 0
        for i in range(p_):
            pred = z2d[n, i] > 0.0
            truth = t2d[n, i] != 0
            if pred and truth:
                tp += 1
            elif pred:
                fp += 1
            elif truth:
                fn += 1
        counts[n, 0] = tp
        counts[n, 1] = fp
        counts[n, 2] = fn


# ----------------------------------------------------------------------- optimiser


@njit(parallel=True, **_JIT)
def adam_step(param, grad, m, v, lr_corrected, beta1, beta2, eps, sqrt_bc2):
    """PyTorch's Adam on the flat buffer: lr_corrected = lr / (1 - b1^t)."""
    for i in prange(param.shape[0]):
        g = grad[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        param[i] -= lr_corrected * mi / (math.sqrt(vi) / sqrt_bc2 + eps)


# ----------------------------------------------------------------------- input pipeline


@njit(parallel=True, **_JIT)
def window_augment(hu, mask, aug, center, width, air, image, mask_out):
    """Flip + rotate by inverse mapping; bilinear HU then window; nearest mask."""
    n_, h_, w_ = hu.shape
    cy = (h_ - 1) / 2.0
    cx = (w_ - 1) / 2.0
    lo = center - width / 2.0
    for ny in prange(n_ * h_):
        n = ny // h_
        y = ny - n * h_
        t = aug[n, 2] * math.pi / 180.0
        ct = math.cos(t)
        st = math.sin(t)
        flip_h = aug[n, 0] != 0.0
        flip_v = aug[n, 1] != 0.0
        dy = y - cy
        for x in range(w_):
            dx = x - cx
            sy = cy + ct * dy + st * dx
            sx = cx + ct * dx - st * dy
            if flip_v:
                sy = h_ - 1 - sy
            if flip_h:
                sx = w_ - 1 - sx
            # image: bilinear over the 4 neighbours, air outside
            y0 = math.floor(sy)
            x0 = math.floor(sx)
            fy = sy - y0
            fx = sx - x0
            acc = 0.0
            for a in range(2):
                yy = int(y0) + a
                wy = fy if a == 1 else 1.0 - fy
                for b in range(2):
                    xx = int(x0) + b
                    wx = fx if b == 1 else 1.0 - fx
                    if 0 <= yy < h_ and 0 <= xx < w_:
                        v = float(hu[n, yy, xx])
                    else:
                        v = air
                    acc += wy * wx * v
            val = (acc - lo) / width
            if val < 0.0:
                val = 0.0
            elif val > 1.0:
                val = 1.0
            image[n, y, x, 0] = val
            # mask: nearest pixel, 0 outside
            my = int(math.floor(sy + 0.5))
            mx = int(math.floor(sx + 0.5))
            if 0 <= my < h_ and 0 <= mx < w_ and mask[n, my, mx] != 0:
                mask_out[n, y, x, 0] = 1
            else:
                mask_out[n, y, x, 0] = 0
