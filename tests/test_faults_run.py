"""Faults and bad input on the run side (issue 13): no silent wrong result, no lost file, no
traceback. One test (or a few) per item of the issue:

1. a cache preprocessed into a run folder is reused only while it records the same folder
   (`nodulekit evaluate RUN dirA` then `RUN dirB`; `train DIR --out X`);
2. a run folder has one writer (an OS lock, two real processes); the `--gpus N` launcher
   passes SIGTERM on to its ranks and never leaves them running, also when SIGKILLed
   (a real mpiexec, CPU ranks);
4. a full disk during a checkpoint write (an injected ENOSPC, and a real 2 MB tmpfs where
   mounting is allowed) leaves the last good checkpoint and no temporary file, and says so
   in one line;
5. an OSError (a read-only output folder, for every command) is one line naming the user's
   path, exit status 1; `nodulekit --debug` shows the traceback;
6. the checkpoint's SHA-256 covers its configuration, history and counters;
9. the smaller ones: --epochs 0, --queue 0, evaluate --batch-size 0, --resume with --out,
   resuming to fewer epochs, a moved cache, failed starts, stale .partial files, predict
   into a used folder, file modes;
and the checkout's `python cli.py`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from tiny import TINY, TINY_MODEL, tiny_train

from nodulekit.cli import main
from nodulekit.training.checkpoint import CheckpointError, load_checkpoint
from nodulekit.training.loop import WriteFailed, train

REPO = Path(__file__).resolve().parents[1]
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
TINY_ARGS = ["--width", str(TINY_MODEL["width"]), "--depth", str(TINY_MODEL["depth"]),
             "--batch-size", str(TINY_MODEL["batch_size"]), "--lr", str(TINY_MODEL["lr"]),
             "--device", "cpu", "--workers", "0", "--no-progress"]


def _cli(*args, catch=False):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch)


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("NODULEKIT_DIST", "NODULEKIT_TEST_FAULT", "NODULEKIT_DIST_TIMEOUT",
                "NODULEKIT_DEBUG"):
        env.pop(var, None)
    env.update(extra)
    return env


def _quiet(**kw):
    return {"device": "cpu", "workers": 0, "progress": False, "echo": lambda *_: None, **kw}


@pytest.fixture(scope="module")
def run_1(tiny_data, tmp_path_factory):
    """A tiny run of one epoch (its checkpoints are read, never written, by the tests)."""
    _, cache = tiny_data
    run = tmp_path_factory.mktemp("faults") / "run"
    tiny_train(cache, run, epochs=1, test=False)
    return run


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A second tiny data set with another number of slices than tiny_data's."""
    from nodulekit.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("other") / "data"
    synthesize(root, SynthConfig(**dict(TINY, slices_per_patient=8, seed=3)), workers=0)
    return root


def _mount_tmpfs(where: Path, options: str) -> None:
    """Mount a tmpfs at `where` (skip the test, saying why, where that is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the injected-fault "
                    "variant of this test covers the same code")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write in, root included: a read-only tmpfs when we are root
    (root ignores permission bits), else a folder without write permission."""
    where = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(where, "ro,size=64k")
        yield where
        _umount(where)
    else:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)


