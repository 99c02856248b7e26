"""3x3 convolutions on the CPU, version 3: a zero-padded input, weights packed per block
of output channels, and a register block sized to the core's vector registers
(``packed`` in cpu.CONV_VARIANTS).

What it computes: the same as ``cpu_conv.conv3x3_rows`` (NHWC float32, stride 1, zero
'same' padding, w_tk [9C, K] with tap (r, s, c) major):

    y[p, k] = relu?(b[k] + sum_t patch(x, p)[t] * w_tk[t, k])

What version 2 (``cpu_conv``, register_blocked) left on the table, measured on one core of
the 2-core Zen 4 (peak 116 GFLOP/s a core), forward, 4 images:

- the border pixels: a pixel whose kernel hangs over the image's edge goes one at a time,
  with a quarter of the block's FMAs in flight. On a 16-pixel row that is 4 of 16 pixels,
  and the layer ran at 46 GFLOP/s (256 -> 256 channels, 16 x 16);
- the weights: a block's 16 columns of w_tk are 16 floats out of every K-float row, so
  walking down them strides K floats. With 9C x K = 2.4 MB of weights (256 -> 256) the
  hardware prefetcher loses track and the loads wait on L2.

Here, three changes, one per problem:

1. ``pad_rows`` copies x into [N, H+2, W+2, C] with a zero border once per call. Every
   output pixel is then an interior one: kernel row dy of pixel (h, w) is the run of 3C
   values at xp[n, h + dy, w:w + 3], and pixel w + 1's run starts C floats later. No
   border code at all; the zeros add exact zeros. (A copy of x: 0.3 ms for 4 x 128 x 128 x
   32, next to a 2.4 ms convolution.)
2. ``pack_weights`` lays each block of output channels out as its own [9C, width] slab,
   so a block's weights are one sequential stream (the BLIS packing idea).
3. The block: with AVX-512 the core has 32 vector registers of 16 lanes, not 16 of 8, so a
   block can keep 16 accumulators of 16 lanes: 4 pixels x 64 channels (``simd.float32x16``).
   Each reduction step loads 4 weight vectors, broadcasts 4 input values and does 16 FMAs:
   0.5 loads per FMA, against 0.67 for the 6 x 16 block. The pixel count 4 (or 8) also
   divides the U-Net's power-of-two rows, so no pixel is left over. The leftover channels go
   in blocks of 8 pixels x 32 channels and 16 x 16 (16 lanes: one vector a pixel, 1 load and
   16 broadcasts per 16 FMAs; 1.5x the 8 x 16 block of 8 lanes it replaced, on one Xeon
   core), and 8 x 8 (8 lanes). On Zen 4, whose FMA pipes are 256 bits wide, a 16-lane FMA
   runs in two halves, and 4 x 64 measured 1.00-1.15x the speed of the same block in 8-lane
   vectors (4 x 32); on a core with 512-bit pipes (Zen 5, Intel's server cores) it does
   twice the 8-lane block's work per instruction. With 16 registers (AVX2) those blocks
   spill (35 GFLOP/s measured with a 4 x 32 block compiled for Haswell), so there it is 6 x
   16 and 6 x 8 (12 and 6 accumulators of 8 lanes). ``WIDE_BLOCKS`` is chosen at import from
   the CPU Numba compiles for.

A row whose width is not a multiple of the block's pixel count ends with a block placed
at its last pixels, overlapping the one before: those pixels are computed twice, the
same sums in the same order, so they come out the same. Rows narrower than the block go
one pixel at a time. Every output is one chain of FMAs in a fixed order (bias, then the
taps in order), whatever the block: results are the same on every run, with any thread
count, and with either block family (a machine with 16 registers computes the same bits).

The weight gradient, dW_tk[t, k] = sum_p patch(x, p)[t] dz[p, k], turns the same blocks
around: a block's rows are 4 (or 8, or 6) consecutive taps of one kernel row, one float
apart in the padded input; its columns are 64 (32, 16, 8) channels of dz; the sum runs
over pixels. With the border gone every pixel counts for every tap, so an image row is one
uninterrupted run. The pixels go in chunks of about PIXEL_CHUNK whose x and dz stay in
L1/L2 while every block of taps and channels passes over them, the sums waiting in the
output between chunks (without chunks, 128 -> 128 at 64 x 64 ran at 54 GFLOP/s a core:
each pass re-read 2 MB of dz from L3). Each chunk's dz is first copied into panels, one
[pixels, block] run per block of channels (``_pack_dz``): in place, a pixel's channels
are K floats after the one before, and at K = 256 or 512 (1 or 2 KB, a power of two)
the chunk's rows fall into a handful of L1's 64 sets and evict each other.

Where the data sits matters as much. NumPy's memory is only 16-byte aligned, so three
16-lane (64-byte) loads in four straddle two cache lines. The packed weights and the dz
panels start on a cache line (``simd.aligned_empty``), and every block's rows then do too.

Measured on one core of a 2-core Xeon (family 6 model 207, 16-lane FMAs at full width,
peak 217-246 GFLOP/s a core depending on the neighbours), 2 images, the same run for both
versions (best of 15 in turns):

    forward 128 -> 128 at 64 x 64 with the weights 64-byte aligned: 204-225 GFLOP/s;
      16, 32 or 48 bytes off: 157-174 (which one a call got was malloc's choice)
    weight gradient, dz in place (64-pixel chunks) -> panels (128-pixel chunks):
      512 -> 512 at 16 x 16: 96 -> 151-182; 256 -> 256 at 32 x 32: 107 -> 171-192;
      128 -> 128 at 64 x 64: 166 -> 191-206; 32 -> 32 at 256 x 256: 198 -> 193-200
    (the weight gradient's sums are the same: out is written in the same order)

Napkin math, one core of the 2-core Zen 4, 4 images (``python -m
nodulekit.engine.cpu_conv_packed`` times these on your machine):

    forward 256 -> 256 at 16 x 16: 2 x 1024 x 2304 x 256 = 1.2 GFLOP
      version 2: 25 ms (48 GFLOP/s); packed: 10.5 ms (116 GFLOP/s, 99% of the core's peak)
    forward 128 -> 128 at 64 x 64: 85 -> 112 GFLOP/s; 32 -> 32 at 128 x 128: 109 -> 107
      (102 with the padding: this one stays with version 2)
    weight gradient 256 -> 256 at 16 x 16: 61 -> 106; 128 -> 128 at 64 x 64: 67 -> 105

    the same, compiled for Haswell (16 registers: NUMBA_CPU_NAME=haswell and AVX2's
    NUMBA_CPU_FEATURES; the 6 x 16 blocks), on the same core: forward 95-98 against
    version 2's 47-104, weight gradient 84-95 against 63-85

Run it: ``nodulekit bench ops --op conv --variants all`` (every layer, each version,
against torch); ``pytest tests/test_conv_packed.py`` checks both block families against
the float64 reference, and ``tests/test_ops.py`` the op (backend ``cpu-packed``) against
the reference and torch.

Requirements: K % 8 == 0. Serial, nogil: the caller runs blocks of image rows (or, for a
deep layer's weight gradient, ranges of taps) on its threads (``cpu_workers.Workers``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from numba import config, njit, uint64

from nodulekit.engine.register_blocks import (
    fma_4x64,
    fma_6x8,
    fma_6x16,
    fma_8x8,
    fma_8x16,
    fma_8x32,
    fma_16x16,
    load_4x64,
    load_6x8,
    load_6x16,
    load_8x8,
    load_8x16,
    load_8x32,
    relu_6x8,
    relu_6x16,
    relu_8,
    relu_16x16,
    store_4x64,
    store_6x8,
    store_6x16,
    store_8x8,
    store_8x16,
    store_8x32,
    store_16x16,
)
from nodulekit.engine.simd import (
    aligned_empty,
    fma8,
    load8,
    load16,
    relu8,
    splat8,
    store8,
    store16,
    zeros8,
    zeros16,
)

_JIT = {"cache": True, "nogil": True}
_INLINE = {"cache": True, "inline": "always"}
# weight gradient: pixels per pass over the blocks of taps and channels (128 against 64:
# 1.0-1.1x, more at 512 channels)
PIXEL_CHUNK = 128


def _compiles_for_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512 (32 vector registers): the host's
    features unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise."""
    if config.CPU_FEATURES is not None:
        return enables_avx512(config.CPU_FEATURES)
    if config.CPU_NAME not in (None, "host"):
        return False  # a named CPU without features: assume the narrower register file
    return enables_avx512(llvm.get_host_cpu_features().flatten())


