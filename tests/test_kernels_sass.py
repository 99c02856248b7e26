"""What the design claims of the kernels' machine code, read from the SASS (cuobjdump -sass).

Every kernel file is compiled for sm_90 twice: by NVRTC exactly as CuPy will (the cubin a
GPU loads) and by nvcc (the toolkit's own compiler, where it is installed), and each cubin
is disassembled with ``cuobjdump -sass``. Then, for every kernel ``cuda.py`` declares:

- the tensor-core kernels (conv_mma.cu) issue HMMA instructions of their shape and type
  (``HMMA.1688.F32.TF32`` for mma.sync m16n8k8 TF32, ``HMMA.16816.F32.BF16`` for m16n8k16
  BF16): the mma.sync in the source became tensor-core work, not an emulation;
- the ``_vec4`` kernels load global memory 128 bits at a time (``LDG.E.128``): the float4
  paths are real 16-byte loads;
- no kernel touches local memory (``LDL`` / ``STL``): no spills, no arrays indexed at run
  time that the compiler had to put on the stack (one exception, LOCAL_MEMORY_ALLOWED:
  window_augment's double-precision cos / sin, from CUDA's math library).

cuobjdump and nvdisasm come with the CUDA toolkit or, in CI, from the ``nvidia-cuda-cuobjdump``
and ``nvidia-cuda-nvdisasm`` wheels of the ``test`` extra; nvcc from the toolkit. A test
skips, saying which tool is missing, where one is not installed.
"""

from __future__ import annotations

import re

import pytest

from nodulekit.engine import cuda, kernel_check

HAVE_SASS = kernel_check.find_tool("cuobjdump") and kernel_check.find_tool("nvdisasm")
needs_sass = pytest.mark.skipif(not HAVE_SASS, reason="no cuobjdump / nvdisasm (CUDA toolkit, "
                                "or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")

HMMA = {"tf32": "HMMA.1688.F32.TF32", "bf16": "HMMA.16816.F32.BF16"}
LOCAL_MEMORY = re.compile(r"\b(LDL|STL)\b")
# The one kernel allowed local memory, and why: CUDA's double-precision cos / sin keep a
# small array there for the argument reduction of huge angles (ptxas: a 40-byte stack
# frame); thread 0 of each block calls them once, for angles of at most 20 degrees.
LOCAL_MEMORY_ALLOWED = {"window_augment": "CUDA's double cos / sin (argument reduction)"}


@pytest.fixture(scope="module")
def nvrtc_sass(kernel_reports):
    return {f: kernel_check.disassemble(r.cubin) for f, r in kernel_reports.items()}


@pytest.fixture(scope="module")
def nvcc_sass():
    if kernel_check.find_tool("nvcc") is None:
        pytest.skip("nvcc is not installed (the CUDA toolkit); the NVRTC cubins are checked")
    return {f: kernel_check.disassemble(kernel_check.nvcc_cubin(f)) for f in cuda.KERNELS}


def _problems(sass: dict[str, dict[str, str]], declared: dict) -> list[str]:
    """What the SASS of each declared kernel (file -> kernels) lacks or has too much of."""
    problems = []
    for file, kernels in declared.items():
        for kernel in kernels:
            text = sass[file].get(kernel)
            if text is None:
                problems.append(f"{kernel}: not in the {file} cubin")
                continue
            if file == "conv_mma.cu":
                precision = "tf32" if "tf32" in kernel else "bf16"
                if HMMA[precision] not in text:
                    problems.append(f"{kernel}: no {HMMA[precision]}")
            if kernel.endswith("_vec4") and "LDG.E.128" not in text:
                problems.append(f"{kernel}: no 128-bit global load (LDG.E.128)")
            if LOCAL_MEMORY.search(text) and kernel not in LOCAL_MEMORY_ALLOWED:
                problems.append(f"{kernel}: local memory "
                                f"({sorted(set(LOCAL_MEMORY.findall(text)))})")
    return problems


@needs_sass
def test_sass_of_the_cubins_cupy_loads(nvrtc_sass):
    problems = _problems(nvrtc_sass, cuda.KERNELS)
    assert not problems, "NVRTC SASS:\n  " + "\n  ".join(problems)


@needs_sass
def test_sass_of_the_nvcc_build(nvcc_sass):
    problems = _problems(nvcc_sass, cuda.KERNELS)
    assert not problems, "nvcc SASS:\n  " + "\n  ".join(problems)


@needs_sass
def test_the_sass_check_sees_what_it_looks_for(monkeypatch):
    """Not vacuous: a kernel with a runtime-indexed local array uses local memory, and one
    without float4 loads has no LDG.E.128, and the check says so."""
    source = r'''
extern "C" __global__ void spills_vec4(const float* x, float* y, int i) {
    float a[256];
    for (int k = 0; k < 256; ++k) a[(k * i) & 255] = x[k * blockDim.x + threadIdx.x];
    y[threadIdx.x] = a[i & 255];
}
'''
    monkeypatch.setattr(kernel_check, "kernel_source", lambda name: source)
    report = kernel_check.compile_file("probe.cu")
    problems = _problems({"probe.cu": kernel_check.disassemble(report.cubin)},
                         {"probe.cu": ("spills_vec4",)})
    assert problems == ["spills_vec4: no 128-bit global load (LDG.E.128)",
                        "spills_vec4: local memory (['LDL', 'STL'])"]
