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
def reports():
    return {r.file: r for r in kernel_check.compile_all("90")}


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
