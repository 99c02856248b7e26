"""The 2x2 stride-2 up-convolution on the CPU, version 3: image rows, weights packed per
block of channels, and the register blocks of ``cpu_conv_packed`` (``packed`` in
cpu.CONV_VARIANTS, and 'auto' wherever it applies).

What it computes: the same as ``cpu_upconv`` (version 2; NHWC float32, w [K, 2, 2, C],
the decoder's concat buffer holding the skip in channels [0, cs) and the up-convolution
in [cs, cs + K)):

    forward:  y[n, 2i+a, 2j+b, cs+k] = bias[k] + sum_c x[n, i, j, c] * w[k, a, b, c]
    backward: dx[n, i, j, c] = sum_{a,b} sum_k g[n, 2i+a, 2j+b, k] * w[k, a, b, c]
              dW[k, a, b, c] = sum_{n,i,j} g[n, 2i+a, 2j+b, k] * x[n, i, j, c]

What version 2 left on the table (the width-32 step of ``nodulekit profile``, 4 x 256 x
256, on the 2-core Xeon with AVX-512): its four up-convolutions ran at 60-110 GFLOP/s,
16% of the roofline, 160 ms a step, the 3x3 convolutions beside them at 250-400. Its
6 x 16 block of 8 lanes leaves half of each AVX-512 register empty, and its blocks of
pixels cross image rows, so every pixel's output address is found on its own.

Here the view is ``cpu_conv_packed``'s: along one input row, pixel j + 1's input is C
floats after pixel j's, and for a fixed (a, b) its output is 2 pixels (2 (cs + K) floats)
after pixel j's. So each (a, b) is a 1x1 convolution whose outputs land with a stride,
and the packed version's register blocks (4 x 64, 8 x 32, 16 x 16 of 16 lanes; 6 x 16
and 6 x 8 of 8 lanes where the core has 16 vector registers) run it unchanged: they take
the strides as arguments. The data gradient is the same block over the reduction
(a, b, k): four runs of K values, one per (a, b), in the concat buffer's gradient where
it lies. The weight gradient turns the block around as the packed convolution does:
rows are consecutive k's (broadcast from the gradient), columns are channels of x, and
the sum runs over the pixels in order, in chunks whose 64-channel blocks of x stay in L1
while every k passes over them.

Every output is one chain of FMAs in a fixed order (forward: the bias, then c = 0..C-1;
data gradient: zero, then (a, b) in order, k = 0..K-1 in each; weight gradient: zero,
then the pixels in order), the order of version 2: the same bits as version 2, on any
machine, with any thread count and either block family. The weight gradient is summed
over all pixels (``upconv2x2_weight_grad_pixels`` over a range of k's: nothing to add up)
or, where the caller splits the pixels into blocks, per block (partials added in order
by the caller, as version 2).

The weight gradient copies each chunk's gradients and x into panels first: in place a
pixel's are 2 (cs + K) and C floats after the one before, powers of two that fold a
chunk's rows into a few of L1's 64 sets (as ``cpu_conv_packed._pack_dz``): 512 -> 256
at 16 x 16 ran at 67 GFLOP/s on 2 threads without them, 187-207 with.

Napkin math (the 2-core Xeon, both threads, the width-32 step, ``nodulekit profile``):
each up-convolution is 1.07 GFLOP forward and 2.15 backward. The deep three are bound by
the FMAs: forward 7.6-8.4 ms (128-141 GFLOP/s, against 10-13.5 ms for version 2 and
BLAS), backward 16-19 ms (113-131, against 20-29). dec0.up (64 -> 32, 4 x 128 x 128)
moves at least 117 MB forward (the skip read, the 67 MB concat buffer written): 4.5 ms at
the 26 GB/s the copy ceiling measures; it took 12.7 ms (17.5 before); the skip's copy
alone takes 9.7 ms on one core, as long as NumPy's slice assignment. All four: 163 ms of
the step before, 112 after.

Run it: ``nodulekit profile --width 32 --size 256`` (the up-convolutions' rows) or
``python -m nodulekit.engine.cpu_upconv_packed`` (versions 2 and 3 and BLAS on the
width-32 step's shapes); ``pytest tests/test_upconv_packed.py`` checks it against version
2 bit for bit and against the float64 reference.

Requirements: K % 8 == 0 (forward), C % 8 == 0 and K % 8 == 0 (backward). Serial, nogil:
the caller runs blocks of input rows (or, for the weight gradient, ranges of k) on its
threads (``cpu_workers.Workers``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from nodulekit.engine.cpu_conv_packed import (
    WIDE_BLOCKS,
    _block_pixels,
    _block_width,
    _fma_6x8,
    _fma_6x16,
    _spread_4,
    _spread_6,
    _spread_8,
    _spread_16,
    _store_6x8,
    _store_6x16,
    _vectors_1x8,
    _vectors_1x16,
    _vectors_2x8,
    _vectors_2x16,
    _vectors_4x16,
    pack_weights,
)
from nodulekit.engine.cpu_upconv import _copy_skip, _next_pixel, _out_pixel
from nodulekit.engine.register_blocks import (
    fma_4x8,
    fma_4x16,
    fma_4x64,
    fma_8x8,
    fma_8x16,
    fma_8x32,
    fma_16x16,
    load_4x8,
    load_4x16,
    load_4x64,
    load_8x8,
    load_8x16,
    load_8x32,
    store_4x8,
    store_4x16,
    store_4x64,
    store_8x8,
    store_8x16,
    store_8x32,
    store_16x16,
)
from nodulekit.engine.simd import aligned_empty, fma8, load8, splat8, store8

_JIT = {"cache": True, "nogil": True}
_INLINE = {"cache": True, "inline": "always"}
# weight gradient: the x rows of a chunk of pixels, in floats (128 KB: in L2; a block of
# 64 channels of them, 16 KB at 512 channels, stays in L1 while every k passes over it)
CHUNK_FLOATS = 32768


def supports_forward(c: int, k: int) -> bool:
    return k % 8 == 0 and c >= 1


def supports_backward(c: int, k: int) -> bool:
    return k % 8 == 0 and c % 8 == 0


def pack_forward_weights(w: np.ndarray, wide: bool = WIDE_BLOCKS) -> np.ndarray:
    """w [K, 2, 2, C] -> for each (a, b) the [C, K] matrix w[:, a, b, :]^T packed per block
    of output channels (``cpu_conv_packed.pack_weights``), at offset (2a + b) C K."""
    k, _, _, c = w.shape
    packed = aligned_empty(4 * c * k)
    for ab in range(4):
        packed[ab * c * k:(ab + 1) * c * k] = pack_weights(
            np.ascontiguousarray(w[:, ab // 2, ab % 2, :].T), wide)
    return packed


def pack_data_grad_weights(w: np.ndarray, wide: bool = WIDE_BLOCKS) -> np.ndarray:
    """w [K, 2, 2, C] -> the [(a, b, k), C] matrix packed per block of C (its [4K, width]
    slab of the block at channel c0 at offset 4K c0)."""
    k, _, _, c = w.shape
    return pack_weights(np.ascontiguousarray(w.transpose(1, 2, 0, 3).reshape(4 * k, c)), wide)


# ---- forward and data gradient: one loop for every block shape (as cpu_conv_packed's
# _forward_block: Numba compiles it per block's functions and LLVM inlines them)

@njit(**_INLINE)
def _gemm_block(vectors, spread, fma, store, width, arrays, at, geometry):
    """A block of pixels x `width` channels: start = vectors(b, j0), then `runs` runs of
    `taps` operands (run r at (r // 2) run_rows + (r % 2) run_cols from xi, its weights
    the slab's rows r taps ..), pixel p's operand in_stride after pixel p - 1's; pixel
    p's sums to yf[o + p out_stride:]. at = (xi, wi, j0, o)."""
    xf, wf, b, yf = arrays
    xi, wi, j0, o = at
    runs, taps, in_stride, out_stride, run_rows, run_cols = geometry
    a = spread(vectors(b, uint64(j0)))
    for run in range(runs):
        xr = xi + (run // uint64(2)) * run_rows + (run % uint64(2)) * run_cols
        wr = wi + run * taps * uint64(width)
        for t in range(taps):
            a = fma(xf, xr + t, in_stride, vectors(wf, wr + t * uint64(width)), a)
    store(yf, o, out_stride, a)


@njit(**_JIT)
def _one_pixel(arrays, at, width, geometry):
    """One pixel x `width` channels, a vector of 8 at a time (rows narrower than a block)."""
    xf, wf, b, yf = arrays
    xi, wi, j0, o = at
    runs, taps, _, _, run_rows, run_cols = geometry
    for v in range(width // 8):
        a = load8(b, uint64(j0 + 8 * v))
        for run in range(runs):
            xr = xi + (run // uint64(2)) * run_rows + (run % uint64(2)) * run_cols
            wr = wi + run * taps * uint64(width) + uint64(8 * v)
            for t in range(taps):
                a = fma8(splat8(xf, xr + t), load8(wf, wr + t * uint64(width)), a)
        store8(yf, o + uint64(8 * v), a)


@njit(**_JIT)
def _row_blocks(arrays, geometry, x_row, o_row, row_width, j0, block, wi, wide):
    """One image row of pixels x the block of channels (j0, block): blocks of the shape's
    pixel count, the last one placed at the row's end (overlapping the one before: the
    same sums in the same order, written twice)."""
    _, taps, in_stride, out_stride, _, _ = geometry
    pixels = _block_pixels(block, wide)
    if row_width < pixels:
        for p in range(row_width):
            _one_pixel(arrays, (x_row + uint64(p) * in_stride, wi, j0,
                                o_row + uint64(p) * out_stride), block, geometry)
        return
    p = 0
    while p < row_width:
        p = min(p, row_width - pixels)
        at = (x_row + uint64(p) * in_stride, wi, j0, o_row + uint64(p) * out_stride)
        if block == 64:
            _gemm_block(_vectors_4x16, _spread_4, fma_4x64, store_4x64, 64, arrays, at, geometry)
        elif block == 32:
            _gemm_block(_vectors_2x16, _spread_8, fma_8x32, store_8x32, 32, arrays, at, geometry)
        elif wide and block == 16:
            _gemm_block(_vectors_1x16, _spread_16, fma_16x16, store_16x16, 16, arrays, at,
                        geometry)
        elif wide:
            _gemm_block(_vectors_1x8, _spread_8, fma_8x8, store_8x8, 8, arrays, at, geometry)
        elif block == 16:
            _gemm_block(_vectors_2x8, _spread_6, _fma_6x16, _store_6x16, 16, arrays, at,
                        geometry)
        else:
            _gemm_block(_vectors_1x8, _spread_6, _fma_6x8, _store_6x8, 8, arrays, at, geometry)
        p += pixels


@njit(**_JIT)
def upconv2x2_concat_rows(skip: np.ndarray, x: np.ndarray, w_packed: np.ndarray,
                          b: np.ndarray, y: np.ndarray, row0: int, row1: int, ab0: int,
                          ab1: int, wide: bool) -> None:
    """y = [skip | upconv(x) + b] at the output pixels (2i + a, 2j + b) of input rows
    row0..row1 (row = n H + i) for 2a + b in ab0..ab1, with the skip where ab0 = 0;
    w_packed = pack_forward_weights(w)."""
    _, height, width, channels = x.shape
    out_channels = b.shape[0]
    cs = skip.shape[3]
    ct = cs + out_channels
    if ab0 == 0:
        _copy_skip(skip, y, row0 * width, row1 * width)
    arrays = (x.ravel(), w_packed.ravel(), b, y.ravel())
    c = uint64(channels)
    # one run of C taps; the next pixel's input C floats on, its output two pixels on
    geometry = (uint64(1), c, c, uint64(2 * ct), uint64(0), uint64(0))
    for ab in range(ab0, ab1):
        j0 = 0
        while j0 < out_channels:  # one block's weight slab at a time: it stays in cache
            block = _block_width(out_channels - j0, wide)
            wi = uint64(ab * channels * out_channels + channels * j0)
            for row in range(row0, row1):
                n, i = row // height, row % height
                out_pixel = (n * 2 * height + 2 * i + ab // 2) * 2 * width + ab % 2
                _row_blocks(arrays, geometry, uint64(row * width) * c,
                            uint64(out_pixel * ct + cs + j0), width, j0, block, wi, wide)
            j0 += block


@njit(**_JIT)
def upconv2x2_split_dx_rows(dcat: np.ndarray, w_packed: np.ndarray, zeros: np.ndarray,
                            dskip: np.ndarray, dx: np.ndarray, row0: int, row1: int,
                            c_lo: int, c_hi: int, wide: bool) -> None:
    """dx[..., c_lo:c_hi] for input rows row0..row1, and, where c_lo = 0, dskip =
    dcat[..., :cs] at their output pixels; w_packed = pack_data_grad_weights(w), zeros: C
    zeros (the sums' start); c_lo and c_hi on the packing's block boundaries."""
    _, height, width, channels = dx.shape
    cs = dskip.shape[3]
    ct = dcat.shape[3]
    out_channels = ct - cs
    if c_lo == 0:
        _copy_skip(dcat, dskip, row0 * width, row1 * width)
    arrays = (dcat.ravel(), w_packed.ravel(), zeros, dx.ravel())
    # four runs of K gradients, (a, b) = (0, 0), (0, 1), (1, 0), (1, 1): b one output pixel
    # on, a one output row on; the next input pixel's two output pixels on
    geometry = (uint64(4), uint64(out_channels), uint64(2 * ct), uint64(channels),
                uint64(2 * width * ct), uint64(ct))
    c0 = c_lo
    while c0 < c_hi:
        block = _block_width(channels - c0, wide)
        wi = uint64(4 * out_channels * c0)
        for row in range(row0, row1):
            n, i = row // height, row % height
            g_row = uint64(((n * 2 * height + 2 * i) * 2 * width) * ct + cs)
            _row_blocks(arrays, geometry, g_row, uint64(row * width * channels + c0), width,
                        c0, block, wi, wide)
        c0 += block


# ---- the weight gradient: out[(a, b, k), c] = sum over pixels of g[out(p, a, b), k] x[p, c].
# A block: `rows` consecutive k's (broadcast from the gradient, 1 float apart) x `block`
# channels of x; the sums wait in out between chunks of pixels. chunk = (gs, pixels, xs,
# os): the next pixel's gradient gs floats on, its x xs floats on; out's rows os apart.
# Written out per shape, as cpu_conv_packed's weight-gradient blocks are (one loop given the
# block's functions ran 8-10% slower there).

@njit(**_INLINE)
def _grad_4x64(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_4x64(outf, o, os)
    one = uint64(1)
    for p in range(pixels):
        a = fma_4x64(df, g + uint64(p) * gs, one, _vectors_4x16(xf, xi + uint64(p) * xs), a)
    store_4x64(outf, o, os, a)


@njit(**_INLINE)
def _grad_8x32(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_8x32(outf, o, os)
    one = uint64(1)
    for p in range(pixels):
        x = xi + uint64(p) * xs
        a = fma_8x32(df, g + uint64(p) * gs, one, _vectors_2x16(xf, x), a)
    store_8x32(outf, o, os, a)


@njit(**_INLINE)
def _grad_8x16(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_8x16(outf, o, os)
    one = uint64(1)
    for p in range(pixels):
        x = xi + uint64(p) * xs
        a = fma_8x16(df, g + uint64(p) * gs, one, _vectors_2x8(xf, x), a)
    store_8x16(outf, o, os, a)


@njit(**_INLINE)
def _grad_8x8(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_8x8(outf, o, os)
    one = uint64(1)
    for p in range(pixels):
        a = fma_8x8(df, g + uint64(p) * gs, one, _vectors_1x8(xf, xi + uint64(p) * xs), a)
    store_8x8(outf, o, os, a)


@njit(**_INLINE)
def _grad_4x16(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_4x16(outf, o, os)
    for p in range(pixels):
        x = xi + uint64(p) * xs
        a = fma_4x16(df, g + uint64(p) * gs, load8(xf, x), load8(xf, x + uint64(8)), a)
    store_4x16(outf, o, os, a)


@njit(**_INLINE)
def _grad_4x8(df, xf, outf, g, xi, o, chunk):
    gs, pixels, xs, os = chunk
    a = load_4x8(outf, o, os)
    for p in range(pixels):
        a = fma_4x8(df, g + uint64(p) * gs, load8(xf, xi + uint64(p) * xs), a)
    store_4x8(outf, o, os, a)


@njit(**_INLINE)
def _grad_rows(block: int, wide: bool) -> int:
    """The k's of a weight-gradient block of `block` channels."""
    if not wide:
        return 4
    return 4 if block == 64 else 8


@njit(**_INLINE)
def _grad_block(df, xf, outf, g, xi, o, chunk, block, wide):
    if not wide and block == 16:
        _grad_4x16(df, xf, outf, g, xi, o, chunk)
    elif not wide:
        _grad_4x8(df, xf, outf, g, xi, o, chunk)
    elif block == 64:
        _grad_4x64(df, xf, outf, g, xi, o, chunk)
    elif block == 32:
        _grad_8x32(df, xf, outf, g, xi, o, chunk)
    elif block == 16:
        _grad_8x16(df, xf, outf, g, xi, o, chunk)
    else:
        _grad_8x8(df, xf, outf, g, xi, o, chunk)


@njit(**_INLINE)
def _pack_gradients(df, panel, at, pixels):
    """The gradients g[out(p, a, b), k0..k0 + kr] of `pixels` pixels from (j, o) (as
    ``cpu_upconv._next_pixel``) to the panel, in runs of 8 k's: pixel q's k's 8 g .. 8 g + 7
    of (a, b) at ((ab kr / 8 + g) pixels + q) 8, so that a block's k's for consecutive pixels
    are 8 floats apart. In place they are 2 (cs + K) floats apart, a power of two, and a
    chunk's would fall into a few of L1's sets.
    at = (j, o, width, ct, first, kr); returns the next (j, o)."""
    j, o, width, ct, first, kr = at
    for q in range(pixels):
        for ab in range(4):
            src = uint64((o + (ab // 2) * 2 * width + ab % 2) * ct + first)
            for t in range(0, kr, 8):
                dst = uint64(((ab * (kr // 8) + t // 8) * pixels + q) * 8)
                store8(panel, dst, load8(df, src + uint64(t)))
        j, o = _next_pixel(j, o, width)
    return j, o


@njit(**_INLINE)
def _pack_x(xf, x_panel, p, pixels, channels, wide):
    """x's rows p..p + pixels as one [pixels, block] run per block of channels (block q0's
    at x_panel[pixels q0:]): in place a pixel's are C floats on, again a power of two."""
    q0 = 0
    while q0 < channels:
        block = _block_width(channels - q0, wide)
        for q in range(pixels):
            src = uint64((p + q) * channels + q0)
            dst = uint64(pixels * q0 + q * block)
            for t in range(0, block, 8):
                store8(x_panel, dst + uint64(t), load8(xf, src + uint64(t)))
        q0 += block


@njit(**_JIT)
def upconv2x2_weight_grad_pixels(dcat: np.ndarray, x: np.ndarray, p0: int, p1: int,
                                 k0: int, k1: int, out: np.ndarray, wide: bool) -> None:
    """out[(a, b, k), :] for k in k0..k1 (multiples of 8) = the sum over input pixels
    p0..p1 (flat, n H W + i W + j), in order, of g[out(p, a, b), k] x[p, :]. Those rows of
    out are overwritten; the others are not touched."""
    _, height, width, channels = x.shape
    ct = dcat.shape[3]
    out_channels = out.shape[0] // 4
    cs = ct - out_channels
    df, xf, outf = dcat.ravel(), x.ravel(), out.ravel()
    c = uint64(channels)
    for ab in range(4):
        for k in range(k0, k1):
            o = (ab * out_channels + k) * channels
            for q in range(channels):
                outf[o + q] = 0.0
    chunk_pixels = max(8, CHUNK_FLOATS // channels)
    kr = k1 - k0
    # a chunk's gradients and x, each packed into one sequential run per block
    panel = np.empty(4 * chunk_pixels * kr, dtype=np.float32)
    x_panel = np.empty(chunk_pixels * channels, dtype=np.float32)
    j, o = _out_pixel(p0, height, width)
    p = p0
    while p < p1:  # chunks of pixels: x's rows for them are one contiguous run
        pixels = min(chunk_pixels, p1 - p)
        j, o = _pack_gradients(df, panel, (j, o, width, ct, cs + k0, kr), pixels)
        _pack_x(xf, x_panel, p, pixels, channels, wide)
        for ab in range(4):
            q0 = 0
            while q0 < channels:
                block = _block_width(channels - q0, wide)
                chunk = (uint64(8), pixels, uint64(block), c)
                for k in range(0, kr, _grad_rows(block, wide)):
                    at = uint64((ab * out_channels + k0 + k) * channels + q0)
                    g = uint64(((ab * (kr // 8) + k // 8) * pixels) * 8 + k % 8)
                    _grad_block(panel, x_panel, outf, g, uint64(pixels * q0), at, chunk, block,
                                wide)
                q0 += block
        p += pixels


# ---- napkin math on this machine: python -m nodulekit.engine.cpu_upconv_packed

def _time_shape(rng, n: int, h: int, w: int, c: int, k: int) -> str:
    from nodulekit.engine import cpu_upconv as v2
    from nodulekit.engine.cpu_conv_packed import _best_ms
    from nodulekit.engine.simd import aligned_copy

    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = rng.standard_normal((k, 2, 2, c), dtype=np.float32)
    b = np.zeros(k, dtype=np.float32)
    skip = rng.standard_normal((n, 2 * h, 2 * w, k), dtype=np.float32)
    dcat = rng.standard_normal((n, 2 * h, 2 * w, 2 * k), dtype=np.float32)
    y, dskip, dx = np.empty_like(dcat), np.empty_like(skip), np.empty_like(x)
    dw = np.empty((4 * k, c), dtype=np.float32)
    pixels, rows, wide = n * h * w, n * h, WIDE_BLOCKS
    w_cabk, w_abkc = aligned_copy(wt.transpose(3, 1, 2, 0)), aligned_copy(wt.transpose(1, 2, 0, 3))
    w_fwd, w_dx = pack_forward_weights(wt), pack_data_grad_weights(wt)
    zeros = np.zeros(c, dtype=np.float32)
    x2d, w2d = x.reshape(pixels, c), w_cabk.reshape(c, 4 * k)
    mflop = 2 * pixels * c * 4 * k / 1e6  # per ms: GFLOP/s
    times = [
        _best_ms(lambda: x2d @ w2d),
        _best_ms(lambda: v2.upconv2x2_concat_pixels(skip, x, w_cabk, b, y, 0, pixels)),
        _best_ms(lambda: upconv2x2_concat_rows(skip, x, w_fwd, b, y, 0, rows, 0, 4, wide)),
        _best_ms(lambda: v2.upconv2x2_split_dx_pixels(dcat, w_abkc, dskip, dx, 0, pixels)),
        _best_ms(lambda: upconv2x2_split_dx_rows(dcat, w_dx, zeros, dskip, dx, 0, rows, 0, c,
                                                 wide)),
        _best_ms(lambda: v2.upconv2x2_weight_grad_pixels(dcat, x, 0, pixels, dw)),
        _best_ms(lambda: upconv2x2_weight_grad_pixels(dcat, x, 0, pixels, 0, k, dw, wide)),
    ]
    rate = [f"{mflop / t:6.1f}" for t in times]
    return (f"{n}x{h}x{w} {c:4d} -> {k:4d}: BLAS {rate[0]} | forward v2 {rate[1]} v3 "
            f"{rate[2]} | data gradient v2 {rate[3]} v3 {rate[4]} | weight gradient v2 "
            f"{rate[5]} v3 {rate[6]}")


def _time_one_core() -> None:
    """Versions 2 and 3 and OpenBLAS's SGEMM of the same product (no scatter into the
    concat buffer) on the calling thread, at the width-32 step's four up-convolutions."""
    rng = np.random.default_rng(0)
    print(f"one core, {'32' if WIDE_BLOCKS else '16'}-register blocks; GFLOP/s")
    for shape in ((4, 16, 16, 512, 256), (4, 32, 32, 256, 128), (4, 64, 64, 128, 64),
                  (4, 128, 128, 64, 32)):
        print(_time_shape(rng, *shape))


if __name__ == "__main__":
    _time_one_core()
