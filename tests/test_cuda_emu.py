"""The CPU emulator of the CUDA kernels itself, and the CUDA backend's choices that need no GPU.

``tests/cuda_emu.py`` runs the real ``kernels/*.cu`` under the real ``CudaBackend`` on the
CPU: it compiles each file with g++ and runs a block's threads as fibers meeting at real
barriers, checking argument types, launch limits and out-of-bounds writes. Every op test of
test_ops.py runs on it as backend ``cuda-emu`` in every CI run (no GPU needed; skipped,
saying why, only without a C++ compiler), so a wrong index, a missing barrier or a mistyped
argument fails before any GPU session.

Here: every kernel that ``cuda.py`` declares is launched; the emulator refuses what CuPy
would refuse; precision and convolution version are named choices; the conv-version sweep
of ``bench ops`` runs. (The emulator's report of a warp split at mma.sync is checked with
the tensor-core probes, in test_cuda_backend.py.)
"""

from __future__ import annotations

import re

import backends
import cuda_emu
import pytest

pytestmark = pytest.mark.skipif(not backends.EMU_OK, reason=backends.EMU_WHY)


def test_every_declared_kernel_runs():
    """One small call per kernel variant (every convolution version, tile shapes, float4 /
    scalar, one or several reduction splits, the fused decoder entries): every kernel
    cuda.py declares is launched, and returns finite numbers."""
    import numpy as np

    from nodulekit.engine.cuda import CONV_VARIANTS, KERNELS, CudaBackend

    rt = cuda_emu.EmuRuntime()
    be = CudaBackend(runtime=rt)
    rng = np.random.default_rng(0)

    def f32(*shape):
        return be.asarray(rng.standard_normal(shape).astype(np.float32))

    outputs = []
    for variant, (precision, _) in CONV_VARIANTS.items():
        cb = CudaBackend(precision=precision, runtime=rt, conv_variant=variant)
        for (n, h, w, c, k, r) in [(2, 9, 11, 20, 80, 3), (1, 5, 7, 1, 4, 3),
                                   (1, 6, 5, 40, 8, 1), (1, 5, 7, 3, 20, 3),
                                   (1, 5, 7, 3, 5, 3)]:
            x, wt, b = f32(n, h, w, c), f32(k, r, r, c), f32(k)
            y = cb.conv2d_forward(x, wt, b, relu=True)
            outputs += [y, *cb.conv2d_backward(f32(n, h, w, k), x, wt, y, relu=True)]
            outputs += cb.conv2d_backward(f32(n, h, w, k), x, wt, need_dx=False)[1:]
    for c in (3, 8):
        y, am = be.maxpool2x2_forward(f32(2, 7, 9, c))
        outputs += [y, be.maxpool2x2_backward(f32(*y.shape), am, (7, 9))]
    x, wt, b = f32(2, 3, 5, 6), f32(4, 2, 2, 6), f32(4)
    for precision in ("fp32", "tf32", "bf16"):
        ub = CudaBackend(precision=precision, runtime=rt)
        outputs += [ub.upconv2x2_forward(x, wt, b),
                    *ub.upconv2x2_backward(f32(2, 6, 10, 4), x, wt)]
        outputs += [ub.upconv2x2_concat_forward(f32(2, 6, 10, 3), x, wt, b),
                    *ub.upconv2x2_split_backward(f32(2, 6, 10, 7), 3, x, wt)]
    for ca, cb in ((4, 8), (3, 2)):
        outputs += [be.concat_channels(f32(2, 3, 4, ca), f32(2, 3, 4, cb)),
                    *be.split_channels(f32(2, 3, 4, ca + cb), ca)]
    for hw in (8, 7):
        z = f32(2, hw, hw, 1)
        t = be.asarray((rng.random((2, hw, hw, 1)) < 0.3).astype(np.uint8))
        outputs += [*be.sigmoid_dice_loss(z, t), be.confusion_counts(z, t)]
    for size, offset in ((10, 0), (10, 1)):
        buf = [f32(size + offset)[offset:] for _ in range(4)]
        buf[3][...] = abs(buf[3])
        be.adam_step(*buf, 3, 1e-3)
        outputs += buf
    hu = be.asarray(rng.integers(-1000, 1000, (2, 5, 6)).astype(np.int16))
    mask = be.asarray((rng.random((2, 5, 6)) < 0.5).astype(np.uint8))
    aug = be.asarray(np.array([[1, 0, 10.0], [0, 1, -5.0]], np.float32))
    outputs += be.window_augment(hu, mask, aug)

    missing = sorted(f"{f}:{k}" for f, ks in KERNELS.items() for k in ks
                     if (f, k) not in rt.launched)
    assert not missing, f"kernels no call launched: {missing}"
    assert rt.launched <= {(f, k) for f, ks in KERNELS.items() for k in ks}
    for out in outputs:
        if out is not None and out.dtype.kind == "f":
            assert np.isfinite(out).all()


