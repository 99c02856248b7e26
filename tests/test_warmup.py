"""The warm-up that compiles a run's CPU kernels in a second process
(`nodulekit.training.warmup`): it runs the run's own shapes, and a failure is a note, not
an error. (`test_train_cli.test_default_run_uses_the_user_cache` runs it inside a real
first run.)"""

from __future__ import annotations

import dataclasses

from nodulekit.training import warmup
from nodulekit.training.config import TrainConfig


def _config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig(data="demo", data_kind="demo", cache=str(tmp_path / "c.h5"),
                       out=str(tmp_path / "run"), epochs=1, batch_size=2, lr=1e-3, width=4,
                       depth=2, image_shape=[24, 20], cache_shape=[24, 20], backend="cpu",
                       norm="batch", patch=[16, 16], nodule_dice_weight=1.0,
                       bce_weight=1e-4, dice="batch")
    return dataclasses.replace(base, **changes)


def test_the_kernels_of_a_run_run_on_its_shapes(tmp_path):
    """In-process, what the second process does: one step of the patch batch (context
    slices as channels too) and an evaluation batch of whole slices, without error."""
    warmup.compile_run_kernels(_config(tmp_path))
    warmup.compile_run_kernels(_config(tmp_path, context_slices=1, in_channels=3,
                                       norm="none", dice="sample"))


def test_a_second_process_compiles_and_the_run_waits_for_it(tmp_path):
    notes = []
    assert warmup.start(_config(tmp_path)) is not None
    waited = warmup.wait(notes.append)
    assert waited is not None and waited >= 0 and notes == []
    assert warmup.wait(notes.append) is None  # nothing pending any more


def test_a_failed_warm_up_is_a_note_and_nothing_else(tmp_path):
    notes = []
    assert warmup.start(_config(tmp_path, backend="no-such-backend")) is not None
    warmup.wait(notes.append)
    assert len(notes) == 1 and "compiling the kernels ahead failed" in notes[0]
    assert "they compile as the run first calls them" in notes[0]


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(warmup.ENV, "0")
    assert not warmup.enabled()
    monkeypatch.setenv(warmup.ENV, "1")
    assert warmup.enabled()


def test_a_warm_up_that_takes_too_long_is_stopped(tmp_path, monkeypatch):
    """Past WAIT_SECONDS the run stops waiting: the second process is killed, a note says
    so, and the run goes on (compiling what is left itself)."""
    monkeypatch.setattr(warmup, "WAIT_SECONDS", 0.01)
    notes = []
    proc = warmup.start(_config(tmp_path))
    warmup.wait(notes.append)
    assert proc.poll() is not None and proc.returncode != 0
    assert len(notes) == 1 and "compiling the kernels ahead failed" in notes[0]
