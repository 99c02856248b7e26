"""Starting the ranks: `nodulekit train --gpus N` re-runs itself under mpiexec.

`launch_command` builds ``mpiexec -n N python -m MODULE ARGS...`` with this Python and the
mpiexec beside it (the mpich wheel's, in a venv); `launch` runs it and returns its status.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from nodulekit.distributed.faults import DistributedError
from nodulekit.distributed.world import mpi_status


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
