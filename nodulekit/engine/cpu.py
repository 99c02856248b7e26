"""The CPU backend: NumPy + Numba, float32.

Convolutions come in three versions (:data:`CONV_VARIANTS`, named by technique in the
vocabulary the CUDA backend shares), chosen per shape (``conv_variant='auto'``) or named:

- ``patches_gemm``: patches (im2col) times OpenBLAS SGEMM, one block of output pixels
  at a time so the patch matrix stays small (it would be 9*C floats per pixel for the
  whole batch) and warm in cache when the GEMM reads it. In NHWC a patch row is three
  straight copies and the GEMM's output is already the NHWC output, so nothing is
  transposed. Kept for the shapes the others do not take (K % 8 != 0).
- ``register_blocked`` (``cpu_conv.py``, ``cpu_upconv.py``): no patch matrix; 6 pixels
  x 16 output channels accumulate in vector registers. Best where K is small (BLAS
  reaches half the FMA peak at 16 output columns) and image rows are long: the top levels.
- ``packed`` (``cpu_conv_packed.py``): x copied once into a zero-bordered buffer (no border
  pixels left), the weights packed per block of output channels, and a register block
  sized to the core's vector registers (4 pixels x 64 channels in 16-lane vectors with
  AVX-512). Best from C x K = 64 x 32 on, and on short rows: every deeper level, forward,
  data and weight gradients. Its weight gradient with K or C <= 16, where 16-lane FMAs
  run at full width, is vectorised over the taps instead of the output channels
  (``cpu_weight_grad_taps.py``: 48 consecutive taps of the padded input x 8 channels).
  The up-convolution's version 3 (``cpu_upconv_packed.py``) runs the same register blocks
  along image rows (each (a, b) a 1x1 convolution whose outputs land two pixels apart):
  every up-convolution with 16 or more output channels.

The backward pass reuses the forward machinery:

- dW = (patches(x)^T @ dZ)^T                   (summed per block of pixels, in order)
- dX = patches(dZ) @ W_flipped                 (a 'same' convolution of dZ with the
                                                 kernel rotated 180 degrees, C and K swapped)

so there is no scatter (col2im). The ReLU's mask and the bias gradient are fused into one
pass over dY. Everything else is a single Numba loop (``cpu_kernels.py``). Blocks run on
the backend's own threads (``cpu_workers.py``); every sum is split the same way whatever
the threads do, so results are bit-identical from run to run.
"""

from __future__ import annotations

import numpy as np

from nodulekit.engine import (
    cpu_conv,
    cpu_conv_packed,
    cpu_conv_winograd,
    cpu_norm,
    cpu_upconv,
    cpu_upconv_packed,
    cpu_weight_grad_taps,
    fma_width,
)
from nodulekit.engine import cpu_kernels as kern
from nodulekit.engine.cpu_workers import Workers
from nodulekit.engine.ops import AIR_HU, Backend
from nodulekit.engine.simd import aligned_copy, aligned_empty

# One job's block of the patch matrix: about this many bytes. Fewer, larger blocks cost
# less Python per step (a step runs ~3,000 blocks at 256 KiB); measured here (2-core EPYC,
# 512 KiB L2 per core) 1 MiB was as fast or faster than 256 and 512 KiB, and 2-4 MiB no better.
PATCH_BLOCK_BYTES = 1 << 20


# version 3 of the up-convolution splits its columns in four where its weights pass this
UPCONV_WEIGHTS_WHOLE_BYTES = 512 << 10

# the packed weight gradient's row blocks (one partial sum each); fixed, so the sums are
# split the same way on any machine
WEIGHT_GRAD_BLOCKS = 16


def _block_rows(columns: int) -> int:
    """Rows of a block of that many float32 columns (Workers.plan sets the bounds)."""
    return PATCH_BLOCK_BYTES // (4 * max(columns, 1))


# The 3x3 convolutions' blocks of image rows (forward and data gradient, register_blocked
# and packed): as large as Workers.plan allows (16 blocks a call, whatever the thread
# count), so a block of output channels keeps its weight slab in the core's cache over
# more rows. Each output pixel is summed on its own, so the split does not change a bit.
# Measured on the 2-core Xeon (family 6 model 207), against 1 MiB, in turns: one deep
# forward (4 x 64 x 64, 256 -> 128) 291 against 247 GFLOP/s; the width-32 step (4 x 256 x
# 256) 1373-1385 against 1420-1440 ms; whole-slice inference 2-4% faster; the demo's step
# the same.
CONV_BLOCK_BYTES = 16 << 20


def _conv_block_rows(columns: int) -> int:
    return CONV_BLOCK_BYTES // (4 * max(columns, 1))


# The convolution versions (3x3 convolutions and the 2x2 up-convolution's GEMMs), named
# by technique in the vocabulary cuda.CONV_VARIANTS explains and shares: register_blocked
# is the same technique (an implicit GEMM whose outputs stay in registers as a block of
# outer-product sums) on either device; patches_gemm (im2col + BLAS) exists only here.
# 'auto' (the default) picks one per shape; naming one uses it wherever it applies
# (``nodulekit bench ops --op conv --variants all`` times each against torch).
CONV_VARIANTS = {
    "patches_gemm": "patches (im2col, straight copies in NHWC) + OpenBLAS SGEMM",
    "register_blocked": "6 pixels x 16 channels in vector registers, no patch matrix "
                        "(cpu_conv.py); needs K % 8 == 0",
    "packed": "zero-padded input, weights packed per block of channels, 4 x 64 register "
              "blocks of 16 lanes with AVX-512 (6 x 16 of 8 without) (cpu_conv_packed.py); "
              "3x3 forward, data and weight gradients (with K or C <= 16 on cores with "
              "full-width 16-lane FMAs: vectorised over taps, cpu_weight_grad_taps.py); "
              "needs K % 8 == 0; the up-convolution in the same blocks along image rows "
              "(cpu_upconv_packed.py)",
    "winograd": "Winograd's F(4x4, 3x3) (forward, data gradient) and F(3x3, 4x4) (weight "
                "gradient): 4x fewer multiply-adds, as 36 products between transforms "
                "(cpu_conv_winograd.py); H and W multiples of 4, C and K of 8",
}