def _one_line_error(result, *must) -> str:
    """A CLI result that failed with one line "Error: ..." naming each of `must`."""
    out = result.output
    assert result.exit_code == 1, out
    assert "Traceback" not in out and ".partial" not in out, out
    lines = [x for x in out.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, out
    for text in must:
        assert str(text) in lines[0], out
    return lines[0]


# ----------------------------------------------------------------------------- 1: stale cache


def _split_slices(summary_path: Path) -> int:
    return json.loads(summary_path.read_text())["all"]["slices"]


def test_evaluate_rebuilds_the_cache_for_other_data(run_1, tiny_data, other_data):
    data_a, _ = tiny_data
    first = _cli("evaluate", run_1, data_a, "--device", "cpu", "--no-progress")
    assert first.exit_code == 0, first.output
    summary = run_1 / "evaluate-test" / "summary.json"
    slices_a = _split_slices(summary)

    second = _cli("evaluate", run_1, other_data, "--device", "cpu", "--no-progress")
    assert second.exit_code == 0, second.output
    assert f"rebuilding {run_1 / 'evaluate-test' / 'cache.h5'}: it was built from" in \
        second.output
    slices_b = _split_slices(summary)
    assert slices_b != slices_a  # before: dirA's slices and scores again
    assert json.loads(summary.read_text())["slices"][0]["source"].startswith("test/")

    again = _cli("evaluate", run_1, other_data, "--device", "cpu", "--no-progress")
    assert "reusing" in again.output and _split_slices(summary) == slices_b
    # a file of the data set rewritten: rebuilt
    dcm = sorted(other_data.rglob("*.dcm"))[0]
    os.utime(dcm, ns=(dcm.stat().st_atime_ns, dcm.stat().st_mtime_ns + 10**9))
    changed = _cli("evaluate", run_1, other_data, "--device", "cpu", "--no-progress")
    assert "changed since it was built" in changed.output, changed.output


def test_train_rebuilds_the_cache_in_its_run_folder(tiny_data, other_data, tmp_path):
    """`train dirA --out X` that stops after preprocessing keeps X/cache.h5; `train dirB
    --out X` must not train on it."""
    from nodulekit.data.cache import open_cache

    data_a, _ = tiny_data
    run = tmp_path / "X"
    with pytest.raises(ValueError, match="fewer than one batch"):
        tiny_train(data_a, run, epochs=1, batch_size=1000)
    assert sorted(p.name for p in run.iterdir()) == ["cache.h5"]  # the cache is kept
    lines = []
    result = tiny_train(other_data, run, epochs=1, test=False, echo=lines.append)
    assert any(line.startswith(f"rebuilding {run / 'cache.h5'}") for line in lines), lines
    with open_cache(result.config.cache) as c:
        assert c.attrs["source_path"] == str(other_data.resolve())
        n_b = sum(len(c.split(s)) for s in c.splits)
    assert n_b == 6 * 8  # dirB's slices, not dirA's 6 x 12


# ----------------------------------------------------------------------------- 2: the lock


def _wait_for(predicate, what: str, proc=None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


def _holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / ".lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def test_second_writer_is_refused_naming_the_holder(tiny_data, tmp_path):
    _, cache = tiny_data
    run = tmp_path / "X"
    a = subprocess.Popen([sys.executable, "-m", "nodulekit.cli", "train", str(cache), "--out",
                          str(run), "--epochs", "500", "--no-test", *TINY_ARGS],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=_env())
    try:
        _wait_for(lambda: (run / "checkpoint_last.h5").exists() and _holder_pid(run), "lock",
                  a)
        assert _holder_pid(run) == a.pid
        before = {p.name: p.stat().st_size for p in run.iterdir() if p.name != "train.log"}
        for args in (["train", str(cache), "--out", str(run), "--epochs", "1"],
                     ["train", "--resume", str(run), "--epochs", "1000"]):
            b = subprocess.run([sys.executable, "-m", "nodulekit.cli", *args, *TINY_ARGS],
                               capture_output=True, text=True, timeout=120, env=_env())
            assert b.returncode == 1, b.stdout + b.stderr
            assert f"{run} is in use by another nodulekit run (pid {a.pid} on " in b.stderr
            assert "Traceback" not in b.stderr
        # the refused ones wrote nothing there (a's files may have grown meanwhile)
        assert {p.name for p in run.iterdir() if p.name != "train.log"} >= set(before)
        assert "in use" not in (run / "train.log").read_text()
    finally:
        a.kill()
        a.wait(timeout=60)
    # the kernel dropped the SIGKILLed holder's lock: the folder can be taken again
    from nodulekit.training.runlock import RunLock

    lock = RunLock.acquire(run)
    lock.release()


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie: any of its threads. The group leader shows Z as soon as its
    own thread has exited, while the others (loader, Numba, OpenBLAS) may still be exiting
    and holding the process's files, the run lock's flock among them (seen under load)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            continue
    return False


def _rank_pids(launcher: int) -> set[int]:
    pids = set()
    for pid in _descendants(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"PMI_RANK=" in f.read():
                    pids.add(pid)
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install -e "
                    "'.[test]' brings mpi4py and mpich)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_launcher_leaves_no_rank_running(tiny_data, tmp_path, how):
    """`nodulekit train --gpus 2` (two CPU ranks under the venv's mpiexec), killed as a
    scheduler kills it: SIGTERM is passed on to the ranks (the launcher then exits 143 and
    says so); after SIGKILL, which it cannot catch, the ranks end as well."""
    _, cache = tiny_data
    run = tmp_path / "X"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "nodulekit.cli", "train", str(cache), "--out", str(run),
         "--epochs", "500", "--no-test", "--gpus", "2", *TINY_ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True)
    ranks: set[int] = set()
    try:
        _wait_for(lambda: (run / "checkpoint_last.h5").exists(), "checkpoint", launcher)
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.send_signal(getattr(signal, how))
        launcher.wait(timeout=60)
        _wait_for(lambda: not any(_running(p) for p in ranks), "end of the ranks",
                  seconds=60)
        if how == "SIGTERM":
            assert launcher.returncode == 128 + signal.SIGTERM
            assert "stopped by SIGTERM: passed on to the ranks" in launcher.stderr.read()
    finally:
        for pid in ranks | {launcher.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=60)
    # and the folder is free for the restart
    result = train(resume=str(run), epochs=load_checkpoint(run / "checkpoint_last.h5").epoch
                   + 1, **_quiet(test=False))
    assert result.history[-1]["epoch"] == result.config.epochs


# ----------------------------------------------------------------------------- 4: disk full


def _fail_second_write_of(name: str, monkeypatch) -> None:
    """os.fsync raises ENOSPC on the second write of `name` (its temporary file)."""
    real = os.fsync
    seen = {"n": 0}

    def fsync(fd):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            seen["n"] += 1
            if seen["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _check_left_epoch_1(run: Path, message: str, kinds=("last",)) -> None:
    assert message in [f"could not write checkpoint {run / f'checkpoint_{kind}.h5'}: No space "
                       "left on device; checkpoint_last.h5 still holds epoch 1"
                       for kind in kinds], message
    assert load_checkpoint(run / "checkpoint_last.h5").epoch == 1
    assert not [p.name for p in run.iterdir() if ".partial" in p.name]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_full_disk_on_a_checkpoint_write_injected(tiny_data, tmp_path, monkeypatch):
    _, cache = tiny_data
    run = tmp_path / "X"
    _fail_second_write_of("checkpoint_last.h5", monkeypatch)
    result = _cli("train", cache, "--out", run, "--epochs", 3, "--no-test", *TINY_ARGS)
    line = _one_line_error(result)
    _check_left_epoch_1(run, line.removeprefix("Error: "))


def test_full_disk_on_a_checkpoint_write_real(tiny_data, tmp_path):
    """A 2 MB tmpfs, filled up during epoch 2: the real ENOSPC of a real file system."""
    _, cache = tiny_data
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=2m")
    try:
        run = disk / "X"

        def fill_in_epoch_2(epoch, _step):
            filler = disk / "filler"
            if epoch == 1 and not filler.exists():
                with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * 4096)

        with pytest.raises(WriteFailed) as err:
            tiny_train(cache, run, epochs=3, test=False, callback=fill_in_epoch_2)
        _check_left_epoch_1(run, str(err.value), kinds=("best", "last"))
    finally:
        _umount(disk)


# ----------------------------------------------------------------------------- 5: OSError


def test_read_only_output_is_one_line_for_every_command(run_1, tiny_data,
                                                        readonly_dir):
    data, cache = tiny_data
    dicom = sorted((data / "test").rglob("*.dcm"))[0]
    ro = readonly_dir
    cases = [
        (["train", cache, "--out", ro / "run", "--epochs", 1, *TINY_ARGS], ro / "run"),
        (["evaluate", run_1, cache, "--out", ro / "ev", "--device", "cpu", "--no-progress"],
         ro / "ev"),
        (["predict", run_1, dicom, "--out", ro / "pred", "--device", "cpu", "--no-progress"],
         ro / "pred"),
        (["inspect", run_1, "--json", ro / "layers.json"], ro / "layers.json"),
        (["synth", ro / "synth", "--size", 32, "--patients", 1, "--slices-per-patient", 2,
          "--workers", 0, "--no-progress"], ro / "synth"),
        (["preprocess", data, ro / "cache.h5", "--workers", 0, "--no-progress"],
         ro / "cache.h5"),
    ]
    for args, path in cases:
        result = _cli(*args)  # catch_exceptions=False: a traceback fails the test here
        line = _one_line_error(result, path)
        assert "Read-only file system" in line or "Permission denied" in line, line


def test_debug_shows_the_traceback(tiny_data, readonly_dir):
    _, cache = tiny_data
    args = ["train", cache, "--out", readonly_dir / "run", "--epochs", 1, *TINY_ARGS]
    result = _cli("--debug", *args, catch=True)
    assert isinstance(result.exception, OSError) and result.exit_code == 1
    proc = subprocess.run([sys.executable, "-m", "nodulekit.cli", "--debug",
                           *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr


def test_os_error_names_the_users_file_not_the_temporary_one():
    from nodulekit.cli import describe_os_error

    h5 = OSError(errno.ENOSPC, "Unable to synchronously create file (unable to open file: "
                 "name = '/data/run/.cache.h5.123.89abcdef.partial', errno = 28, error "
                 "message = 'No space left on device')")
    assert describe_os_error(h5) == ("/data/run/cache.h5: No space left on device (Unable "
                                      "to synchronously create file)")
    plain = PermissionError(errno.EACCES, "Permission denied",
                            "/r/.checkpoint_last.h5.77-0badc0de.partial")
    assert describe_os_error(plain) == "/r/checkpoint_last.h5: Permission denied"
    mkstemp = OSError(errno.EROFS, "Read-only file system", "/r/.metrics.csv.a1b_c9z0.partial")
    assert describe_os_error(mkstemp) == "/r/metrics.csv: Read-only file system"
    assert describe_os_error(FileExistsError("x exists; pass --overwrite")) == \
        "x exists; pass --overwrite"


# ----------------------------------------------------------------------------- 6: checksums


def _edit(path: Path, edit) -> Path:
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("field", ["config", "history", "epoch", "adam_lr", "extra"])
def test_checkpoint_hash_covers_every_field(run_1, tmp_path, field):
    path = tmp_path / "ck.h5"
    shutil.copy(run_1 / "checkpoint_last.h5", path)
    load_checkpoint(path)  # fine as written

    def edit(f):
        a = f.attrs
        if field == "config":
            cfg = json.loads(a["config"])
            cfg["batch_size"] = 2  # the case: used silently on resume before
            a["config"] = json.dumps(cfg, sort_keys=True)
        elif field == "history":
            a["history"] = a["history"].replace('"epoch": 1', '"epoch": 7')
        elif field == "epoch":
            a["epoch"] = 7
        elif field == "adam_lr":
            f["adam"].attrs["lr"] = 0.5
        else:
            f.create_dataset("extra", data=np.zeros(3))

    _edit(path, edit)
    with pytest.raises(CheckpointError, match="do not match its SHA-256") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_edited_checkpoint_blocks_resume(tiny_data, tmp_path):
    _, cache = tiny_data
    run = tmp_path / "run"
    tiny_train(cache, run, epochs=1, test=False)

    def edit(f):
        cfg = json.loads(f.attrs["config"])
        cfg["batch_size"] = 2
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)

    _edit(run / "checkpoint_last.h5", edit)
    result = _cli("train", "--resume", run, "--epochs", 2, "--device", "cpu", "--workers", 0,
                  "--no-progress")
    _one_line_error(result, run / "checkpoint_last.h5", "SHA-256")


def test_format_1_checkpoint_is_read_with_a_warning(run_1, tiny_data, tmp_path):
    path = tmp_path / "v1.h5"
    shutil.copy(run_1 / "checkpoint_best.h5", path)

    def to_v1(f):  # what nodulekit wrote before: no whole-file checksum
        del f.attrs["sha256"]
        f.attrs["format_version"] = 1

    _edit(path, to_v1)
    ck = load_checkpoint(path)
    assert "checkpoint format 1" in ck.warning and "not the configuration" in ck.warning
    result = _cli("evaluate", path, tiny_data[1], "--out", tmp_path / "ev",
                  "--device", "cpu", "--no-progress")
    assert result.exit_code == 0 and "warning: " in result.output
    # a format-1 file that carries a format-2 checksum was edited: refused
    shutil.copy(run_1 / "checkpoint_best.h5", path)
    _edit(path, lambda f: f.attrs.__setitem__("format_version", 1))
    with pytest.raises(CheckpointError, match="format_version was edited"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- 9: smaller


def test_bad_counts_are_refused(tiny_data, run_1, tmp_path):
    _, cache = tiny_data
    for args in (["--epochs", 0], ["--queue", 0], ["--queue", -2], ["--batch-size", 0]):
        result = _cli("train", cache, "--out", tmp_path / "X", *TINY_ARGS, *args)
        assert result.exit_code == 2 and "is not in the range" in result.output, result.output
    result = _cli("evaluate", run_1, cache, "--batch-size", 0, "--device", "cpu")
    assert result.exit_code == 2 and "is not in the range" in result.output
    assert not (tmp_path / "X").exists()
    # the library says so too
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        tiny_train(cache, tmp_path / "X", epochs=0)
    with pytest.raises(ValueError, match="queue must be >= 1"):
        tiny_train(cache, tmp_path / "X", queue=0)
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate

    with pytest.raises(ValueError, match="batch size must be >= 1"):
        evaluate(EvaluateOptions(run_1, cache, batch_size=0, device="cpu", progress=False),
                 report=lambda *_: None)
    assert not (tmp_path / "X").exists()


def test_resume_refuses_out_and_fewer_epochs(tiny_data, tmp_path):
    _, cache = tiny_data
    run = tmp_path / "run"
    tiny_train(cache, run, epochs=2, test=False)
    with pytest.raises(ValueError, match="--resume continues the run in .* in place; drop --out"):
        train(resume=str(run), out=str(tmp_path / "other"), epochs=3, **_quiet())
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="has trained 2 epochs; --epochs 1 would not continue"):
        train(resume=str(run), epochs=1, **_quiet())
    with pytest.raises(ValueError, match="has finished its 2 epochs"):
        train(resume=str(run), **_quiet())
    # --out naming the run folder itself is fine, and the summary line says what was done
    lines = []
    train(resume=str(run), out=str(run), epochs=3, **_quiet(test=False, echo=lines.append))
    assert any(x.startswith("trained epochs 3-3 (1 this session; resumed after epoch 2)")
               for x in lines), lines


def test_resume_from_a_moved_cache(tiny_data, tmp_path):
    _, cache = tiny_data
    place_a, place_b = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copy(cache, place_a)
    run = tmp_path / "run"
    tiny_train(place_a, run, epochs=1, test=False)
    place_a.rename(place_b)
    with pytest.raises(ValueError, match=r"the run's cache .*a\.h5 is not there"):
        train(resume=str(run), epochs=2, **_quiet())
    # another cache (other slices) is refused; the same one at its new place is taken
    other = tmp_path / "other.h5"
    shutil.copy(cache, other)
    with h5py.File(other, "r+") as f:
        f["train/meta/slice"][0] += 1
    with pytest.raises(ValueError, match="holds other slices"):
        train(resume=str(run), data=str(other), epochs=2, **_quiet())
    result = _cli("train", "--resume", run, place_b, "--epochs", 2, "--device", "cpu",
                  "--workers", 0, "--no-progress", "--no-test")
    assert result.exit_code == 0, result.output
    assert f"reading the run's cache from {place_b}" in result.output
    ck = load_checkpoint(run / "checkpoint_last.h5")
    assert ck.epoch == 2 and ck.config["cache"] == str(place_b)


def test_moved_run_folder_finds_its_own_cache(tiny_data, tmp_path):
    data, _ = tiny_data
    tiny_train(data, tmp_path / "run", epochs=1, test=False)  # the cache inside the run
    (tmp_path / "run").rename(tmp_path / "moved")
    result = train(resume=str(tmp_path / "moved"), epochs=2, **_quiet(test=False))
    assert result.config.cache == str(tmp_path / "moved" / "cache.h5")


def test_failed_start_leaves_no_run_folder(tiny_data, tmp_path):
    _, cache = tiny_data
    run = tmp_path / "X"
    result = _cli("train", cache, "--out", run, *TINY_ARGS, "--batch-size", 1000)
    _one_line_error(result, "fewer than one batch")
    assert not run.exists()  # before: a folder with train.log
    deep = tmp_path / "p" / "q" / "X"
    assert _cli("train", cache, "--out", deep, *TINY_ARGS, "--batch-size", 1000).exit_code == 1
    assert not (tmp_path / "p").exists()  # nor the folders made above it
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    result = _cli("train", cache, "--out", run, *TINY_ARGS, "--batch-size", 1000)
    assert result.exit_code == 1
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # a folder we did not make stays


def test_stale_partial_files_are_removed_at_start(run_1, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_1, run)
    stale = [".checkpoint_last.h5.4242-0badc0de.partial", ".checkpoint_best.h5.x7a_2kq9.partial",
             ".progress.png.partial.png", ".cache.h5.42.deadbeef.partial"]
    for name in stale:
        (run / name).write_bytes(b"half")
    (run / ".keep").write_text("a hidden file of the user's")
    lines = []
    train(resume=str(run), epochs=2, **_quiet(test=False, echo=lines.append))
    assert not [p.name for p in run.iterdir() if ".partial" in p.name]
    assert (run / ".keep").is_file()
    assert any(f"removed {len(stale)} temporary file(s)" in x for x in lines), lines


def test_predict_does_not_mix_old_and_new_outputs(run_1, tiny_data, tmp_path):
    data, _ = tiny_data
    out = tmp_path / "pred"
    args = ["--out", out, "--device", "cpu", "--no-progress", "--truth", "none"]
    first = _cli("predict", run_1, data / "test", *args)
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")
    exam = sorted(p for p in (data / "test" / "images").rglob("*") if p.is_dir()
                  and any(p.glob("*.dcm")))[0]
    refused = _cli("predict", run_1, exam, *args)
    _one_line_error(refused, out, "--overwrite")
    second = _cli("predict", run_1, exam, *args, "--overwrite")
    assert second.exit_code == 0, second.output
    masks = sorted((out / "masks").rglob("*.png"))
    assert len(masks) == len(list(exam.glob("*.dcm")))  # only the new prediction's
    assert (out / "notes.txt").read_text() == "mine"  # and what predict did not write stays
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.txt").write_text("mine")
    _one_line_error(_cli("predict", run_1, exam, "--out", other, "--overwrite", "--device",
                         "cpu"), "holds no earlier prediction")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tiny_data, tmp_path, umask):
    _, cache = tiny_data
    old = os.umask(umask)
    try:
        tiny_train(cache, tmp_path / "run", epochs=1)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    run = tmp_path / "run"
    for name in ("checkpoint_last.h5", "checkpoint_best.h5", "config.json", "metrics.csv",
                 "progress.png", "train.log", "test/summary.json"):
        assert (run / name).stat().st_mode & 0o777 == want, name


# ----------------------------------------------------------------------------- cli.py


def test_root_cli_runs_from_the_checkout(tmp_path):
    """`python cli.py` without the installed package: -S skips the venv's site-packages and
    its .pth files (the editable install); PYTHONPATH brings back only the dependencies."""
    import click

    site = str(Path(click.__file__).resolve().parents[1])
    env = _env(PYTHONPATH=site)
    proc = subprocess.run([sys.executable, "-S", "-c", "import nodulekit"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0, "nodulekit importable without the checkout: test shows nothing"
    proc = subprocess.run([sys.executable, "-S", str(REPO / "cli.py"), "inspect", "--width",
                           "4", "--depth", "2", "--size", "32"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "enc0.conv1" in proc.stdout
    proc = subprocess.run([sys.executable, "-S", str(REPO / "cli.py"), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("Usage: nodulekit ")
