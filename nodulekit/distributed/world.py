"""Where this process stands: the launcher, MPI and NCCL here, and the communicator.

`init` is the one call the trainer makes: it learns from the launcher's environment
variables whether this process is one rank of several (`launched_by_mpi`), gives each rank
the GPU of its local rank (`use_local_gpu`), and picks the communicator (`select_kind`:
NCCL for cuda, MPI for cpu, `Communicator` for one rank). CPU ranks on one host share its
cores out (`cpu_threads_per_rank`, `limit_numba_threads`).
"""

from __future__ import annotations

import contextlib
import os

from nodulekit.distributed.communicators import (
    Communicator,
    MPICommunicator,
    NCCLCommunicator,
)
from nodulekit.distributed.faults import DistributedError, collective

# Environment variables that MPI launchers set in every process they start.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                       "PMIX_SIZE")
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
KINDS = ("auto", "single", "mpi", "nccl")


# ----------------------------------------------------------------------------- environment


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun with PMI) started this process."""
    return any(os.environ.get(v) for v in _LAUNCHER_SIZE_VARS + _LAUNCHER_RANK_VARS)


def launcher_world_size() -> int | None:
    """The number of ranks the launcher says it started, if it says."""
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def launcher_rank() -> int:
    """This process's rank as the launcher says (0 outside a launcher)."""
    for var in _LAUNCHER_RANK_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def mpi_status() -> tuple[bool, str]:
    """(True, MPI library version) when mpi4py imports, else (False, why not).

    Importing ``mpi4py.MPI`` initialises MPI (a one-rank "singleton" outside a launcher).
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        return False, f"mpi4py is not installed (pip install 'nodulekit[dist]'): {exc}"
    except Exception as exc:  # a broken MPI library
        return False, f"mpi4py failed to load its MPI library ({type(exc).__name__}: {exc})"
    return True, MPI.Get_library_version().splitlines()[0].strip()


def nccl_status() -> tuple[bool, str]:
    """(True, NCCL version) when CuPy can load NCCL, else (False, why not)."""
    import warnings

    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl is missing; we say so
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except ImportError as exc:
        return False, f"cupy is not installed (pip install 'nodulekit[cuda]'): {exc}"
    except Exception as exc:
        return False, f"cupy.cuda.nccl failed to import ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True):
        return False, ("CuPy could not load the NCCL library (libnccl.so.2); pip install "
                       "nvidia-nccl-cu13")
    try:
        return True, f"NCCL {nccl.get_version()}"
    except Exception as exc:
        return False, f"NCCL is not usable ({type(exc).__name__}: {exc})"


def select_kind(backend: str, world_size: int, requested: str = "auto", *,
                have_mpi: tuple[bool, str] = (True, ""),
                have_nccl: tuple[bool, str] = (True, "")) -> str:
    """Which communicator: "single", "mpi" or "nccl". Pure (tests call it directly).

    auto: one rank -> "single"; several -> "nccl" on cuda, "mpi" on cpu. "mpi" on cuda
    stages the gradients through host memory (slow, but it works without NCCL); it is only
    taken when asked for. Raises DistributedError, saying what to install or change.
    """
    if requested not in KINDS:
        raise DistributedError(f"unknown communicator {requested!r}; choose one of {KINDS}")
    if requested == "single":
        if world_size > 1:
            raise DistributedError(f"{world_size} ranks were started but the communicator "
                                   "'single' was asked for; it serves one rank only")
        return "single"
    if requested == "auto":
        if world_size <= 1:
            return "single"
        requested = "nccl" if backend == "cuda" else "mpi"
    if requested == "nccl":
        if backend != "cuda":
            raise DistributedError(f"NCCL averages GPU buffers; the backend here is "
                                   f"{backend!r} (use the MPI communicator, or --device cuda)")
        if not have_nccl[0]:
            raise DistributedError(f"GPU ranks average gradients with NCCL, which is not "
                                   f"usable: {have_nccl[1]} (or set NODULEKIT_DIST=mpi to "
                                   "stage them through host memory over MPI, slowly)")
        if world_size > 1 and not have_mpi[0]:
            raise DistributedError(f"{world_size} ranks need MPI to share the NCCL id: "
                                   f"{have_mpi[1]}")
        return "nccl"
    if not have_mpi[0]:
        raise DistributedError(f"data-parallel training on CPU ranks needs MPI: {have_mpi[1]}")
    return "mpi"


# ----------------------------------------------------------------------------- setting up


def init(device: str = "auto", kind: str | None = None) -> tuple[Communicator, str]:
    """The communicator for this process and the backend name, device chosen per rank.

    Outside an MPI launcher: `Communicator` (one rank) unless ``kind`` (or the environment
    variable NODULEKIT_DIST) asks for another. Under one: MPI first (to learn the local
    rank), then each rank takes the GPU of its local rank, resolves ``device`` there, and
    all ranks must agree on the backend; then NCCL for cuda, MPI for cpu (`select_kind`).
    """
    from nodulekit.engine import resolve_device

    kind = kind or os.environ.get("NODULEKIT_DIST") or "auto"
    if kind not in KINDS:
        raise DistributedError(f"NODULEKIT_DIST / kind must be one of {KINDS}, got {kind!r}")
    if kind == "single" or (kind == "auto" and not launched_by_mpi()):
        backend, _ = resolve_device(device)
        return Communicator(), backend
    have_mpi = mpi_status()
    if not have_mpi[0]:
        where = "an MPI launcher started this process" if launched_by_mpi() else ""
        raise DistributedError(f"{where or 'MPI was asked for'}, but {have_mpi[1]}")
    mpi = MPICommunicator()
    error = None
    backend = "cpu"
    try:
        if device in ("auto", "cuda"):
            use_local_gpu(mpi.local_rank, mpi.local_size, required=device == "cuda")
        backend, _ = resolve_device(device)
    except Exception as exc:
        error = exc
    mpi.agree(error, timeout=None)
    backends = mpi.allgather_object(backend, timeout=None)
    if len(set(backends)) > 1:
        mpi.close()
        raise collective(DistributedError(
            f"the ranks resolved --device {device} differently ({backends}): some hosts "
            "have a usable GPU and some do not; name --device cpu or cuda"))
    error, chosen = None, None
    try:
        chosen = select_kind(backend, mpi.size, kind, have_mpi=have_mpi,
                             have_nccl=nccl_status() if backend == "cuda" else (False, ""))
    except DistributedError as exc:
        error = exc
    mpi.agree(error, timeout=None)
    if chosen == "single":  # mpiexec -n 1: nothing to average
        mpi.close()
        return Communicator(), backend
    if chosen == "nccl":
        comm = None
        try:
            comm = NCCLCommunicator(mpi)
        except Exception as exc:
            error = DistributedError(f"NCCL setup failed on rank {mpi.rank}: "
                                     f"{type(exc).__name__}: {exc}")
        mpi.agree(error, timeout=None)
        return comm, backend
    return mpi, backend


def use_local_gpu(local_rank: int, local_size: int, required: bool = False) -> int | None:
    """Make GPU `local_rank` this process's device (before anything allocates on one).

    Returns the device id, or None when there is no GPU (an error if `required`, or if
    there are fewer GPUs than ranks on this host).
    """
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        if required:
            raise DistributedError(f"--device cuda on rank {local_rank} of this host: no "
                                   f"usable GPU ({type(exc).__name__}: {exc})") from None
        return None
    if count < 1:
        if required:
            raise DistributedError("--device cuda: this host has no GPU")
        return None
    if local_size > count:
        raise DistributedError(f"{local_size} ranks on this host but {count} GPU(s): one GPU "
                               "per rank (start fewer ranks, or --device cpu)")
    cupy.cuda.Device(local_rank).use()
    return local_rank


def cpu_threads_per_rank(local_size: int) -> int:
    """CPU worker threads for one of `local_size` ranks on this host.

    NODULEKIT_THREADS if set; else the cores shared out (at least 1): on 2 cores with 2
    ranks, 1 each, so the ranks do not fight over the cores.
    """
    text = os.environ.get("NODULEKIT_THREADS")
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            raise DistributedError(f"NODULEKIT_THREADS={text!r} is not a number") from None
    return max(1, (os.cpu_count() or 1) // max(1, local_size))


def limit_numba_threads(threads: int) -> None:
    """Numba's parallel loops on this rank: at most `threads` threads."""
    with contextlib.suppress(Exception):
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