def enables_avx512(features: str) -> bool:
    """Whether an LLVM feature list ("+avx2,-avx512f,...") turns AVX-512 on. The host's
    list names every feature it knows, the missing ones as "-avx512f": a substring test
    would find it there too (and did, putting the 32-register blocks on AVX2 cores)."""
    return "+avx512f" in features.replace(" ", "").split(",")


# 4 x 64 and 8 x 32 blocks of 16 lanes, 8 x 16 and 8 x 8 of 8 (16 accumulators) where the
# core has 32 vector registers; 6 x 16 and 6 x 8 of 8 lanes (12 and 6) where it has 16
WIDE_BLOCKS = _compiles_for_avx512()


def supports(c: int, k: int) -> bool:
    return k % 8 == 0 and c >= 1


@njit(**_INLINE)
def _block_width(left: int, wide: bool) -> int:
    """The next block's channels, with `left` channels to go (a multiple of 8)."""
    if wide:
        return 64 if left >= 64 else (32 if left >= 32 else (16 if left >= 16 else 8))
    return 16 if left >= 16 else 8


@njit(**_INLINE)
def _block_pixels(block: int, wide: bool) -> int:
    """The forward block's pixels for a block of that many channels."""
    if not wide:
        return 6
    return 4 if block == 64 else (16 if block == 16 else 8)


