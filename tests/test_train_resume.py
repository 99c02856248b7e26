"""Resuming is exact, a diverging loss stops cleanly, fine-tuning starts from weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny import TINY_MODEL, read_params, tiny_train

from nodulekit.training.checkpoint import load_checkpoint
from nodulekit.training.loop import TrainingDiverged, train
from nodulekit.training.runfiles import read_metrics_csv

TIMING = ("seconds", "train_seconds", "images_per_s")


def _same_run(a, b):
    """Two run folders hold bit-identical weights, optimizer state and metrics."""
    for name in ("checkpoint_last.h5", "checkpoint_best.h5"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        np.testing.assert_array_equal(ca.params, cb.params, err_msg=name)
        np.testing.assert_array_equal(ca.adam["m"], cb.adam["m"], err_msg=name)
        np.testing.assert_array_equal(ca.adam["v"], cb.adam["v"], err_msg=name)
        assert (ca.epoch, ca.global_step, ca.best_epoch) == (cb.epoch, cb.global_step,
                                                             cb.best_epoch)
    def rows(run):
        return [{k: v for k, v in r.items() if k not in TIMING}
                for r in read_metrics_csv(run / "metrics.csv")]

    assert rows(a) == rows(b)


# the older demo's options (per-layer lr scaling, small smoothing, BCE) take the other step
# path; the nodulekit recipe's: batch Dice, the output prior, the poly decay (whose lr at a
# step depends on the global step restored from the checkpoint)
RESUMED_OPTIONS = {
    "fan_in": dict(lr_scaling="fan_in", smooth=0.01, bce_weight=0.01),
    "nodulekit": dict(lr_scaling="none", smooth=1.0, bce_weight=0.01, dice="batch",
                      head_prior=0.01, lr_schedule="poly", nodule_dice_weight=1.0),
}


@pytest.mark.parametrize("options", list(RESUMED_OPTIONS))
def test_interrupted_and_resumed_equals_uninterrupted(tiny_data, tmp_path, options):
    _, cache = tiny_data
    opts = dict(epochs=3, **RESUMED_OPTIONS[options])
    full = tiny_train(cache, tmp_path / "full", **opts)
    steps_per_epoch = full.history[0]["step"]

    def kill_in_epoch_3(epoch, step):
        if epoch == 2 and step == 2 * steps_per_epoch + 1:  # one step into epoch 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_train(cache, tmp_path / "cut", callback=kill_in_epoch_3, **opts)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint_last.h5").epoch == 2
    assert len(read_metrics_csv(tmp_path / "cut" / "metrics.csv")) == 2

    resumed = train(resume=str(tmp_path / "cut"), device="cpu", workers=0, progress=False,
                    echo=lambda *_: None)
    assert resumed.config.epochs == 3 and len(resumed.history) == 3
    for name, value in RESUMED_OPTIONS[options].items():
        assert getattr(resumed.config, name) == value, name
    assert all(r["train_bce"] > 0 for r in resumed.history)
    if RESUMED_OPTIONS[options].get("nodule_dice_weight"):  # the term ran in every epoch
        assert all(r["train_nodule_dice"] > 0 for r in resumed.history)
    _same_run(tmp_path / "full", tmp_path / "cut")
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "resuming from" in log and "2 epoch(s)" in log


def test_resume_cannot_change_what_the_run_computes(tiny_data, tmp_path):
    _, cache = tiny_data
    tiny_train(cache, tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="lr is 0.001, cannot change it to 0.01"):
        train(resume=str(tmp_path / "run"), lr=0.01, device="cpu", progress=False,
              echo=lambda *_: None)
    with pytest.raises(ValueError, match="already holds a run"):
        tiny_train(cache, tmp_path / "run", epochs=1)
    # more epochs is allowed: it extends the run
    more = train(resume=str(tmp_path / "run"), epochs=2, device="cpu", workers=0,
                 progress=False, echo=lambda *_: None)
    assert [r["epoch"] for r in more.history] == [1, 2]


def test_killed_process_resumes_exactly(tiny_data, tmp_path):
    """SIGKILL a real `nodulekit train` at whatever point it has reached after its first
    checkpoint, resume it, and compare with a run that was never stopped."""
    _, cache = tiny_data
    epochs = 12
    args = ["--epochs", str(epochs), "--width", str(TINY_MODEL["width"]),
            "--depth", str(TINY_MODEL["depth"]), "--batch-size", str(TINY_MODEL["batch_size"]),
            "--lr", str(TINY_MODEL["lr"]), "--recipe", TINY_MODEL["recipe"], "--device", "cpu",
            "--workers", "0", "--no-progress", "--no-test"]
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nodulekit.cli", "train", str(cache), "--out", str(run), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint_last.h5").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = load_checkpoint(run / "checkpoint_last.h5").epoch
    assert 1 <= done < epochs
    assert not [p for p in run.iterdir() if p.name.endswith(".partial")]

    result = subprocess.run([sys.executable, "-m", "nodulekit.cli", "train", "--resume",
                             str(run), "--device", "cpu", "--workers", "0", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {run / 'checkpoint_last.h5'}: {done} epoch(s)" in result.stdout

    tiny_train(cache, tmp_path / "straight", epochs=epochs, test=False)
    _same_run(tmp_path / "straight", run)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path,
                                                           monkeypatch):
    import dataclasses

    from nodulekit.nn import TrainStep

    _, cache = tiny_data
    real = TrainStep.__call__
    calls = {"n": 0}

    def poisoned(self, image, target):
        calls["n"] += 1
        losses = real(self, image, target)
        if calls["n"] == steps_per_epoch + 2:
            return dataclasses.replace(losses, dice=np.float64("nan"))
        return losses

    steps_per_epoch = tiny_train(cache, tmp_path / "probe", epochs=1).history[0]["step"]
    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as err:
        tiny_train(cache, run, epochs=3)
    msg = str(err.value)
    assert f"epoch 2, step 2 of {steps_per_epoch}" in msg and "nan" in msg
    assert f"{run / 'checkpoint_last.h5'} (after epoch 1)" in msg
    ck = load_checkpoint(run / "checkpoint_last.h5")
    assert ck.epoch == 1 and np.isfinite(ck.params).all()
    assert len(read_metrics_csv(run / "metrics.csv")) == 1


def test_finetune_starts_from_the_weights(tiny_data, tmp_path):
    _, cache = tiny_data
    base = tiny_train(cache, tmp_path / "base", epochs=1, test=False)
    best = read_params(tmp_path / "base" / "checkpoint_best.h5")
    ft = tiny_train(cache, tmp_path / "ft", epochs=1, finetune_from=tmp_path / "base",
                    empty_fraction=0.5, width=None, depth=None, seed=5, test=False)
    assert ft.config.finetune_from == str(tmp_path / "base" / "checkpoint_best.h5")
    assert (ft.config.width, ft.config.depth) == (base.config.width, base.config.depth)
    ck = load_checkpoint(tmp_path / "ft" / "checkpoint_last.h5")
    assert ck.epoch == 1 and ck.adam["step"] == ck.global_step  # a fresh optimizer
    # one epoch of Adam (a few steps of at most ~lr each) from the fine-tuned weights:
    # close to them, far from a fresh initialisation with the run's own seed
    from nodulekit.engine import get_backend
    from nodulekit.nn import UNet

    fresh = UNet(get_backend("cpu"), depth=ft.config.depth, width=ft.config.width,
                 seed=ft.config.seed).params
    assert np.abs(ck.params - best).max() < 0.02 < np.abs(ck.params - fresh).max()
    with pytest.raises(ValueError, match="--width 8 differs"):
        tiny_train(cache, tmp_path / "ft2", epochs=1, finetune_from=tmp_path / "base",
                   width=8)


def test_lr_scaling_scales_each_layers_step(tiny_data, tmp_path):
    """With lr_scaling="fan_in" each tensor moves by its factor times Adam's step."""
    from nodulekit.engine import get_backend
    from nodulekit.nn import Adam, TrainStep, UNet, lr_scale

    be = get_backend("cpu")
    model = UNet(be, depth=2, width=4, seed=0)
    scale = lr_scale(model.layout, "fan_in")
    slots = model.layout.slots
    assert lr_scale(model.layout, "none") is None
    assert scale[slots["enc0.conv1.w"].offset] == 1.0  # 3x3 on one channel: fan-in 9
    assert scale[slots["enc0.conv2.w"].offset] == pytest.approx((9 / 36) ** 0.5)
    assert scale[slots["enc0.conv2.b"].offset] == pytest.approx((9 / 36) ** 0.5)
    assert scale[slots["dec0.up.w"].offset] == 1.0  # 2x2 up-conv: fan-in = C = 8 < 9
    assert scale[slots["bottom.conv2.w"].offset] == pytest.approx((9 / (9 * 16)) ** 0.5)

    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16, 1), dtype=np.float32)
    t = (rng.random((2, 16, 16, 1)) < 0.3).astype(np.uint8)
    plain = UNet(be, depth=2, width=4, seed=0)
    opt_plain = Adam(be, plain.params, plain.grads, lr=1e-3)
    opt = Adam(be, model.params, model.grads, lr=1e-3)
    start = model.params.copy()
    TrainStep(plain, opt_plain)(x, t)
    TrainStep(model, opt, lr_scale=scale)(x, t)
    np.testing.assert_allclose(model.params - start, (plain.params - start) * scale,
                               rtol=1e-4, atol=2e-7)  # float32 rounding of params ~ 1


