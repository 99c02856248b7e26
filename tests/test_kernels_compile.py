"""Every kernels/*.cu compiles for sm_90 with NVRTC and the options CuPy uses: in every CI run.

No GPU or driver is needed: NVRTC comes from the ``cuda-toolkit[nvrtc]`` wheels that
``pip install -e ".[test]"`` installs, loaded through CuPy. A compile error, any warning
in the log, a spill, too much shared memory or a kernel that ``cuda.py`` launches but the
cubin lacks fails the test. These tests do not skip: without NVRTC they fail, saying what
to install. The kernel files are found as the installed package sees them
(``importlib.resources``), which is how a wheel finds them too.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from nodulekit.engine import cuda, kernel_check

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reports(kernel_reports):
    return kernel_reports


def test_kernel_files_are_found_as_package_data():
    files = cuda.kernel_files()
    assert files, f"no .cu files under {cuda.kernel_dir()}"
    assert set(files) == set(cuda.KERNELS), "every kernel file is declared in cuda.KERNELS"
    assert str(cuda.kernel_dir()).endswith(str(Path("nodulekit") / "kernels"))
    # the repository's top-level kernels/ (docs/design.md) is a link to the package's folder
    top = REPO / "kernels"
    if top.exists():
        assert top.resolve() == (REPO / "nodulekit" / "kernels").resolve()
        assert sorted(p.name for p in top.glob("*.cu")) == files
    # and the wheel ships them, and the headers they include: package data in pyproject.toml
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'nodulekit = ["kernels/*.cu", "kernels/*.cuh"]' in pyproject
    assert "common.cuh" in cuda.kernel_headers()


def test_headers_are_spliced_into_every_compiled_text():
    """`#include "common.cuh"` is replaced by the header's text (kernel_source), between
    #line directives: every compile path (CuPy, NVRTC, nvcc, the emulator) gets one
    self-contained text, and CuPy's cache, keyed by that text, sees a header's change."""
    header = (cuda.kernel_dir() / "common.cuh").read_text()
    including = [f for f in cuda.kernel_files()
                 if '#include "common.cuh"' in (cuda.kernel_dir() / f).read_text()]
    assert {"conv.cu", "conv_mma.cu", "upconv.cu", "pool.cu"} <= set(including)
    for name in including:
        raw = (cuda.kernel_dir() / name).read_text()
        text = cuda.kernel_source(name)
        assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
        assert header.strip() in text
        assert text.count("OFF_IMAGE_ROW = ") <= 1
        # the line after the #include keeps its number in messages
        after = raw.split('#include "common.cuh"', 1)[1].split("\n", 2)[1]
        number = raw[:raw.index('#include "common.cuh"')].count("\n") + 2
        assert f'#line {number} "{name}"\n{after}' in text


@pytest.mark.parametrize("name", sorted(cuda.KERNELS))
def test_kernel_file_compiles_cleanly_for_sm90(reports, name):
    r = reports[name]
    assert r.ok, f"{name}:\n  " + "\n  ".join(r.problems)
    assert {k.kernel for k in r.kernels} == set(kernel_check.declared_kernels(
        cuda.kernel_source(name)))
    assert set(cuda.KERNELS[name]) <= {k.kernel for k in r.kernels}
    for k in r.kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0, f"{k.kernel} spills registers"
        assert 0 < k.registers <= 128, f"{k.kernel}: {k.registers} registers"
        assert k.shared_bytes <= kernel_check.SHARED_LIMIT


def test_each_kernel_file_opens_with_its_description():
    """What it computes, its launch shape, its napkin math and how to run its check."""
    for name in cuda.kernel_files():
        head = cuda.kernel_source(name).split("\n\n")[0] + cuda.kernel_source(name)[:6000]
        assert cuda.kernel_source(name).startswith(f"// {name}:"), name
        for word in ("computes", "Launch", "Napkin math", "Check:"):
            assert word in head, f"{name}: the opening comment lacks {word!r}"


def test_options_are_the_ones_cupy_uses():
    """CuPy appends -ftz=true, -arch=sm_XY and --device-as-default-execution-space to our
    options (cupy/cuda/compiler.py); if a CuPy release changes that, this says so."""
    from cupy.cuda import compiler

    src = inspect.getsource(compiler)
    assert "options += ('-ftz=true',)" in src
    assert "f'-arch=sm_{arch}'" in src
    assert "'--device-as-default-execution-space'" in src
    opts = kernel_check.nvrtc_options("90", verbose=False)
    assert opts == [*cuda.NVRTC_OPTIONS, "-ftz=true", "-arch=sm_90",
                    "--device-as-default-execution-space"]


def test_a_broken_kernel_fails_the_check(monkeypatch):
    """The check is not vacuous: a syntax error and a warning are both reported."""
    good = cuda.kernel_source("adam.cu")
    for broken, expect in ((good.replace("const double g = gf;", "const double g = gf"),
                            "error"),
                           (good.replace("const double g = gf;",
                                         "const double g = gf; int unused_variable = 3;"),
                            "warning")):
        monkeypatch.setattr(kernel_check, "kernel_source", lambda name, b=broken: b)
        r = kernel_check.compile_file("adam.cu")
        assert not r.ok
        assert any(expect in p for p in r.problems), r.problems


def test_report_table_lists_every_kernel(reports):
    text = kernel_check.format_kernel_report(list(reports.values()))
    for kernels in cuda.KERNELS.values():
        for k in kernels:
            assert k in text
    assert "all compile cleanly" in text


def test_inspect_kernels_prints_the_table(reports, monkeypatch):
    from click.testing import CliRunner

    from nodulekit.cli import main

    monkeypatch.setattr(kernel_check, "compile_all", lambda *a, **k: list(reports.values()))
    result = CliRunner().invoke(main, ["inspect", "--kernels"])
    assert result.exit_code == 0, result.output
    assert "conv_forward_128x64" in result.output and "spill" in result.output
    assert "conv_forward_mma_tf32" in result.output and "conv_weight_grad_mma_bf16" in result.output


def test_gpu_test_probe_kernels_compile(monkeypatch):
    """tests/mma_probe.cu's one-warp probes (conv_mma.cu plus three small kernels, built
    by CuPy at GPU-test time) compile for sm_90 too, so a GPU session does not find out."""
    probe = Path(__file__).with_name("mma_probe.cu").read_text()
    source = cuda.kernel_source("conv_mma.cu") + "\n" + probe
    monkeypatch.setattr(kernel_check, "kernel_source", lambda name: source)
    r = kernel_check.compile_file("conv_mma.cu")
    assert r.ok, r.problems
    assert {"mma_probe", "round_probe", "diverged_mma"} <= {k.kernel for k in r.kernels}


def _busy(blocks: int, slots: int) -> float:
    """The fraction of the GPU's block slots a grid of ``blocks`` keeps busy over its waves."""
    return blocks / (cuda._cdiv(blocks, slots) * slots)


