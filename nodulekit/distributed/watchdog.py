"""The deadline every collective runs under: `Watchdog`, and its timeout from the environment.

A rank that hangs (or a launcher that does not end every rank when one dies) would leave
the others waiting in a collective for ever. So each collective runs under a deadline
(``NODULEKIT_DIST_TIMEOUT`` seconds, default `DEFAULT_TIMEOUT_S`; 0 turns it off); a
rank that waits longer is reported to the communicator, which says where it was stuck and
stops every rank.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from nodulekit.distributed.faults import DistributedError

DEFAULT_TIMEOUT_S = 300.0


def timeout_from_env() -> float | None:
    """NODULEKIT_DIST_TIMEOUT in seconds (default DEFAULT_TIMEOUT_S); None when 0."""
    text = os.environ.get("NODULEKIT_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"NODULEKIT_DIST_TIMEOUT={text!r} is not a number of "
                               "seconds") from None
    return value if value > 0 else None


class Watchdog:
    """Calls `on_expire(what, seconds)` when one guarded call outlasts `timeout` seconds."""

    def __init__(self, timeout: float | None,
                 on_expire: Callable[[str, float], None]) -> None:
        self.timeout = timeout
        self._on_expire = on_expire
        self._cv = threading.Condition()
        self._what: str | None = None
        self._deadline: float | None = None
        self._limit = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float | None | bool = True) -> Iterator[None]:
        """Run the body under a deadline: `timeout` seconds, the watchdog's own when True,
        none when None, False or 0."""
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
        """Stop the watchdog's thread (a guarded call still running is no longer watched)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
