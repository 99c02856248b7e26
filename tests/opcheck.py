"""One helper, ``check_op``: a backend's op against the float64 reference and against torch.

In the style of tinygrad's ``helper_test_op``: a test builds seeded inputs once, then
describes the op twice, as ``run(backend, **inputs)`` (forward then backward through the
engine, returning named outputs) and ``run_torch(**inputs)`` (the same outputs from
``nodulekit.reference.torch_ops``). ``check_op`` runs

- the backend under test on the inputs cast to its dtype,
- the reference backend in float64 (skipped when the backend *is* the reference),
- torch in the backend's dtype (float64 for the reference, float32 for cpu/cuda),

and compares every named output, forward and backward side by side, with the tolerance of
the backend's precision. Float inputs are drawn as float32 values (``rand``) so that every
run sees exactly the same numbers and only the arithmetic differs.

Tolerances. An output passes when, elementwise,
``|got - want| <= rtol * |want| + atol * sqrt(L) * max|want|``: ``L`` is the op's reduction
length for that output (terms summed per element), ``max|want|`` makes ``atol`` scale-free
(dlogits are ~1e-4, HU-window values ~1). Rounding error of a sum of L terms grows like
sqrt(L) relative to its scale; a wrong index or a missed term errs at O(max|want|).

The CUDA backend's convolution versions and its tf32 / bf16 precisions are compared output
by output with ``assert_outputs_within`` at ``CONV_ATOL[precision]``, and the tensor-core
ones also with the reference on operands rounded as the kernels round them
(``round_operand``) at ``ROUNDED_ATOL``. Backends are named as in tests/backends.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import backends
import numpy as np

# precision -> (rtol, atol per sqrt(L), relative to max|want|)
TOLERANCES = {
    # float64 against float64: only the order of summation differs (~1e-16 per add).
    "fp64": (1e-10, 1e-12),
    # float32 (unit roundoff 6e-8) against float64 or against torch's float32: rounding
    # drift ~6e-8 * sqrt(L) of scale; 1e-6 * sqrt(L) leaves ~16x room for any summation
    # order (blocked GEMM, im2col, atomics), rtol 1e-4 ~ 1000 ulps for elementwise maths.
    "fp32": (1e-4, 1e-6),
}

# Exact outputs (argmax codes, masks, counts, copies) must match bit for bit: no tolerance.

# torch's grid_sample normalises pixel coordinates to [-1, 1] and back in the run dtype:
# in float32 that moves a sample by ~W * 6e-8 px, i.e. up to ~1e-6 window units per px of
# a 2000 HU step at W = 16. Used for window_augment against torch float32 only.
GRID32_ATOL = 1e-5

# The float64 formula clip((hu - lo) / width, 0, 1) rounded to float32 by a backend that
# computes it in float32: at most two roundings of a value <= 1, i.e. < 2**-23.
WINDOW32_ATOL = 2.0**-23

# The CUDA backend's convolution versions and up-convolutions at every precision are held
# to an absolute tolerance per precision (``assert_outputs_within``): an output passes when
# |got - want| <= atol * sqrt(L) * max|want| elementwise, L its reduction length, max|want|
# its scale:
# - fp32: TOLERANCES' row (1e-6 per sqrt(L): fp32 unit roundoff 6e-8, ~16x room).
# - tf32: each operand rounded to a 10-bit mantissa (cvt.rna: unit roundoff u = 2^-11), so
#   each product carries a relative error below 2u = 2^-10; L independent such errors
#   add up like a random walk, ~2^-10 * sqrt(L) * rms|term| <= 2^-10 * sqrt(L) * max|want|.
# - bf16: the same with a 7-bit mantissa (round to nearest even: u = 2^-8): 2^-7 per sqrt(L).
# These are loose by design (rms|term| is well below max|want|); what makes the tensor-core
# tests sharp is a second check: against the reference computed on operands rounded
# exactly as the kernel rounds them (``round_operand``), within fp32 accumulation error.
CONV_ATOL = {"fp32": 1e-6, "tf32": 2.0**-10, "bf16": 2.0**-7}
# Against the reference on pre-rounded operands: only the fp32 accumulation differs. Tensor
# cores align their addends to the largest and truncate, then truncate the sum toward zero
# (a few fp32 ulps per mma, always toward zero). The emulator sums every mma.sync by a
# pessimistic model of that (tests/cuda_emu.h, MMA_HARDWARE: 24 bits kept, groups of 4 / 8
# products); under it the tensor-core tests pass at 5e-7, so 4e-6 leaves 8x room.
ROUNDED_ATOL = 4e-6


def reference():
    """The float64 reference backend every other backend is compared with."""
    return backends.get("reference")


def tolerance(precision: str, reduce_len: int = 1) -> tuple[float, float]:
    """(rtol, atol relative to max|want|) for a backend precision and reduction length."""
    if precision not in TOLERANCES:
        raise KeyError(f"no tolerance for precision {precision!r}: add a row to TOLERANCES")
    rtol, atol = TOLERANCES[precision]
    return rtol, atol * math.sqrt(max(int(reduce_len), 1))


def rand(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
    """Normal draws that are exact float32 values, held in float64."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(np.float64)


