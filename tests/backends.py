"""The backends the op tests run on, by name, and how a test asks for them.

- ``reference``: float64 NumPy, the yardstick (checked against torch in float64 only);
- ``cpu``: the Numba backend; ``cpu-<version>`` the same with one convolution version named
  (``nodulekit.engine.cpu.CONV_VARIANTS``; plain ``cpu`` picks one per shape);
- ``cuda-emu``: the real ``CudaBackend`` and ``kernels/*.cu`` on the CPU emulator of
  ``tests/cuda_emu.py``: runs in every CI run, skipped (saying why) only without a C++
  compiler;
- ``cuda``: the same on a GPU: marked ``gpu`` (``pytest -m gpu`` selects exactly these) and
  skipped, saying "needs a usable CUDA GPU: <why>", where ``cuda_usable()`` says no.

A test names its backends with :func:`each_backend` or, with a table of cases,
:func:`each_backend_and_case`; conftest.py's ``backend`` fixture turns the name into the
backend object, one per name for the whole session (the emulator compiles each kernel file
once). Test ids end in the backend's name, e.g. ``test_conv2d[n1-7x9-c1-k1-3x3-cuda-emu]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import cuda_emu
import numpy as np
import pytest

from nodulekit.engine import cuda_usable, get_backend
from nodulekit.engine.cpu import CONV_VARIANTS as CPU_CONV_VARIANTS

ALL_BACKENDS = ("reference", "cpu", "cuda-emu", "cuda")
REFERENCE_AND_CPU = ("reference", "cpu")
CUDA_BACKENDS = ("cuda-emu", "cuda")  # the CUDA kernels: emulated, and on a GPU
EMULATOR = ("cuda-emu",)
# the CPU backend with each convolution version named, for the tests of the ops it has them for
CPU_CONV_VERSIONS = tuple(f"cpu-{variant}" for variant in CPU_CONV_VARIANTS)

GPU_OK, GPU_WHY = cuda_usable()
EMU_OK, EMU_WHY = cuda_emu.compiler_available()

_MARKS = {
    "cuda": [pytest.mark.gpu,
             pytest.mark.skipif(not GPU_OK, reason=f"needs a usable CUDA GPU: {GPU_WHY}")],
    "cuda-emu": [pytest.mark.skipif(not EMU_OK, reason=EMU_WHY)],
}


def _param(name: str, *values, case_id: str | None = None):
    test_id = name if case_id is None else f"{case_id}-{name}"
    return pytest.param(name, *values, id=test_id, marks=_MARKS.get(name, []))


def each_backend(*names: str):
    """Run the test once per backend in ``names``: argument ``backend``."""
    return pytest.mark.parametrize("backend", [_param(name) for name in names], indirect=True)


def each_backend_and_case(*groups: tuple[Iterable[str], Mapping[str, object]]):
    """Run the test on every (backend, case) of each group ``(backend names, {id: case})``:
    arguments ``backend`` and ``case``. Shapes every backend runs form one group; shapes
    only the CUDA kernels need (several tiles, float4 paths) another, on CUDA_BACKENDS."""
    params = [_param(name, case, case_id=case_id)
              for names, cases in groups for case_id, case in cases.items() for name in names]
    return pytest.mark.parametrize("backend,case", params, indirect=["backend"])


@functools.cache
def get(name: str):
    """The backend object for a name of this module (one per name per session)."""
    if name == "cuda-emu":
        from nodulekit.engine.cuda import CudaBackend

        return CudaBackend(runtime=cuda_emu.EmuRuntime())
    if name.startswith("cpu-"):
        from nodulekit.engine.cpu import CPUBackend

        return CPUBackend(conv_variant=name.removeprefix("cpu-"))
    return get_backend(name)


@functools.cache
def _cuda_backend(runtime, precision: str, conv_variant: str | None):
    from nodulekit.engine.cuda import CudaBackend

    return CudaBackend(precision=precision, runtime=runtime, conv_variant=conv_variant)


def cuda_backend(like, precision: str | None = None, conv_variant: str | None = None):
    """A CudaBackend on the runtime of ``like`` (the GPU's or the emulator's) computing in
    ``precision`` (default: the precision of ``conv_variant``) with convolution version
    ``conv_variant`` (default: that precision's own)."""
    from nodulekit.engine.cuda import CONV_VARIANTS

    if precision is None:
        precision = CONV_VARIANTS[conv_variant][0] if conv_variant else "fp32"
    return _cuda_backend(like.rt, precision, conv_variant)


def on_gpu(be) -> bool:
    """Whether ``be`` computes on a GPU (its arrays are not NumPy's)."""
    return be.xp is not np


def torch_device(be) -> str:
    """Where torch runs next to ``be``: on the GPU next to a GPU, else on the CPU."""
    return "cuda" if on_gpu(be) else "cpu"


def to_device(be, *arrays):
    """Host arrays -> ``be``'s arrays, floats cast to its dtype (one array: no tuple)."""
    out = tuple(be.asarray(a, dtype=be.dtype if a.dtype.kind == "f" else None) for a in arrays)
    return out if len(out) > 1 else out[0]


def to_host(be, *arrays):
    """``be``'s arrays -> NumPy arrays (None stays None; one array: no tuple)."""
    out = tuple(None if a is None else np.asarray(be.to_host(a)) for a in arrays)
    return out if len(out) > 1 else out[0]