def _packed_conv(variant: str, c: int, k: int, width: int) -> bool:
    """packed (``cpu_conv_packed``) for a 3x3 forward pass (or data gradient)?

    'auto', measured per shape on the 2-core Zen 4 (AVX-512 blocks; one core alone and
    ``bench ops --op conv --variants all``): packed ran at 107-116 GFLOP/s a core wherever
    C x K >= 64 x 32 or the rows are short, against 48-109 for register_blocked (its border
    pixels and strided weights) and ~80 for patches_gemm. On long rows with few channels
    (32 -> 32 at 128 x 128 and wider; 8 or 16 channels) its padded copy of x costs more
    than it saves, and register_blocked stays. (On 8-pixel rows with 256 channels,
    ``bench ops`` had patches_gemm ahead, 2.4 against 3.1 ms, while timed alone in turns
    packed was, 1.97 against 2.40 ms; the training step took the same either way, 79.0
    and 78.9 ms at the demo's shape.)

    Where 16-lane FMAs run at full width (``fma_width``: measured once per machine), packed
    also takes every layer of >= 32 channels in and out, and those of 16 out from 16 in:
    there register_blocked's 8-lane blocks do half the work per instruction. Measured on a
    2-core Xeon (family 6 model 207, both threads, 4 images): 32 -> 32 at 256 x 256 22
    against 29 ms, 64 -> 32 43 against 52, 32 -> 64 and 64 -> 64 at 128 x 128 12 and 22
    against 15 and 27; 8 images, 16 -> 16 at 128 x 128 2.8 against 3.2 ms, 32 -> 16 at
    64 x 64 1.4 against 1.6 (the 16 x 16 block of 16 lanes). With 8 channels in or out
    packed's 8-lane blocks were 1.1-1.5x slower there too.
    """
    if variant != "auto":
        return variant == "packed" and cpu_conv_packed.supports(c, k)
    if not cpu_conv_packed.supports(c, k) or c == 1 or width < 8:
        return False
    if width <= 16 or c * k >= 128 * 64 or (c * k >= 64 * 32 and width <= 64):
        return True
    return (c >= 16 and (k >= 32 and c >= 32 or k == 16)
            and cpu_conv_packed.WIDE_BLOCKS and fma_width.full_width())


