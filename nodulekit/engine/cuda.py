"""The CUDA backend: CuPy arrays, every op a hand-written kernel from ``kernels/*.cu``.

Each ``kernels/<family>.cu`` file (with the helpers of ``kernels/common.cuh`` spliced in
where it includes them: :func:`kernel_source`) is one CuPy ``RawModule``, compiled by NVRTC
on first use with :data:`NVRTC_OPTIONS` (CuPy adds ``-ftz=true``, ``-arch=sm_XY`` and
``--device-as-default-execution-space``; ``kernel_check.py`` compiles with exactly that list
in CI) and kept in CuPy's on-disk cache, keyed by the source text. This module launches the
kernels: it picks a variant (tile shape, float4 or scalar), computes the grid, allocates
outputs and temporaries, and passes every scalar as an explicit NumPy type (``np.int32``,
``np.int64``, ``np.float64``) that matches the kernel's C parameter.

The kernels, by op (each file's header comment gives its math, launch shape and napkin
math):

====================  ========================================================
conv2d_forward        conv.cu  conv_forward_{128x64,256x16} (bias + ReLU fused); other
                      versions: conv_forward_{direct,smem_16x16}, conv_mma.cu
                      conv_forward_mma_{tf32,bf16} (CONV_VARIANTS)
conv2d_backward       reduce.cu relu_grad_channel_sums / channel_sums, sum_partials (db);
                      conv.cu / conv_mma.cu conv_weight_grad_* (+ sum_partials);
                      flip_transpose_weight
                      and conv_forward_* on dz (dx)
maxpool2x2_*          pool.cu  maxpool2x2_{forward,backward}[_vec4]
upconv2x2_*           upconv.cu upconv_forward_128x64, upconv_backward_data_128x64,
                      upconv_weight_grad_64x128 (+ sum_partials); channel_sums (db);
                      tf32 / bf16: conv_mma.cu upconv_*_mma_{tf32,bf16}
concat / split        concat.cu copy_channels[_vec4], once per half
sigmoid_dice_loss     dice.cu  dice_partial_sums (its last block: dice, loss), dice_grad
adam_step             adam.cu  adam_step[_vec4], one launch for the flat buffer
window_augment        window.cu window_augment
confusion_counts      metrics.cu confusion_counts
instance_norm_*,      norm.cu  norm_moments / norm_grad_sums (+ norm_sum_splits),
batch_norm_*          norm_apply[_vec4], norm_grad_apply[_vec4]; the per-channel
                      arithmetic between them on [G, C] arrays (ops.Backend)
====================  ========================================================

Beyond the op contract, :meth:`CudaBackend.upconv2x2_concat_forward` and
:meth:`CudaBackend.upconv2x2_split_backward` let the up-convolution write straight into its
half of the decoder's concat buffer (and read its half of the concat gradient), which
saves a concat and a split pass per decoder level.

Precision is a named choice, ``CudaBackend(precision=...)`` one of :data:`PRECISIONS`
(``fp32``, ``tf32``, ``bf16``; anything else is a ``ValueError`` naming them). It picks the
3x3 / 1x1 convolutions' version (:data:`CONV_VARIANTS`, :data:`DEFAULT_CONV_VARIANT`):
fp32 runs conv.cu's ``register_blocked``, tf32 and bf16 the tensor-core kernels of
conv_mma.cu (``mma_tf32``, ``mma_bf16``: operands rounded to TF32 / BF16, products summed
in fp32). ``conv_variant=`` runs any other version of the same precision (the tests and
``bench ops --variants`` run them all).
The 2x2 up-convolution follows the precision too (upconv.cu in fp32, conv_mma.cu's
upconv_*_mma_{tf32,bf16} otherwise). Everything else stays fp32 whatever the precision:
the bias gradients, pooling, concat, loss, Adam.

Where the CPU backend computes in float64 the kernels mostly do too: the window's source
coordinates and mask rounding (its bilinear weights and window in float32), the Dice sums
above each thread's few pixels and the loss, the Adam update. Every reduction has a fixed
order (per-block partial results, then one pass that adds them), so a result does not
change from run to run; only the confusion counts use atomics (integer).

CuPy is imported lazily: this module imports without it (``kernel_check.py`` and the tests'
CPU emulator of the kernels use it), and :class:`CudaBackend` then says what to install.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from nodulekit.engine.ops import AIR_HU, Backend

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DeviceArray = Any  # a cupy.ndarray (a NumPy array under the tests' CPU emulator)

# Options we pass to cupy.RawModule; CuPy appends CUPY_APPENDED_OPTIONS when it compiles.
NVRTC_OPTIONS = ("-std=c++17",)
# What CuPy 13/14 appends for NVRTC (cupy/cuda/compiler.py), in its order, for an sm_XY
# device: '-ftz=true' in _compile_with_cache_cuda, then the arch and
# '--device-as-default-execution-space' in _compile_using_nvrtc.
CUPY_APPENDED_OPTIONS = ("-ftz=true", "-arch=sm_{arch}", "--device-as-default-execution-space")

# The kernels each file must define (tests check the sources and the compiled cubins).
KERNELS = {
    "adam.cu": ("adam_step", "adam_step_vec4"),
    "concat.cu": ("copy_channels", "copy_channels_vec4"),
    "conv.cu": ("conv_forward_direct", "conv_weight_grad_direct", "conv_forward_smem_16x16",
                "conv_weight_grad_smem_16x16", "conv_forward_128x64", "conv_forward_256x16",
                "conv_forward_128x64_vec4", "conv_forward_256x16_vec4",
                "conv_weight_grad_64x128", "conv_weight_grad_64x16", "conv_weight_grad_16x128",
                "conv_weight_grad_64x128_vec4", "conv_weight_grad_16x128_vec4",
                "flip_transpose_weight"),
    "conv_mma.cu": tuple(f"conv_{op}_mma_{p}{v}" for op in ("forward", "weight_grad")
                         for p in ("tf32", "bf16") for v in ("", "_vec4"))
                   + tuple(f"upconv_{op}_mma_{p}" for op in ("forward", "backward_data",
                                                              "weight_grad")
                           for p in ("tf32", "bf16")),
    "dice.cu": ("dice_partial_sums", "dice_grad"),
    "metrics.cu": ("confusion_counts",),
    "norm.cu": ("norm_moments", "norm_sum_splits", "norm_apply", "norm_apply_vec4",
                "norm_grad_sums", "norm_grad_apply", "norm_grad_apply_vec4"),
    "pool.cu": ("maxpool2x2_forward", "maxpool2x2_forward_vec4", "maxpool2x2_backward",
                "maxpool2x2_backward_vec4"),
    "reduce.cu": ("relu_grad_channel_sums", "channel_sums", "sum_partials"),
    "upconv.cu": ("upconv_forward_128x64", "upconv_backward_data_128x64",
                  "upconv_weight_grad_64x128"),
    "window.cu": ("window_augment",),
}

# The precisions a CudaBackend computes its convolutions in (everything else stays fp32).
PRECISIONS = ("fp32", "tf32", "bf16")

# The convolution versions, in the order conv.cu / conv_mma.cu explain them (their headers
# number them 1-5, the reading order): name -> (precision of its multiplications, what it
# is). Every one computes forward (bias + ReLU fused), data gradient (the forward kernel on
# the flipped weights) and weight gradient; CudaBackend(conv_variant=NAME) runs it, tests
# run all of them, `nodulekit bench ops --op conv --variants all` times all of them.
#
# One vocabulary for both devices (cpu.CONV_VARIANTS uses it too): a name says how the
# convolution is computed, and a word means the same technique wherever it appears.
#   direct            one output at a time, every operand read from memory (CUDA only)
#   smem_tiled        implicit GEMM (the patch matrix gathered, never stored), operand
#                     tiles staged in shared memory, one output per thread (CUDA only)
#   register_blocked  implicit GEMM where each thread (CUDA) or core (CPU) keeps a block of
#                     outputs in registers and adds outer products into it: 8x4 per thread
#                     over shared-memory tiles here, 6 pixels x 16 channels in vector
#                     registers on the CPU (cpu_conv.py)
#   mma_tf32/_bf16    register_blocked's tiling on tensor cores (mma.sync), operands
#                     rounded to TF32 / BF16, fp32 sums (CUDA only)
#   patches_gemm      the patch matrix (im2col) built block by block, then BLAS SGEMM
#                     (CPU only)
#   packed            register_blocked with the input zero-padded once (no border pixels)
#                     and the weights packed per block of output channels, the block sized
#                     to the core's vector registers (CPU only: cpu_conv_packed.py; on the
#                     GPU the shared-memory tiles of register_blocked already play both parts)
# (The earlier names were v1_direct, v2_smem, v3_regblock, v4_mma_tf32, v5_mma_bf16 here and
# v1_patches_blas, v2_register_blocked on the CPU: "v2" meant a different technique on each
# device. bench/results/*.json from before keep the old names.)
CONV_VARIANTS = {
    "direct": ("fp32", "one thread per output, operands from global memory"),
    "smem_tiled": ("fp32", "implicit GEMM, 16x16 shared-memory tiles, one output per thread"),
    "register_blocked": ("fp32", "implicit GEMM, 128x64 tiles, 8x4 register block per thread"),
    "mma_tf32": ("tf32", "tensor cores, mma.sync m16n8k8 TF32 operands, fp32 accumulation"),
    "mma_bf16": ("bf16", "tensor cores, mma.sync m16n8k16 BF16 operands, fp32 accumulation"),
}
# What each precision runs unless a variant is named: its fastest version.
DEFAULT_CONV_VARIANT = {"fp32": "register_blocked", "tf32": "mma_tf32", "bf16": "mma_bf16"}
_MMA = {"mma_tf32": "tf32", "mma_bf16": "bf16"}  # variant -> kernel name suffix

THREADS = 256          # threads per block of every kernel but the channel-sum layout
BLOCKS_PER_SM = 32     # grid-stride kernels: at most this many blocks per SM

# What one SM of a Hopper GPU (sm_90: H100, H200) holds at once, from NVIDIA's CUDA C++
# Programming Guide (compute capability 9.0) and the occupancy calculator's allocation
# rules: the inputs of resident_blocks().
SM90_LIMITS = {
    "registers": 65536,            # 32-bit registers per SM
    "register_unit": 256,          # registers are given to a warp in units of 256
    "threads": 2048,               # resident threads (64 warps)
    "blocks": 32,                  # resident blocks
    "shared_bytes": 228 * 1024,    # shared memory per SM (the carveout at its largest)
    "shared_reserved": 1024,       # what the system keeps per block
    "shared_unit": 128,            # shared memory is given in units of 128 bytes
}
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- kernel files


def kernel_dir() -> Traversable:
    """The folder of the .cu files and the .cuh header they include: ``nodulekit/kernels``
    inside the installed package (package data in a wheel; the source tree in an editable
    install). The repository's top-level ``kernels`` is a symbolic link to it."""
    return resources.files("nodulekit") / "kernels"