def test_bce_term_against_torch():
    import torch

    from nodulekit.engine import get_backend
    from nodulekit.nn import add_bce

    be = get_backend("cpu")
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((3, 8, 8, 1)) * 30).astype(np.float32)  # saturated ones too
    t = (rng.random((3, 8, 8, 1)) < 0.2).astype(np.uint8)
    grad = np.zeros_like(z)
    value = add_bce(be, z, t, grad, 0.01)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    ref = 0.01 * torch.nn.functional.binary_cross_entropy_with_logits(
        zt, torch.tensor(t, dtype=torch.float64), reduction="sum") / 3
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_batch_norm_run_resumes_exactly(tiny_data, tmp_path):
    """With batch norm the run also carries its running statistics (checkpoint dataset
    /buffers, used by validation): interrupted and resumed, it ends with the same weights,
    Adam state, running statistics and metrics, bit for bit, as a run never stopped. A
    resumed run keeps its norm; fine-tuning takes the checkpoint's."""
    _, cache = tiny_data
    opts = dict(epochs=3, norm="batch", test=False)
    full = tiny_train(cache, tmp_path / "full", **opts)
    steps_per_epoch = full.history[0]["step"]

    def kill_in_epoch_2(epoch, step):
        if epoch == 1 and step == steps_per_epoch + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_train(cache, tmp_path / "cut", callback=kill_in_epoch_2, **opts)
    resumed = train(resume=str(tmp_path / "cut"), device="cpu", workers=0, progress=False,
                    echo=lambda *_: None)
    assert resumed.config.norm == "batch" and len(resumed.history) == 3
    _same_run(tmp_path / "full", tmp_path / "cut")
    for name in ("checkpoint_last.h5", "checkpoint_best.h5"):
        a, b = load_checkpoint(tmp_path / "full" / name), load_checkpoint(tmp_path / "cut" / name)
        assert a.buffers is not None and a.buffers.size
        np.testing.assert_array_equal(a.buffers, b.buffers, err_msg=name)
    with pytest.raises(ValueError, match="norm is batch, cannot change it to instance"):
        train(resume=str(tmp_path / "cut"), epochs=4, norm="instance", device="cpu",
              progress=False, echo=lambda *_: None)
    ft = tiny_train(cache, tmp_path / "ft", epochs=1, finetune_from=tmp_path / "full",
                    width=None, depth=None, test=False)
    assert ft.config.norm == "batch"
