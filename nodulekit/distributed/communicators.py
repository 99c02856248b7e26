"""The communicators: how ranks average gradients and share values.

`Communicator` is one rank alone (every collective a no-op) and the interface of all;
`MPICommunicator` runs mpi4py on CPU ranks (``Allreduce`` in place on the NumPy buffer);
`NCCLCommunicator` runs NCCL through CuPy on GPU ranks, with an `MPICommunicator` beside it
for the NCCL id and the small host values. Every collective except the setup broadcast
runs under a `Watchdog`; one that expires stops every rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from nodulekit.distributed.faults import DistributedError, PeerFailed, collective
from nodulekit.distributed.watchdog import Watchdog, timeout_from_env

T = TypeVar("T")
# A backend array: a NumPy array on cpu, a CuPy array on cuda.
Buffer = Any
# A collective's deadline: True for the communicator's own, None (or 0) for none, or seconds.
Timeout = float | bool | None

# seconds between printing why a rank stops every rank and MPI_Abort (see abort)
ABORT_GRACE_S = 1.0



class Communicator:
    """One rank alone: every collective is a no-op. The interface of all communicators.

    Buffers (`allreduce_mean`, `bcast`) are backend arrays, changed in place; host values
    (`allreduce_mean_host`, the *_object calls) are NumPy arrays or picklable objects.
    """

    kind = "single"

    def __init__(self) -> None:
        self.rank, self.size = 0, 1
        self.local_rank, self.local_size = 0, 1
        self.step = 0  # the trainer's global step, named in the watchdog's message

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "one process"

    def allreduce_mean(self, buf: Buffer) -> None:
        """buf <- the mean of every rank's buf (the gradient all-reduce)."""

    def allreduce_sum(self, buf: Buffer) -> None:
        """buf <- the sum of every rank's buf (a small one: batch norm's per-channel sums,
        float64)."""

    def bcast(self, buf: Buffer, root: int = 0) -> None:
        """buf <- root's buf (the initial weights)."""

    def allreduce_mean_host(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def bcast_object(self, obj: Any, root: int = 0, timeout: Timeout = True) -> Any:
        return obj

    def allgather_object(self, obj: Any, timeout: Timeout = True) -> list:
        return [obj]

    def barrier(self, timeout: Timeout = True) -> None:
        pass

    def agree(self, error: BaseException | None, timeout: Timeout = True) -> None:
        """Every rank says whether it failed; if any did, every rank raises.

        The failed rank re-raises its own exception; the others raise `PeerFailed`.
        """
        if error is not None:
            raise collective(error)

    def share(self, make: Callable[[], T], root: int = 0, timeout: Timeout = None) -> T:
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

    def __init__(self, comm: Any = None, timeout: Timeout = True) -> None:
        super().__init__()
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = timeout_from_env() if timeout is True else timeout
        self._watchdog = Watchdog(self.timeout, self._expired)
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

    def _guard(self, what: str, timeout: Timeout = True) -> contextlib.AbstractContextManager[None]:
        return self._watchdog.guard(what, timeout)

    # -- buffers
    def allreduce_mean(self, buf: Buffer) -> None:
        host = _host_view(buf)
        with self._guard("the gradient all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        host /= host.dtype.type(self.size)
        _host_back(buf, host)

    def allreduce_sum(self, buf: Buffer) -> None:
        host = _host_view(buf)
        with self._guard("the batch-norm all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        _host_back(buf, host)

    def bcast(self, buf: Buffer, root: int = 0) -> None:
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

    def bcast_object(self, obj: Any, root: int = 0, timeout: Timeout = True) -> Any:
        with self._guard("a broadcast from rank 0", timeout):
            return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any, timeout: Timeout = True) -> list:
        with self._guard("gathering results from every rank", timeout):
            return self.comm.allgather(obj)

    def barrier(self, timeout: Timeout = True) -> None:
        with self._guard("a barrier", timeout):
            self.comm.Barrier()

    def agree(self, error: BaseException | None, timeout: Timeout = True) -> None:
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

    def __init__(self, mpi: MPICommunicator | None = None) -> None:
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
        self._watchdog = Watchdog(mpi.timeout if mpi is not None else timeout_from_env(),
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

    def _dtype(self, buf: Buffer) -> int:
        try:
            return self._dtypes[np.dtype(buf.dtype)]
        except KeyError:
            raise DistributedError(f"NCCL collectives here take {sorted(map(str, self._dtypes))}"
                                   f", not {buf.dtype}") from None

    def _check(self, buf: Buffer) -> None:
        if not isinstance(buf, self.cupy.ndarray) or not buf.flags.c_contiguous:
            raise DistributedError("NCCL collectives take a C-contiguous CuPy array")

    def allreduce_mean(self, buf: Buffer) -> None:
        self._check(buf)
        stream = self.cupy.cuda.get_current_stream()
        with self._watchdog.guard("the NCCL gradient all-reduce"):
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                                self.nccl.NCCL_SUM, stream.ptr)
            stream.synchronize()  # NCCL is asynchronous: the wait is where a hang shows
        buf /= buf.dtype.type(self.size)

    def allreduce_sum(self, buf: Buffer) -> None:
        self._check(buf)
        stream = self.cupy.cuda.get_current_stream()
        # queued on the stream, no wait: the kernels that read the sums come after it on the
        # same stream, and a rank that hangs shows in the step's (waited-for) gradient
        # all-reduce; waiting here would stall the GPU twice per batch-norm layer
        with self._watchdog.guard("the NCCL batch-norm all-reduce"):
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                                self.nccl.NCCL_SUM, stream.ptr)

    def bcast(self, buf: Buffer, root: int = 0) -> None:
        self._check(buf)
        stream = self.cupy.cuda.get_current_stream()
        with self._watchdog.guard("the NCCL weight broadcast"):
            self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, stream.ptr)
            stream.synchronize()

    def allreduce_mean_host(self, values: np.ndarray) -> np.ndarray:
        if self.mpi is None:
            return np.asarray(values, dtype=np.float64)
        return self.mpi.allreduce_mean_host(values)

    def bcast_object(self, obj: Any, root: int = 0, timeout: Timeout = True) -> Any:
        return obj if self.mpi is None else self.mpi.bcast_object(obj, root, timeout)

    def allgather_object(self, obj: Any, timeout: Timeout = True) -> list:
        return [obj] if self.mpi is None else self.mpi.allgather_object(obj, timeout)

    def barrier(self, timeout: Timeout = True) -> None:
        if self.mpi is not None:
            self.mpi.barrier(timeout)

    def agree(self, error: BaseException | None, timeout: Timeout = True) -> None:
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


def _host_view(buf: Buffer) -> np.ndarray:
    """A NumPy array for MPI: buf itself, or a host copy of a GPU buffer."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise DistributedError("MPI collectives take a C-contiguous array")
        return buf
    return buf.get()  # a CuPy array, with the MPI communicator asked for on cuda


def _host_back(buf: Buffer, host: np.ndarray) -> None:
    if host is not buf:
        buf.set(host)
