"""Starting the ranks: `nodulekit train --gpus N` re-runs itself under mpiexec.

`launch_command` builds ``mpiexec -n N python -m MODULE ARGS...`` with this Python and the
mpiexec beside it (the mpich wheel's, in a venv); `launch` runs it and returns its status,
passing SIGTERM / SIGINT / SIGHUP on to the ranks and never leaving them running when the
launcher itself dies (see `launch`).
"""

from __future__ import annotations

import contextlib
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


class LaunchInterrupted(DistributedError):
    """The launcher was asked to stop (SIGTERM, SIGINT, SIGHUP); it passed the signal on to
    mpiexec, which ended the ranks. `signum` is the signal."""

    def __init__(self, signum: int, status: int):
        self.signum, self.status = signum, status
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: passed on to the ranks (mpiexec exited with "
                         f"status {status})")


# Signals the launcher passes on to mpiexec, and how long the ranks then have to end before
# the launcher kills mpiexec's process group (a rank stuck in a collective may not listen).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 30.0


def launch(ranks: int, args: list[str], module: str = "nodulekit.cli",
           timeout: float | None = None) -> int:
    """Run `launch_command` and return its exit status (0: every rank succeeded).

    mpiexec ends every rank when one dies; a non-zero status means a rank failed, and its
    message is in the output above.

    The ranks never outlive the launcher. mpiexec runs in its own session, so a terminal's
    Ctrl-C reaches the launcher alone, which passes SIGINT (and SIGTERM, SIGHUP: what a
    scheduler or a closed terminal sends) on to mpiexec; MPICH's Hydra then signals every
    rank through its proxies (Hydra starts each rank in a session of its own, so signalling
    mpiexec's process group would miss them: mpiexec must relay it). The ranks get
    `GRACE_S` to end before the launcher kills the group; then `LaunchInterrupted`.

    A launcher that is SIGKILLed runs no handler. For that, mpiexec is started with the
    Linux parent-death signal (PR_SET_PDEATHSIG = SIGTERM): the kernel sends it SIGTERM the
    moment the launcher dies, and Hydra ends the ranks as above. Chosen over a watchdog
    thread in every rank polling the launcher's pid: nothing to poll or time out, no pid
    reuse to guard against, and the ranks started by a plain `mpiexec` (no launcher) are
    unchanged. Elsewhere than Linux only the forwarding applies.
    """
    import subprocess

    cmd = launch_command(ranks, args, module)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    _checkout_on_path(env)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent())
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    import threading

    main = threading.current_thread() is threading.main_thread()  # where handlers can go
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main else {}
    try:
        status = _wait(proc, timeout, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status is None:
        raise DistributedError(f"the {ranks} ranks ran past {timeout} s; stopped them")
    if received:
        raise LaunchInterrupted(received[0], status)
    return status


def _wait(proc, timeout: float | None, received: list[int]) -> int | None:
    """mpiexec's exit status; None when it ran past `timeout` (then it is killed). After a
    forwarded signal, mpiexec's group is killed if it has not ended within GRACE_S."""
    import subprocess
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    signalled_at = None
    while True:
        try:
            return proc.wait(timeout=0.5)  # wakes for the signal handler in between
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if received and signalled_at is None:
            signalled_at = now
        late = signalled_at is not None and now - signalled_at > GRACE_S
        if late or (deadline is not None and now >= deadline):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode if late else None


def _die_with_parent():
    """A preexec_fn giving mpiexec the parent-death signal SIGTERM (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _checkout_on_path(env: dict) -> None:
    """Run from a checkout (``python cli.py``, not installed): the ranks' ``python -m
    nodulekit.cli`` must find this nodulekit too, so its folder goes on PYTHONPATH."""
    import nodulekit

    root = os.path.dirname(os.path.dirname(os.path.abspath(nodulekit.__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return  # installed: the ranks import it as this process does
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