def channel_blocks(k: int, wide: bool) -> list[tuple[int, int]]:
    """(first channel, width) of each block of output channels, in the kernel's order:
    64s (wide) or 16s while they fit, then what is left (a 32, a 16, an 8)."""
    blocks, j0 = [], 0
    while j0 < k:
        left = k - j0
        if left < 8:
            raise ValueError(f"cpu_conv_packed needs K % 8 == 0, got K = {k}")
        width = _block_width(left, wide)
        blocks.append((j0, width))
        j0 += width
    return blocks


def pack_weights(w_tk: np.ndarray, wide: bool = WIDE_BLOCKS) -> np.ndarray:
    """w_tk [9C, K] -> each block of output channels as its own [9C, width] slab; the slab
    of the block starting at channel j0 sits at offset 9C j0."""
    taps, k = w_tk.shape
    packed = aligned_empty(taps * k)  # every block's rows then start on a cache line
    for j0, width in channel_blocks(k, wide):
        packed[taps * j0: taps * (j0 + width)] = w_tk[:, j0:j0 + width].ravel()
    return packed


@njit(**_JIT)
def pad_rows(x: np.ndarray, xp: np.ndarray, row0: int, row1: int) -> None:
    """xp's rows row0..row1 (row = n * (H+2) + h'): x's row h' - 1 between zero columns,
    or zeros for the top and bottom rows."""
    _, height, width, channels = x.shape
    run = width * channels
    xf, xpf = x.ravel(), xp.ravel()
    padded_run = (width + 2) * channels
    # loops, not slice assignments: as fast, and Numba compiles slice assignments slowly
    # (their shape checks and broadcasting: 2.5 s for this function, 0.7 s without)
    for row in range(row0, row1):
        n, hp = row // (height + 2), row % (height + 2)
        o = row * padded_run
        if hp == 0 or hp == height + 1:
            for j in range(padded_run):
                xpf[o + j] = 0.0
            continue
        i = (n * height + hp - 1) * run
        for j in range(channels):
            xpf[o + j] = 0.0
            xpf[o + channels + run + j] = 0.0
        d, sixteen = o + channels, run - run % 16
        for j in range(0, sixteen, 16):
            store16(xpf, uint64(d + j), load16(xf, uint64(i + j)))
        for j in range(sixteen, run):
            xpf[d + j] = xf[i + j]


# ---- the forward blocks. A block shape is the functions it is made of (register_blocks, or
# the adapters below), and one loop runs any of them: _forward_block. Numba compiles each
# call for the functions it is given, and LLVM inlines them: the same machine code as a
# loop written out per shape (measured: the same GFLOP/s, the same bits).
#   vectors(f, i)       the block's channel vectors at f[i:] (weights or bias)
#   spread(v)           those vectors once per pixel: the starting sums (the bias)
#   fma(xf, i, s, w, a) a += xf[i + r s] (broadcast) * w, r over the block's pixels
#   relu(a), store(f, o, k, a): the block's sums, pixel r to f[o + r k:]
# (The weight gradient's blocks below are written out: the same pattern there, with the
# sums resumed from `out` every 64 pixels, ran 8-10% slower.)

