"""Patch training: crops placed on nodules as often as asked, aligned with their masks,
seeded, independent of the readers, bit-exact on resume, and whole slices when the patch
is the slice."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cachefile import scan_meta, write_cache
from tiny import TINY_MODEL, tiny_train

from nodulekit.data.cache import open_cache
from nodulekit.data.loader import CropOptions, Loader, LoaderError, SampleOptions, train_loader
from nodulekit.nn.inputs import window_input
from nodulekit.training.checkpoint import load_checkpoint
from nodulekit.training.config import check_patch, resolve_patch
from nodulekit.training.loop import train
from nodulekit.training.runfiles import read_metrics_csv

SIZE, PATCH = 96, 32


@pytest.fixture(scope="module")
def nodule_cache(tmp_path_factory):
    """96x96 slices of noise, 4 scans x 10 slices; 24 of them with one small nodule (a 3x3
    to 6x6 square of HU 100 on the mask) somewhere in the slice, the others empty."""
    rng = np.random.default_rng(11)
    n = 40
    hu = rng.integers(-1000, -700, (n, SIZE, SIZE)).astype(np.int16)
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in rng.choice(n, 24, replace=False):
        s = int(rng.integers(3, 7))
        y, x = (int(v) for v in rng.integers(0, SIZE - s, 2))
        mask[i, y:y + s, x:x + s] = 1
        hu[i, y:y + s, x:x + s] = 100
    path = tmp_path_factory.mktemp("patches") / "cache.h5"
    write_cache(path, {"train": dict(hu=hu, mask=mask, **scan_meta(4, 10))})
    return path, hu, mask


def _loader(path, **crop) -> Loader:
    crop.setdefault("patch", PATCH)
    workers = crop.pop("workers", 0)
    return train_loader(path, batch_size=4, empty_fraction=0.5, seed=crop.pop("seed", 1),
                        num_workers=workers, crop=CropOptions(**crop))


def test_the_foreground_fraction_holds(nodule_cache):
    """Over ~2,000 samples, a binomial share F of the nodule slices' crops is placed on a
    nodule (within 4 standard deviations), every placed crop holds nodule pixels, and
    uniform crops hold fewer; the origins of uniform crops span the whole slice."""
    path, _, mask = nodule_cache
    has = mask.reshape(len(mask), -1).any(axis=1)
    f = 1.0 / 3.0
    with _loader(path, foreground_fraction=f) as loader:
        rows, placed, origin = [], [], []
        for epoch in range(90):
            plan = loader.plan(epoch)
            rows += plan.rows
            placed += plan.foreground
            origin += plan.origin
        rows, placed = np.concatenate(rows), np.concatenate(placed)
        origin = np.concatenate(origin)
        on_nodule_slice = has[rows]
        n = int(on_nodule_slice.sum())
        assert n >= 2000
        k = int(placed[on_nodule_slice].sum())
        assert abs(k - n * f) <= 4 * math.sqrt(n * f * (1 - f)), (k, n)
        assert not placed[~on_nodule_slice].any()  # an empty slice: uniform crop
        # what the crops hold (read back for 10 epochs)
        hit, was_placed = [], []
        for epoch in range(10):
            for batch, fg in zip(loader.epoch(epoch), loader.plan(epoch).foreground,
                                 strict=True):
                hit += batch.mask.reshape(len(batch), -1).any(axis=1).tolist()
                was_placed += fg.tolist()
    hit, was_placed = np.array(hit), np.array(was_placed)
    assert hit[was_placed].all()
    assert hit[~was_placed].mean() < 0.5 < hit[was_placed].mean()
    uniform = origin[~placed]
    assert uniform.min() == 0 and uniform.max() == SIZE - PATCH
    for f_all, want in ((0.0, 0), (1.0, n)):
        with _loader(path, foreground_fraction=f_all) as loader:
            fg = np.concatenate([np.concatenate(loader.plan(e).foreground)
                                 for e in range(90)])
        assert int(fg.sum()) == want


@pytest.mark.parametrize("raw", [True, False], ids=["raw_chunks", "through_hdf5"])
@pytest.mark.parametrize("in_memory", [False, True], ids=["read", "in_memory"])
def test_crops_are_windows_of_their_slices(nodule_cache, tmp_path, raw, in_memory):
    path, hu, mask = nodule_cache
    if not raw:
        path = write_cache(tmp_path / "hdf5.h5", {"train": dict(hu=hu, mask=mask,
                                                                **scan_meta(4, 10))}, raw=False)
    with train_loader(path, batch_size=4, empty_fraction=0.5, seed=2, num_workers=2,
                      in_memory=in_memory, crop=CropOptions(patch=(PATCH, 48))) as loader:
        assert loader._reader.raw == raw
        for batch in loader.epoch(0):
            assert batch.hu.shape == (4, PATCH, 48) and batch.hu.flags.c_contiguous
            for j, (i, (y, x)) in enumerate(zip(batch.index, batch.origin, strict=True)):
                np.testing.assert_array_equal(batch.hu[j], hu[i, y:y + PATCH, x:x + 48])
                np.testing.assert_array_equal(batch.mask[j], mask[i, y:y + PATCH, x:x + 48])


def test_flip_and_rotation_keep_image_and_mask_aligned(tmp_path):
    """A bright off-centre rectangle exactly where the mask is 1: after cropping, flips and
    rotation, the mask still covers the bright pixels (the image bilinear, the mask
    nearest: they differ at most on the rim)."""
    from nodulekit.engine import get_backend

    hu = np.full((4, 64, 64), -1000, np.int16)
    mask = np.zeros((4, 64, 64), np.uint8)
    for i in range(4):
        hu[i, 20 + i:34 + i, 24:32], mask[i, 20 + i:34 + i, 24:32] = 400, 1
    path = write_cache(tmp_path / "c.h5", {"train": dict(hu=hu, mask=mask)})
    be = get_backend("cpu")
    checked, angles, flips = 0, [], []
    with train_loader(path, batch_size=4, seed=0, num_workers=0,
                      crop=CropOptions(patch=48, foreground_fraction=1.0)) as loader:
        for epoch in range(6):
            for batch in loader.epoch(epoch):
                image, target = window_input(be, batch.hu, batch.mask, batch.aug, -500.0,
                                             1600.0)
                bright = image[..., 0] > 0.6  # HU 400 -> 0.875, air -> 0.0
                t = target[..., 0].astype(bool)
                for j in range(4):
                    rim = bright[j] ^ t[j]
                    assert t[j].sum() > 20
                    assert rim.sum() <= 0.35 * t[j].sum(), (batch.aug[j], rim.sum())
                    # the two centroids agree to a pixel
                    cb = np.argwhere(bright[j]).mean(0)
                    ct = np.argwhere(t[j]).mean(0)
                    assert np.abs(cb - ct).max() < 1.0
                    checked += 1
                angles += np.abs(batch.aug[:, 2]).tolist()
                flips += batch.aug[:, :2].sum(axis=1).tolist()
    assert checked == 24 and max(angles) > 10 and 0 in flips and 2 in flips


def test_plan_independent_of_workers_and_queue(nodule_cache):
    path = nodule_cache[0]
    runs = []
    for workers, queue in ((0, None), (1, 1), (3, 5)):
        with train_loader(path, batch_size=4, empty_fraction=0.5, seed=5, num_workers=workers,
                          queue_size=queue, crop=CropOptions(patch=PATCH, context_slices=1)
                          ) as loader:
            runs.append([list(loader.epoch(e)) for e in range(2)])
    for other in runs[1:]:
        for a_epoch, b_epoch in zip(runs[0], other, strict=True):
            for a, b in zip(a_epoch, b_epoch, strict=True):
                for key in ("hu", "mask", "aug", "index", "origin"):
                    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_patch_as_large_as_the_slice_is_whole_slice_training(nodule_cache):
    """The same batches, bit for bit, as without patches; and with patches the epoch's rows
    and augmentation are unchanged (the crops' draws come last)."""
    path = nodule_cache[0]

    def epochs(crop):
        with train_loader(path, batch_size=4, empty_fraction=0.5, seed=4, num_workers=2,
                          crop=crop) as loader:
            return [list(loader.epoch(e)) for e in range(3)]

    whole = epochs(None)
    for crop in (CropOptions(patch=SIZE), CropOptions(patch=SIZE, region=(SIZE, SIZE)),
                 CropOptions(patch=(SIZE, SIZE), foreground_fraction=1.0)):
        for a_epoch, b_epoch in zip(whole, epochs(crop), strict=True):
            for a, b in zip(a_epoch, b_epoch, strict=True):
                assert b.origin is None
                for key in ("hu", "mask", "aug", "index"):
                    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    for a_epoch, b_epoch in zip(whole, epochs(CropOptions(patch=PATCH)), strict=True):
        for a, b in zip(a_epoch, b_epoch, strict=True):
            np.testing.assert_array_equal(a.index, b.index)
            np.testing.assert_array_equal(a.aug, b.aug)


def test_region_is_the_centre_crop_and_patches_stay_inside(nodule_cache):
    path, hu, _ = nodule_cache
    with _loader(path, region=(64, 64), patch=None) as loader:
        batch = next(iter(loader))
        np.testing.assert_array_equal(batch.hu, hu[batch.index, 16:80, 16:80])
    with _loader(path, region=64, foreground_fraction=1.0) as loader:
        origin = np.concatenate([np.concatenate(loader.plan(e).origin) for e in range(20)])
    assert origin.min() >= 16 and origin.max() <= 80 - PATCH


def test_two_ranks_within_read_what_one_process_reads(nodule_cache):
    """Data parallel ("within"): rank r's batch k is samples [2r, 2r + 2) of the single
    process's batch k, crops and context channels included."""
    from nodulekit import distributed

    path = nodule_cache[0]
    crop = CropOptions(patch=PATCH, context_slices=1)
    with train_loader(path, batch_size=4, seed=3, empty_fraction=0.5, num_workers=0,
                      crop=crop) as whole:
        one = [list(whole.epoch(e)) for e in range(2)]
    for r in range(2):
        with distributed.shard_global_batches(
                train_loader(path, batch_size=4, seed=3, empty_fraction=0.5, num_workers=2,
                             crop=crop), r, 2) as loader:
            for epoch in range(2):
                mine = list(loader.epoch(epoch))
                assert len(mine) == len(one[epoch])
                for got, batch in zip(mine, one[epoch], strict=True):
                    for key in ("hu", "mask", "aug", "index", "origin"):
                        np.testing.assert_array_equal(getattr(got, key),
                                                      getattr(batch, key)[2 * r:2 * r + 2])


def test_bad_patches_are_clear_errors(nodule_cache):
    path = nodule_cache[0]
    with pytest.raises(LoaderError, match="patch 128x128 is larger than the 96x96"):
        _loader(path, patch=128)
    with pytest.raises(LoaderError, match="foreground_fraction must be in"):
        Loader(path, sample=SampleOptions(), crop=CropOptions(patch=32,
                                                               foreground_fraction=1.5))
    with pytest.raises(ValueError, match=r"--patch 40 is not a multiple of 2\*\*depth = 16"):
        check_patch([40, 40], [96, 96], 4)
    with pytest.raises(ValueError, match="--patch 128 is larger than the 96x96 slices"):
        resolve_patch(128, [96, 96], 4, "cpu")
    # auto: the slice where small, else 128 on the CPU, 256 on a GPU
    assert resolve_patch(None, [96, 96], 4, "cpu") == [96, 96]
    assert resolve_patch("auto", [512, 512], 4, "cpu") == [128, 128]
    assert resolve_patch(None, [512, 384], 4, "cuda") == [256, 256]
    assert resolve_patch(None, [512, 512], 8, "cpu") == [256, 256]  # at least 2**depth
    # sides that are no multiple of 2**depth: the largest crop that is
    assert resolve_patch(None, [300, 260], 4, "cpu") == [128, 128]
    assert resolve_patch(None, [100, 90], 4, "cpu") == [96, 80]
    assert resolve_patch(None, [300, 260], 4, "cuda") == [256, 256]
    assert resolve_patch(None, [200, 260], 4, "cuda") == [192, 256]
    with pytest.raises(ValueError, match="smaller than the 16x16"):
        resolve_patch(None, [12, 40], 4, "cpu")


def test_cli_patch_option(tiny_data, tmp_path):
    from click.testing import CliRunner

    from nodulekit.cli import main

    _, cache = tiny_data
    base = ["train", str(cache), "--width", "4", "--depth", "2", "--device", "cpu",
            "--workers", "0", "--no-progress", "--epochs", "1"]
    runner = CliRunner()
    bad = runner.invoke(main, [*base, "--out", str(tmp_path / "a"), "--patch", "ten"])
    assert bad.exit_code == 2 and "neither a whole number of pixels nor 'auto'" in bad.output
    bad = runner.invoke(main, [*base, "--out", str(tmp_path / "b"), "--patch", "6"])
    assert bad.exit_code == 1 and "--patch 6 is not a multiple of 2**depth = 4" in bad.output
    bad = runner.invoke(main, [*base, "--out", str(tmp_path / "c"), "--patch", "64"])
    assert bad.exit_code == 1 and "--patch 64 is larger than the 32x32 slices" in bad.output


def test_resume_with_patches_is_bit_exact(tiny_data, tmp_path):
    """2 epochs straight = 1 epoch, then resumed for a second: the same weights, Adam state
    and metrics, bit for bit (the plan is a function of (seed, epoch)); the patch and the
    foreground fraction are recorded and cannot change on resume."""
    _, cache = tiny_data
    opts = dict(patch=16, foreground_fraction=0.5, test=False)
    straight = tiny_train(cache, tmp_path / "straight", epochs=2, **opts)
    assert straight.config.patch == [16, 16] and straight.config.foreground_fraction == 0.5
    tiny_train(cache, tmp_path / "cut", epochs=1, **opts)
    stored = load_checkpoint(tmp_path / "cut" / "checkpoint_last.h5").config
    assert (stored["patch"], stored["foreground_fraction"]) == ([16, 16], 0.5)
    with pytest.raises(ValueError, match=r"patch is \[16, 16\], cannot change it to 8"):
        train(resume=str(tmp_path / "cut"), epochs=2, patch=8, device="cpu", progress=False,
              echo=lambda *_: None)
    with pytest.raises(ValueError, match="foreground_fraction is 0.5, cannot change it"):
        train(resume=str(tmp_path / "cut"), epochs=2, foreground_fraction=0.2, device="cpu",
              progress=False, echo=lambda *_: None)
    train(resume=str(tmp_path / "cut"), epochs=2, patch="auto", foreground_fraction=0.5,
          device="cpu", workers=2, progress=False, test=False, echo=lambda *_: None)
    for name in ("checkpoint_last.h5", "checkpoint_best.h5"):
        a = load_checkpoint(tmp_path / "straight" / name)
        b = load_checkpoint(tmp_path / "cut" / name)
        np.testing.assert_array_equal(a.params, b.params)
        np.testing.assert_array_equal(a.adam["m"], b.adam["m"])
        np.testing.assert_array_equal(a.adam["v"], b.adam["v"])

    def rows(run):
        return [{k: v for k, v in r.items()
                 if k not in ("seconds", "train_seconds", "images_per_s")}
                for r in read_metrics_csv(run / "metrics.csv")]

    assert rows(tmp_path / "straight") == rows(tmp_path / "cut")
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "(32x32; 16x16 patches, 50% placed on a nodule)" in log


def test_patch_of_the_slice_size_trains_as_whole_slices(tiny_data, tmp_path):
    """--patch 32 on 32x32 slices and --patch auto (the same on the CPU) train bit for bit
    alike: whole slices, as before patches (which `test_patch_as_large_as_the_slice_is_
    whole_slice_training` checks batch by batch)."""
    _, cache = tiny_data
    runs = {}
    for name, patch in (("explicit", 32), ("auto", None)):
        runs[name] = tiny_train(cache, tmp_path / name, epochs=1, patch=patch, test=False)
        assert runs[name].config.patch == [32, 32]
    a = load_checkpoint(tmp_path / "explicit" / "checkpoint_last.h5").params
    b = load_checkpoint(tmp_path / "auto" / "checkpoint_last.h5").params
    np.testing.assert_array_equal(a, b)
    n_nodule = int(np.count_nonzero(open_cache(cache).split("train").meta["has_nodule"]))
    assert runs["auto"].history[0]["step"] == n_nodule // TINY_MODEL["batch_size"]
