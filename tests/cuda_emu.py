"""Run nodulekit's CUDA kernels on the CPU: a runtime for ``CudaBackend(runtime=...)``.

Nobody can run the kernels without a GPU, and GPU time is rare. So the tests also run the
*real* ``kernels/*.cu`` sources, launched by the *real* ``nodulekit/engine/cuda.py``, on the
CPU: each file is compiled by g++ as C++17 with ``tests/cuda_emu.h`` in front (CUDA's
built-ins as plain C++; a block's threads are fibers meeting at real barriers, a warp's
lanes meet at warp-wide mma.sync; blocks run one after another), plus one generated
wrapper per ``extern "C" __global__`` kernel, with ``-fsanitize=thread`` instrumentation
whose hooks cuda_emu.h defines (no ThreadSanitizer runtime: every load and store of the
kernel code calls the emulator's checks).
:class:`EmuRuntime` then stands in for CuPy: NumPy arrays for device memory, kernel calls
through ctypes. On every launch it checks what would otherwise fail only on the GPU:

- each argument's type against the kernel's C signature: arrays must have the pointer's
  element type and be C-contiguous; scalars must be the NumPy type of the C type exactly
  (``np.int32`` for ``int``, ``np.float64`` for ``double``, ...), as CuPy needs;
- the launch shape against the CUDA limits (1024 threads a block, grid y/z <= 65535);
- that no thread left the kernel while others waited in ``__syncthreads``, and that all 32
  lanes of a warp reached each warp-wide ``mma.sync`` (emulated from the PTX ISA's
  fragment layouts; TF32 / BF16 operand rounding bit-exact; the sums by a model of the
  tensor cores' truncating adder, or exactly: ``mma=``);
- races in shared memory: two threads of a block touching one word of a ``__shared__``
  array in one barrier interval, one of them writing (compute-sanitizer's racecheck);
  the threads of each interval run in a seeded pseudo-random order (``seed=``, default
  ``NODULEKIT_EMU_SEED`` or 1; 0 is the old fixed order);
- out-of-bounds reads and writes: an access inside an argument's allocation (its guard
  bytes included) but outside every argument's bytes fails the launch, naming the
  argument, the thread and the block (memcheck); guard bytes around every array the
  runtime allocated are compared after each launch too. Fresh ``empty`` arrays are filled
  with NaN bytes, so an output element a kernel never writes shows up as NaN.

``record_block`` records one block's shared-memory accesses (``recorded``) for the tests'
static counts of bank conflicts (:func:`bank_conflicts`).

What it cannot see: races between blocks (they run one at a time), warp-level behaviour
beyond mma.sync, and the GPU's floating-point details outside the tensor cores (FMA
contraction, flushed denormals, CUDA's libm). Those need the GPU run (``pytest -m gpu``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np

from nodulekit.engine.cuda import kernel_source

HEADER = Path(__file__).with_name("cuda_emu.h")
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-pthread", "-fno-strict-aliasing", "-fno-gnu-unique",
            "-fvisibility=hidden", "-w",
            # every load and store of the kernels calls cuda_emu.h's hooks; the checks need
            # one call per source-level access, so no vector merging of neighbouring ones
            "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
            "-fno-tree-vectorize", "-fno-tree-slp-vectorize"]
# linked without ThreadSanitizer's runtime: cuda_emu.h defines every hook it calls
LDFLAGS = ["-shared", "-pthread", "-Wl,-z,defs"]

SIGNATURE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
    r"(\w+)\s*\(([^)]*)\)", re.S)

# C scalar type -> (ctypes type, the NumPy scalar type CuPy wants for it)
SCALARS = {
    "int": (ctypes.c_int, np.int32),
    "unsigned int": (ctypes.c_uint, np.uint32),
    "long long": (ctypes.c_longlong, np.int64),
    "float": (ctypes.c_float, np.float32),
    "double": (ctypes.c_double, np.float64),
}
# C pointee type -> the array dtypes it may point to
POINTEES = {
    "float": (np.float32,),
    "double": (np.float64,),
    "short": (np.int16,),
    "unsigned char": (np.uint8,),
    "int": (np.int32,),
    "unsigned int": (np.uint32,),
    "unsigned long long": (np.uint64, np.int64),
}
GUARD = 256  # bytes before and after every array
POISON = 0xFF  # NaN as float32 / float64
CHECKS = {"races": 1, "bounds": 2}  # cuda_emu.h's CHECK_* bits
MMA_MODELS = {"exact": 0, "hardware": 1}  # cuda_emu.h's MMA_* models
# one recorded shared-memory access (cuda_emu.h's emu_records)
RECORD = np.dtype([("thread", np.int64), ("interval", np.int64), ("pc", np.int64),
                   ("array", np.int64), ("offset", np.int64), ("size", np.int64),
                   ("write", bool)])


def default_seed() -> int:
    """The thread-order seed of a runtime made without one: NODULEKIT_EMU_SEED, else 1."""
    return int(os.environ.get("NODULEKIT_EMU_SEED", "1"))


def compiler_available() -> tuple[bool, str]:
    if shutil.which(CXX) is None:
        return False, f"no C++ compiler {CXX!r} on PATH (set CXX) to emulate the kernels"
    return True, CXX


def parse_kernels(source: str) -> dict[str, list[tuple[str, bool, str]]]:
    """``extern "C" __global__`` kernels of a source -> [(C type, is pointer, name)]."""
    kernels = {}
    for name, params in SIGNATURE.findall(source):
        out = []
        for param in params.split(","):
            text = " ".join(param.replace("__restrict__", " ").split())
            is_ptr = "*" in text
            text = text.replace("*", " ")
            words = [w for w in text.split() if w != "const"]
            out.append((" ".join(words[:-1]), is_ptr, words[-1]))
        kernels[name] = out
    return kernels


def _wrapper(kernels) -> str:
    lines = []
    for name, params in kernels.items():
        decl = ", ".join(f"{t}{'*' if p else ''} {n}" for t, p, n in params)
        names = ", ".join(n for _, _, n in params)
        lines.append(
            f'extern "C" __attribute__((visibility("default"))) int emu_launch_{name}('
            f"unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz"
            f"{', ' if decl else ''}{decl}) {{\n"
            f"    return emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}},\n"
            f"                       [&] {{ {name}({names}); }});\n"
            f"}}\n")
    return "\n".join(lines)


def _cache_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"nodulekit-cuda-emu-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _register_shared(cdll, path: Path) -> list[str]:
    """Tell the library where its __shared__ arrays (function-local statics, ``_ZZ...``
    symbols) are, so it can poison them before every block. Returns their names."""
    proc = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True,
                          text=True, check=True)
    symbols = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16), parts[2])
    anchor = symbols["_ZN3emu6anchorE"][0]
    cdll.emu_add_shared.argtypes = [ctypes.c_longlong, ctypes.c_ulonglong]
    names = []
    for name, (value, size, kind) in symbols.items():
        if name.startswith("_ZZ") and kind in "bBdDvV" and not name.startswith("_ZZNSt"):
            cdll.emu_add_shared(value - anchor, size)
            names.append(name)
    return _demangle(names)


def _demangle(names: list[str]) -> list[str]:
    """``_ZZ...E2As`` -> ``conv_forward_mma<0, false>::As`` (c++filt where it is)."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                         text=True).stdout.splitlines()
    if len(out) != len(names):
        return names
    short = []
    for full in out:
        func, _, var = full.rpartition("::")
        m = re.match(r"^(?:[\w:]+\s+)?([\w:]+(?:<[^()]*>)?)\s*\(", func)
        short.append(f"{m.group(1) if m else func}::{var}")
    return short