def test_emulator_rejects_what_cupy_would():
    """Arguments CuPy would pass wrongly (a Python int for an int, a float64 array for a
    float*), a host array, and an impossible launch shape fail loudly."""
    import numpy as np

    be = backends.get("cuda-emu")
    rt = be.rt
    x = be.zeros((4,))
    good = (x, x, x, x, np.int64(4), np.float64(1e-3), np.float64(0.9), np.float64(0.999),
            np.float64(1e-8), np.float64(1.0))
    rt.launch("adam.cu", "adam_step", (1, 1, 1), (32, 1, 1), good)
    with pytest.raises(TypeError, match=r"argument 4 \(long long n\): pass np.int64"):
        rt.launch("adam.cu", "adam_step", (1, 1, 1), (32, 1, 1), good[:4] + (4,) + good[5:])
    with pytest.raises(TypeError, match=r"array of float64, expected float32"):
        rt.launch("adam.cu", "adam_step", (1, 1, 1), (32, 1, 1),
                  (be.zeros((4,), np.float64),) + good[1:])
    with pytest.raises(TypeError, match="a host array"):
        rt.launch("adam.cu", "adam_step", (1, 1, 1), (32, 1, 1),
                  (np.zeros(4, np.float32),) + good[1:])
    with pytest.raises(RuntimeError, match="outside CUDA's limits"):
        rt.launch("adam.cu", "adam_step", (1, 1, 1), (2048, 1, 1), good)
    assert backends.get("cuda-emu") is be  # one emulated backend for the whole session


def test_precision_and_conv_variant_are_named_choices():
    """Precision is one of fp32 / tf32 / bf16 and picks the convolution version; anything
    else, or a version of another precision, is a ValueError that names the choices."""
    from nodulekit.engine.cuda import (
        CONV_VARIANTS,
        DEFAULT_CONV_VARIANT,
        PRECISIONS,
        CudaBackend,
    )

    rt = backends.get("cuda-emu").rt
    for precision in PRECISIONS:
        if precision in DEFAULT_CONV_VARIANT:
            be = CudaBackend(precision=precision, runtime=rt)
            assert be.precision == precision
            assert be.conv_variant == DEFAULT_CONV_VARIANT[precision]
            assert CONV_VARIANTS[be.conv_variant][0] == precision
        else:
            with pytest.raises(ValueError, match=rf"no {precision} convolution yet"):
                CudaBackend(precision=precision, runtime=rt)
    for bad in ("fp16", "float32", "TF32", ""):
        with pytest.raises(ValueError, match=r"one of fp32, tf32, bf16; got precision="):
            CudaBackend(precision=bad, runtime=rt)
    first = next(iter(CONV_VARIANTS))
    with pytest.raises(ValueError, match=rf"unknown convolution variant 'v9'.*{re.escape(first)}"):
        CudaBackend(runtime=rt, conv_variant="v9")
    for variant, (precision, _) in CONV_VARIANTS.items():
        assert CudaBackend(precision=precision, runtime=rt,
                           conv_variant=variant).conv_variant == variant
        other = next(p for p in DEFAULT_CONV_VARIANT if p != precision) \
            if len(DEFAULT_CONV_VARIANT) > 1 else "tf32"
        with pytest.raises(ValueError, match=rf"{variant}' computes in {precision}|no "):
            CudaBackend(precision=other, runtime=rt, conv_variant=variant)


