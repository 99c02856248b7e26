"""3x3 convolutions on the CPU, version 4: Winograd's minimal filtering, F(4x4, 3x3)
for the forward pass and the data gradient, F(3x3, 4x4) for the weight gradient
(``winograd`` in cpu.CONV_VARIANTS).

What it computes: the same as ``cpu_conv_packed`` (NHWC float32, stride 1, zero 'same'
padding, w_tk [9C, K] with tap (r, s, c) major), with fewer multiplications:

    y[p, k] = relu?(b[k] + sum_t patch(x, p)[t] * w_tk[t, k])
    dW_tk[t, k] = sum_p patch(x, p)[t] * dz[p, k]

A direct convolution spends 9 multiply-adds per output pixel, input channel and output
channel. Winograd's algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) computes a 4 x 4 tile of outputs from the 6 x 6 window of input under it
with 36 instead of 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, per channel pair)

with B^T 6 x 6, G 6 x 3 and A^T 4 x 6 (``B_T``, ``G``, ``A_T`` below: polynomial
interpolation at the points 0, 1, -1, 2, -2 and infinity). Summed over the input
channels, the elementwise products become 36 matrix products, one per position xi of the
6 x 6 transformed tile:

    V = B^T d B       the input transform, per tile and channel: additions and small
                      constants, 8 channels a vector (NHWC keeps a pixel's channels together)
    U = G g G^T       the weight transform, once per call
    M[xi] [tiles, K] = V[xi] [tiles, C] @ U[xi] [C, K]       the products: 4x fewer FMAs
    Y = A^T M A + b   the output transform per tile (+ bias, ReLU)

The products are the packed convolution's register blocks (``cpu_conv_packed``, 4 tiles x
64 channels of 16 lanes with AVX-512) with C "taps" where the direct kernel has 9C. One
block of about BLOCK_TILES tiles (whole tile rows) goes through all three stages on one
thread while its V and M (36 x tiles x (C + K) floats) stay in the core's L2. There is no
padded copy of x: a tile on the image's border gathers its window first, zeros beyond
the edge, and the others read x in place. The transforms run on vectors of 16 channels
where Numba compiles for AVX-512 (C a multiple of 16), else 8; the weights' transform
writes the products' packed layout directly, in blocks of input channels on the threads.

The weight gradient turns the same picture around: over one 4 x 4 tile of dz and the
6 x 6 window of x under it, dW is a 3 x 3 correlation with a 4 x 4 "filter" (dz's tile):
F(3x3, 4x4), the same points and so the same B^T. Its 36 products M[xi] [C, K] = V[xi]^T
[C, tiles] @ Z[xi] [tiles, K] (Z = G_W dz G_W^T) sum over the tiles, and A_W^T M A_W
(3 x 6) runs once, on the sum: 36 multiply-adds per 16 pixels where the direct sum needs
144. The sum over tiles is split into WEIGHT_GRAD_BLOCKS fixed blocks, added in order.

What it costs, measured here (tests/test_conv_winograd.py): rounding. The transforms
scale and mix inputs of either sign (constants up to 8) before the products, so an output
carries about 6x the direct sum's error (against float64: 1e-5 of the output's scale at
256 channels, where the direct kernels give 2e-6; the tests' fp32 rule allows 1e-6 x
sqrt(9C), 5e-5 there). Every output is still one fixed chain of operations: the same bits
on every run, thread count and register-block family. And speed where there is little to
multiply: with 8 or 16 channels the transforms' additions cost more than the products
save, and on fewer than ~128 tiles the weights' transform and the short products do;
cpu.py's 'auto' takes it only where it measured faster.

Napkin math, the 2-core Xeon (family 6 model 207, 16-lane FMAs at full width), both
threads, against the direct kernels 'auto' had before (``python -m
nodulekit.engine.cpu_conv_winograd`` times the forward pass on your machine; its
GFLOP/s count the direct convolution's FLOPs, so they can pass the FMA peak):

    forward 64 -> 64 at 4 x 128 x 128 (9.7 GFLOP direct, 2.4 in the products):
      packed 17.9 ms (269 GFLOP/s); winograd 8.3 ms (582 direct-equivalent)
    forward 32 -> 32 at 4 x 256 x 256: 25.0 -> 16.3 ms; 128 -> 128 at 4 x 64 x 64:
      16.9 -> 10.0 ms; 512 -> 256 at 4 x 32 x 32: 0.62x of 41 ms
    weight gradient 64 -> 32 at 4 x 256 x 256: 67.2 -> 39.6 ms; 128 -> 128 at 4 x 64 x
      64: 22.6 -> 14.7 ms
    one core, 128 -> 128 at 4 x 64 x 64: input transform 1.1 ms, products 8.7 ms (139
      GFLOP/s of real FMAs, 57% of the core's peak), output transform 0.9 ms; the
      packed forward 31 ms
    (F(2x2, 3x3), tried first: 2.25x fewer FMAs, 4x the input's size in V, and 1.0-1.35x
    faster than packed with both threads; OpenBLAS for the products: 124 GFLOP/s a core)

Requirements: H and W multiples of 4, C and K multiples of 8. Serial, nogil: the caller
runs blocks of tile rows on its threads (``cpu_workers.Workers``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from nodulekit.engine import cpu_conv_packed as packed
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
from nodulekit.engine.simd import (
    add8,
    add16,
    fma8,
    fma16,
    load8,
    load16,
    mul8,
    mul16,
    relu8,
    relu16,
    splat8,
    splat16,
    store8,
    store16,
    sub8,
    sub16,
    zeros8,
)

_JIT = {"cache": True, "nogil": True}
_INLINE = {"cache": True, "inline": "always"}

# F(4x4, 3x3): 6 x 6 input windows, 4 x 4 output tiles (Lavin and Gray's matrices)
ALPHA, TILE = 6, 4
B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)
PLANES = ALPHA * ALPHA

# tiles per block (whole tile rows, at least one). One core of the Xeon, 4 images:
# 128 -> 128 at 64 x 64 took 11.4, 10.7 and 10.5 ms with 32, 64 and 128 tiles; 32 -> 32
# at 256 x 256 15.0 with 64 and 22.2 with 128 (its V and M then leave L2)
BLOCK_TILES = 64
# and at least this many blocks a call, whatever the thread count (Workers.plan's default
# is 16: here a smaller block costs speed in the products)
BLOCKS_AT_LEAST = 4


def supports(c: int, k: int, height: int, width: int) -> bool:
    return c % 8 == 0 and k % 8 == 0 and height % TILE == 0 and width % TILE == 0


# U[xi] = sum over the 9 taps (r, s) of G[i, r] G[j, s] g[r, s], xi = 6 i + j: a [36, 9]
# matrix of coefficients, 144 of them nonzero
_WEIGHT_TRANSFORM = np.einsum("ir,js->ijrs", G, G).reshape(PLANES, 9).astype(np.float32)


def transform_weights(w_tk: np.ndarray) -> np.ndarray:
    """w_tk [9C, K] (tap (r, s, c) major) -> U [36, C, K] = G g G^T for every (c, k), in
    float32, each element's nonzero terms fused-multiply-added in tap order (so the same on
    every machine, unlike a BLAS product of [36, 9] by [9, C K], whose kernel depends on
    the CPU); K a multiple of 8. The layout of one block of all K channels: the kernel the
    backend runs (``transform_and_pack_rows``), unpacked."""
    taps, k = w_tk.shape
    c = taps // 9
    out = np.empty(PLANES * c * k, dtype=np.float32)
    transform_and_pack_rows(w_tk, out, (np.arange(0, k, 8), np.full(k // 8, k)), 0, c)
    return out.reshape(PLANES, c, k)


def tile_rows_per_block(width: int) -> int:
    """Tile rows (W/4 tiles each) per block: about BLOCK_TILES tiles."""
    return max(1, round(BLOCK_TILES / (width // TILE)))


# The transforms run on vectors of 8 or 16 channels (``lanes``): 16 where Numba compiles for
# AVX-512 and C (or K) is a multiple of 16, half the instructions of 8 (each lane's
# arithmetic is the same, so are the bits). A vector kind is its operations, passed as
# one tuple (load, store, add, sub, mul, fma, splat); LLVM inlines them.
@njit(**_INLINE)
def _bt(ops, d, k):
    """B^T applied to one line of six vectors d (the window's column or row): 6 vectors.
    k: the constants (2, 4, 5, 0) as vectors."""
    _, _, add, sub, mul, fma, _ = ops
    two, four, five, zero = k
    d0, d1, d2, d3, d4, d5 = d
    t1 = fma(four, sub(zero, d2), d4)  # d4 - 4 d2
    t2 = fma(four, sub(zero, d1), d3)  # d3 - 4 d1
    t3 = sub(d4, d2)
    t4 = mul(two, sub(d3, d1))
    r0 = add(fma(four, d0, mul(five, sub(zero, d2))), d4)
    r5 = add(fma(four, d1, mul(five, sub(zero, d3))), d5)
    return r0, add(t1, t2), sub(t1, t2), add(t3, t4), sub(t3, t4), r5


@njit(**_INLINE)
def _input_group(ops, lanes, src, dst, t, constants):
    """V = B^T d B for one tile's group of ``lanes`` channels: d at src = (xf, i, row, c)
    (the window's first value, then a row and a pixel apart), V[xi] at dst = (vf, o,
    plane) + xi plane; t: scratch of 36 vectors."""
    load, store, _, _, _, _, splat = ops
    xf, i, row, c = src
    vf, o, plane = dst
    k = (splat(constants, 0), splat(constants, 1), splat(constants, 2), splat(constants, 3))
    for j in range(ALPHA):  # B^T d, one window column at a time
        e = i + j * c
        r = _bt(ops, (load(xf, e), load(xf, e + row), load(xf, e + 2 * row),
                      load(xf, e + 3 * row), load(xf, e + 4 * row), load(xf, e + 5 * row)), k)
        for q in range(ALPHA):
            store(t, (q * ALPHA + j) * lanes, r[q])
    for q in range(ALPHA):  # (B^T d) B, one row at a time, to V[6 q .. 6 q + 5]
        e = q * ALPHA * lanes
        r = _bt(ops, (load(t, e), load(t, e + lanes), load(t, e + 2 * lanes),
                      load(t, e + 3 * lanes), load(t, e + 4 * lanes), load(t, e + 5 * lanes)), k)
        for j in range(ALPHA):
            store(vf, o + (ALPHA * q + j) * plane, r[j])


@njit(**_JIT)
def _edge_window(xf, shape, corner, ch, lanes, window):
    """A border tile's 6 x 6 window of ``lanes`` channels from ch, zeros where it hangs
    over the image (the 'same' padding), copied into window [6][6][lanes]."""
    height, width, c = shape
    n, y0, x0 = corner
    for i in range(ALPHA):
        for j in range(ALPHA):
            yy, xx = y0 + i, x0 + j
            o = (i * ALPHA + j) * lanes
            if 0 <= yy < height and 0 <= xx < width:
                src = ((n * height + yy) * width + xx) * c + ch
                for q in range(lanes):
                    window[o + q] = xf[src + q]
            else:
                for q in range(lanes):
                    window[o + q] = 0.0


@njit(**_JIT)
def input_transform(x: np.ndarray, tile_row0: int, tile_row1: int, vf: np.ndarray,
                    plane: int, constants: np.ndarray, wide: bool) -> None:
    """V = B^T d B for the tiles of tile rows tile_row0..tile_row1 (tile row = n * H/4 +
    ty, W/4 tiles each, T of them in order), d the 6 x 6 window of x [N, H, W, C] under
    the tile (its rows 4 ty - 1 .. 4 ty + 4, zero beyond the image: the 'same' padding,
    without a padded copy of x; only the border tiles' windows are gathered first):
    V[xi][tile, c] at vf[xi * plane + tile * C + c]; vectors of 16 channels where ``wide``
    and C % 16 == 0, else 8 (C % 8 == 0). constants = (2, 4, 5, 0)."""
    _, height, width, c = x.shape
    tiles_h, tiles_w = height // TILE, width // TILE
    xf = x.ravel()
    lanes = 16 if wide and c % 16 == 0 else 8
    row = width * c  # floats from one image row to the next
    t = np.empty(PLANES * 16, dtype=np.float32)  # B^T d, [6 rows][6 columns][lanes]
    window = np.empty(PLANES * 16, dtype=np.float32)  # a border tile's window
    tile = 0
    for tr in range(tile_row0, tile_row1):
        n, ty = tr // tiles_h, tr % tiles_h
        for tx in range(tiles_w):
            y0, x0 = TILE * ty - 1, TILE * tx - 1  # the window's first row and column
            inside = 0 < ty < tiles_h - 1 and 0 < tx < tiles_w - 1
            base = ((n * height + y0) * width + x0) * c
            for ch in range(0, c, lanes):
                dst = (vf, tile * c + ch, plane)
                if inside:
                    src = (xf, base + ch, row, c)
                else:
                    _edge_window(xf, (height, width, c), (n, y0, x0), ch, lanes, window)
                    src = (window, 0, ALPHA * lanes, lanes)
                if lanes == 16:
                    _input_group((load16, store16, add16, sub16, mul16, fma16, splat16), 16,
                                 src, dst, t, constants)
                else:
                    _input_group((load8, store8, add8, sub8, mul8, fma8, splat8), 8, src, dst,
                                 t, constants)
            tile += 1


@njit(**_INLINE)
def _at(ops, m, k):
    """A^T applied to one line of six vectors m: 4 vectors. k: (2, 4, 8) as vectors."""
    _, _, add, sub, _, fma, _ = ops
    two, four, eight = k
    m0, m1, m2, m3, m4, m5 = m
    a, b = add(m1, m2), sub(m1, m2)
    c, d = add(m3, m4), sub(m3, m4)
    return (add(add(m0, a), c), fma(two, d, b), fma(four, c, a), add(fma(eight, d, b), m5))


@njit(**_INLINE)
def _output_group(ops, relu_op, lanes, src, dst, s, bias_constants):
    """y's 4 x 4 block of one tile's group of ``lanes`` channels = A^T M A + bias (ReLU'd
    if relu_op is given): M[xi] at src = (mf, i, plane) + xi plane, y at dst = (yf, top,
    row, k) (the block's first value, then a row and a pixel apart); s: scratch of 24
    vectors. bias_constants = (b, ch, relu, constants)."""
    load, store, add, _, _, _, splat = ops
    mf, i, plane = src
    yf, top, row, k = dst
    b, ch, relu, constants = bias_constants
    kk = (splat(constants, 0), splat(constants, 1), splat(constants, 2))
    for j in range(ALPHA):  # A^T M, one tile column at a time
        r = _at(ops, (load(mf, i + j * plane), load(mf, i + (ALPHA + j) * plane),
                      load(mf, i + (2 * ALPHA + j) * plane), load(mf, i + (3 * ALPHA + j) * plane),
                      load(mf, i + (4 * ALPHA + j) * plane),
                      load(mf, i + (5 * ALPHA + j) * plane)), kk)
        for q in range(TILE):
            store(s, (q * ALPHA + j) * lanes, r[q])
    bias = load(b, ch)
    for q in range(TILE):  # (A^T M) A + b, one output row at a time
        e = q * ALPHA * lanes
        r = _at(ops, (load(s, e), load(s, e + lanes), load(s, e + 2 * lanes),
                      load(s, e + 3 * lanes), load(s, e + 4 * lanes), load(s, e + 5 * lanes)), kk)
        o = top + q * row
        for p in range(TILE):
            out = add(r[p], bias)
            if relu:
                out = relu_op(out)
            store(yf, o + p * k, out)


@njit(**_JIT)
def output_transform(mf: np.ndarray, plane: int, b: np.ndarray, relu: bool, y: np.ndarray,
                     tile_row0: int, tile_row1: int, constants: np.ndarray, wide: bool) -> None:
    """y's 4 x 4 block under each tile of tile rows tile_row0..tile_row1 = A^T M A + b
    (ReLU'd if asked), M[xi][tile, k] at mf[xi * plane + tile * K + k]; vectors of 16
    channels where ``wide`` and K % 16 == 0, else 8 (K % 8 == 0). constants = (2, 4, 8)."""
    _, height, width, k = y.shape
    tiles_h, tiles_w = height // TILE, width // TILE
    yf = y.ravel()
    lanes = 16 if wide and k % 16 == 0 else 8
    s = np.empty(TILE * ALPHA * 16, dtype=np.float32)  # A^T M, [4 rows][6 columns][lanes]
    tile = 0
    for tr in range(tile_row0, tile_row1):
        n, ty = tr // tiles_h, tr % tiles_h
        for tx in range(tiles_w):
            top = ((n * height + TILE * ty) * width + TILE * tx) * k
            for ch in range(0, k, lanes):
                src, dst = (mf, tile * k + ch, plane), (yf, top + ch, width * k, k)
                rest = (b, ch, relu, constants)
                if lanes == 16:
                    _output_group((load16, store16, add16, sub16, mul16, fma16, splat16),
                                  relu16, 16, src, dst, s, rest)
                else:
                    _output_group((load8, store8, add8, sub8, mul8, fma8, splat8), relu8, 8,
                                  src, dst, s, rest)
            tile += 1


# V[xi] and M[xi] lie this many floats (a cache line) further apart than their size: at
# power-of-two sizes the 16 planes' loads and stores of one tile would otherwise all fall
# into the same few sets of L1 and L2 and evict each other
PLANE_PAD = 16


def plane_floats(tiles: int, channels: int) -> int:
    return tiles * channels + PLANE_PAD


def packed_offsets(k: int, wide: bool = packed.WIDE_BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """Where ``transform_and_pack_rows`` puts each group of 8 output channels (k = 8 g):
    the products read each plane's [C, K] packed per block of output channels (j0, width)
    as ``cpu_conv_packed.pack_weights`` packs [9C, K], one [C, width] slab a block, at
    C j0. The group's value of input channel c sits at C j0 + (k - j0) + c width of the
    plane; returned as (k - j0, width) per group."""
    base = np.empty(k // 8, dtype=np.int64)
    widths = np.empty(k // 8, dtype=np.int64)
    for j0, width in packed.channel_blocks(k, wide):
        for kk in range(j0, j0 + width, 8):
            base[kk // 8], widths[kk // 8] = kk - j0, width
    return base, widths


def transform_and_pack_rows(w_tk: np.ndarray, out: np.ndarray, offsets, c0: int,
                            c1: int) -> None:
    """Input channels c0..c1 of U = G g G^T (see ``transform_weights``), written straight
    into the products' packed layout (``packed_offsets``; out: 36 C K floats): a block of
    rows, the caller runs the blocks on its threads."""
    taps, k = w_tk.shape
    c = taps // 9
    base, widths = offsets
    w9 = np.ascontiguousarray(w_tk, dtype=np.float32).reshape(9, c * k)
    _transform_pack_rows(w9, _WEIGHT_TRANSFORM, base, widths, c, out, c0, c1)


@njit(**_JIT)
def _transform_pack_rows(w9, coefficients, base, widths, c, out, c0, c1):
    size = w9.shape[1]
    k = size // c
    wf, cf = w9.ravel(), coefficients.ravel()
    for ch in range(c0, c1):
        for g in range(k // 8):
            e = ch * k + 8 * g
            o = c * (8 * g - base[g]) + base[g] + ch * widths[g]  # C j0 + (k - j0) + c width
            for xi in range(PLANES):
                a = zeros8()
                for t in range(9):
                    if cf[9 * xi + t] != 0.0:
                        a = fma8(splat8(cf, 9 * xi + t), load8(wf, t * size + e), a)
                store8(out, xi * size + o, a)


@njit(**_INLINE)
def _product_block(vectors, spread, fma, store, width, arrays, at, geometry):
    """M[o : +pixels tiles, j0 : +width] = sum over c of V[tile, c] U[c, j0 : +width]:
    one register block, its sums in channel order from zero."""
    vf, uf, zero, mf = arrays
    vi, ui, o = at
    c, k = geometry
    a = spread(vectors(zero, uint64(0)))
    for t in range(c):
        a = fma(vf, vi + uint64(t), c, vectors(uf, ui + uint64(t) * uint64(width)), a)
    store(mf, o, k, a)


@njit(**_JIT)
def _one_tile(vf, uf, mf, vi, ui, o, c, block):
    """One tile x a block of channels, 8 at a time (blocks of tiles fewer than a block's)."""
    for q in range(block // uint64(8)):
        a = zeros8()
        for t in range(c):
            a = fma8(splat8(vf, vi + t), load8(uf, ui + t * block + uint64(8) * q), a)
        store8(mf, o + uint64(8) * q, a)


@njit(**_JIT)
def products(vf: np.ndarray, v_plane: int, u_packed: np.ndarray, c: int, k: int,
             tiles: int, mf: np.ndarray, m_plane: int, wide: bool) -> None:
    """M[xi] [tiles, K] = V[xi] [tiles, C] @ U[xi] [C, K] for the 36 xi, with the packed
    convolution's register blocks (the "pixels" are tiles, C floats apart in V, and the
    "taps" the C input channels): each output one chain of FMAs in channel order."""
    zero = np.zeros(64, dtype=np.float32)
    arrays = (vf, u_packed, zero, mf)
    cu, ku = uint64(c), uint64(k)
    geometry = (cu, ku)
    for xi in range(PLANES):
        v0, u0, m0 = uint64(xi * v_plane), uint64(xi * c * k), uint64(xi * m_plane)
        j0 = 0
        while j0 < k:  # one block of channels at a time: its slab of U stays in L1
            block = packed._block_width(k - j0, wide)
            pixels = packed._block_pixels(block, wide)
            ui = u0 + cu * uint64(j0)
            if tiles < pixels:
                for t0 in range(tiles):
                    _one_tile(vf, u_packed, mf, v0 + uint64(t0) * cu, ui,
                              m0 + uint64(t0) * ku + uint64(j0), cu, uint64(block))
                j0 += block
                continue
            t0 = 0
            while t0 < tiles:
                t0 = min(t0, tiles - pixels)  # the last block ends at the last tile
                at = (v0 + uint64(t0) * cu, ui, m0 + uint64(t0) * ku + uint64(j0))
                if block == 64:
                    _product_block(packed._vectors_4x16, packed._spread_4, fma_4x64,
                                   store_4x64, 64, arrays, at, geometry)
                elif block == 32:
                    _product_block(packed._vectors_2x16, packed._spread_8, fma_8x32,
                                   store_8x32, 32, arrays, at, geometry)
                elif wide and block == 16:
                    _product_block(packed._vectors_1x16, packed._spread_16, fma_16x16,
                                   store_16x16, 16, arrays, at, geometry)
                elif wide:
                    _product_block(packed._vectors_1x8, packed._spread_8, fma_8x8, store_8x8,
                                   8, arrays, at, geometry)
                elif block == 16:
                    _product_block(packed._vectors_2x8, packed._spread_6, packed._fma_6x16,
                                   packed._store_6x16, 16, arrays, at, geometry)
                else:
                    _product_block(packed._vectors_1x8, packed._spread_6, packed._fma_6x8,
                                   packed._store_6x8, 8, arrays, at, geometry)
                t0 += pixels
            j0 += block


_INPUT_CONSTANTS = np.array([2, 4, 5, 0], dtype=np.float32)
_DZ_CONSTANTS = np.array([2, 4, 1 / 4, -1 / 6, 1 / 24], dtype=np.float32)
_OUTPUT_CONSTANTS = np.array([2, 4, 8], dtype=np.float32)


def conv3x3_winograd_tile_rows(x, u_packed, b, relu, y, tile_row0, tile_row1, v, m,
                               wide=packed.WIDE_BLOCKS):
    """One block: y's image rows 4 tile_row0 .. 4 tile_row1 (of its N * H) from the input
    x [N, H, W, C] and the packed transformed weights (``transform_and_pack_rows``); v and
    m are flat scratch of at least 36 plane_floats(tiles, C) and 36 plane_floats(tiles, K)
    floats."""
    c, k = x.shape[3], y.shape[3]
    tiles = (tile_row1 - tile_row0) * (y.shape[2] // TILE)
    v_plane, m_plane = plane_floats(tiles, c), plane_floats(tiles, k)
    input_transform(x, tile_row0, tile_row1, v, v_plane, _INPUT_CONSTANTS, wide)
    products(v, v_plane, u_packed, c, k, tiles, m, m_plane, wide)
    output_transform(m, m_plane, b, relu, y, tile_row0, tile_row1, _OUTPUT_CONSTANTS, wide)


# ---- the weight gradient: dW[r, s][c, k] = sum over pixels p of x_pad[p + (r, s), c] dz[p, k].
# Over one 4 x 4 tile of dz and the 6 x 6 window of x under it, that is a 3 x 3 correlation
# of a 6 x 6 input with a 4 x 4 "filter" (dz's tile): Winograd's F(3x3, 4x4), with the
# same points and so the same B^T as the forward pass:
#
#     dW_tile = A_W^T [ (G_W dz G_W^T) * (B^T x B) ] A_W       (6 x 6 elementwise)
#
# and summed over tiles and channels, 36 products M[xi] [C, K] = V[xi]^T [C, tiles] @
# Z[xi] [tiles, K] (V the forward's input transform of x, Z = G_W dz G_W^T), then A_W^T M A_W
# once for the whole sum: 36 multiply-adds per tile of 16 pixels where the direct sum
# needs 144 (9 taps x 16 pixels), 4x fewer.
G_W = np.array([[1 / 4, 0, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6, 1 / 6],
                [1 / 24, 1 / 12, 1 / 6, 1 / 3],
                [1 / 24, -1 / 12, 1 / 6, -1 / 3],
                [0, 0, 0, 1]], dtype=np.float64)
A_W_T = np.array([[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 1]], dtype=np.float64)
# tiles per pass of the weight gradient's products: their V and Z planes stay in L2
WEIGHT_GRAD_TILES = 64
# the tile blocks (one partial sum of M each, added in block order): fixed, so the sums are
# split the same way on any machine
WEIGHT_GRAD_BLOCKS = 8


@njit(**_INLINE)
def _gw(ops, d, k):
    """G_W applied to one line of four vectors d (dz's tile column or row): 6 vectors. k:
    the constants (2, 4, 1/4, -1/6, 1/24) as vectors."""
    _, _, add, sub, mul, fma, _ = ops
    two, four, quarter, minus_sixth, twenty_fourth = k
    d0, d1, d2, d3 = d
    s02, s13 = add(d0, d2), add(d1, d3)
    u = fma(four, d2, d0)  # d0 + 4 d2
    v = mul(two, fma(four, d3, d1))  # 2 d1 + 8 d3
    return (mul(quarter, d0), mul(minus_sixth, add(s02, s13)), mul(minus_sixth, sub(s02, s13)),
            mul(twenty_fourth, add(u, v)), mul(twenty_fourth, sub(u, v)), d3)


@njit(**_INLINE)
def _dz_group(ops, lanes, src, dst, t, constants):
    """Z = G_W d G_W^T for one tile's group of ``lanes`` channels: d at src = (df, i, row,
    k), Z[xi] at dst = (zf, o, plane) + xi plane; t: scratch of 24 vectors."""
    load, store, _, _, _, _, splat = ops
    df, i, row, k = src
    zf, o, plane = dst
    kk = (splat(constants, 0), splat(constants, 1), splat(constants, 2), splat(constants, 3),
          splat(constants, 4))
    for j in range(TILE):  # G_W d, one tile column at a time
        e = i + j * k
        r = _gw(ops, (load(df, e), load(df, e + row), load(df, e + 2 * row),
                      load(df, e + 3 * row)), kk)
        for q in range(ALPHA):
            store(t, (q * TILE + j) * lanes, r[q])
    for q in range(ALPHA):  # (G_W d) G_W^T, one row at a time
        e = q * TILE * lanes
        r = _gw(ops, (load(t, e), load(t, e + lanes), load(t, e + 2 * lanes),
                      load(t, e + 3 * lanes)), kk)
        for j in range(ALPHA):
            store(zf, o + (ALPHA * q + j) * plane, r[j])


@njit(**_JIT)
def dz_transform(dz: np.ndarray, tile_row0: int, tile_row1: int, zf: np.ndarray, plane: int,
                 constants: np.ndarray, wide: bool) -> None:
    """Z = G_W d G_W^T for the 4 x 4 tiles d of dz [N, H, W, K] in tile rows tile_row0..
    tile_row1: Z[xi] at zf[xi * plane:], laid out per block of channels
    (``cpu_conv_packed.channel_blocks``) as [tiles, width] panels (block j0's at T j0), so
    that the products read each block's values as one run (in place, a tile's channels
    would be K floats apart: at K = 256, 1 KB, L1's sets collide). Vectors of 16 channels
    in blocks of 16 or more where ``wide``, else 8."""
    _, height, width, k = dz.shape
    tiles_h, tiles_w = height // TILE, width // TILE
    tiles = (tile_row1 - tile_row0) * tiles_w
    df = dz.ravel()
    row = width * k
    t = np.empty(ALPHA * TILE * 16, dtype=np.float32)  # G_W d, [6 rows][4 columns][lanes]
    j0 = 0
    while j0 < k:
        block = packed._block_width(k - j0, wide)
        lanes = 16 if wide and block % 16 == 0 else 8
        tile = 0
        for tr in range(tile_row0, tile_row1):
            n, ty = tr // tiles_h, tr % tiles_h
            for tx in range(tiles_w):
                base = ((n * height + TILE * ty) * width + TILE * tx) * k
                for ch in range(j0, j0 + block, lanes):
                    src = (df, base + ch, row, k)
                    dst = (zf, tiles * j0 + tile * block + (ch - j0), plane)
                    if lanes == 16:
                        _dz_group((load16, store16, add16, sub16, mul16, fma16, splat16), 16,
                                  src, dst, t, constants)
                    else:
                        _dz_group((load8, store8, add8, sub8, mul8, fma8, splat8), 8, src,
                                  dst, t, constants)
                tile += 1
        j0 += block


# register_blocks' 4-row blocks of 8 lanes take their operand vectors one by one
@njit(**_INLINE)
def _fma_4x16(xf, i, c, w, a):
    return fma_4x16(xf, i, w[0], w[1], a)


@njit(**_INLINE)
def _fma_4x8(xf, i, c, w, a):
    return fma_4x8(xf, i, w[0], a)


@njit(**_INLINE)
def _grad_block(vectors, fma, load, store, width, arrays, at, geometry, first):
    """M[c0 : +rows, j0 : +width] += sum over the pass's tiles t of V[t, c0 + r] Z[t, j0:]:
    one register block (rows of M: consecutive channels of V, broadcast; columns: a
    block's panel of Z), resumed from M unless it is the first pass."""
    vf, zf, mf, zero = arrays
    vi, zi, o = at
    c, k, tiles = geometry
    if first:
        a = load(zero, uint64(0), uint64(0))
    else:
        a = load(mf, o, k)
    one = uint64(1)
    for t in range(tiles):
        a = fma(vf, vi + uint64(t) * c, one, vectors(zf, zi + uint64(t) * uint64(width)), a)
    store(mf, o, k, a)


@njit(**_JIT)
def weight_grad_products(vf: np.ndarray, v_plane: int, zf: np.ndarray, z_plane: int, c: int,
                         k: int, tiles: int, mf: np.ndarray, first: bool, wide: bool) -> None:
    """M[xi] [C, K] (+)= V[xi]^T @ Z[xi] over this pass's tiles, for the 36 xi (M at
    mf[xi C K:], row-major); each element one chain of FMAs, over the tiles in order."""
    zero = np.zeros(64, dtype=np.float32)  # a block's starting sums, read as a block
    arrays = (vf, zf, mf, zero)
    cu, ku = uint64(c), uint64(k)
    geometry = (cu, ku, tiles)
    for xi in range(PLANES):
        v0, z0, m0 = uint64(xi * v_plane), uint64(xi * z_plane), uint64(xi * c * k)
        j0 = 0
        while j0 < k:
            block = packed._block_width(k - j0, wide)
            zi = z0 + uint64(tiles * j0)
            for c0 in range(0, c, 4 if (block == 64 or not wide) else 8):
                at = (v0 + uint64(c0), zi, m0 + uint64(c0) * ku + uint64(j0))
                if wide and block == 64:
                    _grad_block(packed._vectors_4x16, fma_4x64, load_4x64, store_4x64, 64,
                                arrays, at, geometry, first)
                elif wide and block == 32:
                    _grad_block(packed._vectors_2x16, fma_8x32, load_8x32, store_8x32, 32,
                                arrays, at, geometry, first)
                elif wide and block == 16:
                    _grad_block(packed._vectors_2x8, fma_8x16, load_8x16, store_8x16, 16,
                                arrays, at, geometry, first)
                elif wide:
                    _grad_block(packed._vectors_1x8, fma_8x8, load_8x8, store_8x8, 8, arrays,
                                at, geometry, first)
                elif block == 16:
                    _grad_block(packed._vectors_2x8, _fma_4x16, load_4x16, store_4x16, 16,
                                arrays, at, geometry, first)
                else:
                    _grad_block(packed._vectors_1x8, _fma_4x8, load_4x8, store_4x8, 8, arrays,
                                at, geometry, first)
            j0 += block


@njit(**_INLINE)
def _aw(ops, m, k):
    """A_W^T applied to one line of six vectors m: 3 vectors. k: (2, 4) as vectors."""
    _, _, add, sub, _, fma, _ = ops
    two, four = k
    m0, m1, m2, m3, m4, m5 = m
    a, b = add(m1, m2), sub(m1, m2)
    c, d = add(m3, m4), sub(m3, m4)
    return add(add(m0, a), c), fma(two, d, b), add(fma(four, c, a), m5)


@njit(**_INLINE)
def _weight_grad_group(ops, lanes, mf, e, plane, of, s, constants):
    """dW_tk's 9 taps of the ``lanes`` (c, k) pairs at flat [C, K] index e."""
    load, store, _, _, _, _, splat = ops
    kk = (splat(constants, 0), splat(constants, 1))
    for j in range(ALPHA):
        r = _aw(ops, (load(mf, e + j * plane), load(mf, e + (ALPHA + j) * plane),
                      load(mf, e + (2 * ALPHA + j) * plane), load(mf, e + (3 * ALPHA + j) * plane),
                      load(mf, e + (4 * ALPHA + j) * plane),
                      load(mf, e + (5 * ALPHA + j) * plane)), kk)
        for q in range(3):
            store(s, (q * ALPHA + j) * lanes, r[q])
    for q in range(3):
        b = q * ALPHA * lanes
        r = _aw(ops, (load(s, b), load(s, b + lanes), load(s, b + 2 * lanes),
                      load(s, b + 3 * lanes), load(s, b + 4 * lanes), load(s, b + 5 * lanes)), kk)
        for p in range(3):  # tap (q, p): rows (3 q + p) C + c of dW_tk
            store(of, (3 * q + p) * plane + e, r[p])


def weight_grad_output(m: np.ndarray, c: int, k: int, wide: bool = packed.WIDE_BLOCKS
                       ) -> np.ndarray:
    """dW_tk [9C, K] (tap (r, s, c) major) = A_W^T M A_W from the products' sum M [36 C K]."""
    out = np.empty((9 * c, k), dtype=np.float32)
    _weight_grad_output(m, c, k, out, _OUTPUT_CONSTANTS, wide)
    return out


@njit(**_JIT)
def _weight_grad_output(mf: np.ndarray, c: int, k: int, out: np.ndarray,
                        constants: np.ndarray, wide: bool) -> None:
    """dW_tk [9C, K] (tap (r, s, c) major) = A_W^T M A_W for every (c, k), M [36, C, K]:
    16 pairs a vector where ``wide`` and K % 16 == 0, else 8."""
    of = out.ravel()
    plane = c * k
    lanes = 16 if wide and k % 16 == 0 else 8
    s = np.empty(3 * ALPHA * 16, dtype=np.float32)
    for e in range(0, plane, lanes):
        if lanes == 16:
            _weight_grad_group((load16, store16, add16, sub16, mul16, fma16, splat16), 16, mf,
                               e, plane, of, s, constants)
        else:
            _weight_grad_group((load8, store8, add8, sub8, mul8, fma8, splat8), 8, mf, e,
                               plane, of, s, constants)


def weight_grad_tile_rows(x, dz, tile_row0, tile_row1, m, v, z, wide=packed.WIDE_BLOCKS):
    """m [36 C K] = the products' sum over the tiles of tile rows tile_row0..tile_row1, in
    passes of WEIGHT_GRAD_TILES tiles (v, z: scratch of 36 plane_floats(pass tiles, C or
    K) floats)."""
    c, k = x.shape[3], dz.shape[3]
    per_row = dz.shape[2] // TILE
    rows_per_pass = max(1, WEIGHT_GRAD_TILES // per_row)
    for t0 in range(tile_row0, tile_row1, rows_per_pass):
        t1 = min(tile_row1, t0 + rows_per_pass)
        tiles = (t1 - t0) * per_row
        v_plane, z_plane = plane_floats(tiles, c), plane_floats(tiles, k)
        input_transform(x, t0, t1, v, v_plane, _INPUT_CONSTANTS, wide)
        dz_transform(dz, t0, t1, z, z_plane, _DZ_CONSTANTS, wide)
        weight_grad_products(v, v_plane, z, z_plane, c, k, tiles, m, t0 == tile_row0, wide)


def _main() -> None:  # pragma: no cover - a timing script
    import time

    from nodulekit.engine.cpu import CPUBackend

    def best_ms(f):
        f()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    rng = np.random.default_rng(0)
    backends = {"direct": CPUBackend(conv_variant="packed"),
                "winograd": CPUBackend(conv_variant="winograd")}
    print("3x3 convolutions, both threads, best of 7; GFLOP/s count the direct FLOPs")
    for n, h, c, k in [(4, 256, 32, 32), (4, 256, 64, 32), (4, 128, 64, 64),
                       (4, 64, 128, 128), (4, 32, 256, 256), (8, 128, 16, 16)]:
        x = rng.standard_normal((n, h, h, c), dtype=np.float32)
        w = (rng.standard_normal((k, 3, 3, c)) / np.sqrt(9 * c)).astype(np.float32)
        dz = rng.standard_normal((n, h, h, k), dtype=np.float32)
        bias = np.zeros(k, dtype=np.float32)
        gflop = 2 * n * h * h * 9 * c * k / 1e9
        line = []
        for name, be in backends.items():
            forward = best_ms(lambda be=be, a=(x, w, bias): be.conv2d_forward(*a, True))
            grad = best_ms(lambda be=be, a=(dz, x, w, dz): be.conv2d_backward(*a, False, False))
            line.append(f"{name} forward {forward:.2f} ms ({gflop / forward * 1e3:.0f}), "
                        f"weight gradient {grad:.2f} ({gflop / grad * 1e3:.0f})")
        print(f"{n} x {h} x {h}, {c} -> {k}: " + "; ".join(line))


if __name__ == "__main__":  # pragma: no cover
    _main()
