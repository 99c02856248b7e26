"""One writer per run folder: an OS file lock on ``RUN/.lock``.

`RunLock.acquire` takes an exclusive `fcntl.flock` on ``RUN/.lock`` without waiting and
writes who holds it (pid, host, start time, command) into the file; a second
`nodulekit train --out RUN` or `--resume RUN` then fails at once with `RunLocked`, naming the
holder. The lock belongs to the open file, so the kernel drops it whenever the holder ends,
SIGKILL and a crash included: there is no stale lock to clean up, and the file's contents
only say who held it last. (flock is local to one host: on a network file system two hosts
may not see each other's locks; run one writer per folder there.)

The file stays in the folder after the run (removing it would let a process that opened the
old file take a lock nobody else sees). While holding the lock, `clean_stale_partials`
removes the temporary files (``.NAME.*.partial``) that a killed writer of this folder left;
no other process writes them there while we hold it.

`release(new_run=True)` of a new run that wrote no checkpoint (a failed start: bad options,
data too small, a full disk, Ctrl-C in the first epoch) removes what the session wrote there
(the log, config.json, the lock file) and the folders it made, when they are left empty; a
cache preprocessed into the run folder is kept for the next try.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"
# What a session writes into a new run folder before its first checkpoint; a failed start
# removes these (never anything else).
_SESSION_FILES = (LOCK_NAME, "train.log", "config.json", "metrics.csv", "progress.png")


class RunLocked(RuntimeError):
    """The run folder is held by another process; the message names it."""


def is_partial(name: str) -> bool:
    """A temporary file of ours: ``.NAME.<random>.partial`` (plus an extension)."""
    return name.startswith(".") and ".partial" in name


class RunLock:
    """An exclusive lock on a run folder (see the module docstring)."""

    def __init__(self, folder: Path, fd: int, made: list[Path], existed: set[str]):
        self.folder, self._fd, self._existed = folder, fd, existed
        self._made = made  # the folders acquire made, innermost first

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        """Lock `folder` (made if missing) or raise RunLocked naming the holder; an OSError
        (a read-only place, ...) names the folder."""
        folder = Path(folder).absolute()
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        existed = {p.name for p in folder.iterdir()}
        path = folder / LOCK_NAME
        try:
            fd = _lock(path)
        except OSError as e:
            _remove_empty(made)
            raise OSError(e.errno, f"cannot lock the run folder ({e.strerror})",
                          str(folder)) from None
        if fd is None:
            holder = _holder(path)
            raise RunLocked(f"{folder} is in use by another nodulekit run ({holder}); a run "
                            "folder has one writer at a time: wait for it to end, or use "
                            "another --out")
        lock = cls(folder, fd, made, existed)
        lock._write_holder()
        return lock

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        text = (json.dumps(info) + "\n").encode()
        with contextlib.suppress(OSError):  # the lock holds even if this cannot be written
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text, 0)

    def clean_stale_partials(self) -> list[str]:
        """Remove the temporary files left in the folder (not below it) by a killed writer;
        returns their names."""
        removed = []
        for p in self.folder.iterdir():
            if is_partial(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
        return removed

    def release(self, new_run: bool = False) -> None:
        """Give the lock up. new_run: the session started this run; if it wrote no
        checkpoint, remove what it wrote (see the module docstring)."""
        if self._fd is None:
            return
        if new_run and not any((self.folder / f"checkpoint_{kind}.h5").exists()
                               for kind in ("last", "best")):
            for name in _SESSION_FILES:
                if name not in self._existed or name == LOCK_NAME:
                    with contextlib.suppress(OSError):
                        (self.folder / name).unlink()
            self.clean_stale_partials()
            _remove_empty(self._made)  # a cache left there keeps the folder
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the file drops the lock
        self._fd = None


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The file we locked must still be the one under the name (a failed start of another
        # process may have removed it between our open and our lock); else lock again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the file."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "holder unknown: it has just started"
    return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"
