"""A loop of fused multiply-adds and nothing else: what a core's FMA pipes can do.

FMA throughput. A core with two FMA pipes of latency 4 cycles finishes two FMAs a cycle only
if eight or more of them are in flight, each on its own accumulator: a single chain
``a = a * m + c`` waits 4 cycles per step. So the kernel keeps ``chains`` independent vector
accumulators (``lanes`` float32 each), all in registers, and updates each once per
iteration: ``chains`` FMAs a loop trip, no loads, no stores. Numba would keep a local
accumulator array in memory and does not vectorise straight-line code (see engine/simd.py),
so the loop is written as LLVM IR directly (:func:`fma_loop`): one ``llvm.fma.v<lanes>f32``
per accumulator and iteration, which compiles to one ``vfmadd`` each. The multiplier, the
addend and the starting values are run-time arguments: with constants LLVM proved one chain
to be at its fixed point (1.0 * 0.999 + 0.001 == 1.0) and dropped it, 7 FMAs an iteration
instead of 8. One copy of the loop per core (``prange``), each its share of the work.

Used by the profile's ceilings (``profile.peaks_cpu``: every core, 8 and 16 lanes; one
scalar chain for the clock) and by ``fma_width`` (one core, 8 lanes against 16).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

FMA_CHAINS = 12  # >= 2 pipes x 4 cycles of latency, with room; 12 of 16 or 32 registers


def fma_loop(lanes: int, chains: int):
    """An intrinsic ``f(iterations, start, m, c) -> float32``: ``chains`` accumulators of
    ``lanes`` float32, each ``a = fma(a, m, c)`` per iteration, summed at the end (so the
    work is not dead code)."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, lanes)

    @intrinsic
    def fma_loop(typingctx, iterations, start, m, c):
        def codegen(context, builder, sig, args):
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.v{lanes}f32")

            def splat(value):
                v = ir.Constant(vec, ir.Undefined)
                for i in range(lanes):
                    v = builder.insert_element(v, value, ir.Constant(ir.IntType(32), i))
                return v

            start_v, m_v, c_v = (splat(context.cast(builder, v, t, types.float32))
                                 for v, t in zip(args[1:], sig.args[1:], strict=True))
            # allocas in the entry block: LLVM promotes them to registers
            accs = [cgutils.alloca_once(builder, vec) for _ in range(chains)]
            for j, acc in enumerate(accs):
                builder.store(builder.fadd(start_v, ir.Constant(vec, [float(j)] * lanes)), acc)
            n = context.cast(builder, args[0], sig.args[0], types.intp)
            with cgutils.for_range(builder, n):
                for acc in accs:
                    builder.store(builder.call(fma, [builder.load(acc), m_v, c_v]), acc)
            total = builder.load(accs[0])
            for acc in accs[1:]:
                total = builder.fadd(total, builder.load(acc))
            s = builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
            for i in range(1, lanes):
                s = builder.fadd(s, builder.extract_element(total, ir.Constant(ir.IntType(32), i)))
            return s

        return types.float32(iterations, start, m, c), codegen

    return fma_loop


def fma_kernels(lanes: int, chains: int):
    """(on_every_core(iterations, start, m, c, out), on_one_core(iterations, start, m, c)):
    the loop once per core (out: one result per core) or once on the calling core."""
    loop = fma_loop(lanes, chains)

    @njit(parallel=True)
    def on_every_core(iterations, start, m, c, out):
        for t in prange(out.size):
            out[t] = loop(iterations, start + np.float32(t), m, c)

    @njit
    def on_one_core(iterations, start, m, c):
        return loop(iterations, start, m, c)

    return on_every_core, on_one_core


# run-time values (see the module docstring): a chain converges to C / (1 - M) = 1.0
START, M, C = np.float32(0.25), np.float32(0.999), np.float32(0.001)