def kernel_files() -> list[str]:
    """Names of every ``*.cu`` file shipped with the package, sorted."""
    return sorted(p.name for p in kernel_dir().iterdir() if p.name.endswith(".cu"))


def kernel_headers() -> list[str]:
    """Names of every ``*.cuh`` header shipped with the package (``common.cuh``), sorted."""
    return sorted(p.name for p in kernel_dir().iterdir() if p.name.endswith(".cuh"))


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([\w.-]+\.cuh)"[ \t]*(?://.*)?$',
                      re.MULTILINE)


def _read_kernel_file(name: str) -> str:
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no kernel file {name!r} in {kernel_dir()}; "
                                f"there are: {', '.join(kernel_files() + kernel_headers())}")
    return path.read_text(encoding="utf-8")


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>``, ready to compile: each ``#include "<header>.cuh"``
    line is replaced by that header's text from the same folder (once per header, between
    ``#line`` directives so that compiler messages name the right file and line).

    Every compile path takes this one self-contained text: CuPy's RawModule (so NVRTC needs
    no ``-I`` and CuPy's on-disk cache, keyed by the source text, recompiles when a header
    changes; with ``-I`` it would not), the NVRTC and nvcc checks of ``kernel_check.py``,
    and the tests' CPU emulator.
    """
    return _expand_includes(name, _read_kernel_file(name), set())


def _expand_includes(name: str, text: str, seen: set[str]) -> str:
    def splice(match: re.Match) -> str:
        header = match.group(1)
        line = text.count("\n", 0, match.start()) + 2  # the line after the #include
        body = ""
        if header not in seen:  # a header's text goes in once (as with an include guard)
            seen.add(header)
            body = _expand_includes(header, _read_kernel_file(header), seen)
        return f'#line 1 "{header}"\n{body}\n#line {line} "{name}"'

    return _INCLUDE.sub(splice, text)


# --------------------------------------------------------------------------- CuPy runtime

_MODULES: dict = {}  # (device id, file) -> cupy.RawModule, shared by all backends


class CupyRuntime:
    """Arrays, kernel launches and synchronisation through CuPy on the current device."""

    def __init__(self):
        try:
            import cupy
        except ImportError as exc:
            raise ImportError("the cuda backend needs CuPy: pip install 'nodulekit[cuda]' "
                              f"(cupy-cuda13x); importing it failed: {exc}") from exc
        self.cp = cupy
        self.xp = cupy
        self.device = cupy.cuda.Device()
        self.sm_count = int(self.device.attributes["MultiProcessorCount"])
        self._functions: dict = {}

    def module(self, file: str) -> object:
        key = (self.device.id, file)
        if key not in _MODULES:
            _MODULES[key] = self.cp.RawModule(code=kernel_source(file), options=NVRTC_OPTIONS)
        return _MODULES[key]

    def _function(self, file: str, kernel: str):
        fn = self._functions.get((file, kernel))
        if fn is None:
            fn = self._functions[(file, kernel)] = self.module(file).get_function(kernel)
        return fn

    def launch(self, file: str, kernel: str, grid: tuple, block: tuple, args: tuple) -> None:
        self._function(file, kernel)(tuple(grid), tuple(block), tuple(args))

    def resident_blocks(self, file: str, kernel: str, threads: int) -> int:
        """How many blocks of ``threads`` threads of the kernel one SM holds at once: the
        driver's occupancy calculation (cuOccupancyMaxActiveBlocksPerMultiprocessor), else
        resident_blocks() on the kernel's registers and static shared memory."""
        fn = self._function(file, kernel)
        try:
            from cupy_backends.cuda.api import driver

            return max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(
                fn.kernel.ptr, threads, 0)))
        except Exception:  # an older CuPy: the same rules from the kernel's attributes
            return resident_blocks(int(fn.num_regs), int(fn.shared_size_bytes), threads)

    def empty(self, shape: tuple[int, ...] | int, dtype: Any) -> DeviceArray:
        return self.cp.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any) -> DeviceArray:
        return self.cp.zeros(shape, dtype=dtype)

    def asarray(self, a: Any, dtype: Any = None) -> DeviceArray:
        return self.cp.ascontiguousarray(self.cp.asarray(a, dtype=dtype))

    def to_host(self, a: DeviceArray) -> np.ndarray:
        return self.cp.asnumpy(a)

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    @staticmethod
    def address(a) -> int:
        return int(a.data.ptr)