def test_weight_gradient_splits_fill_whole_waves_on_an_h200(reports):
    """The weight gradients' split counts come from occupancy: an H200's 132 SMs times the
    blocks of the kernel one SM holds (resident_blocks, from its registers and shared
    memory as ptxas reports them here). At the paper's shapes (batch 12, 512x512, width 64)
    every layer gets the split count that keeps the most block slots busy within two waves
    (two splits where the tiles alone fill one): on tensor cores, where the tiles leave
    the GPU short of a wave, >= 95% busy; the former rule (4 x SMs blocks whatever the
    occupancy) kept 67-73% busy at enc0.conv2, enc1.conv2, enc2.conv2 and dec0.conv1, 87% at
    bottom.conv2 (now 97%), on tensor cores (2 blocks per SM)."""
    from nodulekit.bench.ops import conv_variant_shapes, upconv_levels

    info = {k.kernel: k for r in reports.values() for k in r.kernels}
    sms, batch = 132, 12
    layers = [(f"conv_weight_grad_mma_{p}_vec4", label, batch * h * h,
               cuda._cdiv(r * r * c, 128) * cuda._cdiv(k, 64))
              for p in ("tf32", "bf16") for label, h, c, k, r, _ in conv_variant_shapes()]
    layers += [("conv_weight_grad_64x128_vec4", label, batch * h * h,
                cuda._cdiv(r * r * c, 128) * cuda._cdiv(k, 64))
               for label, h, c, k, r, _ in conv_variant_shapes() if k > 16 and r * r * c > 16]
    layers += [(f"upconv_weight_grad_mma_{p}", label, batch * h * h,
                cuda._cdiv(c, 128) * cuda._cdiv(4 * k, 64))
               for p in ("tf32", "bf16") for label, h, c, k in upconv_levels()]
    for kernel, label, rows, tiles in layers:
        k = info[kernel]
        resident = cuda.resident_blocks(k.registers, k.shared_bytes, cuda.THREADS)
        if "mma" in kernel:  # __launch_bounds__(256, 2): two blocks per SM, as designed
            assert resident == 2, (kernel, k.registers, k.shared_bytes)
        slots = sms * resident
        splits, per = cuda.wave_splits(rows, tiles, slots)
        assert splits * per >= rows > (splits - 1) * per and per % 16 == 0
        # the best of every split count within two waves (two splits where tiles fill one)
        most = max(2, cuda._cdiv(2 * slots, tiles))
        best = max(_busy(tiles * s, slots) for s in range(1, min(most, rows // 256) + 1))
        got = _busy(tiles * splits, slots)
        assert got >= best - 1e-9, (kernel, label, tiles, splits)
        if "mma" in kernel and tiles < slots:  # the tensor-core defaults: whole waves
            assert got >= 0.95, (kernel, label, tiles, splits, got)


def test_resident_blocks_follows_the_sm90_limits():
    """Registers (units of 256 a warp), shared memory (1 KB kept per block, 128-byte
    units), threads and block slots each cap the blocks an SM holds."""
    assert cuda.resident_blocks(128, 13824, 256) == 2     # conv_mma.cu: registers
    assert cuda.resident_blocks(32, 0, 256) == 8          # threads: 2048 / 256
    assert cuda.resident_blocks(32, 60 * 1024, 256) == 3  # shared memory: 228 KB / 61 KB
    assert cuda.resident_blocks(16, 0, 32) == 32          # block slots
    assert cuda.resident_blocks(255, 0, 1024) == 1        # never below one
