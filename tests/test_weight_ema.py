"""The weight average (`nn.ema`, `train --weight-ema`): its arithmetic against a float64
recurrence, that the averaged model is the one validated, kept and loaded, that a resumed
run continues it bit for bit, and that its checkpoint arrays are checked."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import tiny_train

from nodulekit.engine import get_backend
from nodulekit.evaluation import selection
from nodulekit.nn import UNet
from nodulekit.nn.ema import WARMUP, WeightEMA
from nodulekit.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from nodulekit.training.loop import train


def test_average_follows_the_recurrence_in_float64():
    """float32 in-place arithmetic against the same recurrence in float64: a few ulps
    after 200 steps (each step rounds twice at ~6e-8 relative; the errors decay with d)."""
    be = get_backend("cpu")
    model = UNet(be, depth=2, width=4, norm="batch", seed=3)
    ema = WeightEMA(be, model, 0.9)
    ref_p = model.params.astype(np.float64)
    ref_b = model.buffers.astype(np.float64)
    rng = np.random.default_rng(0)
    for step in range(1, 201):
        model.params[...] = rng.normal(size=model.params.shape).astype(np.float32)
        model.buffers[...] = rng.uniform(0.5, 2, size=model.buffers.shape).astype(np.float32)
        ema.update(model, step)
        d = min(0.9, (1 + step) / (WARMUP + step))
        ref_p = d * ref_p + (1 - d) * model.params.astype(np.float64)
        ref_b = d * ref_b + (1 - d) * model.buffers.astype(np.float64)
    np.testing.assert_allclose(ema.params, ref_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ema.buffers, ref_b, rtol=1e-6)
    assert ema.rate(1) == pytest.approx(2 / 11) and ema.rate(10**6) == 0.9
    # inside `applied` the model holds the average, after it its own weights, bit for bit
    own = model.params.copy(), model.buffers.copy()
    with ema.applied(model):
        np.testing.assert_array_equal(model.params, ema.params)
        np.testing.assert_array_equal(model.buffers, ema.buffers)
    np.testing.assert_array_equal(model.params, own[0])
    np.testing.assert_array_equal(model.buffers, own[1])
    with pytest.raises(ValueError, match="decay must be in"):
        WeightEMA(be, model, 1.0)


EMA_RUN = dict(norm="batch", dice="batch", head_prior=0.01, weight_ema=0.9, test=False)


def test_the_average_is_what_is_validated_kept_and_loaded(tiny_data, tmp_path):
    """Both checkpoints carry the average beside the optimiser's weights; a model loaded
    from checkpoint_best is the average (not the weights), and scoring it on the validation
    split gives the epoch's validation row."""
    from nodulekit.evaluation.evaluate import InferSettings, infer_split

    _, cache = tiny_data
    result = tiny_train(cache, tmp_path / "run", epochs=3, **EMA_RUN)
    assert result.config.weight_ema == 0.9
    best = load_checkpoint(tmp_path / "run" / "checkpoint_best.h5")
    last = load_checkpoint(tmp_path / "run" / "checkpoint_last.h5")
    for ck in (best, last):
        assert ck.ema_params is not None and ck.ema_buffers is not None
        assert not np.array_equal(ck.ema_params, ck.params)  # an average, not a copy
    be = get_backend("cpu")
    model = model_from_checkpoint(best, be)
    np.testing.assert_array_equal(model.params, best.ema_params)
    np.testing.assert_array_equal(model.buffers, best.ema_buffers)
    config = result.config
    settings = InferSettings(image_shape=tuple(config.image_shape), batch_size=config.batch_size,
                             workers=0, queue=None,
                             window=(config.window_center, config.window_width),
                             smooth=config.smooth)
    val = infer_split(model, cache, "val", settings, progress=False)
    row = selection.best_row(best.history, best.epoch)
    cols = selection.validation_columns(val.counts, val.loss, val.soft_dice)
    for key in ("val_loss", "val_dice", "val_nodule_dice", "val_nodule_soft_dice",
                "val_empty_fp"):
        assert cols[key] == pytest.approx(row[key], rel=1e-12, abs=1e-12), key
    # the optimiser's own weights score otherwise (the check above could tell them apart)
    model.load_flat(best.params)
    model.load_buffers(best.buffers)
    raw = infer_split(model, cache, "val", settings, progress=False)
    assert raw.loss != pytest.approx(row["val_loss"], rel=1e-9)


def test_a_run_with_the_average_resumes_exactly(tiny_data, tmp_path):
    _, cache = tiny_data
    full = tiny_train(cache, tmp_path / "full", epochs=3, **EMA_RUN)
    steps_per_epoch = full.history[0]["step"]

    def kill_in_epoch_2(epoch, step):
        if epoch == 1 and step == steps_per_epoch + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_train(cache, tmp_path / "cut", callback=kill_in_epoch_2, **EMA_RUN, epochs=3)
    train(resume=str(tmp_path / "cut"), device="cpu", workers=0, progress=False,
          echo=lambda *_: None)
    for name in ("checkpoint_last.h5", "checkpoint_best.h5"):
        a, b = (load_checkpoint(tmp_path / run / name) for run in ("full", "cut"))
        for field in ("params", "buffers", "ema_params", "ema_buffers"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field),
                                          err_msg=f"{name} {field}")
    with pytest.raises(ValueError, match="weight_ema is 0.9, cannot change it to 0.5"):
        train(resume=str(tmp_path / "cut"), epochs=4, weight_ema=0.5, device="cpu",
              progress=False, echo=lambda *_: None)


def test_the_average_in_a_checkpoint_is_checked(tiny_data, tmp_path):
    _, cache = tiny_data
    tiny_train(cache, tmp_path / "run", epochs=1, **EMA_RUN)
    path = tmp_path / "run" / "checkpoint_last.h5"
    ck = load_checkpoint(path)
    ck.ema_params = ck.ema_params.copy()
    ck.ema_params[0] += 1.0
    edited = tmp_path / "edited.h5"
    save_checkpoint(edited, ck)  # a consistent file with another average: readable
    assert load_checkpoint(edited).ema_params[0] == ck.ema_params[0]
    import h5py

    with h5py.File(edited, "r+") as f:  # a changed byte under the old checksum: refused
        f["ema/params"][1] = f["ema/params"][1] + 1.0
    with pytest.raises(CheckpointError, match="ema/params.*SHA-256"):
        load_checkpoint(edited)
    ck.ema_buffers = None
    with pytest.raises(ValueError, match="needs ema_buffers"):
        save_checkpoint(tmp_path / "bad.h5", ck)
