"""Compile every ``kernels/*.cu`` as CuPy will, without a GPU, and report each kernel's
registers, shared memory and spills.

CuPy compiles a ``RawModule`` with NVRTC, passing our :data:`~nodulekit.engine.cuda.
NVRTC_OPTIONS` followed by what it adds itself (``-ftz=true``, ``-arch=sm_XY``,
``--device-as-default-execution-space``). This module runs NVRTC (the library from the
``cuda-toolkit[nvrtc]`` wheels, loaded through ``cupy_backends``; no driver or GPU needed)
with that very list for sm_90 (the H100/H200) and ``-Xptxas -v``: NVRTC then runs ptxas, so
the cubin is the one the GPU will load and ptxas's report gives registers, shared memory,
stack and spills per kernel. A file passes when it compiles, its log holds nothing but
ptxas's info lines (no warning of any kind), and every kernel ``cuda.py`` declares for it
is in the cubin. ``tests/test_kernels_compile.py`` runs this in CI;
``nodulekit inspect --kernels`` prints :func:`format_kernel_report`. Where ``nvcc`` is on
the PATH, ``nvcc -arch=sm_90 -cubin -Xptxas -v`` gives the same table from the toolkit's
own compiler (``--nvcc``), as a cross-check.

    python -m nodulekit.engine.kernel_check [--arch 90] [--nvcc] [FILE.cu ...]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from nodulekit.engine.cuda import (
    CUPY_APPENDED_OPTIONS,
    KERNELS,
    NVRTC_OPTIONS,
    kernel_dir,
    kernel_files,
    kernel_source,
)

DEFAULT_ARCH = "90"
SHARED_LIMIT = 48 * 1024  # static shared memory per block without opting in

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\w+)'")
_FUNC = re.compile(r"Function properties for (\w+)")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")
_KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+'
                          r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


@dataclass
class KernelInfo:
    kernel: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    barriers: int = 0


@dataclass
class FileReport:
    file: str
    ok: bool
    seconds: float
    options: list[str]
    problems: list[str] = field(default_factory=list)  # errors, warnings, missing kernels
    kernels: list[KernelInfo] = field(default_factory=list)
    cubin_bytes: int = 0
    cubin: bytes = field(default=b"", repr=False)  # the machine code, for disassemble()


def nvrtc_options(arch: str = DEFAULT_ARCH, verbose: bool = True) -> list[str]:
    """The option list CuPy's RawModule gives NVRTC for an sm_<arch> device."""
    opts = list(NVRTC_OPTIONS) + [o.format(arch=arch) for o in CUPY_APPENDED_OPTIONS]
    return opts + (["-Xptxas", "-v"] if verbose else [])


def declared_kernels(source: str) -> list[str]:
    """Names of the ``extern "C" __global__`` kernels in a source text."""
    return _KERNEL_DECL.findall(source)


def parse_ptxas(log: str) -> tuple[list[KernelInfo], list[str]]:
    """ptxas -v output -> per-kernel resources, and every line that is not an info line."""
    kernels: dict[str, KernelInfo] = {}
    entry = props = None  # the kernel being compiled; the function whose properties follow
    other = []
    for raw in log.replace("\x00", "").splitlines():
        line = raw.strip()
        if not line:
            continue
        if m := _ENTRY.search(line):
            entry = kernels.setdefault(m.group(1), KernelInfo(m.group(1)))
        elif m := _FUNC.search(line):  # an entry or a device function it calls
            props = kernels.get(m.group(1))
        elif m := _PROPS.search(line):
            if props is not None:
                props.stack_bytes, props.spill_stores, props.spill_loads = (
                    int(g) for g in m.groups())
        elif m := _USED.search(line):
            if entry is not None:
                entry.registers = int(m.group(1))
                s = _SMEM.search(line)
                entry.shared_bytes = int(s.group(1)) if s else 0
                b = _BARRIERS.search(line)
                entry.barriers = int(b.group(1)) if b else 0
        elif not line.startswith("ptxas info"):
            other.append(line)
    return list(kernels.values()), other


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise RuntimeError(
            "compiling the kernels needs CuPy and NVRTC: pip install 'nodulekit[test]' (or "
            "cupy-cuda13x 'cuda-toolkit[nvrtc,cudart]==13.0.*')") from exc
    return nvrtc


