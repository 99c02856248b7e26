"""The CPU emulator of the CUDA kernels itself, and the CUDA backend's choices that need no GPU.

``tests/cuda_emu.py`` runs the real ``kernels/*.cu`` under the real ``CudaBackend`` on the
CPU: it compiles each file with g++ and runs a block's threads as fibers meeting at real
barriers, in a seeded shuffled order, checking argument types, launch limits, races in
shared memory and out-of-bounds reads and writes. Every op test of
test_ops.py runs on it as backend ``cuda-emu`` in every CI run (no GPU needed; skipped,
saying why, only without a C++ compiler), so a wrong index, a missing barrier or a mistyped
argument fails before any GPU session.

Here: every kernel that ``cuda.py`` declares is launched (nodulekit/bench/kernel_smoke.py's
table, which compute-sanitizer runs on the GPU), under three thread-order seeds; each of the
emulator's checks catches a defect planted in tests/emu_defects.cu (a missing
__syncthreads, a racy shared write, an out-of-bounds read, a wrong mma fragment layout, a
bank-conflicted staging store) and passes the same kernel without it; the tensor-core
staging of conv_mma.cu is free of bank conflicts, counted per warp access from the
emulator's record; the emulator refuses what CuPy would refuse; precision and convolution
version are named choices; the conv-version sweep of ``bench ops`` runs fastest first and
the ncu target launches its three kernels once each. (The emulator's report of a warp split
at mma.sync and its model of the tensor cores' truncation are checked with the tensor-core
probes, in test_cuda_backend.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import backends
import cuda_emu
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not backends.EMU_OK, reason=backends.EMU_WHY)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_declared_kernel_runs(seed):
    """One small call per kernel variant (every convolution version, tile shapes, float4 /
    scalar, one or several reduction splits, the fused decoder entries, the norms: the
    table of nodulekit/bench/kernel_smoke.py, which compute-sanitizer runs on the GPU):
    every kernel cuda.py declares is launched and returns finite numbers, with no race in
    shared memory and no out-of-bounds access, under three thread-order seeds."""
    from nodulekit.bench import kernel_smoke

    rt = cuda_emu.EmuRuntime(seed=seed)
    outputs, launched = kernel_smoke.run_every_kernel(rt, seed=0)
    result = kernel_smoke.check(outputs, launched)
    assert not result["missing"], f"kernels no call launched: {result['missing']}"
    assert not result["undeclared"], result["undeclared"]
    assert result["non_finite_outputs"] == 0
    assert launched == rt.launched


# ----------------------------------------------------------- each check catches its defect

DEFECTS = Path(__file__).with_name("emu_defects.cu")


def _defects_runtime(**options):
    """An emulator runtime with tests/emu_defects.cu (appended to conv_mma.cu, whose mma
    helpers and stage_index it calls) as file "defects.cu"."""
    from nodulekit.engine.cuda import kernel_source

    rt = cuda_emu.EmuRuntime(**options)
    rt.add_source("defects.cu", kernel_source("conv_mma.cu") + "\n" + DEFECTS.read_text())
    return rt


def _f32(rt, values):
    return rt.asarray(np.asarray(values, np.float32))


def test_a_missing_syncthreads_is_a_race_and_shuffled_orders_show_it():
    """neighbour_sum without its __syncthreads: the race checker names the shared array
    and both threads under any seed; with the checker off, the shuffled thread orders read
    stale data (wrong sums) where the old fixed order got most of them right by luck; with
    the barrier, no report and the right sums."""
    x = np.arange(256, dtype=np.float32)
    want = x + np.roll(x, -1)
    for seed in (0, 1, 2):
        rt = _defects_runtime(seed=seed)
        with pytest.raises(RuntimeError, match=r"shared-memory race: thread \d+ (read|wrote) "
                                               r"neighbour_sum::s .* a __syncthreads is missing"):
            rt.launch("defects.cu", "neighbour_sum", (1, 1, 1), (256, 1, 1),
                      (_f32(rt, x), rt.zeros((256,), np.float32), np.int32(0)))
        y = rt.zeros((256,), np.float32)
        rt.launch("defects.cu", "neighbour_sum", (1, 1, 1), (256, 1, 1),
                  (_f32(rt, x), y, np.int32(1)))
        np.testing.assert_array_equal(y, want)
    wrong = []
    for seed in (1, 2, 3):
        rt = _defects_runtime(seed=seed, checks=())
        y = rt.zeros((256,), np.float32)
        rt.launch("defects.cu", "neighbour_sum", (1, 1, 1), (256, 1, 1),
                  (_f32(rt, x), y, np.int32(0)))
        wrong.append(int(np.sum(y != want)))
    assert min(wrong) > 50, f"shuffled orders should expose the missing barrier: {wrong}"


def test_a_racy_shared_write_is_reported():
    """Two threads writing one shared word in one barrier interval (racy_slots with pairs)
    fail the launch; one slot per thread passes."""
    rt = _defects_runtime()
    x = _f32(rt, np.arange(64))
    with pytest.raises(RuntimeError, match=r"thread \d+ wrote racy_slots::s byte \d+, which "
                                           r"thread \d+ wrote in the same barrier interval"):
        rt.launch("defects.cu", "racy_slots", (1, 1, 1), (64, 1, 1),
                  (x, rt.zeros((64,), np.float32), np.int32(1)))
    y = rt.zeros((64,), np.float32)
    rt.launch("defects.cu", "racy_slots", (1, 1, 1), (64, 1, 1), (x, y, np.int32(0)))
    np.testing.assert_array_equal(y, np.arange(64))


def test_an_out_of_bounds_read_is_reported():
    """shifted_copy reads one element past the end (or before the start) of x while
    writing y in bounds: the guard bytes alone would not see it; the bounds check names the
    argument, the distance and the thread. Shift 0 passes."""
    rt = _defects_runtime()
    x = _f32(rt, np.arange(40))
    for shift, where in ((1, "0 bytes past the end of"), (-1, "4 bytes before the start of")):
        with pytest.raises(RuntimeError, match=rf"out-of-bounds read of 4 bytes, {where} "
                                               rf"argument 0 \(x\), by thread \d+"):
            rt.launch("defects.cu", "shifted_copy", (1, 1, 1), (64, 1, 1),
                      (x, rt.zeros((40,), np.float32), np.int32(40), np.int32(shift)))
    unchecked = _defects_runtime(checks=("races",))  # the old emulator: only guard bytes
    y = unchecked.zeros((40,), np.float32)
    unchecked.launch("defects.cu", "shifted_copy", (1, 1, 1), (64, 1, 1),
                     (_f32(unchecked, np.arange(40)), y, np.int32(40), np.int32(1)))
    assert np.isnan(y[-1])  # it read a guard byte (NaN) and nobody said so
    y = rt.zeros((40,), np.float32)
    rt.launch("defects.cu", "shifted_copy", (1, 1, 1), (64, 1, 1),
              (x, y, np.int32(40), np.int32(0)))
    np.testing.assert_array_equal(y, np.arange(40))


def test_a_wrong_fragment_layout_gives_a_wrong_product():
    """The emulated mma.sync unpacks fragments by the PTX ISA's layouts: a probe that
    loads A's fragment with a1 and a2 exchanged gets a product far from A @ B; the right
    layout matches it to fp32 accumulation error (the probe test's tolerance)."""
    from opcheck import round_operand

    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    want = round_operand(a, "tf32") @ round_operand(b, "tf32")
    tol = 4 * 2.0**-23 * np.abs(want).max()
    rt = _defects_runtime()
    for swap in (0, 1):
        d = rt.zeros((16, 8), np.float32)
        rt.launch("defects.cu", "mma_layout_probe", (1, 1, 1), (32, 1, 1),
                  (_f32(rt, a), _f32(rt, b), d, np.int32(swap)))
        err = float(np.abs(d - want).max())
        assert (err <= tol) if swap == 0 else (err > 100 * tol), (swap, err, tol)


def test_the_bank_conflict_count_sees_a_conflicted_layout():
    """The static count (cuda_emu.bank_conflicts over the emulator's record of one block)
    finds the 4-way conflicts of a warp writing a column of a [rows][16 + 4] tile, and none
    with conv_mma.cu's stage_index layout."""
    worst = {}
    for swizzled in (0, 1):
        rt = _defects_runtime()
        rt.record_block = 0
        rt.launch("defects.cu", "column_store", (1, 1, 1), (64, 1, 1),
                  (_f32(rt, np.arange(1024)), rt.zeros((64,), np.float32), np.int32(swizzled)))
        records, names = rt.recorded["defects.cu", "column_store"]
        degrees = cuda_emu.bank_conflicts(records)
        worst[swizzled] = max(degrees.values())
        assert {names[a] for a, _ in degrees} == {"column_store::tile" if swizzled
                                                  else "column_store::padded"}
    assert worst == {0: 4, 1: 1}


STAGED_TILES = ("As", "Bs", "Ds", "Xs")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_staging_is_free_of_bank_conflicts(precision):
    """Every shared-memory access of conv_mma.cu's kernels, loads and stores, scalar and
    float4 staging, forward, weight gradient and the up-convolution's three GEMMs: counted
    per warp access from the emulator's record of block 0, each hits 32 different banks.
    (With the former [rows][20] layout the staging stores were 16-, 8- and 4-way.)"""
    from nodulekit.engine.cuda import CudaBackend

    rt = cuda_emu.EmuRuntime()
    rt.record_block = 0
    be = CudaBackend(precision=precision, runtime=rt)
    rng = np.random.default_rng(0)

    def f32(*shape):
        return be.asarray(rng.standard_normal(shape).astype(np.float32))

    for n, h, w, c, k in ((1, 9, 11, 20, 80), (1, 5, 7, 3, 5)):  # _vec4 and scalar staging
        x, wt = f32(n, h, w, c), f32(k, 3, 3, c)
        y = be.conv2d_forward(x, wt, f32(k), relu=True)
        be.conv2d_backward(f32(n, h, w, k), x, wt, y, relu=True)
    x = f32(2, 3, 5, 6)
    be.upconv2x2_forward(x, f32(4, 2, 2, 6), f32(4))
    be.upconv2x2_backward(f32(2, 6, 10, 4), x, f32(4, 2, 2, 6))
    kernels = {kernel for file, kernel in rt.recorded if file == "conv_mma.cu"}
    assert len(kernels) == 7, sorted(kernels)  # forward, wgrad (each +_vec4), 3 upconv
    for (file, kernel), (records, names) in rt.recorded.items():
        if file != "conv_mma.cu":
            continue
        degrees = cuda_emu.bank_conflicts(records)
        tiles = {key: d for key, d in degrees.items()
                 if names[key[0]].rsplit("::", 1)[-1] in STAGED_TILES}
        stores = cuda_emu.bank_conflicts(records, write=True)
        assert any(names[a].endswith("::As") or names[a].endswith("::Ds") for a, _ in stores)
        assert len(tiles) >= 4, (kernel, sorted(names[a] for a, _ in degrees))
        bad = {f"{names[a]} @ {pc:#x}": d for (a, pc), d in tiles.items() if d > 1}
        assert not bad, f"{kernel}: bank conflicts (n-way) {bad}"


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
    partial = []
    result = ops.run_conv_variants_bench("all", (2, 1), repeats=1, warmup=0, width=4,
                                         depth=2, size=8, progress=partial.append)
    shapes = ops.conv_variant_shapes(4, 2, 8)
    assert result["peak"]["device"] == "H100 SXM" and not result["skipped"]
    # fastest first, direct last; the result so far handed over after every version
    order = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    assert order[:len(cuda.CONV_VARIANTS)] == list(ops.FAST_FIRST) == result["config"]["variants"]
    assert [len({r["variant"] for r in p["rows"]}) for p in partial] == [1, 2, 3, 4, 5]
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
    # direct only at small shapes: above DIRECT_MAX_PIXELS pixels a batch it is skipped
    monkeypatch.setattr(ops, "DIRECT_MAX_PIXELS", 8 * 8)
    small = ops.run_conv_variants_bench("direct", (2,), repeats=1, warmup=0, width=4,
                                        depth=1, size=8)
    assert {r["batch"] * int(r["shape"].split("x")[1]) ** 2 for r in small["rows"]
            if r["variant"] == "direct"} == {2 * 4 * 4}
    assert small["skipped"] and all("only at 64 pixels" in s for s in small["skipped"])


def test_bench_conv_variants_says_it_needs_a_gpu(monkeypatch):
    from nodulekit.bench import ops

    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (False, "no CUDA device"))
    with pytest.raises(SystemExit, match="needs a GPU: no CUDA device"):
        ops.main(["--op", "conv", "--variants", "all"])


def test_ncu_target_launches_the_three_kernels_once_each():
    """bench/gpu_check.sh bench profiles nodulekit.bench.ncu_target with ncu --launch-count
    3 and a name filter: each of its KERNELS must be launched exactly once (here on the
    emulator, at a smaller layer of the same channel counts)."""
    from nodulekit.bench import ncu_target

    launches = []
    rt = cuda_emu.EmuRuntime()
    real = rt.launch
    rt.launch = lambda file, kernel, *a: (launches.append(kernel), real(file, kernel, *a))
    ncu_target.launch_all((1, 8, 64, 64), runtime=rt)
    picked = [k for k in launches if re.match(ncu_target.ncu_regex()[len("regex:"):], k)]
    assert picked == list(ncu_target.KERNELS)
