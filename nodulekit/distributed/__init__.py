"""Data-parallel training: one process per rank, gradients averaged once per step.

A rank is one process: on GPUs one per GPU (each takes the GPU of its local rank, its index
among the ranks on its host), on CPUs one per group of cores. Every rank holds the same
weights: rank 0's initial weights are broadcast, and after each step's backward pass the
flat gradient buffer is averaged over the ranks in ONE all-reduce (sum, then divide by the
number of ranks), so every rank's Adam step is the same.

Why the average is exact: the Dice loss is a per-sample mean over the batch (DESIGN.md), so
with the global batch B split into N equal parts of B/N samples, each rank's gradient is
that of the mean over its own samples, and the mean of the N rank gradients is the
gradient of the mean over all B samples. Only the order of the float32 additions differs
from one process with batch B (its weight gradients sum B samples' contributions in one
order; here B/N per rank, then the N partial means), so the two agree to float32 rounding.

Two implementations, chosen automatically (`init`), no home-made transport:

- `MPICommunicator`: mpi4py on CPU ranks (``Allreduce`` in place on the NumPy buffer);
- `NCCLCommunicator`: NCCL through CuPy on GPU ranks (``cupy.cuda.nccl``): rank 0's NCCL
  unique id is broadcast over MPI, the gradient all-reduce and the weight broadcast run on
  the GPU, on the current stream; small host values (losses, metrics, objects) go over MPI.

A process that was not started by an MPI launcher gets `Communicator` (one rank, every
collective a no-op). `mpiexec -n N nodulekit train ...` starts N ranks; `nodulekit train
--gpus N` starts the same by itself (`launch`).

A rank that dies. mpiexec (MPICH's Hydra, Open MPI's mpirun) ends every rank when one
exits abnormally. A rank that hangs, or a launcher that does not, is caught by a watchdog:
every collective runs under a deadline (``NODULEKIT_DIST_TIMEOUT`` seconds, default
`DEFAULT_TIMEOUT_S`; 0 turns it off), and a rank that waits longer prints which collective
it was stuck in and calls ``MPI_Abort``, which ends the whole job. The setup broadcast
(rank 0 may be preprocessing a data set or generating the demo set) has no deadline.

Every rank must take part in every collective, in the same order: the trainer calls them
at the same points on all ranks (each step; the end of each epoch's validation; setup).
A rank left out of one is the classic hang, which the watchdog then reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np

from nodulekit.data.loader import split_range  # noqa: F401  (re-exported)

DEFAULT_TIMEOUT_S = 300.0
# Environment variables that MPI launchers set in every process they start.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                       "PMIX_SIZE")
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
KINDS = ("auto", "single", "mpi", "nccl")


class DistributedError(RuntimeError):
    """Data-parallel setup or a collective failed; the message says which rank and why."""


class PeerFailed(DistributedError):
    """Another rank failed (its own message says why); this rank stops too, quietly."""


def collective(exc: BaseException) -> BaseException:
    """Mark `exc` as raised on every rank alike (so no rank is left waiting): it then ends
    the run normally. Any other exception in a job of several ranks ends it by
    `abort_on_error`. Returns exc."""
    exc.nodulekit_collective = True
    return exc


@contextlib.contextmanager
def abort_on_error(comm: Communicator):
    """In a job of several ranks: an exception on some ranks only (a bug, a full disk,
    Ctrl-C) would leave the others waiting in their next collective, and this rank in
    MPI_Finalize waiting for them: a hang. So print it here and end every rank
    (`Communicator.abort`). Exceptions every rank raises alike (`collective`) pass."""
    try:
        yield
    except BaseException as exc:
        if comm.size > 1 and not getattr(exc, "nodulekit_collective", False) and not (
                isinstance(exc, SystemExit) and exc.code in (0, None)):
            import traceback

            code = 130 if isinstance(exc, KeyboardInterrupt) else 1
            detail = "" if isinstance(exc, (KeyboardInterrupt, ValueError, OSError)) else (
                "".join(traceback.format_exception(exc)))
            sys.stderr.write(f"{detail}\nnodulekit rank {comm.rank}/{comm.size}: "
                             f"{type(exc).__name__}: {exc}\nstopping every rank\n")
            sys.stderr.flush()
            comm.abort(code)
        raise


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


def timeout_from_env() -> float | None:
    """NODULEKIT_DIST_TIMEOUT in seconds (default DEFAULT_TIMEOUT_S); None when 0."""
    text = os.environ.get("NODULEKIT_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"NODULEKIT_DIST_TIMEOUT={text!r} is not a number of "
                               "seconds") from None
    return value if value > 0 else None


# ----------------------------------------------------------------------------- the watchdog


# seconds between printing why a rank stops every rank and MPI_Abort (see abort)
ABORT_GRACE_S = 1.0


class _Watchdog:
    """Calls `on_expire(what, seconds)` when one guarded call outlasts `timeout` seconds."""

    def __init__(self, timeout: float | None, on_expire):
        self.timeout = timeout
        self._on_expire = on_expire
        self._cv = threading.Condition()
        self._what: str | None = None
        self._deadline: float | None = None
        self._limit = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float | None | bool = True):
        limit = self.timeout if timeout is True else (timeout or None)
        if limit is None:
            yield
            return
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nodulekit-watchdog",
                                                daemon=True)
                self._thread.start()
            self._what, self._limit = what, limit
            self._deadline = time.monotonic() + limit
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._what = self._deadline = None

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                what, limit = self._what, self._limit
                break
            else:
                return
        self._on_expire(what, limit)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


# ----------------------------------------------------------------------------- communicators


class Communicator:
    """One rank alone: every collective is a no-op. The interface of all communicators.

    Buffers (`allreduce_mean`, `bcast`) are backend arrays, changed in place; host values
    (`allreduce_mean_host`, the *_object calls) are NumPy arrays or picklable objects.
    """

    kind = "single"

    def __init__(self):
        self.rank, self.size = 0, 1
        self.local_rank, self.local_size = 0, 1
        self.step = 0  # the trainer's global step, named in the watchdog's message

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "one process"

    def allreduce_mean(self, buf) -> None:
        """buf <- the mean of every rank's buf (the gradient all-reduce)."""

    def bcast(self, buf, root: int = 0) -> None:
        """buf <- root's buf (the initial weights)."""

    def allreduce_mean_host(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def bcast_object(self, obj, root: int = 0, timeout=True):
        return obj

    def allgather_object(self, obj, timeout=True) -> list:
        return [obj]

    def barrier(self, timeout=True) -> None:
        pass

    def agree(self, error: BaseException | None, timeout=True) -> None:
        """Every rank says whether it failed; if any did, every rank raises.

        The failed rank re-raises its own exception; the others raise `PeerFailed`.
        """
        if error is not None:
            raise collective(error)

    def share(self, make, root: int = 0, timeout=None):
        """make() on `root`, its result (or its exception) on every rank.

        For setup: rank 0 resolves the configuration, reads a checkpoint, maybe builds a
        data set; the other ranks wait (with no deadline unless `timeout` is given).
        """
        ok, value = True, None
        if self.rank == root:
            try:
                value = make()
            except Exception as exc:
                ok, value = False, exc
        ok, value = self.bcast_object((ok, value) if self.rank == root else None, root,
                                      timeout=timeout)
        if ok:
            return value
        if self.rank == root:
            raise collective(value)
        raise collective(PeerFailed(f"rank {root} failed: {value}")) from None

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def close(self) -> None:
        pass


class MPICommunicator(Communicator):
    """mpi4py over MPI.COMM_WORLD (or a given communicator): CPU ranks."""

    kind = "mpi"

    def __init__(self, comm=None, timeout: float | None | bool = True):
        super().__init__()
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = timeout_from_env() if timeout is True else timeout
        self._watchdog = _Watchdog(self.timeout, self._expired)
        self.library = MPI.Get_library_version().splitlines()[0].strip()

    def describe(self) -> str:
        return f"{self.size} ranks over MPI ({self.library})"

    # -- the watchdog's end
    def _expired(self, what: str, limit: float) -> None:
        sys.stderr.write(
            f"\nnodulekit rank {self.rank}/{self.size}: waited {limit:g} s in {what} (global "
            f"step {self.step}) without every rank taking part: another rank has died or "
            "hangs. Stopping every rank (MPI_Abort). Set NODULEKIT_DIST_TIMEOUT (seconds) to "
            "wait longer.\n")
        sys.stderr.flush()
        self.abort(1)

    def _guard(self, what: str, timeout=True):
        return self._watchdog.guard(what, timeout)

    # -- buffers
    def allreduce_mean(self, buf) -> None:
        host = _host_view(buf)
        with self._guard("the gradient all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        host /= host.dtype.type(self.size)
        _host_back(buf, host)

    def bcast(self, buf, root: int = 0) -> None:
        host = _host_view(buf)
        with self._guard("the weight broadcast"):
            self.comm.Bcast(host, root=root)
        _host_back(buf, host)

    # -- host values
    def allreduce_mean_host(self, values: np.ndarray) -> np.ndarray:
        values = np.array(values, dtype=np.float64)
        with self._guard("the loss all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values / self.size

    def bcast_object(self, obj, root: int = 0, timeout=True):
        with self._guard("a broadcast from rank 0", timeout):
            return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj, timeout=True) -> list:
        with self._guard("gathering results from every rank", timeout):
            return self.comm.allgather(obj)

    def barrier(self, timeout=True) -> None:
        with self._guard("a barrier", timeout):
            self.comm.Barrier()

    def agree(self, error: BaseException | None, timeout=True) -> None:
        said = self.allgather_object(None if error is None else f"{type(error).__name__}: "
                                     f"{error}", timeout)
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if not failed:
            return
        if error is not None:
            raise collective(error)
        raise collective(PeerFailed("; ".join(f"rank {r} failed: {m}" for r, m in failed)))

    def abort(self, code: int = 1) -> None:
        # MPI_Abort tears the job down at once, and mpiexec may drop what this rank wrote
        # to stderr just before (seen in CI: the reason why was lost). Give it a moment.
        time.sleep(ABORT_GRACE_S)
        try:
            self.comm.Abort(code)
        finally:
            os._exit(code)

    def close(self) -> None:
        self._watchdog.close()


class NCCLCommunicator(Communicator):
    """NCCL through CuPy: GPU ranks, one GPU each (select it before creating this).

    mpi: an `MPICommunicator` for the NCCL id and the host values; None only for one rank
    (then the id is made locally, and host collectives are no-ops).
    """

    kind = "nccl"

    def __init__(self, mpi: MPICommunicator | None = None):
        super().__init__()
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        self.mpi = mpi
        if mpi is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
            uid = nccl.get_unique_id()
        else:
            self.rank, self.size = mpi.rank, mpi.size
            self.local_rank, self.local_size = mpi.local_rank, mpi.local_size
            uid = mpi.bcast_object(nccl.get_unique_id() if mpi.rank == 0 else None)
        self.device = cupy.cuda.Device().id
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                        np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int32): nccl.NCCL_INT32,
                        np.dtype(np.int64): nccl.NCCL_INT64,
                        np.dtype(np.uint8): nccl.NCCL_UINT8}
        self._watchdog = _Watchdog(mpi.timeout if mpi is not None else timeout_from_env(),
                                   self._expired)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:  # the MPI side's watchdog names it too
        self._step = value
        if getattr(self, "mpi", None) is not None:
            self.mpi.step = value

    def describe(self) -> str:
        from cupy.cuda import nccl

        return f"{self.size} rank(s) over NCCL {nccl.get_version()} (GPU {self.device} here)"

    def _expired(self, what: str, limit: float) -> None:
        sys.stderr.write(
            f"\nnodulekit rank {self.rank}/{self.size} (GPU {self.device}): waited {limit:g} s "
            f"in {what} (global step {self.step}): another rank has died or hangs. Stopping "
            "every rank.\n")
        sys.stderr.flush()
        self.abort(1)

    def _dtype(self, buf):
        try:
            return self._dtypes[np.dtype(buf.dtype)]
        except KeyError:
            raise DistributedError(f"NCCL collectives here take {sorted(map(str, self._dtypes))}"
                                   f", not {buf.dtype}") from None

    def _check(self, buf) -> None:
        if not isinstance(buf, self.cupy.ndarray) or not buf.flags.c_contiguous:
            raise DistributedError("NCCL collectives take a C-contiguous CuPy array")

    def allreduce_mean(self, buf) -> None:
        self._check(buf)
        stream = self.cupy.cuda.get_current_stream()
        with self._watchdog.guard("the NCCL gradient all-reduce"):
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                                self.nccl.NCCL_SUM, stream.ptr)
            stream.synchronize()  # NCCL is asynchronous: the wait is where a hang shows
        buf /= buf.dtype.type(self.size)

    def bcast(self, buf, root: int = 0) -> None:
        self._check(buf)
        stream = self.cupy.cuda.get_current_stream()
        with self._watchdog.guard("the NCCL weight broadcast"):
            self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, stream.ptr)
            stream.synchronize()

    def allreduce_mean_host(self, values: np.ndarray) -> np.ndarray:
        if self.mpi is None:
            return np.asarray(values, dtype=np.float64)
        return self.mpi.allreduce_mean_host(values)

    def bcast_object(self, obj, root: int = 0, timeout=True):
        return obj if self.mpi is None else self.mpi.bcast_object(obj, root, timeout)

    def allgather_object(self, obj, timeout=True) -> list:
        return [obj] if self.mpi is None else self.mpi.allgather_object(obj, timeout)

    def barrier(self, timeout=True) -> None:
        if self.mpi is not None:
            self.mpi.barrier(timeout)

    def agree(self, error, timeout=True) -> None:
        if self.mpi is None:
            super().agree(error)
        else:
            self.mpi.agree(error, timeout)

    def abort(self, code: int = 1) -> None:
        with contextlib.suppress(Exception):
            self.comm.abort()
        if self.mpi is not None:
            self.mpi.abort(code)
        os._exit(code)

    def close(self) -> None:
        self._watchdog.close()
        with contextlib.suppress(Exception):
            self.comm.destroy()
        if self.mpi is not None:
            self.mpi.close()