def compile_file(name: str, arch: str = DEFAULT_ARCH) -> FileReport:
    """Compile one kernels/*.cu file with NVRTC as CuPy would, for sm_<arch>."""
    nvrtc = _nvrtc()
    source = kernel_source(name)
    opts = nvrtc_options(arch)
    report = FileReport(name, False, 0.0, opts)
    t0 = time.perf_counter()
    try:
        prog = nvrtc.createProgram(source, name, [], [])
    except Exception as exc:  # libnvrtc not found or not loadable
        raise RuntimeError(f"NVRTC could not be loaded ({type(exc).__name__}: {exc}); "
                           f"pip install 'cuda-toolkit[nvrtc,cudart]==13.0.*' (in the "
                           f"[test] extra)") from exc
    try:
        nvrtc.compileProgram(prog, opts)
        compiled = True
    except Exception as exc:  # NVRTCError: the log says why
        compiled = False
        report.problems.append(f"NVRTC failed: {exc}")
    log = nvrtc.getProgramLog(prog)
    report.kernels, other = parse_ptxas(log)
    report.problems += other
    if compiled:
        cubin = nvrtc.getCUBIN(prog)
        report.cubin_bytes = len(cubin)
        report.cubin = _whole_elf(bytes(cubin))
        for kernel in KERNELS.get(name, ()):
            if kernel.encode() not in cubin:
                report.problems.append(f"kernel {kernel!r} (launched by cuda.py) not in the cubin")
        found = {k.kernel for k in report.kernels}
        for kernel in declared_kernels(source):
            if kernel not in found:
                report.problems.append(f"kernel {kernel!r} got no ptxas report")
        for k in report.kernels:
            if k.shared_bytes > SHARED_LIMIT:
                report.problems.append(f"{k.kernel}: {k.shared_bytes} bytes of static shared "
                                       f"memory, over the {SHARED_LIMIT} a block may use")
    if name not in KERNELS:
        report.problems.append(f"{name} is not in cuda.KERNELS: declare what it defines")
    report.seconds = time.perf_counter() - t0
    report.ok = compiled and not report.problems
    return report


def _whole_elf(image: bytes) -> bytes:
    """A cubin as CuPy's getCUBIN returns it can lack its last byte(s) (zeros: it is handed
    over like a C string): pad it to the end its ELF header gives, so tools can read it."""
    if len(image) < 64 or image[:4] != b"\x7fELF":
        return image
    phoff, shoff = int.from_bytes(image[32:40], "little"), int.from_bytes(image[40:48], "little")
    phsize, phnum, shsize, shnum = (int.from_bytes(image[i:i + 2], "little")
                                    for i in (54, 56, 58, 60))
    end = max(phoff + phsize * phnum, shoff + shsize * shnum)
    return image + b"\0" * max(0, end - len(image))


def compile_all(arch: str = DEFAULT_ARCH, files=None) -> list[FileReport]:
    return [compile_file(f, arch) for f in (files or kernel_files())]