class EmuModule:
    """One kernels/*.cu file compiled for the CPU, with a launcher per kernel."""

    def __init__(self, file: str, source: str | None = None):
        self.file = file
        source = kernel_source(file) if source is None else source
        self.kernels = parse_kernels(source)
        if not self.kernels:
            raise RuntimeError(f"{file}: no extern \"C\" __global__ kernels found")
        text = f'#line 1 "{file}"\n{source}\n#line 1 "emu-wrappers"\n{_wrapper(self.kernels)}'
        key = hashlib.sha256((HEADER.read_text() + text + " ".join(CXXFLAGS + LDFLAGS)).encode())
        lib = _cache_dir() / f"{Path(file).stem}-{key.hexdigest()[:16]}.so"
        if not lib.exists():
            src = lib.with_suffix(".cpp")
            src.write_text(text)
            obj = lib.with_suffix(f".{os.getpid()}.o")
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            for cmd in ([CXX, *CXXFLAGS, "-include", str(HEADER), "-x", "c++", "-c", str(src),
                         "-o", str(obj)], [CXX, *LDFLAGS, str(obj), "-o", str(tmp)]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"emulating {file}: g++ failed:\n{proc.stderr[-4000:]}")
            obj.unlink()
            os.replace(tmp, lib)
        self.lib = ctypes.CDLL(str(lib))
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_configure.argtypes = [ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_int]
        self.lib.emu_set_spans.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.lib.emu_record_block.argtypes = [ctypes.c_longlong]
        self.lib.emu_records.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
        self.lib.emu_records.restype = ctypes.c_longlong
        self.shared = _register_shared(self.lib, lib)
        self.launchers = {}
        for name, params in self.kernels.items():
            fn = getattr(self.lib, f"emu_launch_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_uint] * 6 + [
                ctypes.c_void_p if p else SCALARS[t][0] for t, p, _ in params]
            self.launchers[name] = fn

    def last_error(self) -> str:
        """The launch's failure, shared regions by name (``conv_forward_mma<0, false>::As``)."""
        return re.sub(r"shared region (\d+)", lambda m: self.shared[int(m.group(1))],
                      self.lib.emu_last_error().decode())

    def records(self) -> np.ndarray:
        """The recorded shared-memory accesses of the last launch (``RECORD`` rows)."""
        n = self.lib.emu_records(None, 0)
        raw = np.zeros((n, 6), np.uint64)
        if n:
            self.lib.emu_records(raw.ctypes.data, n)
        out = np.zeros(n, RECORD)
        for i, name in enumerate(("thread", "interval", "pc", "array", "offset")):
            out[name] = raw[:, i].astype(np.int64)
        out["size"] = (raw[:, 5] & 0x7FFFFFFF).astype(np.int64)
        out["write"] = (raw[:, 5] >> 31) != 0
        return out


