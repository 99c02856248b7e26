"""What a failure on one rank does to the others: the errors, and ending the job.

`DistributedError` and `PeerFailed` are what the data-parallel code raises; `collective`
marks an exception every rank raises alike (it ends the run normally), and
`abort_on_error` ends every rank when one fails alone. `fault_hook` injects such failures,
for the tests of a failing rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodulekit.distributed.communicators import Communicator

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
def abort_on_error(comm: Communicator) -> Iterator[None]:
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


# ----------------------------------------------------------------------------- faults (tests)


def fault_hook(comm: Communicator) -> Callable[[int], None] | None:
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
