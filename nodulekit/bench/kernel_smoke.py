"""One small call of every CUDA kernel that ``engine/cuda.py`` declares: the sanitizers' target.

:func:`run_every_kernel` drives the real :class:`~nodulekit.engine.cuda.CudaBackend` through
a table of small shapes chosen so that every kernel variant runs at least once: every
convolution version, tile shape, float4 and scalar path, one and several reduction splits,
the fused decoder entries, the norms. The same table serves two runtimes:

- on a GPU (CuPy), under ``compute-sanitizer`` (memcheck, racecheck, synccheck), from
  ``bench/gpu_check.sh quick``: ``python -m nodulekit.bench.kernel_smoke --json OUT``.
  CuPy's memory pool is switched off first, so that every array is its own ``cudaMalloc``
  and memcheck sees its real bounds (a pool hands out pieces of larger blocks);
- on the CPU emulator of the tests (``tests/cuda_emu.py``): the test
  ``test_every_declared_kernel_runs`` runs it under several thread-order seeds, and
  ``--emulator`` runs it from a source checkout (``bench/gpu_check.sh rehearse``).

A kernel no call launches, or a non-finite output, is a failure (exit status 1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# (N, H, W, C, K, R) of the convolution calls: K > 16 and <= 16 tiles, C = 1, C % 4 != 0,
# 1x1, K % 4 != 0 (scalar weight-gradient staging)
CONV_SHAPES = ((2, 9, 11, 20, 80, 3), (1, 5, 7, 1, 4, 3), (1, 6, 5, 40, 8, 1),
               (1, 5, 7, 3, 20, 3), (1, 5, 7, 3, 5, 3))


class RecordingRuntime:
    """A runtime (CuPy's or the emulator's) that notes every (file, kernel) it launches."""

    def __init__(self, runtime: Any):
        self._rt = runtime
        self.launched: set[tuple[str, str]] = set()

    def launch(self, file: str, kernel: str, grid, block, args) -> None:
        self.launched.add((file, kernel))
        self._rt.launch(file, kernel, grid, block, args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)


def _conv_calls(rt, f32) -> list:
    from nodulekit.engine.cuda import CONV_VARIANTS, CudaBackend

    outputs = []
    for variant, (precision, _) in CONV_VARIANTS.items():
        cb = CudaBackend(precision=precision, runtime=rt, conv_variant=variant)
        for (n, h, w, c, k, r) in CONV_SHAPES:
            x, wt, b = f32(n, h, w, c), f32(k, r, r, c), f32(k)
            y = cb.conv2d_forward(x, wt, b, relu=True)
            outputs += [y, *cb.conv2d_backward(f32(n, h, w, k), x, wt, y, relu=True)]
            outputs += cb.conv2d_backward(f32(n, h, w, k), x, wt, need_dx=False)[1:]
    return outputs


def _upconv_calls(rt, f32) -> list:
    from nodulekit.engine.cuda import CudaBackend

    outputs = []
    x, wt, b = f32(2, 3, 5, 6), f32(4, 2, 2, 6), f32(4)
    for precision in ("fp32", "tf32", "bf16"):
        ub = CudaBackend(precision=precision, runtime=rt)
        outputs += [ub.upconv2x2_forward(x, wt, b),
                    *ub.upconv2x2_backward(f32(2, 6, 10, 4), x, wt)]
        outputs += [ub.upconv2x2_concat_forward(f32(2, 6, 10, 3), x, wt, b),
                    *ub.upconv2x2_split_backward(f32(2, 6, 10, 7), 3, x, wt)]
    return outputs


def _other_calls(be, f32, rng) -> list:
    outputs = []
    for c in (3, 8):
        y, am = be.maxpool2x2_forward(f32(2, 7, 9, c))
        outputs += [y, be.maxpool2x2_backward(f32(*y.shape), am, (7, 9))]
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
    if hasattr(be, "instance_norm_forward"):  # the norms (norm.cu), where the engine has them
        for c in (3, 8):  # scalar and float4 passes, per-sample and shared statistics
            x, g, b, dy = f32(2, 5, 6, c), f32(c), f32(c), f32(2, 5, 6, c)
            y, mean, invstd = be.instance_norm_forward(x, g, b, relu=True)
            outputs += [y, *be.instance_norm_backward(dy, x, y, mean, invstd, g, relu=True)]
            rm, rv = be.zeros((c,)), be.asarray(np.ones(c, np.float32))
            y, mean, invstd = be.batch_norm_forward(x, g, b, rm, rv)
            outputs += [y, rm, rv, *be.batch_norm_backward(dy, x, y, mean, invstd, g)]
    return outputs


def run_every_kernel(runtime: Any = None, seed: int = 0) -> tuple[list, set]:
    """Every declared kernel at least once on ``runtime`` (default: CuPy on the current
    GPU). Returns (the outputs, the (file, kernel) pairs launched)."""
    from nodulekit.engine.cuda import CudaBackend, CupyRuntime

    rt = RecordingRuntime(runtime if runtime is not None else CupyRuntime())
    be = CudaBackend(runtime=rt)
    rng = np.random.default_rng(seed)

    def f32(*shape):
        return be.asarray(rng.standard_normal(shape).astype(np.float32))

    outputs = _conv_calls(rt, f32) + _upconv_calls(rt, f32) + _other_calls(be, f32, rng)
    be.synchronize()
    return outputs, rt.launched


def check(outputs: list, launched: set) -> dict:
    """What the run showed: kernels not launched, launches of undeclared kernels, outputs
    that are not finite (as host arrays)."""
    from nodulekit.engine.cuda import KERNELS

    declared = {(f, k) for f, ks in KERNELS.items() for k in ks}
    bad = 0
    for out in outputs:
        if out is None:
            continue
        host = out.get() if hasattr(out, "get") else np.asarray(out)
        bad += host.dtype.kind == "f" and not np.isfinite(host).all()
    return {"declared": len(declared), "launched": len(launched & declared),
            "missing": sorted(f"{f}:{k}" for f, k in declared - launched),
            "undeclared": sorted(f"{f}:{k}" for f, k in launched - declared),
            "non_finite_outputs": int(bad)}


def _emulator_runtime():
    """tests/cuda_emu.py's runtime, from a source checkout."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    if not (tests / "cuda_emu.py").is_file():
        raise SystemExit(f"--emulator needs a source checkout with {tests / 'cuda_emu.py'}")
    sys.path.insert(0, str(tests))
    import cuda_emu

    return cuda_emu.EmuRuntime()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_path", default=None, help="write the result here")
    ap.add_argument("--emulator", action="store_true",
                    help="run on the tests' CPU emulator instead of the GPU")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.emulator:
        runtime, where = _emulator_runtime(), "the CPU emulator (tests/cuda_emu.py)"
    else:
        import cupy

        cupy.cuda.set_allocator(None)  # one cudaMalloc per array: memcheck sees its bounds
        cupy.cuda.set_pinned_memory_allocator(None)
        runtime = None
        where = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        where = where.decode() if isinstance(where, bytes) else where
    outputs, launched = run_every_kernel(runtime, args.seed)
    result = {"where": where, **check(outputs, launched),
              "seconds": round(time.perf_counter() - t0, 2)}
    print(f"kernel smoke on {where}: {result['launched']} of {result['declared']} declared "
          f"kernels launched, {result['non_finite_outputs']} non-finite outputs, "
          f"{result['seconds']} s")
    for name in result["missing"]:
        print("  not launched:", name)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    ok = not result["missing"] and not result["undeclared"] and not result["non_finite_outputs"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
