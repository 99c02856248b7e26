"""Numba kernels behind the CPU backend (``cpu.py``).

Each kernel is one loop nest over NHWC float32 data, parallel over its outermost
independent axis with ``prange``. The heavy arithmetic (convolutions) is BLAS SGEMM
(``patches_gemm``) or the register-blocked kernels of ``cpu_conv`` and ``cpu_upconv``
(``register_blocked``); these kernels do the data movement around the SGEMM (patch
gathering, scatter, fused epilogues) and the memory-bound ops. Sizes are read from the
arrays' shapes (``batch``, ``height``, ``width``, ``channels``, ``out_channels``).
``cache=True`` keeps the compiled code on disk, so only the first run pays for compilation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, uint64

from nodulekit.engine.simd import add8, load8, relu_grad8, store8, zeros8

_JIT = {"cache": True, "nogil": True}


# ----------------------------------------------------------------------- convolution


@njit(**_JIT)
def im2col_rows(x: np.ndarray, m0: int, m1: int, r_size: int, cols: np.ndarray) -> None:
    """The patch matrix of output pixels m0..m1: cols[i, (r*R + s)*C + c].

    Row i is pixel m0 + i; its columns are the R x R x C input values its output reads.
    In NHWC the S*C values of one kernel row r are contiguous in x, so each row of the
    patch matrix is R straight copies (zeros where the kernel hangs over the border).
    Serial: the caller runs one block per thread.

    Why the flat arrays and unsigned offsets: Numba wraps negative indices around
    (``a[-1]``), which costs a compare per access and stops LLVM from vectorising the
    copy. Offsets that cannot be negative let it emit plain vector moves: 3-5x faster
    here (measured on 4x128x128x16: 11 ms -> 3.5 ms single-threaded).
    """
    _, height, width, channels = x.shape
    xf = x.ravel()
    colsf = cols.ravel()
    ld = cols.shape[1]
    pad = r_size // 2
    hw = height * width
    rc = r_size * channels
    for i in range(m1 - m0):
        m = m0 + i
        n = m // hw
        rem = m - n * hw
        h = rem // width
        w = rem - h * width
        row = uint64(i * ld)
        for r in range(r_size):
            hh = h + r - pad
            base = row + uint64(r * rc)
            if hh < 0 or hh >= height:
                for j in range(uint64(rc)):
                    colsf[base + j] = 0.0
                continue
            s_lo = max(0, pad - w)  # kernel columns inside the image: s_lo <= s < s_hi
            s_hi = min(r_size, width + pad - w)
            for j in range(uint64(s_lo * channels)):
                colsf[base + j] = 0.0
            src = uint64(((n * height + hh) * width + (w + s_lo - pad)) * channels)
            dst = base + uint64(s_lo * channels)
            for j in range(uint64((s_hi - s_lo) * channels)):
                colsf[dst + j] = xf[src + j]
            for j in range(uint64(s_hi * channels), uint64(rc)):
                colsf[base + j] = 0.0


@njit(parallel=True, **_JIT)
def transpose(a: np.ndarray, out: np.ndarray) -> None:
    """out = a.T (a [rows, cols] C-contiguous, out [cols, rows]), 32 x 32 tiles at a time.

    Why not np.ascontiguousarray(a.T): it walks a column of a straight down, one line per
    value, and with 512 columns (2 KB rows, a power of two) those lines fall into two of
    L1's 64 sets and evict each other. Measured here: the weight gradient's [4608, 512]
    (bottom.conv2 at width 32) took 9.0 ms that way; a tile keeps its 32 lines.
    """
    rows, cols = a.shape
    for t in prange((rows + 31) // 32):
        i0 = t * 32
        i1 = min(rows, i0 + 32)
        for j0 in range(0, cols, 32):
            for j in range(j0, min(cols, j0 + 32)):
                for i in range(i0, i1):
                    out[j, i] = a[i, j]


@njit(**_JIT)
def bias_relu_rows(y2d: np.ndarray, b: np.ndarray, relu: bool, m0: int, m1: int) -> None:
    """y2d[m0:m1] += b per column, then max(y, 0) if relu: the fused epilogue. Serial."""
    channels = y2d.shape[1]
    yf = y2d.ravel()
    for i in range(m0, m1):
        base = uint64(i * channels)
        for k in range(uint64(channels)):
            v = yf[base + k] + b[k]
            if relu and v < 0.0:
                v = 0.0
            yf[base + k] = v



@njit(parallel=True, **_JIT)
def relu_grad_and_bias_grad(dy2d: np.ndarray, y2d: np.ndarray, relu: bool, dz2d: np.ndarray,
                            db_partial: np.ndarray) -> None:
    """dz = dy * (y > 0) (or dy), and per-thread-block partial sums of dz for db.

    db_partial is [blocks, K]; block j sums its own contiguous run of rows, so the
    reduction parallelises without atomics; the caller adds the blocks up. Where K % 8
    == 0 each row goes 8 channels at a time in vector registers (``simd``): the scalar
    loop cannot be vectorised by LLVM (dz and the sums might overlap, as far as it
    knows) and was 2x slower at K = 8.
    """
    rows, channels = dy2d.shape
    dyf, yf, dzf = dy2d.ravel(), y2d.ravel(), dz2d.ravel()
    blocks = db_partial.shape[0]
    per = (rows + blocks - 1) // blocks
    for j in prange(blocks):
        acc = db_partial[j]
        for q in range(acc.size):  # a loop: a slice assignment compiles far slower
            acc[q] = 0.0
        lo, hi = j * per, min(rows, (j + 1) * per)
        if channels % 8 == 0:
            for k0 in range(0, channels, 8):
                s = zeros8()
                for i in range(lo, hi):
                    o = uint64(i * channels + k0)
                    g = load8(dyf, o)
                    if relu:
                        g = relu_grad8(g, load8(yf, o))
                    store8(dzf, o, g)
                    s = add8(s, g)
                store8(acc, k0, s)
            continue
        for i in range(lo, hi):
            base = uint64(i * channels)
            for k in range(uint64(channels)):
                g = dyf[base + k]
                if relu and yf[base + k] <= 0.0:
                    g = 0.0
                dzf[base + k] = g
                acc[k] += g


@njit(parallel=True, **_JIT)
def column_sums(a2d: np.ndarray, c0: int, partial: np.ndarray) -> None:
    """partial[j, k] = sum of a2d[:, c0 + k] over block j's contiguous rows (the caller
    sums the blocks): e.g. the bias gradient of the up-convolution's half of a concat."""
    rows, ld = a2d.shape
    channels = partial.shape[1]
    af = a2d.ravel()
    blocks = partial.shape[0]
    per = (rows + blocks - 1) // blocks
    for j in prange(blocks):
        acc = partial[j]
        for q in range(acc.size):  # a loop: a slice assignment compiles far slower
            acc[q] = 0.0
        for i in range(j * per, min(rows, (j + 1) * per)):
            base = uint64(i * ld + c0)
            for k in range(uint64(channels)):
                acc[k] += af[base + k]


