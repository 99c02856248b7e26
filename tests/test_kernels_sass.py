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


# ------------------------------------------------------------ instructions per mma.sync

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA (0x[0-9a-f]+)")
# m16n8k8 multiply-adds (1,024) of one instruction: BF16's m16n8k16 does twice TF32's
MMA_WORK = {"HMMA.1688.F32.TF32": 1, "HMMA.16816.F32.BF16": 2}
# The forward's main loop, per m16n8k8 of work (static count of the loop's code). The
# first GPU run (H200, 2026-12-04) found the kernel issue-bound: ncu counted 26 issued
# instructions per mma.sync; the loop's code was 419 for 16 (26 each, 31 with its staging
# loop run twice). With the staging's per-row work taken out of the loop: 329, 21 each.
MAX_INSTRUCTIONS_PER_MMA = 24


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (the widest backward branch's range)."""
    code = [(int(a, 16), ins) for a, ins in SASS_LINE.findall(sass)]
    loops = [(int(m.group(1), 16), at) for at, ins in code
             if (m := BRANCH.search(ins)) and int(m.group(1), 16) < at]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return [ins for at, ins in code if start <= at <= end]


def instructions_per_mma(sass: str) -> float:
    loop = main_loop(sass)
    work = sum(n for ins in loop for name, n in MMA_WORK.items() if name in ins)
    return len(loop) / work


@needs_sass
@pytest.mark.parametrize("kernel", ["conv_forward_mma_tf32_vec4", "conv_forward_mma_bf16_vec4"])
def test_the_tensor_core_forward_loop_issues_few_instructions_per_mma(nvrtc_sass, kernel):
    """The staging's loop-invariant work stays out of the loop over the reduction: at most
    MAX_INSTRUCTIONS_PER_MMA instructions of the main loop per m16n8k8 of work."""
    per_mma = instructions_per_mma(nvrtc_sass["conv_mma.cu"][kernel])
    assert per_mma <= MAX_INSTRUCTIONS_PER_MMA, f"{kernel}: {per_mma:.1f} per mma"


def test_instructions_per_mma_counts_the_loop():
    """The count on a made-up listing: a loop of 6 instructions holding 2 TF32 mma (3 per
    mma), the code before and after it not counted."""
    sass = "\n".join(f"/*{at:04x}*/ {ins} ;" for at, ins in [
        (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "S2R R0, SR_TID.X"),
        (0x20, "LDS R4, [R2]"), (0x30, "HMMA.1688.F32.TF32 R8, R4, R6, R8"),
        (0x40, "LDS R5, [R3]"), (0x50, "HMMA.1688.F32.TF32 R8, R5, R6, R8"),
        (0x60, "ISETP.GE.AND P0, PT, R0, 0x10, PT"), (0x70, "@!P0 BRA 0x20"),
        (0x80, "STG.E [R10.64], R8"), (0x90, "EXIT")])
    assert main_loop(sass)[0].startswith("LDS") and len(main_loop(sass)) == 6
    assert instructions_per_mma(sass) == 3.0


# The fp32 register-blocked GEMMs' compute loop: share of FFMA among its instructions. The
# first GPU run's kernels read their 12 values a reduction index with 12 scalar shared
# loads (FFMA 64-67% of the loop); with tile_index's runs of 4, 3 float4 loads (82%).
MIN_FFMA_SHARE = 0.75
REGISTER_BLOCKED = [("conv.cu", "conv_forward_128x64"), ("conv.cu", "conv_forward_128x64_vec4"),
                    ("conv.cu", "conv_weight_grad_64x128_vec4"),
                    ("upconv.cu", "upconv_forward_128x64"),
                    ("upconv.cu", "upconv_backward_data_128x64"),
                    ("upconv.cu", "upconv_weight_grad_64x128")]


def ffma_share_of_the_compute_loop(sass: str) -> float:
    """FFMA / instructions of the loop (a backward branch's range) where FFMA are densest."""
    code = [(int(a, 16), ins) for a, ins in SASS_LINE.findall(sass)]
    shares = []
    for m_at in ((m, at) for at, ins in code if (m := BRANCH.search(ins))):
        m, at = m_at
        start = int(m.group(1), 16)
        if start < at:
            body = [ins for a, ins in code if start <= a <= at]
            shares.append(sum("FFMA" in ins for ins in body) / len(body))
    return max(shares)


@needs_sass
@pytest.mark.parametrize("file,kernel", REGISTER_BLOCKED, ids=[k for _, k in REGISTER_BLOCKED])
def test_the_register_blocked_compute_loop_is_mostly_ffma(nvrtc_sass, file, kernel):
    share = ffma_share_of_the_compute_loop(nvrtc_sass[file][kernel])
    assert share >= MIN_FFMA_SHARE, f"{kernel}: FFMA {share:.0%} of its compute loop"