def round_operand(a, precision: str) -> np.ndarray:
    """What the kernels' operand conversion does to a float32 value (the tests' model of
    it): tf32 = cvt.rna.tf32.f32 (nearest, ties away from zero, 10-bit mantissa); bf16 =
    cvt.rn.bf16.f32 (nearest, ties to even, 7-bit mantissa); fp32: unchanged."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    if precision == "tf32":
        bits = (bits + 0x1000) & 0xFFFFE000
    elif precision == "bf16":
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def cast(inputs: dict, dtype) -> dict:
    """Float arrays -> ``dtype`` (a copy, so in-place ops cannot touch the caller's)."""
    return {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
            else (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}


def _host(backend, a):
    return None if a is None else np.asarray(backend.to_host(a))


def assert_close(got, want, precision: str, reduce_len: int = 1, what: str = "") -> None:
    """Compare one float output with the tolerance of ``precision`` (see module doc)."""
    rtol, atol = tolerance(precision, reduce_len)
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol,
                               atol=atol * (scale if scale > 0 else 1.0),
                               err_msg=f"{what} (precision {precision}, L={reduce_len})")


def assert_outputs_within(got: dict, want: dict, atol: float, reduce: dict, label: str) -> None:
    """Every output of ``want`` (host float64 arrays by name; None: must be None in ``got``)
    within ``atol * sqrt(L) * max|want|`` of ``got``, L = ``reduce[name]`` (CONV_ATOL)."""
    for key, wv in want.items():
        g = got[key]
        if wv is None:
            assert g is None, f"{label}: {key} should be None"
            continue
        scale = max(float(np.abs(wv).max()), 1e-30)
        tol = atol * np.sqrt(reduce[key]) * scale
        err = float(np.abs(g - wv).max())
        assert err <= tol, (f"{label}: {key} off by {err:.3g} (max |want| {scale:.3g}), "
                            f"allowed {tol:.3g} = {atol:.3g} * sqrt({reduce[key]}) * max|want|")


def compare(got: dict, want: dict, precision: str, reduce: dict, exact, label: str,
            atol_override: dict | None = None):
    atol_override = atol_override or {}
    assert got.keys() == want.keys(), f"{label}: outputs {sorted(got)} vs {sorted(want)}"
    for key, w in want.items():
        g = got[key]
        what = f"{label}: output {key!r}"
        if w is None or g is None:
            assert g is None and w is None, f"{what}: one side is None"
            continue
        assert g.shape == w.shape, f"{what}: shape {g.shape}, expected {w.shape}"
        if key in exact:
            np.testing.assert_array_equal(g, w, err_msg=f"{what} (exact)")
        elif key in atol_override:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=0,
                                       atol=atol_override[key], err_msg=f"{what} (atol)")
        else:
            assert_close(g, w, precision, reduce.get(key, 1), what)


def _check_types(backend, outputs: dict, ref_outputs: dict, free_float=()) -> None:
    """Float outputs in the backend's dtype, others as the reference's; arrays contiguous.

    ``free_float``: outputs that may be any float dtype (the contract leaves it open).
    """
    for key, a in outputs.items():
        r = ref_outputs[key]
        if a is None:
            continue
        if key in free_float:
            assert a.dtype.kind == "f", f"{backend.name}: output {key!r} is {a.dtype}"
            continue
        want = backend.dtype if r.dtype.kind == "f" else r.dtype
        assert a.dtype == want, f"{backend.name}: output {key!r} is {a.dtype}, expected {want}"
        assert a.ndim == 0 or a.flags.c_contiguous, f"{backend.name}: {key!r} not C-contiguous"


def check_op(backend, run: Callable[..., dict], run_torch: Callable[..., dict],
             inputs: dict, reduce: dict | None = None, exact=(),
             torch32_atol: dict | None = None, free_float=()) -> dict:
    """Run ``run`` on ``backend`` (a backend object, or a name of tests/backends.py) and
    compare it with the reference and with torch.

    ``inputs``: named arrays (floats as from ``rand``; ints as they enter the op) and
    scalars, passed as keyword arguments to both callables. ``reduce``: output name ->
    reduction length L (default 1). ``exact``: output names compared bit for bit.
    ``torch32_atol``: output name -> absolute tolerance that replaces the precision's in
    the comparison with torch when the backend is not float64 (where torch's float32
    computes differently, e.g. GRID32_ATOL). ``free_float``: outputs whose float dtype
    the contract leaves open (the Dice loss and per-sample dice: a backend may keep them
    in float64); every other float output must be in the backend's dtype.
    Returns the backend's outputs (host arrays) for further checks.
    """
    reduce = reduce or {}
    be = backends.get(backend) if isinstance(backend, str) else backend
    ref = reference()
    dev_inputs = {k: be.asarray(v) if isinstance(v, np.ndarray) else v
                  for k, v in cast(inputs, be.dtype).items()}
    raw = run(be, **dev_inputs)
    got = {k: _host(be, v) for k, v in raw.items()}

    want = {k: _host(ref, v) for k, v in run(ref, **cast(inputs, np.float64)).items()}
    _check_types(be, raw, want, free_float)
    if be.name != ref.name:
        compare(got, want, be.precision, reduce, exact, f"{be.name} vs reference")

    tgot = run_torch(**cast(inputs, be.dtype))
    override = None if be.dtype == np.float64 else torch32_atol
    compare(got, tgot, be.precision, reduce, exact, f"{be.name} vs torch", override)
    return got