@njit(parallel=True, **_JIT)
def one_output_backward(dy2d: np.ndarray, y2d: np.ndarray, relu: bool, x2d: np.ndarray,
                        w_row: np.ndarray, dx2d: np.ndarray, dw_partial: np.ndarray,
                        db_partial: np.ndarray) -> None:
    """Backward of a 1x1 convolution with one output channel (the U-Net's head), in one
    pass: g = dy (through the ReLU), dx[p, :] = g * w, dW += g * x[p, :], db += g.

    The general path would write dZ, then run a GEMV for dW and an outer product for dx:
    three passes over the pixels for a layer this thin. Partial sums per block of rows
    (dw_partial [blocks, C], db_partial [blocks, 1]); the caller adds them in order.
    dx2d is [rows, C], or [0, C] where dx is not wanted.
    """
    rows, channels = x2d.shape
    need_dx = dx2d.shape[0] != 0
    xf, dxf = x2d.ravel(), dx2d.ravel()
    blocks = dw_partial.shape[0]
    per = (rows + blocks - 1) // blocks
    for j in prange(blocks):
        acc = dw_partial[j]
        for q in range(acc.size):  # a loop: a slice assignment compiles far slower
            acc[q] = 0.0
        bias = 0.0
        for i in range(j * per, min(rows, (j + 1) * per)):
            g = dy2d[i, 0]
            if relu and y2d[i, 0] <= 0.0:
                g = 0.0
            bias += g
            base = uint64(i * channels)
            for c in range(uint64(channels)):
                acc[c] += g * xf[base + c]
            if need_dx:
                for c in range(uint64(channels)):
                    dxf[base + c] = g * w_row[c]
        db_partial[j, 0] = bias


# ----------------------------------------------------------------------- max-pool


