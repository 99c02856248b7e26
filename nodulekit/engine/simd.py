"""Eight (or sixteen) float32 lanes as a Numba value: the few vector operations a GEMM
micro-kernel needs.

Why this exists: Numba turns off LLVM's SLP vectoriser (it miscompiled code, numba#8705),
so straight-line code with many scalar accumulators stays scalar, and a local accumulator
array lives in memory. A register-blocked micro-kernel needs its accumulators in vector
registers. ``float32x8`` is an LLVM ``<8 x float>`` (one AVX2 register; LLVM splits it
into two SSE/NEON registers where there is no AVX), and the functions below are the
intrinsics a C programmer would write (``_mm256_loadu_ps``, ``_mm256_broadcast_ss``,
``_mm256_fmadd_ps``, ``_mm256_storeu_ps``). Locals of this type become SSA values, so a
loop that carries twelve of them carries twelve registers.

``float32x16`` is the same with sixteen lanes (one AVX-512 register: ``_mm512_*``); the
nine operations both have (load, store, splat, zeros, fma, relu, add, sub, mul) are made by
one factory per kind, so ``load8`` and ``load16`` are the same code for another vector type.

``float64x8`` (eight float64 lanes, ``<8 x double>``: two AVX2 registers) holds sums of
float32 values widened exactly (``widen8``), for reductions that must not lose digits (the
normalisation layers' sums of squares).

All loads and stores are unaligned (``align=4``) and take a C-contiguous float32 array
(anything else is refused when the kernel compiles) and a flat element index; nothing is
bounds-checked, like the rest of the Numba code.
``fma8`` is a fused multiply-add (one rounding), so results are the same on every run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

LANES = 8
_F32 = ir.FloatType()
_V8 = ir.VectorType(_F32, LANES)
_F64 = ir.DoubleType()
_D8 = ir.VectorType(_F64, LANES)
_V16 = ir.VectorType(_F32, 16)


class Float32x8(types.Type):
    def __init__(self):
        super().__init__(name="float32x8")


float32x8 = Float32x8()


@register_model(Float32x8)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


class Float32x16(types.Type):
    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


class Float64x8(types.Type):
    def __init__(self):
        super().__init__(name="float64x8")


float64x8 = Float64x8()


@register_model(Float64x8)
class _Float64x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _D8)


def _element_pointer(context, builder, array_type, array, index_type, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.intp)])


def _check_float64_array(array):
    if not (isinstance(array, types.Array) and array.dtype == types.float64
            and array.layout == "C"):
        raise TypingError(f"expected a C-contiguous float64 array, got {array}")


def _check_float32_array(array):
    # a flat element index into the data pointer is right only for a contiguous array
    if not (isinstance(array, types.Array) and array.dtype == types.float32
            and array.layout == "C"):
        raise TypingError(f"expected a C-contiguous float32 array, got {array}")


def _float32_memory_ops(vector, llvm_vector):
    """load, store and splat for one float32 vector type: the same intrinsics for eight
    lanes (``load8``, ...) and sixteen (``load16``, ...)."""
    lanes = llvm_vector.count

    @intrinsic
    def load(typingctx, array, index):
        """array[index : index + lanes] as one vector."""
        _check_float32_array(array)

        def codegen(context, builder, sig, args):
            p = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            return builder.load(builder.bitcast(p, llvm_vector.as_pointer()), align=4)

        return vector(array, index), codegen

    @intrinsic
    def store(typingctx, array, index, value):
        """array[index : index + lanes] = value."""
        _check_float32_array(array)

        def codegen(context, builder, sig, args):
            p = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            builder.store(args[2], builder.bitcast(p, llvm_vector.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(array, index, value), codegen

    @intrinsic
    def splat(typingctx, array, index):
        """array[index] in every lane (a broadcast load)."""
        _check_float32_array(array)

        def codegen(context, builder, sig, args):
            p = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            scalar = builder.load(p, align=4)
            lane0 = builder.insert_element(ir.Constant(llvm_vector, ir.Undefined), scalar,
                                           ir.Constant(ir.IntType(32), 0))
            lanes0 = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            return builder.shuffle_vector(lane0, ir.Constant(llvm_vector, ir.Undefined), lanes0)

        return vector(array, index), codegen

    return load, store, splat


def _float32_arithmetic(vector, llvm_vector):
    """zeros, fma, relu, add, sub and mul for one float32 vector type."""
    lanes = llvm_vector.count
    zero = ir.Constant(llvm_vector, [0.0] * lanes)

    @intrinsic
    def zeros(typingctx):
        def codegen(context, builder, sig, args):
            return zero

        return vector(), codegen

    @intrinsic
    def fma(typingctx, a, b, c):
        """a * b + c, lane by lane, rounded once."""

        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(llvm_vector, [llvm_vector] * 3),
                f"llvm.fma.v{lanes}f32")
            return builder.call(fn, args)

        return vector(a, b, c), codegen

    @intrinsic
    def relu(typingctx, a):
        """max(a, 0) lane by lane; a NaN stays NaN (as np.maximum does), so it is not
        hidden."""

        def codegen(context, builder, sig, args):
            negative = builder.fcmp_ordered("<", args[0], zero)
            return builder.select(negative, zero, args[0])

        return vector(a), codegen

    def lanewise(method, doc):
        @intrinsic
        def op(typingctx, a, b):
            def codegen(context, builder, sig, args):
                return getattr(builder, method)(*args)

            return vector(a, b), codegen

        op.__doc__ = doc
        return op

    add = lanewise("fadd", "a + b, lane by lane.")
    sub = lanewise("fsub", "a - b, lane by lane.")
    mul = lanewise("fmul", "a * b, lane by lane.")
    return zeros, fma, relu, add, sub, mul


load8, store8, splat8 = _float32_memory_ops(float32x8, _V8)
zeros8, fma8, relu8, add8, sub8, mul8 = _float32_arithmetic(float32x8, _V8)
# sixteen lanes: one AVX-512 register (LLVM splits it into two AVX2 registers, correctly,
# where there is no AVX-512). Where the FMA pipes are 512 bits wide (Zen 5, Intel's server
# cores) a 16-lane FMA does twice an 8-lane one's work per instruction; on Zen 4, which runs
# it through its 256-bit pipes in two halves, the two are equal.
load16, store16, splat16 = _float32_memory_ops(float32x16, _V16)
zeros16, fma16, relu16, add16, sub16, mul16 = _float32_arithmetic(float32x16, _V16)


@intrinsic
def relu_grad8(typingctx, g, y):
    """g where y > 0, else 0 (the ReLU's backward given its output y); a NaN y keeps g,
    as the scalar ``y <= 0`` test does."""

    def codegen(context, builder, sig, args):
        zero = ir.Constant(_V8, [0.0] * LANES)
        off = builder.fcmp_ordered("<=", args[1], zero)
        return builder.select(off, zero, args[0])

    return float32x8(g, y), codegen


# ---- eight float64 lanes: exact sums of float32 values


@intrinsic
def widen8(typingctx, a):
    """float32x8 -> float64x8, exactly."""

    def codegen(context, builder, sig, args):
        return builder.fpext(args[0], _D8)

    return float64x8(a), codegen


@intrinsic
def zeros8d(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_D8, [0.0] * LANES)

    return float64x8(), codegen


@intrinsic
def add8d(typingctx, a, b):
    """a + b, lane by lane, in float64."""

    def codegen(context, builder, sig, args):
        return builder.fadd(*args)

    return float64x8(a, b), codegen


@intrinsic
def fma8d(typingctx, a, b, c):
    """a * b + c in float64, rounded once (a product of two widened float32 values is
    exact, so this is the same as a multiply then an add)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_D8, [_D8] * 3), "llvm.fma.v8f64")
        return builder.call(fn, args)

    return float64x8(a, b, c), codegen


@intrinsic
def store8d(typingctx, array, index, vector):
    """array[index : index + 8] = vector, for a C-contiguous float64 array."""
    _check_float64_array(array)

    def codegen(context, builder, sig, args):
        p = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(p, _D8.as_pointer()), align=8)
        return context.get_dummy_value()

    return types.void(array, index, vector), codegen


CACHE_LINE = 64


def aligned_empty(shape, dtype=np.float32, align: int = CACHE_LINE) -> np.ndarray:
    """np.empty whose data starts on an ``align``-byte boundary (a cache line).

    Why: NumPy's memory comes from malloc, which promises 16 bytes, so a 16-lane (64-byte)
    load from such an array straddles two cache lines three times in four, and an 8-lane
    one every other time. Measured on one core of a 2-core Xeon (family 6 model 207), the
    packed forward convolution with its weights 64-byte aligned ran at 225 GFLOP/s (91% of
    the core's FMA peak); with them 16, 32 or 48 bytes off, 174. Which one a call got
    depended on where malloc put that call's weights.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` starting on a cache line (weights a kernel loads in
    vectors: see ``aligned_empty``)."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out