# --------------------------------------------------------------------------- helpers


def _i32(v) -> np.int32:
    v = int(v)
    if not -INT32_MAX - 1 <= v <= INT32_MAX:
        raise ValueError(f"cuda backend: {v} does not fit the kernels' 32-bit indices")
    return np.int32(v)


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _check_sizes(op: str, *arrays) -> None:
    for a in arrays:
        if a is not None and a.size > INT32_MAX:
            raise ValueError(f"{op}: {a.size} elements is more than the kernels' 32-bit pixel "
                             f"and channel indices allow; use a smaller batch")


def resident_blocks(registers: int, shared_bytes: int, threads: int,
                    limits: dict | None = None) -> int:
    """Blocks of a kernel that one SM holds at once (at least 1), from its registers per
    thread, static shared memory per block and threads per block: the least of what the
    register file, the shared memory, the thread slots and the block slots allow
    (:data:`SM90_LIMITS` by default; ``nodulekit inspect --kernels`` prints the first two
    for every kernel)."""
    lim = SM90_LIMITS if limits is None else limits
    warps = _cdiv(threads, 32)
    per_warp = _cdiv(max(registers, 1) * 32, lim["register_unit"]) * lim["register_unit"]
    by_registers = (lim["registers"] // per_warp) // warps
    per_block = _cdiv(shared_bytes + lim["shared_reserved"], lim["shared_unit"]) * \
        lim["shared_unit"]
    by_shared = lim["shared_bytes"] // per_block
    return max(1, min(by_registers, by_shared, lim["threads"] // (32 * warps), lim["blocks"]))


def wave_splits(rows: int, tiles: int, slots: int, step: int = 16,
                min_rows: int = 256) -> tuple[int, int]:
    """How to cut a weight gradient's ``rows`` summed pixels into splits (blockIdx.z), so
    that ``tiles`` output tiles times the splits fill whole waves of ``slots`` blocks (the
    SMs times the blocks each holds at once: resident_blocks).

    Each split sums at least ``min_rows`` rows (and a multiple of ``step``); among the
    split counts that keep the grid within two waves (at most two splits where the tiles
    alone fill a wave), the one that keeps the largest fraction of the GPU's block slots
    busy wins, ``blocks / (waves * slots)``, ties to fewer splits (fewer partial sums to
    add). Returns (splits, rows per split)."""
    tiles, slots = max(int(tiles), 1), max(int(slots), 1)
    most = max(1, min(max(2, _cdiv(2 * slots, tiles)), int(rows) // min_rows, 65535))
    best = None
    for want in range(1, most + 1):
        per = _cdiv(_cdiv(rows, want), step) * step
        splits = _cdiv(rows, per)
        blocks = tiles * splits
        busy = blocks / (_cdiv(blocks, slots) * slots)
        if best is None or busy > best[0] + 1e-12:
            best = (busy, splits, per)
    return best[1], best[2]


def conv_choice(precision: str, conv_variant: str | None = None) -> tuple[str, str]:
    """Check a (precision, convolution version) pair: (precision, variant name).

    ``conv_variant`` None picks the precision's default; a variant of another precision
    is refused rather than silently run in the wrong arithmetic."""
    if precision not in PRECISIONS:
        raise ValueError(f"the cuda backend's precision is one of {', '.join(PRECISIONS)}; "
                         f"got precision={precision!r}")
    if precision not in DEFAULT_CONV_VARIANT:
        raise ValueError(f"the cuda backend has no {precision} convolution yet (have: "
                         f"{', '.join(DEFAULT_CONV_VARIANT)}); got precision={precision!r}")
    if conv_variant is None:
        return precision, DEFAULT_CONV_VARIANT[precision]
    if conv_variant not in CONV_VARIANTS:
        raise ValueError(f"unknown convolution variant {conv_variant!r}; the variants are: "
                         f"{', '.join(CONV_VARIANTS)}")
    if CONV_VARIANTS[conv_variant][0] != precision:
        raise ValueError(f"convolution variant {conv_variant!r} computes in "
                         f"{CONV_VARIANTS[conv_variant][0]}, not precision={precision!r}")
    return precision, conv_variant


class CudaBackend(Backend):
    """The ops of ``ops.py`` as CUDA kernels (see the module docstring for which kernel)."""

    name = "cuda"
    dtype = np.dtype(np.float32)

    def __init__(self, precision: str = "fp32", runtime=None, conv_variant: str | None = None):
        self.precision, self.conv_variant = conv_choice(precision, conv_variant)
        self.rt = runtime if runtime is not None else CupyRuntime()
        self.xp = self.rt.xp
        self.sm_count = int(self.rt.sm_count)
        self._zero_bias: dict[int, object] = {}
        self._dice_counter = None

    # ------------------------------------------------------------------ memory
    def zeros(self, shape: tuple[int, ...] | int, dtype: Any = None) -> DeviceArray:
        return self.rt.zeros(shape, np.dtype(self.dtype if dtype is None else dtype))

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = None) -> DeviceArray:
        return self.rt.empty(shape, np.dtype(self.dtype if dtype is None else dtype))

    def asarray(self, a: Any, dtype: Any = None) -> DeviceArray:
        return self.rt.asarray(a, dtype)

    def to_host(self, a: DeviceArray) -> np.ndarray:
        return self.rt.to_host(a)

    def synchronize(self) -> None:
        self.rt.synchronize()

    # ------------------------------------------------------------------ launch helpers
    def _launch(self, file: str, kernel: str, grid, block, *args) -> None:
        self.rt.launch(file, kernel, grid, block, args)

    def _grid_stride(self, total: int) -> tuple[int, int, int]:
        """Blocks for a 1-D grid-stride loop over ``total`` items, 256 threads each."""
        return (max(1, min(_cdiv(total, THREADS), BLOCKS_PER_SM * self.sm_count)), 1, 1)

    def _aligned(self, *arrays) -> bool:
        """Every array starts on a 16-byte boundary (float4 / uchar4 access is legal)."""
        return all(self.rt.address(a) % 16 == 0 for a in arrays)

    def _weight_grad_splits(self, rows: int, tiles: int, file: str, kernel: str):
        """(splits, rows per split) of a weight-gradient launch: whole waves of the GPU's
        SMs times the blocks of this kernel each SM holds (wave_splits)."""
        resident = getattr(self.rt, "resident_blocks", None)
        per_sm = resident(file, kernel, THREADS) if resident is not None else 1
        return wave_splits(rows, tiles, self.sm_count * per_sm)

    def _splits(self, rows: int, tiles: int, step: int = 16, min_rows: int = 256):
        """Cut ``rows`` reduction rows into ranges so ``tiles * splits`` blocks fill the GPU.

        Returns (splits, rows per split); rows per split is a multiple of ``step``.
        """
        target = 4 * self.sm_count
        splits = max(1, min(_cdiv(target, max(tiles, 1)), _cdiv(rows, min_rows), 65535))
        per = _cdiv(_cdiv(rows, splits), step) * step
        return _cdiv(rows, per), per

    def _zeros_bias(self, k: int):
        if k not in self._zero_bias:
            self._zero_bias[k] = self.zeros((k,))
        return self._zero_bias[k]

    def _sum_partials(self, partial, splits: int, length: int, out) -> None:
        self._launch("reduce.cu", "sum_partials", self._grid_stride(length), (THREADS, 1, 1),
                     partial, _i32(splits), np.int64(length), out)

    def _channel_sums(self, a, ld: int, off: int, m: int, k: int, out, dz=None, y=None):
        """out[k] = sum over the m rows of a[row * ld + off + k]; with ``y`` given, first
        dz = a * (y > 0) (written to ``dz``), and the sums are of dz."""
        bx = min(32, 1 << (max(k, 1) - 1).bit_length())
        by = THREADS // bx
        col_blocks = _cdiv(k, bx)
        splits, rows = self._splits(m, col_blocks, step=by, min_rows=4 * by)
        partial = self.empty((splits, k))
        grid, block = (col_blocks, splits, 1), (bx, by, 1)
        if y is not None:
            self._launch("reduce.cu", "relu_grad_channel_sums", grid, block, a, y, dz,
                         _i32(m), _i32(k), _i32(rows), partial)
        else:
            self._launch("reduce.cu", "channel_sums", grid, block, a, _i32(ld), _i32(off),
                         _i32(m), _i32(k), _i32(rows), partial)
        self._sum_partials(partial, splits, k, out)

    # ------------------------------------------------------------------ convolution
    def _conv_forward(self, x, w, b, relu: bool, y) -> None:
        n, h, wd, c = x.shape
        k, r = w.shape[0], w.shape[1]
        m = n * h * wd
        v = self.conv_variant
        dims = (_i32(n), _i32(h), _i32(wd), _i32(c), _i32(k), _i32(r))
        if v == "direct":
            self._launch("conv.cu", "conv_forward_direct", self._grid_stride(m * k),
                         (THREADS, 1, 1), x, w, b, _i32(relu), y, *dims)
            return
        # float4 staging: four channels of one tap per load (C % 4 == 0, 16-byte aligned)
        vec = "_vec4" if c % 4 == 0 and self._aligned(x, w) else ""
        if v in _MMA:
            file, (kernel, bm, bn) = "conv_mma.cu", (f"conv_forward_mma_{_MMA[v]}{vec}", 128, 64)
        elif v == "smem_tiled":
            file, (kernel, bm, bn) = "conv.cu", ("conv_forward_smem_16x16", 16, 16)
        else:
            file, (kernel, bm, bn) = "conv.cu", ((f"conv_forward_128x64{vec}", 128, 64)
                                                 if k > 16
                                                 else (f"conv_forward_256x16{vec}", 256, 16))
        grid = (_cdiv(m, bm), _cdiv(k, bn), 1)
        self._launch(file, kernel, grid, (THREADS, 1, 1), x, w, b, _i32(relu), y, *dims)

    def _conv2d_forward(self, x, w, b, relu):
        n, h, wd, _ = x.shape
        y = self.empty((n, h, wd, w.shape[0]))
        _check_sizes("conv2d_forward", x, y)
        self._conv_forward(x, w, b, relu, y)
        return y

    def _conv_weight_grad(self, dz, x, wshape):
        n, h, wd, c = x.shape
        k, r = wshape[0], wshape[1]
        j, m = r * r * c, n * h * wd
        v = self.conv_variant
        dims = (_i32(n), _i32(h), _i32(wd), _i32(c), _i32(k), _i32(r))
        dw = self.empty(wshape)
        if v == "direct":
            self._launch("conv.cu", "conv_weight_grad_direct", self._grid_stride(k * j),
                         (THREADS, 1, 1), dz, x, dw, *dims)
            return dw
        file = "conv.cu"
        # float4 staging of dz (along k) and of the patches (along c)
        vec = "_vec4" if c % 4 == 0 and k % 4 == 0 and self._aligned(dz, x) else ""
        if v in _MMA:
            file, kernel, ba, bb = ("conv_mma.cu", f"conv_weight_grad_mma_{_MMA[v]}{vec}", 64,
                                    128)
        elif v == "smem_tiled":
            kernel, ba, bb = "conv_weight_grad_smem_16x16", 16, 16
        elif j <= 16:
            kernel, ba, bb = "conv_weight_grad_64x16", 64, 16
        elif k <= 16:
            kernel, ba, bb = f"conv_weight_grad_16x128{vec}", 16, 128
        else:
            kernel, ba, bb = f"conv_weight_grad_64x128{vec}", 64, 128
        tiles = (_cdiv(j, bb), _cdiv(k, ba))
        splits, rows = self._weight_grad_splits(m, tiles[0] * tiles[1], file, kernel)
        out = dw if splits == 1 else self.empty((splits, k * j))
        self._launch(file, kernel, (tiles[0], tiles[1], splits), (THREADS, 1, 1), dz, x,
                     out, *dims, _i32(rows))
        if splits > 1:
            self._sum_partials(out, splits, k * j, dw)
        return dw

    def _conv2d_backward(self, dy, x, w, y, relu, need_dx, need_db=True):
        n, h, wd, c = x.shape
        k, r = w.shape[0], w.shape[1]
        m = n * h * wd
        _check_sizes("conv2d_backward", x, dy)
        db = self.empty((k,))
        if relu:  # (db comes with the mask's pass whether wanted or not)
            dz = self.empty(dy.shape)
            self._channel_sums(dy, k, 0, m, k, db, dz=dz, y=y)
        else:
            dz = dy
            if need_db:
                self._channel_sums(dy, k, 0, m, k, db)
        db = db if need_db else None
        dw = self._conv_weight_grad(dz, x, w.shape)
        dx = None
        if need_dx:
            wf = self.empty((c, r, r, k))
            self._launch("conv.cu", "flip_transpose_weight", self._grid_stride(w.size),
                         (THREADS, 1, 1), w, wf, _i32(k), _i32(r), _i32(c))
            dx = self.empty(x.shape)
            self._conv_forward(dz, wf, self._zeros_bias(c), False, dx)
        return dx, dw, db

    # ------------------------------------------------------------------ max-pool
    def _maxpool2x2_forward(self, x):
        n, h, w, c = x.shape
        y = self.empty((n, h // 2, w // 2, c))
        argmax = self.empty(y.shape, np.uint8)
        _check_sizes("maxpool2x2_forward", x)
        vec = c % 4 == 0 and self._aligned(x, y, argmax)
        total = y.size // 4 if vec else y.size
        self._launch("pool.cu", "maxpool2x2_forward_vec4" if vec else "maxpool2x2_forward",
                     self._grid_stride(total), (THREADS, 1, 1), x, y, argmax, _i32(n), _i32(h),
                     _i32(w), _i32(c))
        return y, argmax

    def _maxpool2x2_backward(self, dy, argmax, input_hw):
        n, _, _, c = dy.shape
        h, w = input_hw
        dx = self.empty((n, h, w, c))
        _check_sizes("maxpool2x2_backward", dx)
        vec = c % 4 == 0 and self._aligned(dy, argmax, dx)
        total = dx.size // 4 if vec else dx.size
        self._launch("pool.cu", "maxpool2x2_backward_vec4" if vec else "maxpool2x2_backward",
                     self._grid_stride(total), (THREADS, 1, 1), dy, argmax, dx, _i32(n),
                     _i32(h), _i32(w), _i32(c))
        return dx

    # ------------------------------------------------------------------ up-convolution
    def _upconv_kernel(self, fp32_name: str, op: str) -> tuple[str, str]:
        """(file, kernel) of an up-convolution GEMM at this backend's precision: upconv.cu's
        fp32 kernels, or conv_mma.cu's tensor-core ones for tf32 / bf16 (same tiles)."""
        if self.precision == "fp32":
            return "upconv.cu", fp32_name
        return "conv_mma.cu", f"upconv_{op}_mma_{self.precision}"

    def _upconv_forward(self, x, w, b, y, ld: int, off: int) -> None:
        n, h, wd, c = x.shape
        k = w.shape[0]
        grid = (_cdiv(n * h * wd, 128), _cdiv(4 * k, 64), 1)
        file, kernel = self._upconv_kernel("upconv_forward_128x64", "forward")
        self._launch(file, kernel, grid, (THREADS, 1, 1), x, w, b, y,
                     _i32(n), _i32(h), _i32(wd), _i32(c), _i32(k), _i32(ld), _i32(off))

    def _upconv_backward(self, dy, ld: int, off: int, x, w):
        """dx, dw, db from the K channels at ``off`` of ``dy`` (``ld`` channels per pixel)."""
        n, h, wd, c = x.shape
        k = w.shape[0]
        m = n * h * wd
        dx = self.empty(x.shape)
        file, kernel = self._upconv_kernel("upconv_backward_data_128x64", "backward_data")
        self._launch(file, kernel, (_cdiv(m, 128), _cdiv(c, 64), 1), (THREADS, 1, 1), dy, w, dx,
                     _i32(n), _i32(h), _i32(wd), _i32(c), _i32(k), _i32(ld), _i32(off))
        tiles = (_cdiv(c, 128), _cdiv(4 * k, 64))
        file, kernel = self._upconv_kernel("upconv_weight_grad_64x128", "weight_grad")
        splits, rows = self._weight_grad_splits(m, tiles[0] * tiles[1], file, kernel)
        dw = self.empty(w.shape)
        out = dw if splits == 1 else self.empty((splits, w.size))
        self._launch(file, kernel, (tiles[0], tiles[1], splits), (THREADS, 1, 1), dy, x, out,
                     _i32(n), _i32(h), _i32(wd), _i32(c), _i32(k), _i32(ld), _i32(off),
                     _i32(rows))
        if splits > 1:
            self._sum_partials(out, splits, w.size, dw)
        db = self.empty((k,))
        self._channel_sums(dy, ld, off, 4 * m, k, db)
        return dx, dw, db

    def _upconv2x2_forward(self, x, w, b):
        n, h, wd, _ = x.shape
        k = w.shape[0]
        y = self.empty((n, 2 * h, 2 * wd, k))
        _check_sizes("upconv2x2_forward", x, y)
        self._upconv_forward(x, w, b, y, k, 0)
        return y

    def _upconv2x2_backward(self, dy, x, w):
        _check_sizes("upconv2x2_backward", x, dy)
        return self._upconv_backward(dy, w.shape[0], 0, x, w)

    # ------------------------------------------------------------------ concat
    def _copy_channels(self, src, src_ld, src_off, dst, dst_ld, dst_off, pixels, c) -> None:
        vec = (c % 4 == 0 and src_ld % 4 == 0 and src_off % 4 == 0 and dst_ld % 4 == 0
               and dst_off % 4 == 0 and self._aligned(src, dst))
        total = pixels * c // 4 if vec else pixels * c
        self._launch("concat.cu", "copy_channels_vec4" if vec else "copy_channels",
                     self._grid_stride(total), (THREADS, 1, 1), src, _i32(src_ld),
                     _i32(src_off), dst, _i32(dst_ld), _i32(dst_off), _i32(pixels), _i32(c))

    def _concat_channels(self, a, b):
        n, h, w, ca = a.shape
        cb = b.shape[3]
        y = self.empty((n, h, w, ca + cb))
        _check_sizes("concat_channels", y)
        p = n * h * w
        self._copy_channels(a, ca, 0, y, ca + cb, 0, p, ca)
        self._copy_channels(b, cb, 0, y, ca + cb, ca, p, cb)
        return y

    def _split_channels(self, dy, ca):
        n, h, w, ct = dy.shape
        _check_sizes("split_channels", dy)
        da = self.empty((n, h, w, ca))
        db = self.empty((n, h, w, ct - ca))
        p = n * h * w
        self._copy_channels(dy, ct, 0, da, ca, 0, p, ca)
        self._copy_channels(dy, ct, ca, db, ct - ca, 0, p, ct - ca)
        return da, db

    # ---- fused decoder entry: up-convolution straight into / out of the concat buffer
    def _upconv2x2_concat_forward(self, skip, x, w, b):
        """Without the concat pass: the skip is copied into the first channels, the
        up-convolution writes the rest (arguments checked by Backend)."""
        n, h, wd, _ = x.shape
        cs, k = skip.shape[3], w.shape[0]
        y = self.empty((n, 2 * h, 2 * wd, cs + k))
        _check_sizes("upconv2x2_concat_forward", y)
        self._copy_channels(skip, cs, 0, y, cs + k, 0, n * 4 * h * wd, cs)
        self._upconv_forward(x, w, b, y, cs + k, cs)
        return y

    def _upconv2x2_split_backward(self, dcat, ca, x, w):
        """The split, and the up-convolution's backward reading its part of dcat in place."""
        n, h, wd, _ = x.shape
        ct = ca + w.shape[0]
        _check_sizes("upconv2x2_split_backward", dcat)
        dskip = self.empty((n, 2 * h, 2 * wd, ca))
        self._copy_channels(dcat, ct, 0, dskip, ca, 0, n * 4 * h * wd, ca)
        return (dskip, *self._upconv_backward(dcat, ct, ca, x, w))

    # ------------------------------------------------------------------ loss and metrics
    def _per_sample_blocks(self, n: int, items: int) -> int:
        """Blocks per sample for grid (B, N) reductions: ~16 blocks per SM in all, and
        enough that no thread sums more than 8 items (dice.cu sums those in float32)."""
        want = max(_cdiv(16 * self.sm_count, n), _cdiv(items, 8 * THREADS))
        return max(1, min(want, _cdiv(items, THREADS), 65535))

    def _sigmoid_dice_loss(self, logits, target, smooth):
        n = logits.shape[0]
        p = logits.size // n
        _check_sizes("sigmoid_dice_loss", logits)
        if n > 65535:
            raise ValueError(f"sigmoid_dice_loss: at most 65535 samples, got {n}")
        dlogits = self.empty(logits.shape)
        vec = p % 4 == 0 and self._aligned(logits, target, dlogits)
        blocks = self._per_sample_blocks(n, p // 4 if vec else p)
        partial = self.empty((n, blocks, 2), np.float64)
        sums = self.empty((n, 2), np.float64)
        dice = self.empty((n,), np.float64)
        loss = self.empty((), np.float64)
        if self._dice_counter is None:  # zero; the kernel's last block sets it back to zero
            self._dice_counter = self.zeros((1,), np.uint32)
        self._launch("dice.cu", "dice_partial_sums", (blocks, n, 1), (THREADS, 1, 1), logits,
                     target, _i32(p), _i32(vec), np.float64(smooth), partial,
                     self._dice_counter, sums, dice, loss)
        self._launch("dice.cu", "dice_grad", (blocks, n, 1), (THREADS, 1, 1), logits, target,
                     _i32(p), _i32(n), np.float64(smooth), sums, _i32(vec), dlogits)
        return loss, dice, dlogits

    def _confusion_counts(self, logits, target):
        n = logits.shape[0]
        p = logits.size // n
        _check_sizes("confusion_counts", logits)
        if n > 65535:
            raise ValueError(f"confusion_counts: at most 65535 samples, got {n}")
        counts = self.zeros((n, 3), np.int64)
        blocks = self._per_sample_blocks(n, p)
        self._launch("metrics.cu", "confusion_counts", (blocks, n, 1), (THREADS, 1, 1), logits,
                     target, _i32(p), counts)
        return counts

    # ------------------------------------------------------------------ normalisation
    # (the passes of ops.Backend's instance / batch norm; norm.cu's header has the math)
    def _norm_sums(self, kernel: str, x, inputs: tuple, flags: tuple):
        """float64 [N, 2, C]: norm.cu's per-sample channel sums of two values (kernel
        ``norm_moments`` or ``norm_grad_sums``), in a fixed order: per-split partials, then
        norm_sum_splits. ``inputs``: the arrays before P, C; ``flags``: the ints after."""
        n, h, w, c = x.shape
        p = h * w
        _check_sizes(kernel, x)
        if n > 65535:
            raise ValueError(f"{kernel}: at most 65535 samples, got {n}")
        bx = min(32, 1 << (max(c, 1) - 1).bit_length())
        by = THREADS // bx
        col_blocks = _cdiv(c, bx)
        splits, rows = self._splits(p, col_blocks * n, step=by, min_rows=4 * by)
        partial = self.empty((n, splits, 2, c), np.float64)
        self._launch("norm.cu", kernel, (col_blocks, splits, n), (bx, by, 1), *inputs,
                     _i32(p), _i32(c), *flags, _i32(rows), partial)
        sums = self.empty((n, 2, c), np.float64)
        self._launch("norm.cu", "norm_sum_splits", self._grid_stride(n * 2 * c),
                     (THREADS, 1, 1), partial, _i32(splits), _i32(2 * c), _i32(n * 2 * c),
                     sums)
        return sums

    def _norm_moments(self, x):
        return self._norm_sums("norm_moments", x, (x,), ())

    def _norm_grad_sums(self, dy, x, y, mean, invstd, relu):
        per_sample = mean.shape[0] > 1
        return self._norm_sums("norm_grad_sums", x,
                               (dy, x, y if relu else dy, mean, invstd, _i32(relu)),
                               (_i32(per_sample),))

    def _norm_elementwise(self, kernel: str, x, arrays: tuple, relu: bool, groups: int):
        """norm_apply / norm_grad_apply[_vec4] over every element of x: the output."""
        n, h, w, c = x.shape
        out = self.empty(x.shape)
        _check_sizes(kernel, x)
        vec = c % 4 == 0 and self._aligned(out, *(a for a in arrays if a.ndim == 4))
        total = x.size // 4 if vec else x.size
        self._launch("norm.cu", kernel + ("_vec4" if vec else ""), self._grid_stride(total),
                     (THREADS, 1, 1), *arrays, _i32(relu), _i32(n), _i32(h * w), _i32(c),
                     _i32(groups > 1), out)
        return out

    def _norm_apply(self, x, mean, scale, beta, relu):
        return self._norm_elementwise("norm_apply", x, (x, mean, scale, beta), relu,
                                      mean.shape[0])

    def _norm_grad_apply(self, dy, x, y, mean, invstd, coef, relu):
        return self._norm_elementwise("norm_grad_apply", x,
                                      (dy, x, y if relu else dy, mean, invstd, coef), relu,
                                      mean.shape[0])

    # ------------------------------------------------------------------ optimiser
    def _adam_step(self, param, grad, m, v, step, lr, betas, eps):
        beta1, beta2 = betas
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        size = param.size
        vec = self._aligned(param, grad, m, v)
        self._launch("adam.cu", "adam_step_vec4" if vec else "adam_step",
                     self._grid_stride(_cdiv(size, 4) if vec else size), (THREADS, 1, 1),
                     param, grad, m, v, np.int64(size), np.float64(lr / bc1), np.float64(beta1),
                     np.float64(beta2), np.float64(eps), np.float64(math.sqrt(bc2)))

    # ------------------------------------------------------------------ input pipeline
    def _window_augment(self, hu, mask, aug, center, width):
        n, h, w = hu.shape
        if h > 65535 or n > 65535:
            raise ValueError(f"window_augment: at most 65535 rows and samples, got {hu.shape}")
        _check_sizes("window_augment", hu)
        image = self.empty((n, h, w, 1))
        mask_out = self.empty((n, h, w, 1), np.uint8)
        threads = min(THREADS, _cdiv(w, 32) * 32)
        self._launch("window.cu", "window_augment", (_cdiv(w, threads), h, n), (threads, 1, 1),
                     hu, mask, aug, np.float64(center), np.float64(width), np.float64(AIR_HU),
                     image, mask_out, _i32(h), _i32(w))
        return image, mask_out