@njit(**_INLINE)
def _vectors_4x16(f, i):
    return (load16(f, i), load16(f, i + uint64(16)), load16(f, i + uint64(32)),
            load16(f, i + uint64(48)))


@njit(**_INLINE)
def _vectors_2x16(f, i):
    return (load16(f, i), load16(f, i + uint64(16)))


@njit(**_INLINE)
def _vectors_1x16(f, i):
    return (load16(f, i),)


@njit(**_INLINE)
def _vectors_2x8(f, i):
    return (load8(f, i), load8(f, i + uint64(8)))


@njit(**_INLINE)
def _vectors_1x8(f, i):
    return (load8(f, i),)


@njit(**_INLINE)
def _spread_4(v):
    return v + v + v + v


@njit(**_INLINE)
def _spread_6(v):
    return v + v + v + v + v + v


@njit(**_INLINE)
def _spread_8(v):
    return v + v + v + v + v + v + v + v


@njit(**_INLINE)
def _spread_16(v):
    return _spread_8(v) + _spread_8(v)


@njit(**_INLINE)
def _six(i, c):
    return (i, i + c, i + uint64(2) * c, i + uint64(3) * c, i + uint64(4) * c,
            i + uint64(5) * c)


# register_blocks' 6-pixel blocks (for cores with 16 registers) take their six rows as a
# tuple of indices (the up-convolution's rows are not evenly spaced); here they are evenly
@njit(**_INLINE)
def _fma_6x16(xf, i, s, w, a):
    return fma_6x16(xf, _six(i, s), w[0], w[1], a)


@njit(**_INLINE)
def _fma_6x8(xf, i, s, w, a):
    return fma_6x8(xf, _six(i, s), w[0], a)


@njit(**_INLINE)
def _store_6x16(f, o, k, a):
    store_6x16(f, _six(o, k), 8, a)


@njit(**_INLINE)
def _store_6x8(f, o, k, a):
    store_6x8(f, _six(o, k), a)


@njit(**_INLINE)
def _forward_block(vectors, spread, fma, relu_block, store, width, arrays, relu, at,
                   geometry):
    """y[o : +pixels, j0 : +width] (o a flat index into y) from the padded input at xi (its
    first pixel's first tap) and the block's weight slab at wi; at = (xi, wi, j0, o). The
    sums run bias, then kernel rows 0..2, each over its run of 3C taps."""
    xpf, wf, b, yf = arrays
    xi, wi, j0, o = at
    c, k, row_stride = geometry
    taps = uint64(3) * c
    a = spread(vectors(b, uint64(j0)))
    for dy in range(3):
        xr = xi + uint64(dy) * row_stride
        wr = wi + uint64(dy) * taps * uint64(width)
        for t in range(taps):
            a = fma(xpf, xr + t, c, vectors(wf, wr + t * uint64(width)), a)
    if relu:
        a = relu_block(a)
    store(yf, o, k, a)


