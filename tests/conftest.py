"""Fixtures shared by the test files: a seeded generator, and the backend under test; and
a hook that turns a test module's failed import of the CPU-side stack into a skip."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
from tiny import TINY


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fixed per test, different across tests."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def backend(request):
    """The backend object a test runs on, named by its ``backend`` parameter (tests that
    take it are parametrised with tests/backends.py's each_backend / each_backend_and_case)."""
    import backends  # here, not at the top: most test files never touch a GPU or emulator

    return backends.get(request.param)


@pytest.fixture(scope="session")
def kernel_reports():
    """Every kernels/*.cu compiled for sm_90 by NVRTC as CuPy will (kernel_check), once per
    session: file -> FileReport (registers, shared memory, spills, the cubin)."""
    from nodulekit.engine import kernel_check

    return {r.file: r for r in kernel_check.compile_all("90")}


# Packages the GPU machine's image may lack (bench/gpu_check.sh carries them as wheels):
# a test module that cannot be imported for want of one of them is skipped, saying which,
# instead of failing collection, so `pytest -m gpu` there reports on the GPU tests alone.
OPTIONAL_STACK = ("pydicom", "mpi4py", "h5py", "PIL", "matplotlib", "tqdm", "click")
_MISSING = re.compile(r"No module named '([\w.]+)'|import of ([\w.]+) halted")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.failed and isinstance(collector, pytest.Module):
        found = _MISSING.search(str(report.longrepr))
        name = found and (found.group(1) or found.group(2))
        if name and name.split(".")[0] in OPTIONAL_STACK:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: {name} is not "
                               f"installed here (the CPU-side stack; pip install it, or carry "
                               f"its wheel: bash bench/gpu_check.sh --fetch-wheels)")
    return report


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data-set folder, cache path) of the tiny synthetic set (written as DICOM and read
    back with pydicom: where pydicom is missing, as on a GPU machine without the carried
    wheels, the tests that need it skip, saying so)."""
    pytest.importorskip("pydicom", reason="the tiny data set is DICOM: pydicom is not "
                        "installed (carry its wheel: bash bench/gpu_check.sh --fetch-wheels)")
    from nodulekit.data.cache import open_cache
    from nodulekit.data.preprocess import preprocess
    from nodulekit.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "data", SynthConfig(**TINY), workers=0)
    preprocess(root / "data", root / "cache.h5", workers=0, progress=False)
    with open_cache(root / "cache.h5") as c:
        for split in ("train", "val", "test"):
            has = c.split(split).meta["has_nodule"].astype(bool)
            assert has.any() and (~has).any(), (
                f"the tiny set's {split} split should hold slices with and without a nodule; "
                f"synth changed? adjust TINY ({TINY})")
    return root / "data", root / "cache.h5"