class EmuRuntime:
    """Stands in for ``CupyRuntime``: NumPy memory with guards, kernels run on the CPU."""

    xp = np

    def __init__(self, sm_count: int = 4, seed: int | None = None,
                 checks: tuple[str, ...] = ("races", "bounds"), mma: str = "hardware"):
        self.sm_count = sm_count  # small, so that tiny test shapes still split their work
        self.blocks_per_sm = 2
        self.seed = default_seed() if seed is None else int(seed)
        self.checks = tuple(checks)
        self.mma = mma
        unknown = set(self.checks) - set(CHECKS) | ({mma} - set(MMA_MODELS))
        if unknown:
            raise ValueError(f"unknown emulator checks or mma model: {sorted(unknown)}")
        self.record_block: int | None = None  # a block whose shared accesses to record
        # (file, kernel) -> its last launch's recorded accesses, with the arrays' names
        self.recorded: dict[tuple[str, str], tuple[np.ndarray, list[str]]] = {}
        self.sources: dict[str, str] = {}  # file -> source text (planted kernels, probes)
        self.modules: dict[str, EmuModule] = {}
        self.launched: set[tuple[str, str]] = set()
        self._roots = weakref.WeakValueDictionary()  # id(raw buffer) -> raw buffer
        self._layout: dict[int, tuple[int, int]] = {}  # id(raw buffer) -> (start, nbytes)

    # ---- memory
    def _alloc(self, shape, dtype, fill: int):
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in (shape if isinstance(shape, tuple | list) else (shape,)))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.full(nbytes + 2 * GUARD + 256, POISON, dtype=np.uint8)
        start = GUARD + (-(raw.ctypes.data + GUARD)) % 256  # the array starts 256-aligned
        raw[start:start + nbytes] = fill
        for dead in [k for k in self._layout if k not in self._roots]:
            del self._layout[dead]
        self._roots[id(raw)] = raw
        self._layout[id(raw)] = (start, nbytes)
        return raw[start:start + nbytes].view(dtype).reshape(shape)

    def empty(self, shape, dtype):
        return self._alloc(shape, dtype, POISON)

    def zeros(self, shape, dtype):
        return self._alloc(shape, dtype, 0)

    def asarray(self, a, dtype=None):
        src = np.asarray(a, dtype=dtype)
        out = self._alloc(src.shape, src.dtype, POISON)
        out[...] = src
        return out

    def to_host(self, a) -> np.ndarray:
        return np.array(a, copy=True)

    def synchronize(self) -> None:
        pass

    @staticmethod
    def address(a) -> int:
        return int(a.ctypes.data)

    # ---- kernels
    def resident_blocks(self, file: str, kernel: str, threads: int) -> int:
        """Blocks per SM for the backend's split counts (CuPy asks the driver): a fixed
        ``blocks_per_sm``, 2 by default (conv_mma.cu's __launch_bounds__(256, 2))."""
        return self.blocks_per_sm

    def add_source(self, file: str, source: str) -> None:
        """Kernels of ``source`` launch as ``file`` (fixtures: probes, planted defects)."""
        self.sources[file] = source
        self.modules.pop(file, None)

    def module(self, file: str) -> EmuModule:
        if file not in self.modules:
            self.modules[file] = EmuModule(file, self.sources.get(file))
        return self.modules[file]

    def launch(self, file: str, kernel: str, grid, block, args) -> None:
        """Run ``kernel`` of ``file`` as CuPy would: the launch shape and every argument
        checked first, the guard bytes of every array argument after."""
        mod = self.module(file)
        where = f"{file}:{kernel}"
        if kernel not in mod.kernels:
            raise RuntimeError(f"{where}: no such kernel (have {sorted(mod.kernels)})")
        grid, block = _launch_shape(where, grid, block)
        cargs, arrays = self._c_arguments(where, mod.kernels[kernel], args)
        self._configure(mod, arrays)
        rc = mod.launchers[kernel](*grid, *block, *cargs)
        self.launched.add((file, kernel))
        if self.record_block is not None:
            self.recorded[file, kernel] = (mod.records(), mod.shared)
        _raise_on_failure(where, rc, mod, {i: pname for i, pname, _ in arrays})
        for i, pname, arr in arrays:
            self._check_guards(arr, f"{where} argument {i} ({pname})")

    def _configure(self, mod: EmuModule, arrays) -> None:
        """Seed, checks and mma model, the arrays' bounds, the block to record."""
        mod.lib.emu_configure(self.seed, sum(CHECKS[c] for c in self.checks),
                              MMA_MODELS[self.mma])
        rows = np.zeros((max(len(arrays), 1), 5), np.uint64)
        for row, (i, _, arr) in zip(rows, arrays, strict=False):
            root = self._root(arr)
            row[:] = (root.ctypes.data, root.ctypes.data + root.nbytes, arr.ctypes.data,
                      arr.ctypes.data + arr.nbytes, i)
        mod.lib.emu_set_spans(len(arrays), rows.ctypes.data)
        mod.lib.emu_record_block(-1 if self.record_block is None else int(self.record_block))

    def _c_arguments(self, where: str, params, args) -> tuple[list, list]:
        """The ctypes values to pass for ``args``, and the array arguments as
        (position, parameter name, array), after checking each against its parameter."""
        if len(args) != len(params):
            raise TypeError(f"{where}: {len(params)} parameters, {len(args)} arguments")
        cargs, arrays = [], []
        for i, ((ctype, is_ptr, pname), arg) in enumerate(zip(params, args, strict=True)):
            what = f"{where} argument {i} ({ctype}{'*' if is_ptr else ''} {pname})"
            if is_ptr:
                self._check_array_argument(what, ctype, arg)
                cargs.append(ctypes.c_void_p(arg.ctypes.data))
                arrays.append((i, pname, arg))
            else:
                cargs.append(_c_scalar(what, ctype, arg))
        return cargs, arrays

    def _check_array_argument(self, what: str, ctype: str, arg) -> None:
        """An array of this runtime, of the pointee's element type, C-contiguous, guards
        intact before the launch."""
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{what}: expected an array, got {type(arg).__name__}")
        if arg.dtype.type not in POINTEES[ctype]:
            raise TypeError(f"{what}: array of {arg.dtype}, expected "
                            f"{'/'.join(np.dtype(t).name for t in POINTEES[ctype])}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{what}: array is not C-contiguous")
        self._check_guards(arg, what)

    @staticmethod
    def _root(arr) -> np.ndarray:
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        return root

    def _check_guards(self, arr, what: str) -> None:
        root = self._root(arr)
        layout = self._layout.get(id(root))
        if layout is None or self._roots.get(id(root)) is not root:
            raise TypeError(f"{what}: a host array, not one of this runtime's (CuPy would "
                            f"refuse a NumPy array too)")
        start, nbytes = layout
        before, after = root[:start], root[start + nbytes:]
        if (before != POISON).any() or (after != POISON).any():
            lo = np.flatnonzero(before != POISON)
            hi = np.flatnonzero(after != POISON)
            raise RuntimeError(
                f"{what}: out-of-bounds write: {len(lo)} guard bytes before and {len(hi)} "
                f"after the array's {nbytes} bytes were changed")