@njit(**_JIT)
def _one_pixel(xpf, wf, b, yf, relu, xi, wi, channels, o, geometry):
    """One pixel x the block's channels (j0, width), a vector at a time (rows narrower
    than a block)."""
    j0, width = channels
    c, k, row_stride = geometry
    taps = uint64(3) * c
    for v in range(width // 8):
        a = load8(b, j0 + 8 * v)
        for dy in range(3):
            xr = xi + uint64(dy) * row_stride
            wr = wi + uint64(dy) * taps * uint64(width) + uint64(8 * v)
            for t in range(taps):
                a = fma8(splat8(xpf, xr + t), load8(wf, wr + t * uint64(width)), a)
        if relu:
            a = relu8(a)
        store8(yf, o + uint64(8 * v), a)


@njit(**_JIT)
def conv3x3_packed_rows(xp: np.ndarray, w_packed: np.ndarray, b: np.ndarray, relu: bool,
                        y: np.ndarray, row0: int, row1: int, wide: bool) -> None:
    """y = relu?(conv3x3(x, w) + b) for image rows row0..row1 (row = n * H + h), from
    xp = pad_rows(x) and w_packed = pack_weights(w_tk); wide: the 32-register blocks."""
    _, padded_height, padded_width, channels = xp.shape
    height, width = padded_height - 2, padded_width - 2
    out_channels = y.shape[3]
    xpf, wf, yf = xp.ravel(), w_packed.ravel(), y.ravel()
    c, k = uint64(channels), uint64(out_channels)
    geometry = (c, k, uint64(padded_width * channels))
    arrays = (xpf, wf, b, yf)
    taps9 = uint64(9 * channels)
    j0 = 0
    while j0 < out_channels:  # one block of channels at a time: its weight slab stays hot
        block = _block_width(out_channels - j0, wide)
        pixels = _block_pixels(block, wide)
        wi = taps9 * uint64(j0)
        for row in range(row0, row1):
            n, h = row // height, row % height
            xrow = uint64((n * padded_height + h) * padded_width) * c
            orow = uint64(row * width) * k + uint64(j0)
            if width < pixels:
                for x0 in range(width):
                    _one_pixel(xpf, wf, b, yf, relu, xrow + uint64(x0) * c, wi, (j0, block),
                               orow + uint64(x0) * k, geometry)
                continue
            x0 = 0
            while x0 < width:
                x0 = min(x0, width - pixels)  # the last block ends at the row's end
                at = (xrow + uint64(x0) * c, wi, j0, orow + uint64(x0) * k)
                if block == 64:
                    _forward_block(_vectors_4x16, _spread_4, fma_4x64, relu_16x16, store_4x64, 64,
                                   arrays, relu, at, geometry)
                elif block == 32:
                    _forward_block(_vectors_2x16, _spread_8, fma_8x32, relu_16x16, store_8x32, 32,
                                   arrays, relu, at, geometry)
                elif wide and block == 16:
                    _forward_block(_vectors_1x16, _spread_16, fma_16x16, relu_16x16, store_16x16,
                                   16, arrays, relu, at, geometry)
                elif wide:
                    _forward_block(_vectors_1x8, _spread_8, fma_8x8, relu_8, store_8x8, 8,
                                   arrays, relu, at, geometry)
                elif block == 16:
                    _forward_block(_vectors_2x8, _spread_6, _fma_6x16, relu_6x16, _store_6x16, 16,
                                   arrays, relu, at, geometry)
                else:
                    _forward_block(_vectors_1x8, _spread_6, _fma_6x8, relu_6x8, _store_6x8, 8,
                                   arrays, relu, at, geometry)
                x0 += pixels
        j0 += block


# ---- the weight gradient: dW_tk[t, k] = sum over pixels p of patch(x, p)[t] * dz[p, k].
# The same blocks turned around: a block's "pixels" are now consecutive taps of one kernel
# row (1 float apart in the padded input, not C), its channels come from dz, and the sums
# run over the image rows' pixels in order. With the zero border every pixel is valid for
# every tap, so each image row is one uninterrupted run.

@njit(**_INLINE)
def _grad_4x64(xpf, dzf, outf, xi, di, o, span):
    """out[o + r K : +64] (+)= sum over the pixels of rows r0..r1 of xp[tap u0 + r] dz[:64];
    span = (r0, r1, height, padded_height, padded_width, width, C, K, dy, first, ks): the
    sums start at 0 in a pass's first chunk, else from out. dzf is the chunk's panel:
    pixel p of the chunk at di + p ks (ks: the block's width)."""
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros16()
    a = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z) if first else load_4x64(outf, o, k)
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            d = dr + uint64(x) * ks
            a = fma_4x64(xpf, xr + uint64(x) * c, one,
                         (load16(dzf, d), load16(dzf, d + uint64(16)),
                          load16(dzf, d + uint64(32)), load16(dzf, d + uint64(48))), a)
    store_4x64(outf, o, k, a)


@njit(**_INLINE)
def _grad_8x32(xpf, dzf, outf, xi, di, o, span):
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros16()
    a = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z) if first else load_8x32(outf, o, k)
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            d = dr + uint64(x) * ks
            a = fma_8x32(xpf, xr + uint64(x) * c, one,
                         (load16(dzf, d), load16(dzf, d + uint64(16))), a)
    store_8x32(outf, o, k, a)


@njit(**_INLINE)
def _grad_8x16(xpf, dzf, outf, xi, di, o, span):
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros8()
    a = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z) if first else load_8x16(outf, o, k)
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            d = dr + uint64(x) * ks
            a = fma_8x16(xpf, xr + uint64(x) * c, one,
                         (load8(dzf, d), load8(dzf, d + uint64(8))), a)
    store_8x16(outf, o, k, a)