def _host_view(buf) -> np.ndarray:
    """A NumPy array for MPI: buf itself, or a host copy of a GPU buffer."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise DistributedError("MPI collectives take a C-contiguous array")
        return buf
    return buf.get()  # a CuPy array, with the MPI communicator asked for on cuda


def _host_back(buf, host: np.ndarray) -> None:
    if host is not buf:
        buf.set(host)


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


# ----------------------------------------------------------------------------- sharding the data


def check_global_batch(batch_size: int, size: int) -> int:
    """The per-rank batch; DistributedError unless the global batch divides evenly."""
    if batch_size % size:
        raise DistributedError(
            f"the global batch of {batch_size} does not divide evenly over {size} ranks; "
            f"use a --batch-size that is a multiple of {size} (e.g. "
            f"{max(size, batch_size // size * size)} or {(batch_size // size + 1) * size})")
    return batch_size // size


def shard_global_batches(loader, rank: int, size: int):
    """Make `loader` (built for the GLOBAL batch) give this rank its part of every global
    batch: samples [rank*b, (rank+1)*b) with b = batch / size (the loader's "within").

    So every rank takes the same number of steps, an epoch still sees each sample once
    (over all ranks), and the samples and their augmentation are exactly those of one
    process with the global batch.
    """
    if size > 1:
        check_global_batch(loader.batch_size, size)
        loader.set_shard(rank, size, "within")
    return loader


def shard_batches(loader, rank: int, size: int):
    """Make an evaluation `loader` give this rank a contiguous block of its batches (no
    batch dropped; block sizes differ by at most one batch; the loader's "blocks").
    Concatenating the ranks' results in rank order gives the cache order back. Returns
    (loader, batches here)."""
    if size > 1:
        loader.set_shard(rank, size, "blocks")
    return loader, len(loader)


# ----------------------------------------------------------------------------- faults (tests)


def fault_hook(comm: Communicator):
    """NODULEKIT_TEST_FAULT="kill|raise|hang:RANK:STEP": on that rank, after that global
    step, SIGKILL itself, raise an error the other ranks do not see, or sleep for ever.
    For the tests of a failing rank only; None (nothing to do) when the variable is unset."""
    spec = os.environ.get("NODULEKIT_TEST_FAULT")
    if not spec:
        return None
    try:
        action, rank, step = spec.split(":")
        rank, step = int(rank), int(step)
        assert action in ("kill", "raise", "hang")
    except (ValueError, AssertionError):
        raise DistributedError(f"NODULEKIT_TEST_FAULT={spec!r}: expected "
                               "kill|raise|hang:RANK:STEP") from None
    if comm.rank != rank:
        return None

    def hook(global_step: int) -> None:
        if global_step != step:
            return
        sys.stderr.write(f"nodulekit rank {rank}: NODULEKIT_TEST_FAULT: {action} at step "
                         f"{step}\n")
        sys.stderr.flush()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise RuntimeError(f"NODULEKIT_TEST_FAULT: rank {rank} fails alone")
        while True:
            time.sleep(3600)

    return hook


# ----------------------------------------------------------------------------- launching


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel's, in a venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def launch_command(ranks: int, args: list[str], module: str = "nodulekit.cli") -> list[str]:
    """mpiexec -n RANKS python -m MODULE ARGS..., with this Python and the mpiexec beside it."""
    if ranks < 1:
        raise DistributedError(f"the number of ranks must be >= 1, got {ranks}")
    ok, why = mpi_status()
    if not ok:
        raise DistributedError(f"starting {ranks} ranks needs MPI: {why}")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise DistributedError("no mpiexec next to this Python or on PATH (pip install "
                               "'nodulekit[dist]' brings MPICH's)")
    return [mpiexec, "-n", str(ranks), sys.executable, "-m", module, *args]


def launch(ranks: int, args: list[str], module: str = "nodulekit.cli",
           timeout: float | None = None) -> int:
    """Run `launch_command` and return its exit status (0: every rank succeeded).

    mpiexec ends every rank when one dies; a non-zero status means a rank failed, and its
    message is in the output above.
    """
    import subprocess

    cmd = launch_command(ranks, args, module)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait(timeout=timeout)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise DistributedError(f"the {ranks} ranks ran past {timeout} s; stopped them") from None