def test_without_cupy_the_backend_says_what_to_install(monkeypatch):
    """cuda.py imports without CuPy; making the backend then names the package."""
    import sys

    from nodulekit.engine.cuda import CudaBackend

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'nodulekit\[cuda\]'"):
        CudaBackend()


def test_bench_conv_variants_sweeps_every_version(monkeypatch):
    """`bench ops --op conv --variants all` on the emulator, at toy shapes: every version,
    forward and backward at the training batch, forward at batch 1, against torch (here on
    the CPU), TFLOP/s and % of the named device's peak. Timings here mean nothing; what is
    checked is that the sweep runs, covers every case and prints its table."""
    import torch

    import nodulekit.bench.gpu_timing as gpu_timing
    import nodulekit.engine as engine
    import nodulekit.engine.cuda as cuda
    import nodulekit.reference.torch_ops as torch_ops
    from nodulekit.bench import ops
    from nodulekit.bench.common import median_ms

    rt = cuda_emu.EmuRuntime()
    real_backend, real_make = cuda.CudaBackend, torch_ops.make_torch_op
    monkeypatch.setattr(engine, "cuda_usable", lambda: (True, "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(cuda, "CudaBackend", lambda precision, conv_variant: real_backend(
        precision=precision, runtime=rt, conv_variant=conv_variant))
    monkeypatch.setattr(gpu_timing, "event_median_ms",
                        lambda fn, reps, warmup, sync=None: median_ms(fn, reps, warmup))
    monkeypatch.setattr(torch_ops, "make_torch_op",
                        lambda name, *a, device, **k: real_make(name, *a, device="cpu", **k))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    result = ops.run_conv_variants_bench("all", (2, 1), repeats=1, warmup=0, width=4,
                                         depth=2, size=8)
    shapes = ops.conv_variant_shapes(4, 2, 8)
    assert result["peak"]["device"] == "H100 SXM" and not result["skipped"]
    ups = 2 * 3 * 3  # depth 2 levels x 3 precisions x (fwd, bwd at batch 2, fwd at batch 1)
    assert len(result["rows"]) == len(cuda.CONV_VARIANTS) * len(shapes) * 3 + ups
    for v, (precision, _) in [*cuda.CONV_VARIANTS.items(),
                              *((f"upconv_{p}", (p, "")) for p in ("fp32", "tf32", "bf16"))]:
        rows = [r for r in result["rows"] if r["variant"] == v]
        assert {(r["pass"], r["batch"]) for r in rows} == {("forward", 2), ("backward", 2),
                                                           ("forward", 1)}
        assert all(r["precision"] == precision and r["ours_pct_peak"] > 0 for r in rows)
    text = ops.format_variants(result)
    tf32 = cuda.DEFAULT_CONV_VARIANT["tf32"]
    assert tf32 in text and "% peak" in text and "H100 SXM" in text
    assert ops.device_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert ops.device_peak("NVIDIA H200")[0] == "H200 SXM"
    assert ops.device_peak("NVIDIA A100-SXM4-40GB") == (None, None)


def test_bench_conv_variants_says_it_needs_a_gpu(monkeypatch):
    from nodulekit.bench import ops

    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (False, "no CUDA device"))
    with pytest.raises(SystemExit, match="needs a GPU: no CUDA device"):
        ops.main(["--op", "conv", "--variants", "all"])