@njit(**_INLINE)
def _grad_8x8(xpf, dzf, outf, xi, di, o, span):
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros8()
    a = (z, z, z, z, z, z, z, z) if first else load_8x8(outf, o, k)
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            a = fma_8x8(xpf, xr + uint64(x) * c, one, (load8(dzf, dr + uint64(x) * ks),), a)
    store_8x8(outf, o, k, a)


@njit(**_INLINE)
def _grad_6x16(xpf, dzf, outf, xi, di, o, span):
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros8()
    a = (z, z, z, z, z, z, z, z, z, z, z, z) if first else load_6x16(outf, _six(o, k), 8)
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            d = dr + uint64(x) * ks
            a = fma_6x16(xpf, _six(xr + uint64(x) * c, one), load8(dzf, d),
                         load8(dzf, d + uint64(8)), a)
    store_6x16(outf, _six(o, k), 8, a)


@njit(**_INLINE)
def _grad_6x8(xpf, dzf, outf, xi, di, o, span):
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    z = zeros8()
    a = (z, z, z, z, z, z) if first else load_6x8(outf, _six(o, k))
    one = uint64(1)
    for row in range(row0, row1):
        n, h = row // height, row % height
        xr = xi + uint64((n * ph + h + dy) * pw) * c
        dr = di + uint64((row - row0) * width) * ks
        for x in range(width):
            a = fma_6x8(xpf, _six(xr + uint64(x) * c, one), load8(dzf, dr + uint64(x) * ks), a)
    store_6x8(outf, _six(o, k), a)


