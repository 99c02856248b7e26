"""Numba kernels of the normalisation layers (instance and batch norm) behind ``cpu.py``.

Four passes over NHWC float32 data, seen as ``[N, P, C]`` (P = H x W pixels per sample);
statistics ``mean``, ``invstd``, ``scale`` are ``[G, C]`` with G = N (instance norm: one
row per sample) or G = 1 (batch norm: one row for every sample):

- ``moments``    per sample and block of pixels: sum x and sum x^2 per channel, in float64;
- ``apply``      y = (x - mean) scale + beta, ReLU'd: the forward's output (``apply_rows``:
                 the same on a block of rows a convolution has just written, in place);
- ``grad_sums``  per sample and block of pixels: sum g and sum g xhat per channel, in
                 float64, with g = dy (ReLU'd by y > 0) and xhat = (x - mean) invstd;
- ``grad_apply`` dx = k (g - a - xhat b) with (k, a, b) = coef[group] per channel.

Determinism: the two sums split each sample into blocks of ``block_pixels`` pixels, a
number that depends on the shape only (``block_pixels``), and write one partial sum per
(sample, block); the caller adds them in block order. Which thread takes which block does
not matter, so the bits are the same for any thread count.

Each pass is a job function (one block of one sample's pixels, or one pixel row) and two
drivers over the jobs: ``parallel`` (Numba's threads, ``prange``) and ``serial``; a parallel
launch costs ~50 us, more than the whole pass on the U-Net's deep, small layers, so arrays
below ``SERIAL_ELEMENTS`` run serially. Both drivers run the same job function, so the bits
are the same either way.

Vectorised where C % 8 == 0 (every U-Net layer of width >= 8): eight channels at a time in
``simd``'s float32x8, the sums widened to float64x8 (exact: a float32 value and the product
of two are exact in float64). Sums over a block go channel group by channel group, the
block's pixels inner, so each group's two accumulators stay in registers; a block is small
enough (``BLOCK_BYTES``) to stay in cache while its groups go over it. Other C: scalar loops
with float64 accumulators, the same order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from nodulekit.engine.simd import (
    add8d,
    fma8,
    fma8d,
    load8,
    mul8,
    relu8,
    relu_grad8,
    store8,
    store8d,
    sub8,
    widen8,
    zeros8d,
)

_JIT = {"cache": True, "nogil": True}

# A block of one sample's pixels whose sums one job computes: about this many bytes of x
# (so it stays in L2 while its channel groups go over it), at least MIN_BLOCK_PIXELS.
BLOCK_BYTES = 1 << 17
MIN_BLOCK_PIXELS = 256


# below this many elements (2 MiB) a pass runs on the calling thread (see the module doc).
# Measured on the 2-core EPYC (shared): apply / grad_apply took 5 / 10 us serial against 41 /
# 60 us parallel on 4 x 8 x 8 x 128, 46 / 67 against 74 / 87 us on 4 x 64 x 64 x 16, about
# the same on 4 x 128 x 128 x 8, and 210 / 271 against 141 / 185 us on 4 x 128 x 128 x 16
SERIAL_ELEMENTS = 1 << 19


def block_pixels(pixels: int, channels: int) -> int:
    """Pixels per block of the sums: a function of the shape alone (see module doc)."""
    return min(pixels, max(MIN_BLOCK_PIXELS, BLOCK_BYTES // (4 * max(channels, 1))))


@njit(**_JIT)
def _moments_job(xf, pf, job, blocks, block, pixels, channels):
    """Sums of x and x^2 over one block of one sample's pixels into pf (see moments)."""
    n = job // blocks
    lo = (job - n * blocks) * block
    hi = min(pixels, lo + block)
    out = uint64(job * 2 * channels)
    base = n * pixels
    if channels % 8 == 0:
        for k0 in range(0, channels, 8):
            s1 = zeros8d()
            s2 = zeros8d()
            for i in range(lo, hi):
                v = widen8(load8(xf, uint64((base + i) * channels + k0)))
                s1 = add8d(s1, v)
                s2 = fma8d(v, v, s2)
            store8d(pf, out + uint64(k0), s1)
            store8d(pf, out + uint64(channels + k0), s2)
        return
    for k in range(uint64(2 * channels)):
        pf[out + k] = 0.0
    for i in range(lo, hi):
        row = uint64((base + i) * channels)
        for k in range(uint64(channels)):
            v = np.float64(xf[row + k])
            pf[out + k] += v
            pf[out + uint64(channels) + k] += v * v