def _launch_shape(where: str, grid, block) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """grid and block as tuples of 3 ints, within CUDA's limits (else a RuntimeError)."""
    grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
    if len(grid) != 3 or len(block) != 3:
        raise RuntimeError(f"{where}: pass grid and block as 3-tuples, got {grid}, {block}")
    if min(grid + block) < 1 or grid[0] >= 2**31 or max(grid[1:]) > 65535:
        raise RuntimeError(f"{where}: grid {grid} outside CUDA's limits")
    if block[0] > 1024 or block[1] > 1024 or block[2] > 64 or np.prod(block) > 1024:
        raise RuntimeError(f"{where}: block {block} outside CUDA's limits")
    return grid, block


def _c_scalar(what: str, ctype: str, arg):
    """A scalar argument as its ctypes value; it must be the exact NumPy type CuPy needs."""
    want = SCALARS[ctype][1]
    if type(arg) is not want:
        raise TypeError(f"{what}: pass np.{want.__name__}, got "
                        f"{type(arg).__module__}.{type(arg).__name__} {arg!r}")
    return SCALARS[ctype][0](arg.item())


# what a launch's nonzero status means (cuda_emu.h's emu::launch); any other: the message
LAUNCH_FAILURES = {
    1: "threads of a block met different barriers (a thread left the kernel while others "
       "waited in __syncthreads?)",
    2: "the lanes of a warp did not all reach the same mma.sync (divergence, or some wait "
       "at a barrier)",
}