@njit(**_JIT)
def _grad_one_tap(xpf, dzf, outf, xi, di, o, block, span):
    """The taps left over when 3C is not a multiple of the block's tap count: one tap x
    `block` channels, a vector at a time."""
    row0, row1, height, ph, pw, width, c, k, dy, first, ks = span
    for v in range(block // 8):
        a = zeros8() if first else load8(outf, o + uint64(8 * v))
        for row in range(row0, row1):
            n, h = row // height, row % height
            xr = xi + uint64((n * ph + h + dy) * pw) * c
            dr = di + uint64((row - row0) * width) * ks + uint64(8 * v)
            for x in range(width):
                a = fma8(splat8(xpf, xr + uint64(x) * c), load8(dzf, dr + uint64(x) * ks), a)
        store8(outf, o + uint64(8 * v), a)


@njit(**_JIT)
def _pack_dz(dzf, p0, pixels, out_channels, panel, wide):
    """dz's pixels p0..p0+pixels as one [pixels, width] panel per block of channels (block
    j0's at panel[pixels j0:]): each block's values one sequential run. In place, a deep
    layer's dz rows are K floats apart (2 KB at K = 512), a power of two: a chunk's rows
    then fall into a few of L1's 64 sets and evict each other (measured: the weight
    gradient at 512 -> 512 ran at 84 GFLOP/s a core, ~35% of the peak)."""
    j0 = 0
    while j0 < out_channels:
        block = _block_width(out_channels - j0, wide)
        base = pixels * j0
        for p in range(pixels):
            src = (p0 + p) * out_channels + j0
            dst = base + p * block
            for v in range(block // 8):
                store8(panel, uint64(dst + 8 * v), load8(dzf, uint64(src + 8 * v)))
        j0 += block


@njit(**_JIT)
def conv3x3_weight_grad_packed(xp: np.ndarray, dz: np.ndarray, row0: int, row1: int,
                               t_lo: int, t_hi: int, out: np.ndarray, wide: bool,
                               pixel_chunk: int) -> None:
    """out[t_lo:t_hi] = dW_tk's rows (taps) t_lo..t_hi, summed over image rows row0..row1
    (row = n * H + h) of dz and of x (given padded: xp = pad_rows(x)). out [9C, K] is
    written there, not added to. pixel_chunk: PIXEL_CHUNK (a required
    argument, not a default: see tests/test_numba_dispatch.py)."""
    _, ph, pw, channels = xp.shape
    height, width = ph - 2, pw - 2
    out_channels = dz.shape[3]
    xpf, dzf, outf = xp.ravel(), dz.ravel(), out.ravel()
    c, k = uint64(channels), uint64(out_channels)
    taps = 3 * channels
    # a few image rows at a time (about PIXEL_CHUNK pixels): their x and dz stay in L1/L2
    # while every block of taps and channels passes over them; the sums wait in out
    chunk = max(1, pixel_chunk // width)
    size = chunk * width * out_channels
    raw = np.empty(size + 16, dtype=np.float32)  # the panel starts on a cache line
    panel = raw[(64 - raw.ctypes.data % 64) % 64 // 4:][:size]
    for r0 in range(row0, row1, chunk):
        r1 = min(row1, r0 + chunk)
        first = r0 == row0
        pixels = (r1 - r0) * width
        _pack_dz(dzf, r0 * width, pixels, out_channels, panel, wide)
        j0 = 0
        while j0 < out_channels:
            block = _block_width(out_channels - j0, wide)
            group = (4 if block == 64 else 8) if wide else 6
            di = uint64(pixels * j0)  # the block's panel of dz: [pixels, block]
            ks = uint64(block)
            for dy in range(3):
                span = (r0, r1, height, ph, pw, width, c, k, dy, first, ks)
                u0 = max(t_lo - dy * taps, 0)  # this kernel row's taps in t_lo..t_hi
                u_hi = min(t_hi - dy * taps, taps)
                while u0 < u_hi:
                    o = uint64((dy * taps + u0) * out_channels + j0)
                    xi = uint64(u0)
                    if u0 + group > u_hi:
                        _grad_one_tap(xpf, panel, outf, xi, di, o, block, span)
                        u0 += 1
                        continue
                    if block == 64:
                        _grad_4x64(xpf, panel, outf, xi, di, o, span)
                    elif block == 32:
                        _grad_8x32(xpf, panel, outf, xi, di, o, span)
                    elif wide and block == 16:
                        _grad_8x16(xpf, panel, outf, xi, di, o, span)
                    elif wide:
                        _grad_8x8(xpf, panel, outf, xi, di, o, span)
                    elif block == 16:
                        _grad_6x16(xpf, panel, outf, xi, di, o, span)
                    else:
                        _grad_6x8(xpf, panel, outf, xi, di, o, span)
                    u0 += group
            j0 += block


def _best_ms(fn, repeats: int = 5) -> float:
    import time

    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _time_shape(rng, n: int, h: int, w: int, c: int, k: int) -> str:
    from nodulekit.engine import cpu_conv

    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    w_tk = rng.standard_normal((9 * c, k), dtype=np.float32)
    b = np.zeros(k, dtype=np.float32)
    dz = rng.standard_normal((n, h, w, k), dtype=np.float32)
    y = np.empty((n, h, w, k), dtype=np.float32)
    dw = np.empty((9 * c, k), dtype=np.float32)
    xp = np.empty((n, h + 2, w + 2, c), dtype=np.float32)
    pad_rows(x, xp, 0, n * (h + 2))
    w_packed = pack_weights(w_tk)
    mflop = 2 * n * h * w * 9 * c * k / 1e6  # per ms: GFLOP/s
    v2 = _best_ms(lambda: cpu_conv.conv3x3_rows(x, w_tk, b, False, y, 0, n * h))
    v3 = _best_ms(lambda: conv3x3_packed_rows(xp, w_packed, b, False, y, 0, n * h, WIDE_BLOCKS))
    pad = _best_ms(lambda: pad_rows(x, xp, 0, n * (h + 2)))
    g2 = _best_ms(lambda: cpu_conv.conv3x3_weight_grad_rows(x, dz, 0, n * h, dw))
    g3 = _best_ms(lambda: conv3x3_weight_grad_packed(xp, dz, 0, n * h, 0, 9 * c, dw,
                                                     WIDE_BLOCKS, PIXEL_CHUNK))
    return (f"{n}x{h}x{w} {c:4d} -> {k:4d}: forward v2 {mflop / v2:6.1f}  packed "
            f"{mflop / v3:6.1f} (with padding {mflop / (v3 + pad):6.1f}) | weight gradient "
            f"v2 {mflop / g2:6.1f}  packed {mflop / g3:6.1f}")


def _time_one_core() -> None:
    """Version 2 against this one on the calling thread (one core), forward and weight
    gradient, in GFLOP/s: the docstring's numbers, for this machine."""
    rng = np.random.default_rng(0)
    print(f"one core, {'32' if WIDE_BLOCKS else '16'}-register blocks; GFLOP/s")
    for shape in ((4, 16, 16, 256, 256), (4, 64, 64, 128, 128), (4, 128, 128, 32, 32)):
        print(_time_shape(rng, *shape))


if __name__ == "__main__":
    _time_one_core()