@njit(parallel=True, **_JIT)
def _moments_parallel(x3, block, partial):
    batch, pixels, channels = x3.shape
    blocks = partial.shape[1]
    xf, pf = x3.ravel(), partial.ravel()
    for job in prange(batch * blocks):
        _moments_job(xf, pf, job, blocks, block, pixels, channels)


@njit(**_JIT)
def _moments_serial(x3, block, partial):
    batch, pixels, channels = x3.shape
    blocks = partial.shape[1]
    xf, pf = x3.ravel(), partial.ravel()
    for job in range(batch * blocks):
        _moments_job(xf, pf, job, blocks, block, pixels, channels)


def moments(x3: np.ndarray, block: int, partial: np.ndarray) -> None:
    """partial[n, j, 0, c] = sum x, partial[n, j, 1, c] = sum x^2 over block j of sample n
    (pixels [j * block, (j + 1) * block)), in float64."""
    run = _moments_serial if x3.size < SERIAL_ELEMENTS else _moments_parallel
    run(x3, block, partial)


@njit(**_JIT)
def _apply_span(xf, yf, mf, sf, beta, relu, lo, hi, g, channels):
    """yf[lo:hi] = (xf - mean) scale + beta, ReLU'd, over whole pixels (lo, hi multiples
    of channels); the statistics' row at g. Channel group outer, pixels inner: the group's
    statistics stay in registers (and no division per pixel). xf may be yf (in place)."""
    if channels % 8 == 0:
        for k0 in range(0, channels, 8):
            k = uint64(k0)
            m, sc, b = load8(mf, g + k), load8(sf, g + k), load8(beta, k)
            for o in range(uint64(lo) + k, uint64(hi), uint64(channels)):
                v = fma8(sub8(load8(xf, o), m), sc, b)
                store8(yf, o, relu8(v) if relu else v)
        return
    for row in range(uint64(lo), uint64(hi), uint64(channels)):
        for k in range(uint64(channels)):
            v = (xf[row + k] - mf[g + k]) * sf[g + k] + beta[k]
            if relu and v < 0.0:
                v = np.float32(0.0)
            yf[row + k] = v


@njit(**_JIT)
def _apply_job(xf, yf, mf, sf, beta, relu, job, dims):
    """apply on one block of one sample's pixels; dims = (blocks, block, pixels, channels,
    per_sample)."""
    blocks, block, pixels, channels, per_sample = dims
    n = job // blocks
    lo = (n * pixels + (job - n * blocks) * block) * channels
    hi = (n * pixels + min(pixels, (job - n * blocks + 1) * block)) * channels
    g = uint64(n * channels) if per_sample else uint64(0)
    _apply_span(xf, yf, mf, sf, beta, relu, lo, hi, g, channels)


@njit(**_JIT)
def apply_rows(y2d: np.ndarray, mean: np.ndarray, scale: np.ndarray, beta: np.ndarray,
               relu: bool, m0: int, m1: int) -> None:
    """apply in place on rows m0..m1 of y2d [pixels, C], one shared row of statistics
    (batch norm in evaluation): a convolution's epilogue, on the block its thread has
    just written. Serial."""
    channels = y2d.shape[1]
    yf = y2d.ravel()
    _apply_span(yf, yf, mean.ravel(), scale.ravel(), beta, relu, m0 * channels,
                m1 * channels, uint64(0), channels)


