"""Data-parallel training: one process per rank, gradients averaged once per step.

A rank is one process: on GPUs one per GPU (each takes the GPU of its local rank, its index
among the ranks on its host), on CPUs one per group of cores. Every rank holds the same
weights: rank 0's initial weights are broadcast, and after each step's backward pass the
flat gradient buffer is averaged over the ranks in ONE all-reduce (sum, then divide by the
number of ranks), so every rank's Adam step is the same.

Why the average is exact: the Dice loss is a per-sample mean over the batch
(docs/design.md), so with the global batch B split into N equal parts of B/N samples, each
rank's gradient is that of the mean over its own samples, and the mean of the N rank
gradients is the gradient of the mean over all B samples. Only the order of the float32
additions differs from one process with batch B (its weight gradients sum B samples'
contributions in one order; here B/N per rank, then the N partial means), so the two agree
to float32 rounding.

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

The package, one job a module:

- `faults`: `DistributedError`, `PeerFailed`; `collective`, `abort_on_error` (one rank
  failing alone ends every rank); `fault_hook` (failures injected for the tests);
- `watchdog`: `Watchdog`, the deadline of every collective, and `timeout_from_env`;
- `communicators`: `Communicator`, `MPICommunicator`, `NCCLCommunicator`;
- `world`: the launcher's environment, MPI and NCCL here, `select_kind`, `init`, and the
  GPU and CPU threads of each rank;
- `sharding`: each rank's part of the batches (`shard_global_batches`, `shard_batches`);
- `launcher`: `launch`, `nodulekit train --gpus N` re-run under mpiexec (signals passed on,
  ranks never left running: `LaunchInterrupted`).

Everything public is re-exported here: ``from nodulekit import distributed``, then
``distributed.init(...)``.
"""

from nodulekit.distributed.communicators import (
    ABORT_GRACE_S,
    Communicator,
    MPICommunicator,
    NCCLCommunicator,
)
from nodulekit.distributed.faults import (
    DistributedError,
    PeerFailed,
    abort_on_error,
    collective,
    fault_hook,
)
from nodulekit.distributed.launcher import (
    LaunchInterrupted,
    find_mpiexec,
    launch,
    launch_command,
)
from nodulekit.distributed.sharding import (
    check_global_batch,
    shard_batches,
    shard_global_batches,
)
from nodulekit.distributed.watchdog import DEFAULT_TIMEOUT_S, Watchdog, timeout_from_env
from nodulekit.distributed.world import (
    KINDS,
    cpu_threads_per_rank,
    init,
    launched_by_mpi,
    launcher_rank,
    launcher_world_size,
    limit_numba_threads,
    mpi_status,
    nccl_status,
    select_kind,
    use_local_gpu,
)

__all__ = [
    # faults
    "DistributedError",
    "PeerFailed",
    "abort_on_error",
    "collective",
    "fault_hook",
    # watchdog
    "DEFAULT_TIMEOUT_S",
    "Watchdog",
    "timeout_from_env",
    # communicators
    "ABORT_GRACE_S",
    "Communicator",
    "MPICommunicator",
    "NCCLCommunicator",
    # world
    "KINDS",
    "cpu_threads_per_rank",
    "init",
    "launched_by_mpi",
    "launcher_rank",
    "launcher_world_size",
    "limit_numba_threads",
    "mpi_status",
    "nccl_status",
    "select_kind",
    "use_local_gpu",
    # sharding
    "check_global_batch",
    "shard_batches",
    "shard_global_batches",
    # launcher
    "LaunchInterrupted",
    "find_mpiexec",
    "launch",
    "launch_command",
]