@njit(parallel=True, **_JIT)
def maxpool2x2_forward(x: np.ndarray, y: np.ndarray, argmax: np.ndarray) -> None:
    """y = max of each 2x2 window, argmax = its position 2*a + b (first maximum wins)."""
    batch, ho, wo, channels = y.shape
    height, width = x.shape[1], x.shape[2]
    xf, yf, af = x.ravel(), y.ravel(), argmax.ravel()
    row = uint64(width * channels)
    for nh in prange(batch * ho):
        n = nh // ho
        i = nh - n * ho
        for j in range(wo):
            p00 = uint64(((n * height + 2 * i) * width + 2 * j) * channels)
            o = uint64(((n * ho + i) * wo + j) * channels)
            for c in range(uint64(channels)):
                best = xf[p00 + c]
                arg = 0
                v = xf[p00 + channels + c]
                if v > best:
                    best = v
                    arg = 1
                v = xf[p00 + row + c]
                if v > best:
                    best = v
                    arg = 2
                v = xf[p00 + row + channels + c]
                if v > best:
                    best = v
                    arg = 3
                yf[o + c] = best
                af[o + c] = arg


@njit(parallel=True, **_JIT)
def maxpool2x2_backward(dy: np.ndarray, argmax: np.ndarray, dx: np.ndarray) -> None:
    """dx = dy routed to each window's argmax, zero elsewhere (and in an odd last row/col)."""
    batch, height, width, channels = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    dyf, af, dxf = dy.ravel(), argmax.ravel(), dx.ravel()
    for nh in prange(batch * height):
        n = nh // height
        h = nh - n * height
        i = h // 2
        a = h - 2 * i
        for w in range(width):
            j = w // 2
            code = 2 * a + (w - 2 * j)
            o = uint64(((n * height + h) * width + w) * channels)
            if i < ho and j < wo:
                src = uint64(((n * ho + i) * wo + j) * channels)
                for c in range(uint64(channels)):
                    dxf[o + c] = dyf[src + c] if af[src + c] == code else 0.0
            else:
                for c in range(uint64(channels)):
                    dxf[o + c] = 0.0


# ----------------------------------------------------------------------- up-convolution


@njit(parallel=True, **_JIT)
def concat_upconv(skip: np.ndarray, tmp: np.ndarray, b: np.ndarray, y: np.ndarray) -> None:
    """y = [skip | up] with up[n, 2i+a, 2j+c, k] = tmp[n, i, j, a, c, k] + b[k]: the
    up-convolution's scatter written straight into its half of the concat buffer (the
    plain up-convolution is this with a skip of 0 channels)."""
    batch, out_height, out_width, cs = skip.shape
    out_channels = tmp.shape[5]
    height, width = tmp.shape[1], tmp.shape[2]
    ct = cs + out_channels
    sf, tf, yf = skip.ravel(), tmp.ravel(), y.ravel()
    for nh in prange(batch * out_height):
        n = nh // out_height
        hh = nh - n * out_height
        i = hh // 2
        a = hh - 2 * i
        for ww in range(out_width):
            j = ww // 2
            c = ww - 2 * j
            p = nh * out_width + ww
            dst = uint64(p * ct)
            src = uint64(p * cs)
            for q in range(uint64(cs)):
                yf[dst + q] = sf[src + q]
            up = uint64(((((n * height + i) * width + j) * 2 + a) * 2 + c) * out_channels)
            for k in range(uint64(out_channels)):
                yf[dst + cs + k] = tf[up + k] + b[k]


@njit(parallel=True, **_JIT)
def split_gather(dcat: np.ndarray, dskip: np.ndarray, g: np.ndarray) -> None:
    """dskip = dcat[..., :cs] and g[n, i, j, a, c, :] = dcat[n, 2i+a, 2j+c, cs:]: the
    concat's split and the up-convolution's gather in one pass over dcat (cs may be 0)."""
    batch, out_height, out_width, cs = dskip.shape
    height, width, out_channels = g.shape[1], g.shape[2], g.shape[5]
    ct = cs + out_channels
    df, sf, gf = dcat.ravel(), dskip.ravel(), g.ravel()
    for nh in prange(batch * out_height):
        n = nh // out_height
        hh = nh - n * out_height
        i = hh // 2
        a = hh - 2 * i
        for ww in range(out_width):
            j = ww // 2
            c = ww - 2 * j
            p = nh * out_width + ww
            src = uint64(p * ct)
            dst = uint64(p * cs)
            for q in range(uint64(cs)):
                sf[dst + q] = df[src + q]
            up = uint64(((((n * height + i) * width + j) * 2 + a) * 2 + c) * out_channels)
            for k in range(uint64(out_channels)):
                gf[up + k] = df[src + cs + k]


# ----------------------------------------------------------------------- concat