@njit(parallel=True, **_JIT)
def _apply_parallel(x3, mean, scale, beta, relu, y3, block):
    batch, pixels, channels = x3.shape
    blocks = -(-pixels // block)
    dims = (blocks, block, pixels, channels, int(mean.shape[0] == batch and batch > 1))
    xf, yf, mf, sf = x3.ravel(), y3.ravel(), mean.ravel(), scale.ravel()
    for job in prange(batch * blocks):
        _apply_job(xf, yf, mf, sf, beta, relu, job, dims)


@njit(**_JIT)
def _apply_serial(x3, mean, scale, beta, relu, y3, block):
    batch, pixels, channels = x3.shape
    blocks = -(-pixels // block)
    dims = (blocks, block, pixels, channels, int(mean.shape[0] == batch and batch > 1))
    xf, yf, mf, sf = x3.ravel(), y3.ravel(), mean.ravel(), scale.ravel()
    for job in range(batch * blocks):
        _apply_job(xf, yf, mf, sf, beta, relu, job, dims)


def apply(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, beta: np.ndarray, relu: bool,
          y3: np.ndarray) -> None:
    """y = (x - mean[group]) scale[group] + beta, max(y, 0) if relu; group = sample n where
    mean has a row per sample, else row 0."""
    run = _apply_serial if x3.size < SERIAL_ELEMENTS else _apply_parallel
    run(x3, mean, scale, beta, relu, y3, block_pixels(x3.shape[1], x3.shape[2]))


@njit(**_JIT)
def _grad_sums_job(dyf, xf, yf, mf, inf, relu, pf, job, dims):
    """Sums of g and g xhat over one block of one sample's pixels into pf (see grad_sums);
    dims = (blocks, block, pixels, channels, per_sample)."""
    blocks, block, pixels, channels, per_sample = dims
    n = job // blocks
    lo = (job - n * blocks) * block
    hi = min(pixels, lo + block)
    out = uint64(job * 2 * channels)
    base = n * pixels
    g0 = uint64(n * channels) if per_sample else uint64(0)
    if channels % 8 == 0:
        for k0 in range(0, channels, 8):
            k = uint64(k0)
            m, inv = load8(mf, g0 + k), load8(inf, g0 + k)
            s1 = zeros8d()
            s2 = zeros8d()
            for i in range(lo, hi):
                o = uint64((base + i) * channels) + k
                g = load8(dyf, o)
                if relu:
                    g = relu_grad8(g, load8(yf, o))
                gd = widen8(g)
                s1 = add8d(s1, gd)
                s2 = fma8d(gd, widen8(mul8(sub8(load8(xf, o), m), inv)), s2)
            store8d(pf, out + k, s1)
            store8d(pf, out + uint64(channels) + k, s2)
        return
    for k in range(uint64(2 * channels)):
        pf[out + k] = 0.0
    for i in range(lo, hi):
        row = uint64((base + i) * channels)
        for k in range(uint64(channels)):
            g = dyf[row + k]
            if relu and yf[row + k] <= 0.0:
                g = np.float32(0.0)
            xhat = (xf[row + k] - mf[g0 + k]) * inf[g0 + k]
            pf[out + k] += np.float64(g)
            pf[out + uint64(channels) + k] += np.float64(g) * np.float64(xhat)


@njit(parallel=True, **_JIT)
def _grad_sums_parallel(dy3, x3, y3, mean, invstd, relu, block, partial):
    batch, pixels, channels = x3.shape
    blocks = partial.shape[1]
    per_sample = int(mean.shape[0] == batch and batch > 1)
    dyf, xf, yf, pf = dy3.ravel(), x3.ravel(), y3.ravel(), partial.ravel()
    mf, inf = mean.ravel(), invstd.ravel()
    for job in prange(batch * blocks):
        _grad_sums_job(dyf, xf, yf, mf, inf, relu, pf, job,
                       (blocks, block, pixels, channels, per_sample))


@njit(**_JIT)
def _grad_sums_serial(dy3, x3, y3, mean, invstd, relu, block, partial):
    batch, pixels, channels = x3.shape
    blocks = partial.shape[1]
    per_sample = int(mean.shape[0] == batch and batch > 1)
    dyf, xf, yf, pf = dy3.ravel(), x3.ravel(), y3.ravel(), partial.ravel()
    mf, inf = mean.ravel(), invstd.ravel()
    for job in range(batch * blocks):
        _grad_sums_job(dyf, xf, yf, mf, inf, relu, pf, job,
                       (blocks, block, pixels, channels, per_sample))


def grad_sums(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray, mean: np.ndarray,  # noqa: PLR0913
              invstd: np.ndarray, relu: bool, block: int, partial: np.ndarray) -> None:
    """partial[n, j, 0, c] = sum g, partial[n, j, 1, c] = sum g xhat over block j of
    sample n, in float64; g = dy * (y > 0) if relu else dy, xhat = (x - mean) invstd (in
    float32, as grad_apply computes it)."""
    run = _grad_sums_serial if x3.size < SERIAL_ELEMENTS else _grad_sums_parallel
    run(dy3, x3, y3, mean, invstd, relu, block, partial)


@njit(**_JIT)
def _grad_apply_job(arrays, cf, relu, job, dims):
    """grad_apply on one block of one sample's pixels, as _apply_job; arrays = (dy, x, y,
    mean, invstd, dx) flat, dims = (blocks, block, pixels, channels, per_sample)."""
    dyf, xf, yf, mf, inf, dxf = arrays
    blocks, block, pixels, channels, per_sample = dims
    n = job // blocks
    lo = (n * pixels + (job - n * blocks) * block) * channels
    hi = (n * pixels + min(pixels, (job - n * blocks + 1) * block)) * channels
    gi = n if per_sample else 0
    g0 = uint64(gi * channels)
    c0 = uint64(gi * 3 * channels)
    c1 = c0 + uint64(channels)
    c2 = c1 + uint64(channels)
    if channels % 8 == 0:
        for k0 in range(0, channels, 8):
            k = uint64(k0)
            m, inv = load8(mf, g0 + k), load8(inf, g0 + k)
            ck, ca, cb = load8(cf, c0 + k), load8(cf, c1 + k), load8(cf, c2 + k)
            for o in range(uint64(lo) + k, uint64(hi), uint64(channels)):
                g = load8(dyf, o)
                if relu:
                    g = relu_grad8(g, load8(yf, o))
                xhat = mul8(sub8(load8(xf, o), m), inv)
                store8(dxf, o, mul8(ck, sub8(sub8(g, ca), mul8(xhat, cb))))
        return
    for row in range(uint64(lo), uint64(hi), uint64(channels)):
        for k in range(uint64(channels)):
            g = dyf[row + k]
            if relu and yf[row + k] <= 0.0:
                g = np.float32(0.0)
            xhat = (xf[row + k] - mf[g0 + k]) * inf[g0 + k]
            dxf[row + k] = cf[c0 + k] * ((g - cf[c1 + k]) - xhat * cf[c2 + k])


@njit(parallel=True, **_JIT)
def _grad_apply_parallel(dy3, x3, y3, mean, invstd, coef, relu, dx3, block):
    batch, pixels, channels = x3.shape
    blocks = -(-pixels // block)
    dims = (blocks, block, pixels, channels, int(mean.shape[0] == batch and batch > 1))
    arrays = (dy3.ravel(), x3.ravel(), y3.ravel(), mean.ravel(), invstd.ravel(), dx3.ravel())
    cf = coef.ravel()
    for job in prange(batch * blocks):
        _grad_apply_job(arrays, cf, relu, job, dims)


@njit(**_JIT)
def _grad_apply_serial(dy3, x3, y3, mean, invstd, coef, relu, dx3, block):
    batch, pixels, channels = x3.shape
    blocks = -(-pixels // block)
    dims = (blocks, block, pixels, channels, int(mean.shape[0] == batch and batch > 1))
    arrays = (dy3.ravel(), x3.ravel(), y3.ravel(), mean.ravel(), invstd.ravel(), dx3.ravel())
    cf = coef.ravel()
    for job in range(batch * blocks):
        _grad_apply_job(arrays, cf, relu, job, dims)


def grad_apply(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray, mean: np.ndarray,  # noqa: PLR0913
               invstd: np.ndarray, coef: np.ndarray, relu: bool, dx3: np.ndarray) -> None:
    """dx = k (g - a - xhat b), (k, a, b) = coef[group, 0..2, c]; g and xhat as in
    grad_sums."""
    run = _grad_apply_serial if x3.size < SERIAL_ELEMENTS else _grad_apply_parallel
    run(dy3, x3, y3, mean, invstd, coef, relu, dx3, block_pixels(x3.shape[1], x3.shape[2]))


# ---- the per-channel arithmetic between the passes, for instance norm (one row per
# sample). ops.Backend does it in a dozen NumPy calls on [N, C] arrays, ~15 us each way
# at any size: on the U-Net's deep layers more than the passes themselves. These are the
# same float64 operations in the same order (the block sums added in block order, as
# NumPy's sum over that axis; no contraction into FMAs), so the same bits
# (tests/test_norm_cpu.py compares them with ops.Backend's).

@njit(**_JIT)
def _sample_sums(partial, n, k, c):
    """partial[n, :, k, c] added in block order (NumPy's sum over that axis)."""
    s = partial[n, 0, k, c]
    for j in range(1, partial.shape[1]):
        s += partial[n, j, k, c]
    return s


@njit(**_JIT)
def instance_statistics(partial, count, eps, gamma, mean, invstd, scale):
    """From moments' partial sums [N, blocks, 2, C] of ``count`` pixels a sample: mean,
    invstd = 1 / sqrt(max(sum x^2 / count - mean^2, 0) + eps) and scale = invstd gamma,
    each computed in float64 and written rounded to float32 ([N, C] each)."""
    samples, _, _, channels = partial.shape
    for n in range(samples):
        for c in range(channels):
            s0, s1 = _sample_sums(partial, n, 0, c), _sample_sums(partial, n, 1, c)
            m = s0 / count
            var = s1 / count - m * m
            if var < 0.0:  # rounding; NaN stays NaN, as np.maximum keeps it
                var = 0.0
            inv = 1.0 / np.sqrt(var + eps)
            mean[n, c] = m
            invstd[n, c] = inv
            scale[n, c] = inv * np.float64(gamma[c])


@njit(**_JIT)
def instance_grad_coefficients(partial, count, invstd, gamma, coef, dgamma, dbeta):
    """From grad_sums' partial sums [N, blocks, 2, C] (sum g, sum g xhat): grad_apply's
    coef [N, 3, C] = (invstd gamma, mean g, mean g xhat) and dgamma = sum g xhat, dbeta =
    sum g over the batch (samples added in order), float64 rounded to float32."""
    samples, _, _, channels = partial.shape
    total = np.empty((2, channels), dtype=np.float64)
    for n in range(samples):
        for c in range(channels):
            s0, s1 = _sample_sums(partial, n, 0, c), _sample_sums(partial, n, 1, c)
            coef[n, 0, c] = np.float64(invstd[n, c]) * np.float64(gamma[c])
            coef[n, 1, c] = s0 / count
            coef[n, 2, c] = s1 / count
            if n == 0:
                total[0, c], total[1, c] = s0, s1
            else:
                total[0, c] += s0
                total[1, c] += s1
    for c in range(channels):
        dbeta[c] = total[0, c]
        dgamma[c] = total[1, c]


# ---- the same for batch norm (one row for the whole batch, the sums all-reduced across
# ranks between the two halves of each)

@njit(**_JIT)
def batch_sums(partial, count, buf):
    """buf = [sum over the batch of partial's first sums (C), of its second (C), count]:
    blocks added in order within a sample, then the samples in order (NumPy's
    partial.sum(axis=1).sum(axis=0)); the buffer a cross-rank sum adds up."""
    samples, _, _, channels = partial.shape
    for k in range(2):
        for c in range(channels):
            total = 0.0
            for n in range(samples):
                s = _sample_sums(partial, n, k, c)
                total = s if n == 0 else total + s
            buf[k * channels + c] = total
    buf[2 * channels] = count


@njit(**_JIT)
def batch_statistics(buf, eps, momentum, gamma, running_mean, running_var, mean, invstd,
                     scale):
    """From batch_sums' buffer (all-reduced): mean, invstd, scale = invstd gamma ([1, C],
    float32) and PyTorch's update of the running statistics (the variance unbiased), all in
    float64 as ops.Backend's."""
    channels = gamma.shape[0]
    count = buf[2 * channels]
    for c in range(channels):
        m = buf[c] / count
        var = buf[channels + c] / count - m * m
        if var < 0.0:
            var = 0.0
        inv = 1.0 / np.sqrt(var + eps)
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * m
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * var * (count / (count - 1.0)))
        mean[0, c] = m
        invstd[0, c] = inv
        scale[0, c] = inv * np.float64(gamma[c])


@njit(**_JIT)
def batch_grad_coefficients(buf, invstd, gamma, training, coef):
    """grad_apply's coef [1, 3, C] = (invstd gamma, mean g, mean g xhat) from batch_sums'
    buffer of the gradient sums (all-reduced); the means are 0 in evaluation, where the
    running statistics are constants."""
    channels = gamma.shape[0]
    count = buf[2 * channels]
    for c in range(channels):
        coef[0, 0, c] = np.float64(invstd[0, c]) * np.float64(gamma[c])
        coef[0, 1, c] = buf[c] / count if training else 0.0
        coef[0, 2, c] = buf[channels + c] / count if training else 0.0
