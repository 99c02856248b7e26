"""The CLI end to end on a tiny synthetic set: train, evaluate, predict, inspect."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny import TINY, TINY_MODEL, tiny_train

from nodulekit.cli import main
from nodulekit.evaluation.metrics import slice_scores
from nodulekit.training.checkpoint import load_checkpoint


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def _model_args():
    return ["--width", TINY_MODEL["width"], "--depth", TINY_MODEL["depth"], "--batch-size",
            TINY_MODEL["batch_size"], "--lr", TINY_MODEL["lr"]]


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """`nodulekit train CACHE --epochs 2 ...` once, shared by the tests below."""
    _, cache = tiny_data
    run = tmp_path_factory.mktemp("cli") / "run"
    result = _invoke("train", cache, "--epochs", 2, *_model_args(), "--device", "cpu",
                     "--workers", 1, "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    return run, result.output


def test_train_writes_the_run_folder(trained_run, tiny_data):
    run, output = trained_run
    for name in ("config.json", "metrics.csv", "progress.png", "checkpoint_last.h5",
                 "checkpoint_best.h5", "train.log", "test/summary.json"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    c = cfg["config"]
    assert (c["epochs"], c["width"], c["depth"], c["batch_size"], c["lr"]) == (2, 4, 2, 4, 1e-3)
    assert c["image_shape"] == [TINY["size"]] * 2 and c["cache"] == str(tiny_data[1])
    assert c["window_center"] == -500 and c["window_width"] == 1600
    assert cfg["backend"] == "cpu" and "numpy" in cfg["versions"] and "CPU" in cfg["device"]
    # what picked the convolution kernels (another machine may sum in another order)
    from nodulekit.engine.cpu_conv_packed import WIDE_BLOCKS

    kernels = cfg["sessions"][-1]["cpu_kernels"]
    assert kernels["32_register_blocks"] == WIDE_BLOCKS
    assert not WIDE_BLOCKS or isinstance(kernels["fma_16_lanes_full_width"], bool)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for col in ("train_loss", "val_loss", "val_dice", "val_iou", "seconds", "images_per_s"):
        assert all(np.isfinite(float(r[col])) for r in rows), col
    assert Image.open(run / "progress.png").size[0] > 500
    best = load_checkpoint(run / "checkpoint_best.h5")
    assert best.kind == "best" and best.best_epoch == best.epoch
    # kept on the validation nodule-slice Dice of found nodules (config.json says so)
    assert max(float(r["val_nodule_found_dice"]) for r in rows) == pytest.approx(
        best.best_score, rel=1e-5)  # csv: 6 digits
    assert all(float(r["val_nodule_found_dice"]) <= float(r["val_nodule_dice"]) for r in rows)
    assert cfg["selection"]["metric"] == "val_nodule_found_dice"
    # the log mirrors what was printed
    log = (run / "train.log").read_text()
    for line in output.splitlines():
        if line.startswith("epoch "):
            assert line in log
    assert "mean Dice" in output and "nodule 3-10mm" in output


def test_evaluate(trained_run, tiny_data, tmp_path):
    run, _ = trained_run
    _, cache = tiny_data
    result = _invoke("evaluate", run, cache, "--split", "test", "--out", tmp_path / "ev",
                     "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["split"] == "test" and s["checkpoint"].endswith("checkpoint_best.h5")
    per = s["slices"]
    counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in per])
    dice, iou = slice_scores(counts)
    np.testing.assert_allclose([r["dice"] for r in per], dice)
    np.testing.assert_allclose([r["iou"] for r in per], iou)
    assert s["all"]["slices"] == len(per)
    assert s["all"]["mean_dice"] == pytest.approx(dice.mean())
    assert s["all"]["tp"] == counts[:, 0].sum()
    empty = [r for r in per if r["bin"] == "empty"]
    assert empty and s["by_diameter"]["empty"]["slices"] == len(empty)
    assert all(r["dice"] == 1.0 for r in empty if r["fp"] == 0)
    assert set(s["by_diameter"]) == {"<3mm", "3-10mm", "10-30mm", ">30mm", "empty"}
    assert sum(v["slices"] for v in s["by_diameter"].values()) == len(per)
    assert "nodule 10-30mm" in result.output and "global Dice" in result.output
    # the same as what train evaluated at its end
    at_end = json.loads((run / "test" / "summary.json").read_text())
    assert at_end["all"] == s["all"]


def test_predict(trained_run, tiny_data, tmp_path):
    run, _ = trained_run
    data, _ = tiny_data
    out = tmp_path / "pred"
    result = _invoke("predict", run / "checkpoint_best.h5", data / "test", "--out", out,
                     "--probabilities", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    dicoms = sorted((data / "test" / "images").rglob("*.dcm"))
    masks = sorted((out / "masks").rglob("*.png"))
    # UniToChest naming: masks/patient_XXXX/exam_N/NNNN.png mirrors images/...dcm
    assert [m.relative_to(out / "masks").with_suffix("") for m in masks] == \
        [d.relative_to(data / "test" / "images").with_suffix("") for d in dicoms]
    for m in masks:
        a = np.asarray(Image.open(m))
        assert a.dtype == np.uint8 and a.shape == (TINY["size"],) * 2
        assert set(np.unique(a)) <= {0, 255}
    overlays = sorted((out / "overlays").rglob("*.png"))
    probs = sorted((out / "probabilities").rglob("*.png"))
    assert len(overlays) == len(probs) == len(dicoms)
    assert np.asarray(Image.open(overlays[0])).shape == (TINY["size"], TINY["size"], 3)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(dicoms)
    assert all(r["dice"] != "" for r in rows)  # the truth masks were found (auto)
    # predict and evaluate agree slice by slice on the same data
    ev = json.loads((run / "test" / "summary.json").read_text())
    by_source = {r["source"].split("images/", 1)[1]: r for r in ev["slices"]}
    for r in rows:
        key = r["input"].split("images/", 1)[1]
        e = by_source[key]
        assert (int(r["tp"]), int(r["fp"]), int(r["fn"])) == (e["tp"], e["fp"], e["fn"])
    assert "against the truth masks" in result.output


def test_overlay_colours():
    from nodulekit.inference.predict import COLOURS, overlay

    grey = np.full((2, 2), 0.5)
    pred = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [1, 0]], np.uint8)
    rgb = overlay(grey, pred, truth, alpha=1.0)
    assert tuple(rgb[0, 0]) == COLOURS["tp"] == (255, 255, 0)  # agreement: yellow
    assert tuple(rgb[0, 1]) == COLOURS["fp"] == (0, 255, 0)  # false positive: green
    assert tuple(rgb[1, 0]) == COLOURS["fn"] == (255, 0, 0)  # false negative: red
    assert tuple(rgb[1, 1]) == (128, 128, 128)  # background stays grey
    assert tuple(overlay(grey, pred, None, alpha=1.0)[0, 0]) == COLOURS["pred"]


def test_inspect_matches_the_model(trained_run):
    from nodulekit.engine import get_backend
    from nodulekit.nn import UNet
    from nodulekit.nn.summary import totals, unet_layers

    run, _ = trained_run
    result = _invoke("inspect", run, "--json", "-")
    assert result.exit_code == 0, result.output
    assert "enc0.conv1" in result.output and "head" in result.output
    n = TINY_MODEL["batch_size"]
    assert f"input {n} x {TINY['size']} x {TINY['size']} x 1" in result.output

    be = get_backend("cpu")
    for depth, width, size, batch in ((2, 4, 32, 3), (3, 2, 24, 1), (4, 16, 128, 2)):
        layers = unet_layers(depth=depth, width=width, size=size, batch=batch)
        model = UNet(be, depth=depth, width=width)
        assert totals(layers)["params"] == model.num_parameters
        for x in layers:  # each layer's parameters are its slots in the flat buffer
            mine = sum(s.size for name, s in model.layout.slots.items()
                       if name.rsplit(".", 1)[0] == x.name)
            assert mine == x.params, x.name
        assert layers[-1].output_shape == (batch, size, size, 1)
        bottom = next(x for x in layers if x.name == "bottom.conv2")
        assert bottom.output_shape == (batch, size >> depth, size >> depth, width << depth)
    # FLOPs by hand: the first conv of a depth-2 width-4 net on 1 x 32 x 32
    first = unet_layers(depth=2, width=4, size=32, batch=1)[0]
    assert first.flops == 2 * 32 * 32 * 4 * 9 * 1 and first.activation_bytes == 32 * 32 * 4 * 4
    # the output shapes are the ones the forward pass produces
    model = UNet(be, depth=2, width=4)
    x = np.zeros((3, 32, 32, 1), np.float32)
    assert model.forward(x, keep_for_backward=False).shape == (3, 32, 32, 1)

    # a size that is no multiple of 2**depth runs padded, as validation and predict run it
    result = _invoke("inspect", "--width", 4, "--depth", 2, "--size", 30)
    assert result.exit_code == 0, result.output
    assert "padded with air to 32x32" in result.output and "1 x 32 x 32 x 1" in result.output


def test_size_crop_and_clear_errors(tiny_data, tmp_path):
    _, cache = tiny_data
    # --size smaller than the slices: centre crop
    r = tiny_train(cache, tmp_path / "crop", epochs=1, size=16, test=False)
    assert r.config.image_shape == [16, 16] and r.config.cache_shape == [32, 32]
    # larger than the slices, too small for the depth: clear messages
    for args, message in ((["--size", 64], "crops but does not resize"),
                          (["--depth", 6], "smaller than the 64x64 a depth-6 U-Net needs"),
                          (["--size", 30, "--patch", 30], "e.g. --patch 28")):
        result = _invoke("train", cache, "--epochs", 1, "--width", 4, "--depth", 2,
                         "--device", "cpu", "--out", tmp_path / "bad", "--no-progress", *args)
        assert result.exit_code != 0 and message in result.output, result.output
    bad_ckpt = tmp_path / "bad.h5"
    bad_ckpt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = _invoke("evaluate", bad_ckpt, cache, "--device", "cpu")
    assert result.exit_code != 0 and str(bad_ckpt) in result.output
    assert "truncated or corrupt" in result.output


def test_slices_of_any_size_train_on_crops_and_validate_whole(tiny_data, tmp_path):
    """Slices whose sides are no multiple of 2**depth (here a 30 x 30 centre crop, depth 2):
    training takes the largest crops that are (28 x 28), validation and test the whole
    30 x 30 slices, padded with air for the network and cropped back."""
    _, cache = tiny_data
    r = tiny_train(cache, tmp_path / "odd", epochs=1, size=30)
    assert r.config.image_shape == [30, 30] and r.config.patch == [28, 28]
    row = r.history[-1]
    assert np.isfinite(row["val_loss"]) and np.isfinite(row["val_dice"])
    result = _invoke("evaluate", tmp_path / "odd", cache, "--device", "cpu", "--size", 30,
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert "30x30" in result.output


def test_default_run_uses_the_user_cache(tmp_path, monkeypatch):
    """No DATA: the demo set is generated once under NODULEKIT_CACHE, then reused."""
    import nodulekit.training.demo as demo

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_SYNTH", dict(TINY))
    from nodulekit.training import config as train_config

    monkeypatch.setitem(train_config.SIZE_DEFAULTS, "demo",
                        {"epochs": 1, "width": 4, "depth": 2, "batch_size": 4,
                         "val_interval": 1})
    monkeypatch.chdir(tmp_path)
    result = _invoke("train", "--device", "cpu", "--workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    data, cache = demo.demo_paths()
    assert cache.is_file() and (data / "synth.json").is_file()
    assert str(tmp_path / "cache") in str(cache)
    assert "generating the demo data set" in result.output
    # the first run compiled its kernels in a second process meanwhile, and it went well
    assert "compiling the run's kernels in a second process" in result.output
    assert "compiling the kernels ahead failed" not in result.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("demo-")
    cfg = json.loads((runs[0] / "config.json").read_text())["config"]
    assert cfg["data_kind"] == "demo" and cfg["lr"] == train_config.RECIPES["nodulekit"]["lr"]
    assert (runs[0] / "test" / "summary.json").is_file()
    mtime = cache.stat().st_mtime_ns
    result = _invoke("train", "--device", "cpu", "--workers", 0, "--no-progress", "--out",
                     tmp_path / "second", "--no-test")
    assert result.exit_code == 0, result.output
    assert "generating" not in result.output and cache.stat().st_mtime_ns == mtime
    assert "second process" not in result.output  # nothing to overlap: the set exists


def test_the_warm_up_changes_no_number(tmp_path, monkeypatch):
    """The first run on a machine compiles its kernels in a second process while the demo
    set is generated; with or without that, the run computes the same numbers."""
    import nodulekit.training.demo as demo
    from nodulekit.training import config as train_config
    from nodulekit.training.loop import train

    monkeypatch.setattr(demo, "DEMO_SYNTH", dict(TINY))
    monkeypatch.setitem(train_config.SIZE_DEFAULTS, "demo",
                        {"epochs": 1, "width": 4, "depth": 2, "batch_size": 4,
                         "val_interval": 1})
    histories = []
    for on in ("1", "0"):
        monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / f"cache{on}"))  # generated anew
        monkeypatch.setenv("NODULEKIT_WARMUP", on)
        lines = []
        r = train(out=str(tmp_path / f"run{on}"), device="cpu", workers=0, progress=False,
                  test=False, echo=lines.append)
        said = "\n".join(lines)
        assert ("compiling the run's kernels in a second process" in said) == (on == "1")
        assert "compiling the kernels ahead failed" not in said
        histories.append([{k: v for k, v in row.items() if "seconds" not in k
                           and "per_s" not in k} for row in r.history])
    assert histories[0] == histories[1]


def test_folder_data_is_preprocessed_into_the_run(tiny_data, tmp_path):
    data, _ = tiny_data
    r = tiny_train(data, tmp_path / "run", epochs=1, test=False)
    assert r.config.data_kind == "folder"
    assert r.config.cache == str(tmp_path / "run" / "cache.h5")
    assert (tmp_path / "run" / "cache.h5").is_file()


def test_train_with_norm_then_inspect_and_evaluate(tiny_data, tmp_path):
    """`train --norm batch`: the configuration and checkpoint record it, `inspect RUN`
    shows each norm layer after its convolution (and the parameters match the model's),
    `evaluate RUN` runs the model on its running statistics."""
    _, cache = tiny_data
    run = tmp_path / "bn"
    result = _invoke("train", cache, "--epochs", 1, *_model_args(), "--device", "cpu",
                     "--workers", 0, "--out", run, "--no-progress", "--no-test", "--norm",
                     "batch")
    assert result.exit_code == 0, result.output
    assert "U-Net depth 2 width 4, batch norm" in result.output
    assert json.loads((run / "config.json").read_text())["config"]["norm"] == "batch"
    ck = load_checkpoint(run / "checkpoint_last.h5")
    assert ck.config["norm"] == "batch" and ck.buffers.size == sum(
        int(np.prod(shape)) for _, shape, _ in ck.buffer_layout) > 0
    result = _invoke("inspect", run, "--json", "-")
    assert result.exit_code == 0, result.output
    assert "batch norm" in result.output
    lines = result.output.splitlines()
    conv = next(i for i, line in enumerate(lines) if line.startswith("enc0.conv1"))
    assert lines[conv + 1].startswith("enc0.norm1") and "batchnorm+relu" in lines[conv + 1]
    assert "conv3x3+relu" not in result.output and "head" in result.output
    layers = json.loads(result.output[result.output.index("{"):])
    assert layers["norm"] == "batch" and layers["totals"]["params"] == ck.params.size
    result = _invoke("inspect", "--width", 4, "--depth", 2, "--size", 32, "--norm", "instance")
    assert result.exit_code == 0 and "instnorm+relu" in result.output
    result = _invoke("evaluate", run, "--device", "cpu", "--workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mean Dice" in result.output
