"""What only the CUDA backend has: the tensor cores' building blocks, one warp at a time.

Every op of the CUDA backend (its convolution versions and tf32 / bf16 precisions included)
is checked against the reference and torch in test_ops.py, on the emulator (``cuda-emu``)
and on a GPU (``cuda``). Here probe kernels, appended to conv_mma.cu, run its helpers
directly: one mma.sync with the PTX ISA's fragment layouts, and the operand rounding that
``opcheck.round_operand`` models; on a GPU that checks the emulator's model against the
hardware.
"""

from __future__ import annotations

from pathlib import Path

import cuda_emu
import numpy as np
import pytest
from backends import CUDA_BACKENDS, EMULATOR, each_backend, on_gpu
from opcheck import round_operand

# one-warp probe kernels, appended to conv_mma.cu whose helpers they call
PROBE = "\n" + Path(__file__).with_name("mma_probe.cu").read_text()


def _probe_runner(backend, monkeypatch):
    """(launch(kernel, grid, block, *args), alloc(np array), host(a)) for the probe kernels
    appended to conv_mma.cu: through CuPy on a GPU, through a fresh emulator otherwise."""
    from nodulekit.engine import cuda as cuda_mod

    source = cuda_mod.kernel_source("conv_mma.cu") + PROBE
    if not on_gpu(backend):
        monkeypatch.setattr(cuda_emu, "kernel_source", lambda name: source)
        rt = cuda_emu.EmuRuntime()
        return (lambda k, grid, block, *args: rt.launch("probe.cu", k, grid, block, args),
                lambda a: rt.asarray(a), lambda a: np.asarray(a))
    import cupy

    mod = cupy.RawModule(code=source, options=cuda_mod.NVRTC_OPTIONS)
    return (lambda k, grid, block, *args: mod.get_function(k)(grid, block, args),
            lambda a: cupy.asarray(a), lambda a: cupy.asnumpy(a))


@each_backend(*CUDA_BACKENDS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_mma_fragment_layouts_on_one_warp(backend, rng, monkeypatch, precision):
    """One mma.sync through conv_mma.cu's helpers and the PTX ISA's fragment layouts (as
    conv_mma.cu's head writes them down) gives A @ B of the rounded operands: on a GPU this
    checks the layouts (and the emulator's model of them) against the tensor cores."""
    launch, alloc, host = _probe_runner(backend, monkeypatch)
    kk = 8 if precision == "tf32" else 16
    a = rng.standard_normal((16, kk)).astype(np.float32)
    b = rng.standard_normal((kk, 8)).astype(np.float32)
    d = alloc(np.zeros((16, 8), np.float32))
    launch("mma_probe", (1, 1, 1), (32, 1, 1), alloc(a), alloc(b), d,
           np.int32(precision == "bf16"))
    want = round_operand(a, precision) @ round_operand(b, precision)
    np.testing.assert_allclose(host(d), want, rtol=0, atol=4 * 2.0**-23 * np.abs(want).max())


@each_backend(*CUDA_BACKENDS)
def test_operand_rounding_matches_the_model(backend, monkeypatch):
    """to_tf32 = cvt.rna.tf32.f32 (ties away from zero), to_bf16 = cvt.rn.bf16.f32 (ties to
    even), bit for bit, ties and both signs included; round_operand is the tests' model."""
    launch, alloc, host = _probe_runner(backend, monkeypatch)
    one = np.float32(1.0)
    x = np.array([1.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-8,
                  1 + 3 * 2.0**-8, -(1 + 3 * 2.0**-8), 1 + 2.0**-12, 3.14159265, -2.7182818,
                  1e-30, 65504.0, 1e30], np.float64).astype(np.float32)
    x = np.concatenate([x, np.random.default_rng(5).standard_normal(300).astype(np.float32)])
    tf, bf = alloc(np.zeros_like(x)), alloc(np.zeros_like(x))
    launch("round_probe", (2, 1, 1), (256, 1, 1), alloc(x), tf, bf, np.int32(x.size))
    np.testing.assert_array_equal(host(tf), round_operand(x, "tf32").astype(np.float32))
    np.testing.assert_array_equal(host(bf), round_operand(x, "bf16").astype(np.float32))
    assert host(tf)[1] == one + np.float32(2.0**-10)  # the tie went away from zero
    assert host(bf)[4] == one  # the tie went to even


@each_backend(*EMULATOR)
def test_emulator_reports_a_warp_that_splits_at_mma(backend, monkeypatch):
    """Half a warp at mma.sync (the other half gone) is a bug the GPU would hang or
    garble on: the emulator fails the launch and says so."""
    launch, alloc, _ = _probe_runner(backend, monkeypatch)
    with pytest.raises(RuntimeError, match="lanes of a warp did not all reach"):
        launch("diverged_mma", (1, 1, 1), (32, 1, 1), alloc(np.zeros(32, np.float32)))


@each_backend(*EMULATOR)
def test_emulator_models_the_tensor_cores_truncation(backend):
    """The emulator sums an mma.sync as the tensor cores are measured to (cuda_emu.h's
    MMA_HARDWARE): addends aligned to the largest and truncated, the sum truncated toward
    zero. 1 + three products of 2^-24 is 1 + 2^-22 summed exactly and rounded to nearest,
    but 1 on the model (each 2^-24 falls below the last bit kept), -1 for the negated row:
    the tolerances of opcheck.py are met under this model in every emulator run."""
    from nodulekit.engine import cuda as cuda_mod

    a = np.zeros((16, 8), np.float32)
    b = np.zeros((8, 8), np.float32)
    a[0, :4] = a[1, :4] = [1.0, 2.0**-12, 2.0**-12, 2.0**-12]
    a[1] *= -1
    b[:4, 0] = [1.0, 2.0**-12, 2.0**-12, 2.0**-12]
    got = {}
    for model in ("exact", "hardware"):
        rt = cuda_emu.EmuRuntime(mma=model)
        rt.add_source("probe.cu", cuda_mod.kernel_source("conv_mma.cu") + PROBE)
        d = rt.zeros((16, 8), np.float32)
        rt.launch("probe.cu", "mma_probe", (1, 1, 1), (32, 1, 1), (rt.asarray(a),
                  rt.asarray(b), d, np.int32(0)))
        got[model] = (float(d[0, 0]), float(d[1, 0]))
    assert got["exact"] == (1 + 2.0**-22, -(1 + 2.0**-22))
    assert got["hardware"] == (1.0, -1.0)
