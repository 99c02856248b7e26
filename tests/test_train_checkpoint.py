"""Checkpoints: round trip, atomic writes, and clear errors for damaged files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nodulekit.engine import get_backend
from nodulekit.nn import Adam, TrainStep, UNet
from nodulekit.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def _trained(seed=0, norm="none"):
    be = get_backend("cpu")
    model = UNet(be, depth=2, width=4, seed=seed, norm=norm)
    opt = Adam(be, model.params, model.grads, lr=1e-3)
    rng = np.random.default_rng(seed)
    x = rng.random((2, 16, 16, 1), dtype=np.float32)
    t = (rng.random((2, 16, 16, 1)) < 0.2).astype(np.uint8)
    for _ in range(3):
        TrainStep(model, opt)(x, t)
    return be, model, opt, x


def _save(path, model, opt, **kw):
    state = dict(params=model.params, layout=model.layout,
                 config={"depth": model.depth, "width": model.width, "seed": 0, "lr": 1e-3},
                 epoch=3, global_step=opt.step_count, adam=opt.state(),
                 history=[{"epoch": 1, "train_loss": 0.5}], best_epoch=2, best_score=0.25,
                 rng={"loader_seed": 0, "next_epoch": 3}, kind="last")
    state.update(kw)
    return save_checkpoint(path, Checkpoint(**state))


def test_round_trip(tmp_path):
    be, model, opt, x = _trained()
    path = _save(tmp_path / "ck.h5", model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]  # no temporary file left
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck.params, model.params)
    np.testing.assert_array_equal(ck.adam["m"], opt.m)
    np.testing.assert_array_equal(ck.adam["v"], opt.v)
    assert ck.adam["step"] == opt.step_count == ck.global_step == 3
    assert ck.adam["betas"] == opt.betas and ck.adam["lr"] == opt.lr
    assert (ck.epoch, ck.best_epoch, ck.best_score) == (3, 2, 0.25)
    assert ck.history == [{"epoch": 1, "train_loss": 0.5}]
    assert ck.rng == {"loader_seed": 0, "next_epoch": 3}
    assert ck.config["width"] == 4 and ck.kind == "last"

    # the model rebuilt from it computes exactly what the original does
    clone = model_from_checkpoint(ck, be)
    np.testing.assert_array_equal(clone.forward(x, keep_for_backward=False),
                                  model.forward(x, keep_for_backward=False))
    # and an optimizer restored from it takes the same next step
    opt2 = Adam(be, clone.params, clone.grads, lr=ck.adam["lr"])
    opt2.load_state(ck.adam)
    t = np.zeros((2, 16, 16, 1), np.uint8)
    t[:, 4:8, 4:8] = 1
    TrainStep(model, opt)(x, t)
    TrainStep(clone, opt2)(x, t)
    np.testing.assert_array_equal(clone.params, model.params)


def test_overwrite_is_atomic(tmp_path):
    _, model, opt, _ = _trained()
    path = _save(tmp_path / "ck.h5", model, opt, epoch=1)
    _save(path, model, opt, epoch=2)
    assert load_checkpoint(path).epoch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    _, model, opt, _ = _trained()
    path = _save(tmp_path / "ck.h5", model, opt)
    data = path.read_bytes()
    for keep in (len(data) // 2, 1000, 0):
        bad = tmp_path / f"cut{keep}.h5"
        bad.write_bytes(data[:keep])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(bad)
        assert str(bad) in str(err.value)
        assert "truncated" in str(err.value) or "empty" in str(err.value)


def test_corrupt_bytes_are_caught_by_the_checksum(tmp_path):
    _, model, opt, _ = _trained()
    path = _save(tmp_path / "ck.h5", model, opt)
    with h5py.File(path, "r") as f:
        offset = f["params"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256.*corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello, not HDF5\n" * 100)
    with pytest.raises(CheckpointError, match="not a readable HDF5 file"):
        load_checkpoint(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="not a nodulekit checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.h5")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_missing_parts_and_wrong_architecture(tmp_path):
    be, model, opt, _ = _trained()
    path = _save(tmp_path / "ck.h5", model, opt)
    with h5py.File(path, "a") as f:
        del f["adam/v"]
    with pytest.raises(CheckpointError, match="'adam/v' is missing"):
        load_checkpoint(path)

    path = _save(tmp_path / "ck2.h5", model, opt, config={"depth": 3, "width": 4})
    with pytest.raises(CheckpointError, match="does not match a depth-3 width-4 U-Net"):
        model_from_checkpoint(load_checkpoint(path), be)

    nan = model.params.copy()
    nan[5] = np.nan
    path = _save(tmp_path / "ck3.h5", model, opt, params=nan)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def _save_with_norm(path, model, opt, norm, **kw):
    config = {"depth": model.depth, "width": model.width, "seed": 0, "lr": 1e-3, "norm": norm}
    return _save(path, model, opt, config=config, buffers=model.buffers,
                 buffer_layout=model.buffer_layout, **kw)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_round_trip_with_norm(tmp_path, norm):
    """gamma and beta are parameters like any; batch norm's running statistics are a
    dataset of their own (/buffers, with its checksum), and the model rebuilt from the file
    evaluates exactly as the original (on the running statistics)."""
    be, model, opt, x = _trained(norm=norm)
    path = _save_with_norm(tmp_path / "ck.h5", model, opt, norm)
    with h5py.File(path, "r") as f:
        assert ("buffers" in f) == (norm == "batch")
    ck = load_checkpoint(path)
    clone = model_from_checkpoint(ck, be)
    assert clone.norm == norm
    np.testing.assert_array_equal(clone.params, model.params)
    np.testing.assert_array_equal(clone.buffers, model.buffers)
    if norm == "batch":
        assert model.buffers.size and not np.array_equal(
            model.buffers, model.buffer_layout.initial_buffers().astype(np.float32))
    np.testing.assert_array_equal(clone.forward(x, keep_for_backward=False),
                                  model.forward(x, keep_for_backward=False))


def test_batch_norm_buffers_are_checked(tmp_path):
    be, model, opt, _ = _trained(norm="batch")
    path = _save_with_norm(tmp_path / "ck.h5", model, opt, "batch")
    with h5py.File(path, "r") as f:
        offset = f["buffers"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 4] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="'buffers' does not match its SHA-256"):
        load_checkpoint(path)
    # a batch-norm configuration whose file lacks the running statistics
    path = _save(tmp_path / "nobuf.h5", model, opt,
                 config={"depth": 2, "width": 4, "seed": 0, "norm": "batch"})
    with pytest.raises(CheckpointError, match="buffers .0 tensors. do not match the model's "
                                              r"\(20: norm batch\)"):
        model_from_checkpoint(load_checkpoint(path), be)


def test_checkpoint_from_before_norms_is_norm_none(tmp_path):
    """A checkpoint written before normalisation layers (no "norm" in its configuration, no
    buffers) loads as norm none and predicts as it did; and a norm checkpoint's layout is
    refused for the plain U-Net."""
    be, model, opt, x = _trained()
    path = _save(tmp_path / "old.h5", model, opt)  # the configuration of older versions
    with h5py.File(path, "r") as f:
        assert "buffers" not in f and "buffer_layout" not in f.attrs
        assert "norm" not in load_checkpoint(path).config
    clone = model_from_checkpoint(load_checkpoint(path), be)
    assert clone.norm == "none" and clone.buffers.size == 0
    np.testing.assert_array_equal(clone.forward(x, keep_for_backward=False),
                                  model.forward(x, keep_for_backward=False))
    _, normed, nopt, _ = _trained(norm="instance")
    path = _save(tmp_path / "mixed.h5", normed, nopt)  # instance-norm weights, no norm key
    with pytest.raises(CheckpointError, match="does not match a depth-2 width-4 U-Net with "
                                              "norm none"):
        model_from_checkpoint(load_checkpoint(path), be)
