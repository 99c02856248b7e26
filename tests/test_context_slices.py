"""Slice context (2.5D): each sample's channels are its scan's neighbouring slices, the edge
slice repeated, in the same window with the same augmentation; evaluation reads the same
channels from whole slices; the run records K and trains a (2K+1)-channel U-Net."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backends import ALL_BACKENDS, each_backend, to_host
from cachefile import write_cache
from tiny import TINY_MODEL, tiny_train

from nodulekit.data.loader import CropOptions, context_table, eval_loader, train_loader
from nodulekit.nn.inputs import window_input
from nodulekit.training.checkpoint import load_checkpoint


def test_context_table_orders_each_scan_by_position_and_repeats_the_edges():
    # two scans, rows interleaved and out of order; positions descend with the row here
    patient = ["a", "b", "a", "b", "a", "b", "a"]
    position = [30.0, 5.0, 10.0, 0.0, 20.0, 10.0, 0.0]
    got = context_table(1, patient, ["1"] * 7, slice_position=position)
    # scan a by position: rows 6 (0 mm), 2 (10), 4 (20), 0 (30); scan b: 3, 1, 5
    want = {6: [6, 6, 2], 2: [6, 2, 4], 4: [2, 4, 0], 0: [4, 0, 0],
            3: [3, 3, 1], 1: [3, 1, 5], 5: [1, 5, 5]}
    assert got.tolist() == [want[i] for i in range(7)]
    two = context_table(2, patient, ["1"] * 7, slice_position=position)
    assert two[6].tolist() == [6, 6, 6, 2, 4] and two[0].tolist() == [2, 4, 0, 0, 0]
    # the exam separates scans of one patient; K = 0 is the row itself
    assert context_table(1, ["a"] * 4, ["1", "1", "2", "2"]).tolist() == [
        [0, 0, 1], [0, 1, 1], [2, 2, 3], [2, 3, 3]]
    assert context_table(0, patient, ["1"] * 7).tolist() == [[i] for i in range(7)]


def test_context_table_falls_back_to_slice_then_instance_numbers():
    nan = math.nan
    rows = context_table(1, ["p"] * 3, ["e"] * 3, slice_position=[nan, 1.0, 2.0],
                         slice_number=[3, 1, 2], instance_number=[1, 2, 3])
    assert rows.tolist() == [[2, 0, 0], [1, 1, 2], [1, 2, 0]]  # by slice: 1, 2, 0
    rows = context_table(1, ["p"] * 3, ["e"] * 3, slice_position=[1.0, 1.0, 2.0],
                         slice_number=[-1, -1, -1], instance_number=[2, 3, 1])
    assert rows.tolist() == [[2, 0, 1], [0, 1, 1], [2, 2, 0]]  # by instance: 2, 0, 1
    rows = context_table(1, ["p"] * 3, ["e"] * 3)  # nothing known: as given
    assert rows.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]


@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory):
    """2 scans x 6 slices of 48x48 whose HU encode (row, y, x): hu = 100 * row + (y + x) % 100
    - 1000 (so a window of a slice names its row and place); a nodule on every slice. Rows
    in cache order by slice number, positions descending (as synth writes them)."""
    n, size = 12, 48
    y, x = np.mgrid[0:size, 0:size]
    hu = np.stack([100 * r + (y + x) % 100 - 1000 for r in range(n)]).astype(np.int16)
    mask = np.zeros((n, size, size), np.uint8)
    mask[:, 20:26, 20:26] = 1
    meta = {"patient": ["0001"] * 6 + ["0002"] * 6, "exam": ["1"] * n,
            "slice": np.tile(np.arange(1, 7), 2), "slice_position": np.tile(
                -2.5 * np.arange(6), 2)}
    path = tmp_path_factory.mktemp("context") / "cache.h5"
    write_cache(path, {"train": dict(hu=hu, mask=mask, **meta),
                       "val": dict(hu=hu, mask=mask, **meta)})
    return path, hu, mask


def _neighbours(row: int, k: int) -> list[int]:
    """Row's scan neighbours in the labelled cache: positions descend with the row, so the
    slice below (lower z) is the next row; the edges repeat."""
    scan = row // 6 * 6
    return [min(max(row - d, scan), scan + 5) for d in range(-k, k + 1)]


@pytest.mark.parametrize("in_memory", [False, True], ids=["read", "in_memory"])
def test_context_channels_are_the_neighbours_in_the_same_window(labelled_cache, in_memory):
    path, hu, mask = labelled_cache
    with train_loader(path, batch_size=4, seed=1, num_workers=2, in_memory=in_memory,
                      crop=CropOptions(patch=16, context_slices=2)) as loader:
        seen = set()
        for epoch in range(3):
            for batch in loader.epoch(epoch):
                assert batch.hu.shape == (4, 5, 16, 16) and batch.hu.flags.c_contiguous
                for j, (i, (y0, x0)) in enumerate(zip(batch.index, batch.origin,
                                                      strict=True)):
                    window = np.s_[y0:y0 + 16, x0:x0 + 16]
                    want = [hu[r][window] for r in _neighbours(int(i), 2)]
                    np.testing.assert_array_equal(batch.hu[j], np.stack(want))
                    np.testing.assert_array_equal(batch.mask[j], mask[i][window])
                    seen.add(int(i))
        assert {0, 5, 6, 11} <= seen  # the edges were read


def test_eval_loader_gives_whole_slices_with_their_context(labelled_cache):
    path, hu, _ = labelled_cache
    with eval_loader(path, "val", batch_size=5, num_workers=0, context_slices=1) as loader:
        batches = list(loader)
        rows = np.concatenate([b.index for b in batches])
        np.testing.assert_array_equal(rows, np.arange(12))  # cache order, whole split
        first = batches[0]
        assert first.hu.shape == (5, 3, 48, 48) and not first.aug.any()
        for j, i in enumerate(first.index):
            np.testing.assert_array_equal(first.hu[j], hu[_neighbours(int(i), 1)])
        again = loader.read([11, 0])  # any rows, as evaluation reads them
        # row 11 is its scan's lowest slice, row 0 its scan's highest
        np.testing.assert_array_equal(again.hu, np.stack([hu[[11, 11, 10]], hu[[1, 0, 0]]]))
    with eval_loader(path, "val", batch_size=5, num_workers=0) as plain:
        assert next(iter(plain)).hu.shape == (5, 48, 48)  # K = 0: as before


def test_window_input_interleaves_the_channels_with_one_augmentation(labelled_cache):
    from nodulekit.engine import get_backend

    path = labelled_cache[0]
    be = get_backend("cpu")
    with train_loader(path, batch_size=4, seed=2, num_workers=0,
                      crop=CropOptions(patch=32, context_slices=1)) as loader:
        batch = next(iter(loader))
    assert batch.aug[:, 2].any()
    image, target = window_input(be, batch.hu, batch.mask, batch.aug, -500.0, 1600.0)
    assert image.shape == (4, 32, 32, 3) and image.flags.c_contiguous
    assert image.dtype == np.float32 and target.shape == (4, 32, 32, 1)
    for c in range(3):
        one, t = be.window_augment(np.ascontiguousarray(batch.hu[:, c]), batch.mask,
                                   batch.aug, -500.0, 1600.0)
        np.testing.assert_array_equal(image[..., c], one[..., 0])
        np.testing.assert_array_equal(target, t)
    # K = 0 is window_augment itself
    hu0 = np.ascontiguousarray(batch.hu[:, 1])
    a, _ = window_input(be, hu0, batch.mask, batch.aug, -500.0, 1600.0)
    np.testing.assert_array_equal(a, be.window_augment(hu0, batch.mask, batch.aug,
                                                       -500.0, 1600.0)[0])


@each_backend(*ALL_BACKENDS)
def test_window_input_on_every_backend(backend):
    """The channels interleaved with the backend's own array module (CuPy on a GPU): each is
    that backend's `window_augment` of the channel, the target the centre channel's."""
    rng = np.random.default_rng(5)
    hu = rng.integers(-1100, 600, (2, 3, 16, 24)).astype(np.int16)
    mask = (rng.random((2, 16, 24)) < 0.2).astype(np.uint8)
    aug = np.array([[1, 0, 12.5], [0, 1, -7.0]], np.float32)
    image, target = to_host(backend, *window_input(backend, hu, mask, aug, -500.0, 1600.0))
    assert image.shape == (2, 16, 24, 3) and target.shape == (2, 16, 24, 1)
    for c in range(3):
        one, t = backend.window_augment(backend.asarray(np.ascontiguousarray(hu[:, c])),
                                        backend.asarray(mask), backend.asarray(aug),
                                        -500.0, 1600.0)
        np.testing.assert_array_equal(image[..., c], to_host(backend, one)[..., 0])
        np.testing.assert_array_equal(target, to_host(backend, t))


def _train_only_cache(path):
    """2 scans x 8 slices of 32x32, 12 with a nodule, and no validation or test slices."""
    rng = np.random.default_rng(3)
    n, size = 16, 32
    hu = rng.integers(-1000, -600, (n, size, size)).astype(np.int16)
    mask = np.zeros((n, size, size), np.uint8)
    for i in range(2, 14):
        mask[i, 10:14, 12 + i % 5:16 + i % 5] = 1
    hu[mask.astype(bool)] = 50
    return write_cache(path, {"train": dict(
        hu=hu, mask=mask, patient=["1"] * 8 + ["2"] * 8, exam=["1"] * n,
        slice=np.tile(np.arange(1, 9), 2), slice_position=np.tile(np.arange(8.0), 2))})


def test_training_with_context_records_it(tmp_path):
    """A run with --context-slices 1 trains a 3-channel U-Net on patches and records K in
    config.json and the checkpoints; fine-tuning keeps it. (A cache with a train split only:
    validation, which reads the same context through nodulekit.evaluation, is not run.)"""
    cache = _train_only_cache(tmp_path / "c.h5")
    run = tiny_train(cache, tmp_path / "k1", epochs=1, patch=16, context_slices=1)
    assert (run.config.context_slices, run.config.in_channels) == (1, 3)
    ck = load_checkpoint(tmp_path / "k1" / "checkpoint_last.h5")
    assert (ck.config["context_slices"], ck.config["in_channels"]) == (1, 3)
    first = next(layer for layer in ck.layout if layer[0] == "enc0.conv1.w")
    assert first[1][-1] == 3  # [K, R, S, C]: three input channels
    assert run.history[0]["step"] == 3 and np.isfinite(run.history[0]["train_loss"])
    log = (tmp_path / "k1" / "train.log").read_text()
    assert "1 slice(s) below and above as channels (3 in all)" in log
    with pytest.raises(ValueError, match="--context-slices 0 differs from the fine-tuned"):
        tiny_train(cache, tmp_path / "ft", epochs=1, finetune_from=tmp_path / "k1",
                   context_slices=0, width=None, depth=None)
    ft = tiny_train(cache, tmp_path / "ft2", epochs=1, finetune_from=tmp_path / "k1",
                    width=None, depth=None)
    assert (ft.config.context_slices, ft.config.in_channels) == (1, 3)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                    reason="mpi4py is not installed (pip install -e '.[test]')")
def test_two_ranks_with_patches_and_context_train_as_one_process(tmp_path):
    """`mpiexec -n 2 nodulekit train --patch 16 --context-slices 1`: each rank reads its half
    of every global batch (crops and channels as one process draws them), so the run ends
    with one process's weights and losses, to float32 rounding (the tolerances of
    test_train_distributed.py)."""
    cache = _train_only_cache(tmp_path / "c.h5")
    args = ["--width", str(TINY_MODEL["width"]), "--depth", str(TINY_MODEL["depth"]),
            "--batch-size", "4", "--lr", str(TINY_MODEL["lr"]), "--device", "cpu",
            "--workers", "0", "--no-progress", "--epochs", "2", "--patch", "16",
            "--context-slices", "1", "--recipe", TINY_MODEL["recipe"]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("NODULEKIT_DIST", "NODULEKIT_TEST_FAULT", "NODULEKIT_DIST_TIMEOUT")}
    mpiexec = Path(sys.executable).parent / "mpiexec"
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "nodulekit.cli",
                           "train", str(cache), "--out", str(tmp_path / "ranks"), *args],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 4 = 2 per rank" in proc.stdout
    single = tiny_train(cache, tmp_path / "one", epochs=2, patch=16, context_slices=1)
    a = load_checkpoint(tmp_path / "one" / "checkpoint_last.h5")
    b = load_checkpoint(tmp_path / "ranks" / "checkpoint_last.h5")
    assert b.config["context_slices"] == 1 and b.config["patch"] == [16, 16]
    assert (a.global_step, b.global_step) == (6, 6)
    from nodulekit.nn.layout import ParameterLayout, unet_parameter_shapes

    start = ParameterLayout(unet_parameter_shapes(TINY_MODEL["depth"], TINY_MODEL["width"],
                                                  3)).he_normal(0)
    moved = np.linalg.norm(a.params.astype(np.float64) - start)
    assert moved > 1e-2
    assert np.linalg.norm(b.params.astype(np.float64) - a.params) / moved < 2e-5
    for ra, rb in zip(single.history, b.history, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-6)