def _raise_on_failure(where: str, rc: int, mod: EmuModule, names: dict[int, str]) -> None:
    if rc:
        text = LAUNCH_FAILURES.get(rc) or mod.last_error()
        text = re.sub(r"argument (\d+)", lambda m: f"argument {m.group(1)} "
                      f"({names.get(int(m.group(1)), '?')})", text)
        raise RuntimeError(f"{where}: {text}")


def bank_conflicts(records: np.ndarray, write: bool | None = None) -> dict:
    """Shared-memory bank conflicts of recorded accesses (``EmuRuntime.recorded``).

    The lanes of a warp run one instruction together: the k-th execution of one
    instruction (its address) by each lane of a warp in one barrier interval is one warp
    access. Its degree is the most distinct 4-byte words that fall in one of the 32 banks
    (1: conflict-free; n: the access is replayed n times). Returns {(array, pc): worst
    degree over that instruction's warp accesses}; ``write`` keeps stores (True) or loads
    (False) only. Offsets are from each array's start: a constant shift of every address
    does not change a degree, wherever the compiler places the array."""
    if write is not None:
        records = records[records["write"] == write]
    seen: dict = {}
    groups: dict = {}
    for r in records:
        lane_key = (int(r["thread"]), int(r["interval"]), int(r["pc"]))
        k = seen.get(lane_key, 0)
        seen[lane_key] = k + 1
        key = (int(r["array"]), int(r["pc"]), int(r["thread"]) // 32, int(r["interval"]), k)
        first, last = int(r["offset"]) // 4, (int(r["offset"]) + int(r["size"]) - 1) // 4
        groups.setdefault(key, set()).update(range(first, last + 1))
    worst: dict = {}
    for (array, pc, *_), words in groups.items():
        per_bank: dict = {}
        for word in words:
            per_bank[word % 32] = per_bank.get(word % 32, 0) + 1
        worst[array, pc] = max(worst.get((array, pc), 0), max(per_bank.values()))
    return worst