@njit(parallel=True, **_JIT)
def concat_channels(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> None:
    ca = a.shape[3]
    batch, height, width, cb = b.shape
    af, bf, yf = a.ravel(), b.ravel(), y.ravel()
    for nh in prange(batch * height):
        for w in range(width):
            p = nh * width + w
            dst = uint64(p * (ca + cb))
            sa = uint64(p * ca)
            sb = uint64(p * cb)
            for c in range(uint64(ca)):
                yf[dst + c] = af[sa + c]
            for c in range(uint64(cb)):
                yf[dst + ca + c] = bf[sb + c]


@njit(parallel=True, **_JIT)
def split_channels(dy: np.ndarray, da: np.ndarray, db: np.ndarray) -> None:
    ca = da.shape[3]
    batch, height, width, cb = db.shape
    dyf, daf, dbf = dy.ravel(), da.ravel(), db.ravel()
    for nh in prange(batch * height):
        for w in range(width):
            p = nh * width + w
            src = uint64(p * (ca + cb))
            a_start = uint64(p * ca)
            b_start = uint64(p * cb)
            for c in range(uint64(ca)):
                daf[a_start + c] = dyf[src + c]
            for c in range(uint64(cb)):
                dbf[b_start + c] = dyf[src + ca + c]


# ----------------------------------------------------------------------- loss


@njit(parallel=True, **_JIT)
def sigmoid_dice_loss(z2d: np.ndarray, t2d: np.ndarray, smooth: float, dice: np.ndarray,
                      dz2d: np.ndarray) -> None:
    """z2d, t2d: [N, pixels]. Writes dice [N] and dz2d; returns nothing (loss by caller).

    Sums accumulate in float64 so a 512x512 slice loses nothing to rounding.
    """
    batch, pixels = z2d.shape
    for n in prange(batch):
        inter = 0.0
        total = 0.0
        for i in range(pixels):
            p = 1.0 / (1.0 + math.exp(-z2d[n, i]))
            t = float(t2d[n, i])
            inter += p * t
            total += p + t
        den = total + smooth
        num = 2.0 * inter + smooth
        dice[n] = num / den
        scale = -1.0 / (batch * den * den)
        for i in range(pixels):
            p = 1.0 / (1.0 + math.exp(-z2d[n, i]))
            t = float(t2d[n, i])
            dz2d[n, i] = scale * (2.0 * t * den - num) * p * (1.0 - p)


@njit(parallel=True, **_JIT)
def confusion_counts(z2d: np.ndarray, t2d: np.ndarray, counts: np.ndarray) -> None:
    batch, pixels = z2d.shape
    for n in prange(batch):
        tp = 0
        fp = 0
        fn = 0
        for i in range(pixels):
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
def adam_step(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray,
              coefficients: tuple[float, float, float, float, float]) -> None:
    """PyTorch's Adam on the flat buffer. coefficients = (lr_corrected, beta1, beta2, eps,
    sqrt_bc2) with lr_corrected = lr / (1 - beta1^t), sqrt_bc2 = sqrt(1 - beta2^t)."""
    lr_corrected, beta1, beta2, eps, sqrt_bc2 = coefficients
    for i in prange(param.shape[0]):
        g = grad[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        param[i] -= lr_corrected * mi / (math.sqrt(vi) / sqrt_bc2 + eps)


# ----------------------------------------------------------------------- input pipeline


@njit(parallel=True, **_JIT)
def window_augment(hu: np.ndarray, mask: np.ndarray, aug: np.ndarray, window_center: float,
                   window_width: float, air: float, image: np.ndarray,
                   mask_out: np.ndarray) -> None:
    """Flip + rotate by inverse mapping; bilinear HU then window; nearest mask."""
    batch, height, width = hu.shape
    cy = (height - 1) / 2.0
    cx = (width - 1) / 2.0
    lo = window_center - window_width / 2.0
    for ny in prange(batch * height):
        n = ny // height
        y = ny - n * height
        t = aug[n, 2] * math.pi / 180.0
        ct = math.cos(t)
        st = math.sin(t)
        flip_h = aug[n, 0] != 0.0
        flip_v = aug[n, 1] != 0.0
        dy = y - cy
        for x in range(width):
            dx = x - cx
            sy = cy + ct * dy + st * dx
            sx = cx + ct * dx - st * dy
            if flip_v:
                sy = height - 1 - sy
            if flip_h:
                sx = width - 1 - sx
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
                    if 0 <= yy < height and 0 <= xx < width:
                        v = float(hu[n, yy, xx])
                    else:
                        v = air
                    acc += wy * wx * v
            val = (acc - lo) / window_width
            if val < 0.0:
                val = 0.0
            elif val > 1.0:
                val = 1.0
            image[n, y, x, 0] = val
            # mask: nearest pixel, 0 outside
            my = int(math.floor(sy + 0.5))
            mx = int(math.floor(sx + 0.5))
            if 0 <= my < height and 0 <= mx < width and mask[n, my, mx] != 0:
                mask_out[n, y, x, 0] = 1
            else:
                mask_out[n, y, x, 0] = 0