def find_tool(name: str) -> str | None:
    """A CUDA command-line tool (nvcc, cuobjdump, nvdisasm): on the PATH, in the CUDA
    toolkit's folder, or from the NVIDIA wheels (``nvidia-cuda-cuobjdump``,
    ``nvidia-cuda-nvdisasm``: ``site-packages/nvidia/cu*/bin``)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join("/usr/local/cuda/bin", name)]
    try:
        import nvidia

        for root in nvidia.__path__:
            for sub in sorted(os.listdir(root)):
                candidates.append(os.path.join(root, sub, "bin", name))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def disassemble(cubin: bytes) -> dict[str, str]:
    """``cuobjdump -sass`` of a cubin: kernel name -> its SASS text. Needs cuobjdump and
    the nvdisasm it runs (find_tool); RuntimeError naming what is missing otherwise."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        raise RuntimeError("disassembling needs cuobjdump and nvdisasm: the CUDA toolkit, or "
                           "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep
               + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                              env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr.strip()[-2000:]}")
    parts = re.split(r"^\s*Function : (\w+)\s*$", proc.stdout, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def nvcc_cubin(name: str, arch: str = DEFAULT_ARCH) -> bytes:
    """``nvcc -arch=sm_<arch> -cubin`` of a kernel file (the toolkit's own compiler, the
    options CuPy gives NVRTC); RuntimeError where nvcc is missing or fails."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, name), os.path.join(tmp, "out.cubin")
        with open(src, "w", encoding="utf-8") as f:
            f.write(kernel_source(name))
        proc = subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-std=c++17", "-ftz=true",
                               src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {name}: {proc.stderr.strip()[-2000:]}")
        with open(out, "rb") as f:
            return f.read()


def nvcc_report(name: str, arch: str = DEFAULT_ARCH) -> FileReport:
    """The same report from ``nvcc -arch=sm_<arch> -cubin -Xptxas -v`` (needs nvcc)."""
    nvcc = find_tool("nvcc")
    opts = [f"-arch=sm_{arch}", "-cubin", "-std=c++17", "-ftz=true", "-Xptxas", "-v"]
    report = FileReport(name, False, 0.0, opts)
    if nvcc is None:
        report.problems.append("nvcc not found")
        return report
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, name)
        with open(src, "w", encoding="utf-8") as f:
            f.write(kernel_source(name))
        proc = subprocess.run([nvcc, *opts, src, "-o", os.path.join(tmp, "out.cubin")],
                              capture_output=True, text=True)
    report.kernels, other = parse_ptxas(proc.stderr + proc.stdout)
    report.problems += other
    if proc.returncode != 0:
        report.problems.append(f"nvcc exited with {proc.returncode}")
    report.seconds = time.perf_counter() - t0
    report.ok = proc.returncode == 0 and not report.problems
    return report


def format_kernel_report(reports: list[FileReport] | None = None, arch: str = DEFAULT_ARCH,
                         nvcc: bool = False) -> str:
    """The table: file, kernel, registers, shared memory, stack, spills; then problems."""
    if reports is None:
        reports = ([nvcc_report(f, arch) for f in kernel_files()] if nvcc
                   else compile_all(arch))
    how = ("nvcc " if nvcc else "NVRTC (as CuPy's RawModule) ") + " ".join(reports[0].options)
    lines = [f"kernels in {kernel_dir()}", f"compiled for sm_{arch} with {how}",
             f"{'file':<11} {'kernel':<32} {'regs':>4} {'smem B':>7} {'stack B':>7} "
             f"{'spill st/ld B':>13} {'bar':>3}"]
    for r in reports:
        for k in sorted(r.kernels, key=lambda k: k.kernel):
            lines.append(f"{r.file:<11} {k.kernel:<32} {k.registers:>4} {k.shared_bytes:>7} "
                         f"{k.stack_bytes:>7} {f'{k.spill_stores}/{k.spill_loads}':>13} "
                         f"{k.barriers:>3}")
    total = sum(r.seconds for r in reports)
    bad = [r for r in reports if not r.ok]
    lines.append(f"{len(reports)} files, {sum(len(r.kernels) for r in reports)} kernels, "
                 f"{total:.1f} s; " + ("all compile cleanly" if not bad
                                       else f"{len(bad)} with problems:"))
    for r in bad:
        for p in r.problems:
            lines.append(f"  {r.file}: {p}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="kernel files (default: all)")
    ap.add_argument("--arch", default=DEFAULT_ARCH, help="compute capability, e.g. 90")
    ap.add_argument("--nvcc", action="store_true", help="use nvcc instead of NVRTC")
    args = ap.parse_args(argv)
    files = args.files or kernel_files()
    reports = ([nvcc_report(f, args.arch) for f in files] if args.nvcc
               else compile_all(args.arch, files))
    print(format_kernel_report(reports, args.arch, args.nvcc))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