def _winograd_conv(variant: str, c: int, k: int, height: int, width: int,
                   images: int) -> bool:
    """winograd (``cpu_conv_winograd``: F(4x4, 3x3)) for a 3x3 forward pass (or data
    gradient)?

    'auto', measured on the 2-core Xeon (family 6 model 207, both threads, each shape in
    turns with the direct versions): 0.58-0.70x their time wherever both channel counts are
    >= 16, one of them >= 32, and the image holds >= 128 tiles of 4 x 4 (8 x 64 x 64, 16 ->
    32: 1.17 against 1.95 ms; 8 x 32 x 32, 64 -> 64: 1.37 against 2.35; 4 x 128 x 128, 64
    -> 64: 8.3 against 17.9; 4 x 32 x 32, 512 -> 256: 0.62x of 41 ms); 0.8-1.0x at 128
    tiles of 128 channels. Slower on fewer tiles (8 x 8 x 8, 256 -> 256: 5.5 against 3.0
    ms; 4 x 16 x 16, 512 -> 512: 1.3x of 22 ms), where the weights' transform and the
    short products cost more than they save, and with 8 or 16 channels in and out (16 ->
    16 at 128 x 128: 1.26x; the transforms' additions outweigh the products).
    """
    if not cpu_conv_winograd.supports(c, k, height, width):
        return False
    if variant != "auto":
        return variant == "winograd"
    tiles = images * (height // cpu_conv_winograd.TILE) * (width // cpu_conv_winograd.TILE)
    return min(c, k) >= 16 and max(c, k) >= 32 and tiles >= 128


def _winograd_weight_grad(variant: str, c: int, k: int, height: int, width: int,
                          images: int) -> bool:
    """winograd's weight gradient (F(3x3, 4x4), ``cpu_conv_winograd``)?

    'auto', measured as `_winograd_conv`: 0.59-0.81x the direct kernels' time wherever both
    channel counts are >= 32 and the image holds >= 128 tiles (4 x 256 x 256, 64 -> 32:
    39.6 against 67.2 ms; 4 x 64 x 64, 128 -> 128: 14.7 against 22.6; 8 x 64 x 64, 32 ->
    32: 2.5 against 3.1), 0.89-0.96x at 4 x 32 x 32 with 512 and 256 channels; slower with
    16 or 8 channels (16 -> 32 at 64 x 64: 1.12x; 16 -> 8 at 128 x 128: 2.1x, where
    cpu_weight_grad_taps is quick) and on few tiles (4 x 16 x 16, 512 -> 512: 1.3-1.6x).
    """
    if not cpu_conv_winograd.supports(c, k, height, width):
        return False
    if variant != "auto":
        return variant == "winograd"
    tiles = images * (height // cpu_conv_winograd.TILE) * (width // cpu_conv_winograd.TILE)
    return min(c, k) >= 32 and tiles >= 128 and c * k <= 512 * 256


def _register_blocked_conv(variant: str, c: int, k: int, width: int) -> bool:
    """register_blocked (``cpu_conv``) rather than patches_gemm for a 3x3 forward pass?

    'auto' was measured per shape on the 2-core EPYC (``bench ops --op conv --variants
    all``): register_blocked is 1.1-2.9x faster where K <= 64 and image rows are long
    (16-pixel rows too while C <= 64), and slower on the deep layers, where BLAS does well
    and an 8- or 16-pixel row is mostly border.
    """
    if variant == "patches_gemm" or not cpu_conv.supports(c, k):
        return False
    return variant == "register_blocked" or (
        k <= 64 and (width >= 32 or c == 1 or (width >= 16 and c <= 64)))


def _packed_weight_grad(variant: str, c: int, k: int) -> bool:
    # 'auto', measured on the 2-core Zen 4 (both threads, padding included): packed's
    # weight gradient took 0.35-0.70x register_blocked's time from C x K = 32 x 32 up (the
    # deeper, the larger the gain: 512 -> 512 at 16 x 16, 25 against 72 ms), and as long or
    # longer below (8 -> 8: 1.30 against 1.22 ms; 16 -> 16: 1.11 against 0.89 ms)
    if variant not in ("auto", "packed") or not cpu_conv_packed.supports(c, k):
        return False
    return variant == "packed" or c * k >= 32 * 32


def _taps_weight_grad(variant: str, c: int, k: int) -> bool:
    # 'auto' (and 'packed', whose padded input it shares), where 16-lane FMAs run at full
    # width, for K <= 16 or C <= 16: there the other kernels' blocks are one or two 8-lane
    # vectors of output channels wide, or register_blocked's latency-bound 4 x 16 (C x K <
    # 32 x 32). Measured on the 2-core Xeon (family 6 model 207), one core, 8 images:
    # 8 -> 8 at 128 x 128 123-144 GFLOP/s against register_blocked's 52-59 and packed's
    # 61-66; 16 -> 16 at 64 x 64 164-177 against 57-62 and 74-90; 32 -> 16 161-176 against
    # 57-61 and 77-86. Both threads, with the padding: 16 -> 32 at 32 x 32 0.40-0.46 ms
    # against register_blocked's 0.80-0.97, 16 -> 64 0.63-0.71 against 1.66-1.87. From
    # 32 x 32 channels on it is level with packed (4 x 256 x 256, 32 -> 32: 146-156 GFLOP/s
    # against 144-155 on one core), which keeps them. Its 24 sums of 16 lanes need 32
    # vector registers.
    if variant not in ("auto", "packed") or not cpu_weight_grad_taps.supports(c, k):
        return False
    return ((k <= 16 or c <= 16) and cpu_conv_packed.WIDE_BLOCKS
            and fma_width.full_width())


def _register_blocked_weight_grad(variant: str, c: int, k: int, width: int) -> bool:
    # 'auto': register_blocked's weight gradient is 1.0-4.5x faster up to 128 x 128
    # channels and rows of >= 16 pixels
    if variant == "patches_gemm" or not cpu_conv.supports(c, k):
        return False
    return variant == "register_blocked" or (c * k <= 128 * 128 and width >= 16)


def _register_blocked_upconv_forward(variant: str, c: int, k: int) -> bool:
    # 'auto': register_blocked (``cpu_upconv``) up to C x K = 128 x 64; deeper, BLAS was
    # faster
    if variant == "patches_gemm" or k % 8:
        return False
    return variant == "register_blocked" or c * k <= 128 * 64


def _upconv_parts(c: int, k: int, by_channels: bool = False) -> int:
    """Version 3's parts of the columns: 4 where the weights (16 C K bytes) would not stay
    in a core's L2 over a job's rows, so that each job streams a quarter of them. The
    forward's parts are (a, b) positions; the data gradient's (by_channels) are runs of C
    input channels, which must fall on whole 64-channel blocks."""
    if 16 * c * k <= UPCONV_WEIGHTS_WHOLE_BYTES:
        return 1
    return 4 if not by_channels or c % 256 == 0 else 1


def _per_block_partials(k: int, rows: int, blocks: int) -> bool:
    # the up-convolution's weight gradient as one partial [4K, C] per block of pixels,
    # added in order (versions 2 and 3), while those partials stay small next to the data
    return blocks * 4 * k < rows


def _packed_upconv(variant: str, k: int) -> bool:
    # version 3 (``cpu_upconv_packed``), where its K % 8 (and, backward, C % 8) holds:
    # 'packed' always; 'auto' from 16 output channels (with 8, one 8-lane vector a pixel,
    # version 2's 6-pixel blocks measured as fast or faster: 0.85 against 1.1 ms forward
    # at 8 x 64 x 64, 16 -> 8, on the Xeon; the same bits either way)
    return variant == "packed" or (variant == "auto" and k >= 16)


def _register_blocked_upconv_backward(variant: str, c: int, k: int, rows: int,
                                      blocks: int) -> bool:
    # 'auto': register_blocked while its per-block weight-gradient partials stay small next
    # to the data
    if variant == "patches_gemm" or c % 16:
        return False
    return variant == "register_blocked" or _per_block_partials(k, rows, blocks)


def _upconv_weight_and_bias_grads(dw_abkc: np.ndarray, dcat: np.ndarray, ca: int):
    """(dW [K, 2, 2, C] from its [(a, b, k), C] sum, db: the column sums of the concat
    gradient's up-convolution channels, ca on)."""
    four_k, c = dw_abkc.shape
    k = four_k // 4
    dw = np.ascontiguousarray(dw_abkc.reshape(2, 2, k, c).transpose(2, 0, 1, 3))
    d2d = dcat.reshape(-1, dcat.shape[3])
    db_partial = np.empty((_reduction_blocks(d2d.shape[0]), k), dtype=np.float32)
    kern.column_sums(d2d, ca, db_partial)
    return dw, db_partial.sum(axis=0)


def _reduction_blocks(rows: int) -> int:
    # enough partial sums to keep both cores busy, few enough to add up cheaply
    return max(1, min(64, rows // 1024))


def kernel_choices() -> dict:
    """What picks this machine's convolution kernels, for the records of runs and
    benchmarks: a run on a machine with other choices sums in another order."""
    wide = cpu_conv_packed.WIDE_BLOCKS
    out = {"32_register_blocks": wide}
    if wide:
        decided = fma_width.decide()
        out["fma_16_lanes_full_width"] = bool(decided["full_width"])
        out["decided_by"] = decided["source"]
    return out


_WORKERS: dict[int | None, Workers] = {}


def _shared_workers(threads: int | None) -> Workers:
    if threads not in _WORKERS:
        _WORKERS[threads] = Workers(threads)
    return _WORKERS[threads]


class CPUBackend(Backend):
    name = "cpu"
    xp = np
    dtype = np.dtype(np.float32)
    # Which kernels the op calls ran, for `nodulekit profile` (a list while it records, else
    # None): the names of cpu.CONV_VARIANTS, plus "taps" (cpu_weight_grad_taps), "1x1" and
    # the up-convolution's versions; a backward call's entries start with "dW" or "dx".
    kernel_log: list | None = None
    _note_prefix = ""

    def _note(self, kernel: str) -> None:
        if self.kernel_log is not None:
            self.kernel_log.append(self._note_prefix + kernel)

    def _note_norm(self, name: str, x: np.ndarray, block: int | None = None) -> None:
        """A normalisation pass: serial or parallel (cpu_norm runs small tensors on the
        calling thread), and the sums' block; formatted only while a profile listens."""
        if self.kernel_log is None:
            return
        way = "serial" if x.size < cpu_norm.SERIAL_ELEMENTS else "parallel"
        self._note(f"{name} ({way})" if block is None else
                   f"{name} ({way}, blocks of {block} px)")

    def __init__(self, precision: str = "fp32", threads: int | None = None,
                 conv_variant: str = "auto"):
        if precision != "fp32":
            raise ValueError(f"the cpu backend computes in fp32 only; got precision={precision!r}")
        if conv_variant != "auto" and conv_variant not in CONV_VARIANTS:
            raise ValueError(f"unknown cpu convolution variant {conv_variant!r}; choose auto, "
                             f"{', '.join(CONV_VARIANTS)}")
        self.precision = precision
        self.conv_variant = conv_variant
        # the variant of everything winograd does not do (weight gradients, up-convolutions,
        # 3x3 layers of odd sizes or channels): it leaves them to 'auto'
        self.direct_variant = "auto" if conv_variant == "winograd" else conv_variant
        self.workers = _shared_workers(threads)

    # ------------------------------------------------------------------ convolution
    def _conv(self, x, w2d, r_size, b, relu, out2d, then=None):
        """out2d[M, K] = epilogue(patches(x) @ w2d^T + b), one block of pixels per job.

        Per block of mb pixels: cols [mb, R*R*C] = patches (straight copies in NHWC);
        out2d[block] = cols @ w2d^T (SGEMM, written in place: NHWC is [pixels, K]);
        then bias and ReLU over the block while it is still in cache, and ``then(m0, m1)``
        (if given) on the block's rows out2d[m0:m1] (the norm of `conv2d_bn_eval_forward`).
        """
        if then is None:
            def then(m0, m1):
                pass

        n, h, w, c = x.shape
        rows = n * h * w
        k = w2d.shape[0]
        w2t = w2d.T  # a transposed view: BLAS reads it as is (no copy of a 2.4 MB weight)
        if r_size == 3 and _winograd_conv(self.conv_variant, c, k, h, w, n):
            self._note("winograd")
            return self._conv_winograd(x, w2t, b, relu, out2d, then)
        if r_size == 3 and _packed_conv(self.direct_variant, c, k, w):
            self._note("packed")
            return self._conv_packed(x, w2t, b, relu, out2d, then)
        if r_size == 3 and _register_blocked_conv(self.direct_variant, c, k, w):
            self._note("register_blocked")
            w_tk = aligned_copy(w2t)  # [9C, K]; small wherever register_blocked is
            y = out2d.reshape(n, h, w, k)

            def image_rows(m0, m1, _):
                cpu_conv.conv3x3_rows(x, w_tk, b, relu, y, m0 // w, m1 // w)
                then(m0, m1)

            self.workers.run(image_rows, rows, _conv_block_rows(r_size * r_size * c), align=w)
            return out2d
        if r_size == 1:
            self._note("1x1 (BLAS rows)")
            x2d = x.reshape(rows, c)
            # one input channel (the head's data gradient): an outer product, not a GEMM
            product = np.multiply if c == 1 else np.matmul

            def job1(m0, m1, _):
                product(x2d[m0:m1], w2t, out=out2d[m0:m1])
                kern.bias_relu_rows(out2d, b, relu, m0, m1)
                then(m0, m1)

            self.workers.run(job1, rows, _block_rows(c + k))
            return out2d
        self._note("patches_gemm")
        cols_n = r_size * r_size * c
        step, _ = self.workers.plan(rows, _block_rows(cols_n))
        scratch = self.workers.scratch("patches", [((step, cols_n), np.float32)])

        def job(m0, m1, worker):
            cols = scratch[worker][0][: m1 - m0]
            kern.im2col_rows(x, m0, m1, r_size, cols)
            np.matmul(cols, w2t, out=out2d[m0:m1])
            kern.bias_relu_rows(out2d, b, relu, m0, m1)
            then(m0, m1)

        self.workers.run(job, rows, step)
        return out2d

    def _conv_packed(self, x, w_tk, b, relu, out2d, then):
        """out2d = relu?(conv3x3(x) + b) with ``cpu_conv_packed``: x copied into a zero-padded
        buffer, the weights packed, then blocks of image rows on the threads (``then`` as
        in `_conv`)."""
        n, h, w, c = x.shape
        k = w_tk.shape[1]
        wide = cpu_conv_packed.WIDE_BLOCKS
        w_packed = cpu_conv_packed.pack_weights(w_tk, wide)
        xp = self._pad(x)
        y = out2d.reshape(n, h, w, k)

        def image_rows(m0, m1, _):
            cpu_conv_packed.conv3x3_packed_rows(xp, w_packed, b, relu, y, m0 // w, m1 // w,
                                                wide)
            then(m0, m1)

        self.workers.run(image_rows, n * h * w, _conv_block_rows(9 * c), align=w)
        return out2d

    def _conv_winograd(self, x, w_tk, b, relu, out2d, then):
        """out2d = relu?(conv3x3(x) + b) with ``cpu_conv_winograd``: the weights transformed,
        then blocks of tile rows (four image rows each) on the threads (``then`` as in
        `_conv`)."""
        n, h, w, c = x.shape
        k = w_tk.shape[1]
        wide = cpu_conv_packed.WIDE_BLOCKS
        u = self._winograd_weights(w_tk, wide)
        y = out2d.reshape(n, h, w, k)
        # blocks of whole tile rows, counted in tiles so that Workers.plan's smallest block
        # (64 rows) is 64 tiles, not 64 tile rows
        wg = cpu_conv_winograd
        per_row, tiles = w // wg.TILE, n * h // wg.TILE * (w // wg.TILE)
        step, _ = self.workers.plan(tiles, wg.tile_rows_per_block(w) * per_row, align=per_row,
                                    blocks_at_least=wg.BLOCKS_AT_LEAST)
        scratch = self.workers.scratch(
            "winograd", [((wg.PLANES * wg.plane_floats(step, c),), np.float32),
                         ((wg.PLANES * wg.plane_floats(step, k),), np.float32)])

        def tile_rows(m0, m1, worker):
            v, m = scratch[worker]
            t0, t1 = m0 // per_row, m1 // per_row
            wg.conv3x3_winograd_tile_rows(x, u, b, relu, y, t0, t1, v, m, wide)
            then(wg.TILE * t0 * w, wg.TILE * t1 * w)

        self.workers.run(tile_rows, tiles, step, align=per_row,
                         blocks_at_least=cpu_conv_winograd.BLOCKS_AT_LEAST)
        return out2d

    def _gram(self, b2d, rows, width, step, a2d=None, fill=None):
        """A^T @ b2d -> [width, B]: a weight gradient, summed over all pixels (rows).

        A [rows, width] is given (a2d) or written block by block by fill(m0, m1, out) (the
        patch matrix, never built whole when it is large). The sum over rows is split the
        same way whatever the thread count and whichever thread takes which block, so the
        result is bit-identical from run to run (exact resume relies on it). Two plans:
        - many rows (top levels): one partial product per block of rows, added in order;
        - few rows, many columns (deep levels), where those partials would outweigh A:
          A whole, and the product split over A's columns instead (nothing to add up).
        """
        workers = self.workers
        kb = b2d.shape[1]
        step, blocks = workers.plan(rows, step)
        if blocks * kb < rows:
            if a2d is None:
                scratch = workers.scratch("patches", [((step, width), np.float32)])
            partial = np.empty((blocks, width, kb), dtype=np.float32)

            def job(m0, m1, worker):
                if a2d is None:
                    a = scratch[worker][0][: m1 - m0]
                    fill(m0, m1, a)
                else:
                    a = a2d[m0:m1]
                np.matmul(a.T, b2d[m0:m1], out=partial[m0 // step])

            workers.run(job, rows, step)
            return partial.sum(axis=0)
        if a2d is None:
            a2d = np.empty((rows, width), dtype=np.float32)
            workers.run(lambda m0, m1, _: fill(m0, m1, a2d[m0:m1]), rows, step)
        out = np.empty((width, kb), dtype=np.float32)

        def column_job(j0, j1, _):
            np.matmul(a2d[:, j0:j1].T, b2d, out=out[j0:j1])

        workers.run(column_job, width, width)
        return out

    def _pad(self, x, slack: int = 0):
        """x [N, H, W, C] copied into a zero-bordered [N, H+2, W+2, C] (cpu_conv_packed),
        with ``slack`` floats of room after it (read, never used, by cpu_weight_grad_taps)."""
        n, h, w, c = x.shape
        count = n * (h + 2) * (w + 2) * c
        xp = aligned_empty((count + slack,))[:count].reshape(n, h + 2, w + 2, c)
        self.workers.run(lambda m0, m1, _: cpu_conv_packed.pad_rows(x, xp, m0, m1),
                         n * (h + 2), _block_rows((w + 2) * c))
        return xp

    def _weight_grad_packed(self, x, dz):
        """dW^T [9C, K] with cpu_conv_packed's kernel. As in ``_gram``: one partial sum per
        block of image rows, added in block order; where those partials would outweigh the
        data (deep layers), the taps (dW^T's rows) are split over the threads instead."""
        n, h, w, c = x.shape
        k = dz.shape[3]
        rows = n * h * w
        xp = self._pad(x)
        wide = cpu_conv_packed.WIDE_BLOCKS
        # as few row blocks as keep the threads busy (Workers.plan: 16): the kernel reads x
        # and dz in place, and every block costs a [9C, K] partial to write and add
        step, blocks = self.workers.plan(rows, -(-rows // WEIGHT_GRAD_BLOCKS), align=w)
        if blocks * k < rows:
            return self._image_row_partials(
                (n * h, w), step, blocks, (9 * c, k),
                lambda r0, r1, out: cpu_conv_packed.conv3x3_weight_grad_packed(
                    xp, dz, r0, r1, 0, 9 * c, out, wide, cpu_conv_packed.PIXEL_CHUNK))
        out = np.empty((9 * c, k), dtype=np.float32)

        def taps_job(t0, t1, _):
            cpu_conv_packed.conv3x3_weight_grad_packed(xp, dz, 0, n * h, t0, t1, out, wide,
                                                       cpu_conv_packed.PIXEL_CHUNK)

        self.workers.run(taps_job, 9 * c, 9 * c, align=24)
        return out

    def _weight_grad_taps(self, x, dz):
        """dW [K, 3, 3, C] with cpu_weight_grad_taps: one partial sum per block of image
        rows, added in block order (as ``_weight_grad_packed``)."""
        n, h, w, c = x.shape
        k = dz.shape[3]
        xp = self._pad(x, slack=cpu_weight_grad_taps.SLACK)
        rows = n * h * w
        step, blocks = self.workers.plan(rows, -(-rows // WEIGHT_GRAD_BLOCKS), align=w)
        acc = self._image_row_partials(
            (n * h, w), step, blocks, (k, 3, cpu_weight_grad_taps.padded_taps(c)),
            lambda r0, r1, out: cpu_weight_grad_taps.weight_grad_taps(
                xp, dz, r0, r1, out, cpu_weight_grad_taps.PIXEL_CHUNK))
        return np.ascontiguousarray(acc[:, :, :3 * c]).reshape(k, 3, 3, c)

    def _winograd_weights(self, w_tk, wide):
        """U = G g G^T in the products' packed layout, blocks of input channels on the
        threads (one pass: 60 ms of a width-32 step as two passes on one thread)."""
        taps, k = w_tk.shape
        c = taps // 9
        w_tk = np.ascontiguousarray(w_tk, dtype=np.float32)
        out = aligned_empty((cpu_conv_winograd.PLANES * c * k,))
        offsets = cpu_conv_winograd.packed_offsets(k, wide)
        self.workers.run(lambda c0, c1, _: cpu_conv_winograd.transform_and_pack_rows(
            w_tk, out, offsets, c0, c1), c, -(-c // 4))
        return out

    def _weight_grad_winograd(self, x, dz):
        """dW^T [9C, K] with cpu_conv_winograd's F(3x3, 4x4): one partial sum of the 36
        products per block of tile rows (WEIGHT_GRAD_BLOCKS of them, whatever the thread
        count), added in block order, then transformed back once."""
        wg = cpu_conv_winograd
        n, h, w, c = x.shape
        k = dz.shape[3]
        per_row, tile_rows = w // wg.TILE, n * h // wg.TILE
        tiles = tile_rows * per_row
        step, blocks = self.workers.plan(tiles, -(-tile_rows // wg.WEIGHT_GRAD_BLOCKS) * per_row,
                                         align=per_row, blocks_at_least=wg.WEIGHT_GRAD_BLOCKS)
        partial = np.empty((blocks, wg.PLANES * c * k), dtype=np.float32)
        pass_tiles = max(1, wg.WEIGHT_GRAD_TILES // per_row) * per_row
        scratch = self.workers.scratch(
            "winograd-dw", [((wg.PLANES * wg.plane_floats(pass_tiles, c),), np.float32),
                            ((wg.PLANES * wg.plane_floats(pass_tiles, k),), np.float32)])
        wide = cpu_conv_packed.WIDE_BLOCKS

        def tile_rows_job(m0, m1, worker):
            v, z = scratch[worker]
            wg.weight_grad_tile_rows(x, dz, m0 // per_row, m1 // per_row,
                                     partial[m0 // step], v, z, wide)

        self.workers.run(tile_rows_job, tiles, step, align=per_row,
                         blocks_at_least=wg.WEIGHT_GRAD_BLOCKS)
        return wg.weight_grad_output(partial.sum(axis=0), c, k, wide)

    def _weight_grad_3x3(self, x, dz):
        """dW^T [9C, K] with packed's kernel or register_blocked's, or None where
        patches_gemm should do it.

        The sum over pixels is split as in ``_gram``: one partial per block of image rows,
        added in block order. Where those partials would outweigh the patches (deep
        layers: few pixels, many channels), patches_gemm's column split is used instead;
        splitting register_blocked over kernel rows and channels was measured slower there
        (5.4 vs 3.1 ms for 4x16x16x128 -> 128 on 2 threads). A named variant is held to.
        """
        n, h, w, c = x.shape
        k = dz.shape[3]
        if _winograd_weight_grad(self.conv_variant, c, k, h, w, n):
            self._note("dW winograd")
            return self._weight_grad_winograd(x, dz)
        if _packed_weight_grad(self.direct_variant, c, k):
            self._note("dW packed")
            return self._weight_grad_packed(x, dz)
        rows = n * h * w
        step, blocks = self.workers.plan(rows, _block_rows(9 * c), align=w)
        if not _register_blocked_weight_grad(self.direct_variant, c, k, w) or (
                blocks * k >= rows and self.direct_variant in ("auto", "packed")):
            return None
        self._note("dW register_blocked")
        return self._image_row_partials(
            (n * h, w), step, blocks, (9 * c, k),
            lambda r0, r1, out: cpu_conv.conv3x3_weight_grad_rows(x, dz, r0, r1, out))

    def _image_row_partials(self, rows_shape, step, blocks, shape, kernel):
        """A sum over the image rows of [N * H, W] pixels (``rows_shape``), one partial of
        ``shape`` per block of ``step`` pixels (whole rows), added in block order:
        ``kernel(row0, row1, out)`` writes one block's partial into out."""
        image_rows, w = rows_shape
        partial = np.empty((blocks, *shape), dtype=np.float32)

        def job(m0, m1, _):
            kernel(m0 // w, m1 // w, partial[m0 // step])

        self.workers.run(job, image_rows * w, step, align=w)
        return partial.sum(axis=0)

    def _conv2d_forward(self, x, w, b, relu):
        n, h, wd, _ = x.shape
        k, r = w.shape[0], w.shape[1]
        y = aligned_empty((n, h, wd, k))  # read in vectors downstream (see simd)
        self._conv(x, w.reshape(k, -1), r, b, relu, y.reshape(n * h * wd, k))
        return y

    def _conv2d_bn_eval_forward(self, x, w, gamma, beta, running, relu, eps):
        """The convolution's sums, then the norm on each block of rows the thread has just
        written (in cache), in place: the same arithmetic as the two passes (the same
        rounded coefficients; ``cpu_norm.apply_rows`` is ``apply``'s loop), one pass over
        memory fewer."""
        mean, scale = self._eval_norm_coefficients(gamma, *running, eps)
        n, h, wd, _ = x.shape
        k, r = w.shape[0], w.shape[1]
        y = aligned_empty((n, h, wd, k))
        y2d = y.reshape(n * h * wd, k)

        def normalise(m0, m1):
            cpu_norm.apply_rows(y2d, mean, scale, beta, relu, m0, m1)

        self._conv(x, w.reshape(k, -1), r, np.zeros(k, dtype=np.float32), False, y2d,
                   then=normalise)
        return y

    def _weight_grad_transposed(self, dz2d, x, w, r):
        """dW [K, R, R, C] by way of dW^T [R*R*C, K] = patches(x)^T @ dZ: packed's or
        register_blocked's kernel where faster, else patches_gemm; then transposed."""
        n, h, wd, c = x.shape
        k = w.shape[0]
        rows = n * h * wd
        acc = self._weight_grad_3x3(x, dz2d.reshape(n, h, wd, k)) if r == 3 else None
        if acc is None and r == 1:
            self._note("dW 1x1 (BLAS)")
            acc = self._gram(dz2d, rows, c, _block_rows(c + k), a2d=x.reshape(rows, c))
        elif acc is None:
            self._note("dW patches_gemm")

            def fill(m0, m1, out):
                kern.im2col_rows(x, m0, m1, r, out)

            acc = self._gram(dz2d, rows, r * r * c, _block_rows(r * r * c), fill=fill)
        dw = np.empty(w.shape, dtype=np.float32)  # acc.T: [K, R, R, C]
        kern.transpose(acc, dw.reshape(k, -1))
        return dw

    def _conv2d_backward(self, dy, x, w, y, relu, need_dx, need_db=True):
        n, h, wd, c = x.shape
        k, r = w.shape[0], w.shape[1]
        rows = n * h * wd
        if r == 1 and k == 1:  # the head: one fused pass
            self._note("head (one fused pass)")
            dx = np.empty_like(x) if need_dx else np.empty((0, c), dtype=np.float32)
            blocks = _reduction_blocks(rows)
            dw_partial = np.empty((blocks, c), dtype=np.float32)
            db_partial = np.empty((blocks, 1), dtype=np.float32)
            kern.one_output_backward(dy.reshape(rows, 1), (y if relu else dy).reshape(rows, 1),
                                     relu, x.reshape(rows, c), w.reshape(c), dx.reshape(-1, c),
                                     dw_partial, db_partial)
            return (dx if need_dx else None, dw_partial.sum(axis=0).reshape(w.shape),
                    db_partial.sum(axis=0) if need_db else None)
        dy2d = dy.reshape(rows, k)
        partial = np.empty((_reduction_blocks(rows), k), dtype=np.float32)
        if relu:
            dz2d = aligned_empty(dy2d.shape)  # the weight gradient loads it in vectors
            kern.relu_grad_and_bias_grad(dy2d, y.reshape(rows, k), relu, dz2d, partial)
        else:  # no mask: dz is dy, and db its column sums (the same sums in the same order
            dz2d = dy2d  # as the fused pass, without its copy), if wanted
            if need_db:
                kern.column_sums(dy2d, 0, partial)
        db = partial.sum(axis=0) if need_db else None

        if (r == 3 and _taps_weight_grad(self.direct_variant, c, k)
                and not _winograd_weight_grad(self.conv_variant, c, k, h, wd, n)):
            self._note("dW taps")
            dw = self._weight_grad_taps(x, dz2d.reshape(n, h, wd, k))  # dW's own layout
        else:
            dw = self._weight_grad_transposed(dz2d, x, w, r)

        dx = None
        if need_dx:
            # 'same' convolution of dZ with the kernel rotated 180 degrees, K <-> C. Built as
            # [R, R, K, C] (C stays innermost: a fast copy; 10x faster than [C, R, R, K] for
            # a 256 x 3 x 3 x 256 kernel) and handed over transposed, as _conv wants.
            w_flip = np.ascontiguousarray(w[:, ::-1, ::-1, :].transpose(1, 2, 0, 3))
            dx = aligned_empty((n, h, wd, c))
            self._note_prefix = "dx "
            try:
                self._conv(dz2d.reshape(n, h, wd, k), w_flip.reshape(-1, c).T, r,
                           np.zeros(c, dtype=np.float32), False, dx.reshape(rows, c))
            finally:
                self._note_prefix = ""
        return dx, dw, db

    # ------------------------------------------------------------------ max-pool
    def _maxpool2x2_forward(self, x):
        n, h, w, c = x.shape
        y = np.empty((n, h // 2, w // 2, c), dtype=np.float32)
        argmax = np.empty(y.shape, dtype=np.uint8)
        kern.maxpool2x2_forward(x, y, argmax)
        self._note("maxpool2x2_forward (rows in parallel)")
        return y, argmax

    def _maxpool2x2_backward(self, dy, argmax, input_hw):
        n, _, _, c = dy.shape
        dx = np.empty((n, input_hw[0], input_hw[1], c), dtype=np.float32)
        kern.maxpool2x2_backward(dy, argmax, dx)
        self._note("maxpool2x2_backward (argmax scatter)")
        return dx

    # ------------------------------------------------------------------ up-convolution
    @staticmethod
    def _upconv_matrix(w):
        """w [K,2,2,C] -> [C, 2*2*K] with columns ordered (a, b, k)."""
        return np.ascontiguousarray(w.transpose(3, 1, 2, 0)).reshape(w.shape[3], -1)

    def _upconv_gemm(self, x, w):
        """tmp [N,H,W,2,2,K] = x @ (w as [C, 2*2*K]), on all threads; no bias yet."""
        n, h, wd, c = x.shape
        k = w.shape[0]
        rows = n * h * wd
        x2d, wm = x.reshape(rows, c), self._upconv_matrix(w)
        tmp = np.empty((n, h, wd, 2, 2, k), dtype=np.float32)
        tmp2d = tmp.reshape(rows, 4 * k)

        def job(m0, m1, _):
            np.matmul(x2d[m0:m1], wm, out=tmp2d[m0:m1])

        self.workers.run(job, rows, _block_rows(c + 4 * k))
        return tmp

    def _upconv2x2_forward(self, x, w, b):
        # the decoder's fused op with an empty skip: no kernel of its own to keep in step
        n, h, wd, _ = x.shape
        no_skip = np.empty((n, 2 * h, 2 * wd, 0), dtype=np.float32)
        return self._upconv2x2_concat_forward(no_skip, x, w, b)

    def _upconv2x2_backward(self, dy, x, w):
        return self._upconv2x2_split_backward(dy, 0, x, w)[1:]

    def _upconv2x2_concat_forward(self, skip, x, w, b):
        n, h, wd, c = x.shape
        k = w.shape[0]
        y = np.empty(skip.shape[:3] + (skip.shape[3] + k,), dtype=np.float32)
        if _packed_upconv(self.direct_variant, k) and cpu_upconv_packed.supports_forward(c, k):
            # version 3: image rows, the packed convolution's register blocks
            self._note("packed (up-convolution version 3)")
            w_packed = cpu_upconv_packed.pack_forward_weights(w)
            wide, parts = cpu_conv_packed.WIDE_BLOCKS, _upconv_parts(c, k)

            def rows(r0, r1, part):  # a part: (a, b) positions
                cpu_upconv_packed.upconv2x2_concat_rows(
                    skip, x, w_packed, b, y, r0, r1, 4 * part // parts,
                    4 * (part + 1) // parts, wide)

            self._rows_in_parts(x.shape, c + 4 * k, parts, rows)
            return y
        if _register_blocked_upconv_forward(self.direct_variant, c, k):
            # the GEMM's register blocks write straight into the concat buffer
            self._note("register_blocked (up-convolution version 2)")
            w_cabk = aligned_copy(w.transpose(3, 1, 2, 0))

            def pixels(m0, m1, _):
                cpu_upconv.upconv2x2_concat_pixels(skip, x, w_cabk, b, y, m0, m1)

            self.workers.run(pixels, n * h * wd, _block_rows(c + 4 * k))
            return y
        self._note("patches_gemm (SGEMM + scatter)")
        tmp = self._upconv_gemm(x, w)
        kern.concat_upconv(skip, tmp, b, y)
        return y

    def _upconv2x2_split_backward(self, dcat, ca, x, w):
        """(dskip, dx, dw, db). packed (version 3, `_upconv2x2_split_backward_packed`: 16 or
        more output channels under 'auto'); register_blocked (C % 16 == 0, enough pixels to
        keep the weight gradient's per-block partials small): register blocks read the
        gradient where it lies in dcat. patches_gemm: the split and the gather to the GEMM's layout
        in one pass (g [N,H,W,2,2,K]), then dx = g @ W^T and dW = x^T @ g on all threads."""
        n, h, wd, c = x.shape
        k = w.shape[0]
        rows = n * h * wd
        if (_packed_upconv(self.direct_variant, k)
                and cpu_upconv_packed.supports_backward(c, k)):
            self._note("dx and dW packed (up-convolution version 3)")
            return self._upconv2x2_split_backward_packed(dcat, ca, x, w)
        step, blocks = self.workers.plan(rows, _block_rows(c + 4 * k))
        if _register_blocked_upconv_backward(self.direct_variant, c, k, rows, blocks):
            self._note("dx and dW register_blocked (up-convolution version 2)")
            return self._upconv2x2_split_backward_blocked(dcat, ca, x, w, step, blocks)
        self._note("dx and dW patches_gemm (gather + SGEMM)")
        dskip = np.empty(dcat.shape[:3] + (ca,), dtype=np.float32)
        g = np.empty((n, h, wd, 2, 2, k), dtype=np.float32)
        kern.split_gather(dcat, dskip, g)
        g2d = g.reshape(rows, 4 * k)
        x2d, wm = x.reshape(rows, c), self._upconv_matrix(w)
        dx = np.empty((n, h, wd, c), dtype=np.float32)
        dx2d = dx.reshape(rows, c)

        def job(m0, m1, _):
            np.matmul(g2d[m0:m1], wm.T, out=dx2d[m0:m1])

        self.workers.run(job, rows, _block_rows(c + 4 * k))
        dwm = self._gram(g2d, rows, c, _block_rows(c + 4 * k), a2d=x2d)  # [C, (a, b, k)]
        dw = np.ascontiguousarray(dwm.reshape(c, 2, 2, k).transpose(3, 1, 2, 0))
        g_k = g.reshape(-1, k)
        partial = np.empty((_reduction_blocks(g_k.shape[0]), k), dtype=np.float32)
        kern.column_sums(g_k, 0, partial)
        return dskip, dx, dw, partial.sum(axis=0)

    def _upconv2x2_split_backward_blocked(self, dcat, ca, x, w, step, blocks):
        n, h, wd, c = x.shape
        k = w.shape[0]
        rows = n * h * wd
        dskip = np.empty(dcat.shape[:3] + (ca,), dtype=np.float32)
        dx = np.empty_like(x)
        w_abkc = aligned_copy(w.transpose(1, 2, 0, 3))
        partial = np.empty((blocks, 4 * k, c), dtype=np.float32)

        def pixels(m0, m1, _):
            cpu_upconv.upconv2x2_split_dx_pixels(dcat, w_abkc, dskip, dx, m0, m1)
            cpu_upconv.upconv2x2_weight_grad_pixels(dcat, x, m0, m1, partial[m0 // step])

        self.workers.run(pixels, rows, step)
        return (dskip, dx, *_upconv_weight_and_bias_grads(partial.sum(axis=0), dcat, ca))

    def _rows_in_parts(self, shape, columns, parts, call):
        """call(r0, r1, part) over blocks of whole image rows of an [N, H, W, C] input x
        `parts` parts of the columns, on the threads; a part's blocks one after another, so
        its weights stay in cache."""
        n, h, wd, _ = shape
        pixels = n * h * wd
        step, blocks = self.workers.plan(pixels, _block_rows(columns), align=wd,
                                         blocks_at_least=max(1, 16 // parts))

        def job(u0, u1, _):
            for u in range(u0, u1):
                part, m0 = divmod(u, blocks)
                call(m0 * step // wd, min(pixels, (m0 + 1) * step) // wd, part)

        self.workers.run(job, blocks * parts, 1, rows_at_least=1)

    def _upconv2x2_split_backward_packed(self, dcat, ca, x, w):
        """Version 3 (``cpu_upconv_packed``): dx on blocks of image rows; dW per block of
        rows (partials added in order, as version 2) where those partials stay small next
        to the data, else over all pixels at once, split over k (nothing to add up)."""
        n, h, wd, c = x.shape
        k = w.shape[0]
        wide = cpu_conv_packed.WIDE_BLOCKS
        dskip = np.empty(dcat.shape[:3] + (ca,), dtype=np.float32)
        dx = np.empty_like(x)
        w_packed = cpu_upconv_packed.pack_data_grad_weights(w)
        zeros = np.zeros(c, dtype=np.float32)
        parts = _upconv_parts(c, k, by_channels=True)

        def rows(r0, r1, part):  # a part: runs of input channels
            cpu_upconv_packed.upconv2x2_split_dx_rows(
                dcat, w_packed, zeros, dskip, dx, r0, r1, c * part // parts,
                c * (part + 1) // parts, wide)

        self._rows_in_parts(x.shape, c + 4 * k, parts, rows)
        # the weight gradient: version 2's blocks of pixels (so its bits), or all at once
        pixels = n * h * wd
        step, blocks = self.workers.plan(pixels, _block_rows(c + 4 * k))
        if _per_block_partials(k, pixels, blocks):
            partial = np.empty((blocks, 4 * k, c), dtype=np.float32)

            def block(m0, m1, _):
                cpu_upconv_packed.upconv2x2_weight_grad_pixels(dcat, x, m0, m1, 0, k,
                                                               partial[m0 // step], wide)

            self.workers.run(block, pixels, step)
            dwm = partial.sum(axis=0)
        else:
            dwm = np.empty((4 * k, c), dtype=np.float32)

            def k_range(k0, k1, _):
                cpu_upconv_packed.upconv2x2_weight_grad_pixels(dcat, x, 0, pixels, k0, k1,
                                                               dwm, wide)

            # four runs of k's, each summed over all pixels: no partials; each run reads
            # all of x, so no more runs than the cores need
            self.workers.run(k_range, k, -(-k // 4), align=8, blocks_at_least=4,
                             rows_at_least=8)
        return (dskip, dx, *_upconv_weight_and_bias_grads(dwm, dcat, ca))

    # ------------------------------------------------------------------ concat
    def _concat_channels(self, a, b):
        y = np.empty(a.shape[:3] + (a.shape[3] + b.shape[3],), dtype=np.float32)
        kern.concat_channels(a, b, y)
        return y

    def _split_channels(self, dy, ca):
        da = np.empty(dy.shape[:3] + (ca,), dtype=np.float32)
        db = np.empty(dy.shape[:3] + (dy.shape[3] - ca,), dtype=np.float32)
        kern.split_channels(dy, da, db)
        return da, db

    # ------------------------------------------------------------------ loss and metrics
    def _sigmoid_dice_loss(self, logits, target, smooth):
        n = logits.shape[0]
        dice = np.empty(n, dtype=np.float64)
        dlogits = np.empty_like(logits)
        kern.sigmoid_dice_loss(logits.reshape(n, -1), target.reshape(n, -1), smooth, dice,
                               dlogits.reshape(n, -1))
        self._note("sigmoid_dice_loss (samples in parallel)")
        return np.asarray(np.mean(1.0 - dice)), dice, dlogits

    def _confusion_counts(self, logits, target):
        n = logits.shape[0]
        counts = np.empty((n, 3), dtype=np.int64)
        kern.confusion_counts(logits.reshape(n, -1), target.reshape(n, -1), counts)
        return counts

    # ------------------------------------------------------------------ optimiser
    def _adam_step(self, param, grad, m, v, step, lr, betas, eps):
        beta1, beta2 = betas
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        kern.adam_step(param, grad, m, v, (lr / bc1, beta1, beta2, eps, np.sqrt(bc2)))
        self._note("adam_step (one fused pass)")

    # ------------------------------------------------------------------ normalisation
    # (the passes of ops.Backend's instance / batch norm; kernels and their order of
    # summation in cpu_norm.py)
    def _norm_moments(self, x):
        return self._moments_partial(x).sum(axis=1)

    def _moments_partial(self, x):
        n, h, w, c = x.shape
        block = cpu_norm.block_pixels(h * w, c)
        partial = np.empty((n, -(-(h * w) // block), 2, c), dtype=np.float64)
        cpu_norm.moments(x.reshape(n, h * w, c), block, partial)
        self._note_norm("moments", x, block)
        return partial

    # instance norm: ops.Backend's passes, with the per-channel arithmetic between them in
    # one Numba call each way instead of a dozen NumPy ones (same bits; cpu_norm.py)
    def _instance_norm_forward(self, x, gamma, beta, eps, relu):
        n, h, w, c = x.shape
        mean, invstd, scale = (np.empty((n, c), dtype=np.float32) for _ in range(3))
        cpu_norm.instance_statistics(self._moments_partial(x), float(h * w), eps, gamma,
                                     mean, invstd, scale)
        return self._norm_apply(x, mean, scale, beta, relu), mean, invstd

    def _instance_norm_backward(self, dy, x, y, mean, invstd, gamma, relu):
        n, h, w, c = x.shape
        coef = np.empty((n, 3, c), dtype=np.float32)
        dgamma, dbeta = np.empty(c, dtype=np.float32), np.empty(c, dtype=np.float32)
        cpu_norm.instance_grad_coefficients(
            self._grad_sums_partial(dy, x, y, mean, invstd, relu), float(h * w), invstd,
            gamma, coef, dgamma, dbeta)
        return self._norm_grad_apply(dy, x, y, mean, invstd, coef, relu), dgamma, dbeta

    def _batch_norm_forward(self, x, gamma, beta, running, training, relu, sum_across,
                            momentum, eps):
        if not training:  # the running statistics: no sums (ops.Backend's few calls)
            return super()._batch_norm_forward(x, gamma, beta, running, training, relu,
                                               sum_across, momentum, eps)
        n, h, w, c = x.shape
        buf = np.empty(2 * c + 1, dtype=np.float64)
        cpu_norm.batch_sums(self._moments_partial(x), float(n * h * w), buf)
        if sum_across is not None:
            sum_across(buf)
        mean, invstd, scale = (np.empty((1, c), dtype=np.float32) for _ in range(3))
        cpu_norm.batch_statistics(buf, eps, float(momentum), gamma, running[0], running[1],
                                  mean, invstd, scale)
        return self._norm_apply(x, mean, scale, beta, relu), mean, invstd

    def _batch_norm_backward(self, dy, x, y, mean, invstd, gamma, training, relu, sum_across):
        n, h, w, c = x.shape
        buf = np.empty(2 * c + 1, dtype=np.float64)
        cpu_norm.batch_sums(self._grad_sums_partial(dy, x, y, mean, invstd, relu),
                            float(n * h * w), buf)
        # this rank's dgamma, dbeta (the gradients' all-reduce comes later, with the rest)
        dgamma, dbeta = buf[c:2 * c].astype(np.float32), buf[:c].astype(np.float32)
        if training and sum_across is not None:
            sum_across(buf)
        coef = np.empty((1, 3, c), dtype=np.float32)
        cpu_norm.batch_grad_coefficients(buf, invstd, gamma, training, coef)
        return self._norm_grad_apply(dy, x, y, mean, invstd, coef, relu), dgamma, dbeta

    def _norm_apply(self, x, mean, scale, beta, relu):
        n, h, w, c = x.shape
        y = np.empty_like(x)
        cpu_norm.apply(x.reshape(n, h * w, c), mean, scale, beta, relu, y.reshape(n, h * w, c))
        self._note_norm("apply", x)
        return y

    def _norm_grad_sums(self, dy, x, y, mean, invstd, relu):
        return self._grad_sums_partial(dy, x, y, mean, invstd, relu).sum(axis=1)

    def _grad_sums_partial(self, dy, x, y, mean, invstd, relu):
        n, h, w, c = x.shape
        block = cpu_norm.block_pixels(h * w, c)
        partial = np.empty((n, -(-(h * w) // block), 2, c), dtype=np.float64)
        shape = (n, h * w, c)
        cpu_norm.grad_sums(dy.reshape(shape), x.reshape(shape),
                           (y if relu else dy).reshape(shape), mean, invstd, relu, block,
                           partial)
        self._note_norm("grad_sums", x, block)
        return partial

    def _norm_grad_apply(self, dy, x, y, mean, invstd, coef, relu):
        n, h, w, c = x.shape
        dx = np.empty_like(x)
        shape = (n, h * w, c)
        cpu_norm.grad_apply(dy.reshape(shape), x.reshape(shape),
                            (y if relu else dy).reshape(shape), mean, invstd, coef, relu,
                            dx.reshape(shape))
        self._note_norm("grad_apply", x)
        return dx

    # ------------------------------------------------------------------ input pipeline
    def _window_augment(self, hu, mask, aug, center, width):
        n, h, w = hu.shape
        image = np.empty((n, h, w, 1), dtype=np.float32)
        mask_out = np.empty((n, h, w, 1), dtype=np.uint8)
        kern.window_augment(hu, mask, aug, center, width, AIR_HU, image, mask_out)
        self._note("window_augment (bilinear, samples in parallel)")
        return image, mask_out
