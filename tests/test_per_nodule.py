"""Sampling nodule by nodule (`CropOptions(nodule_balance=B)`): the split's sections joined
into 3-D nodules across consecutive slices, every nodule drawn as often as every other
whatever its size, crops placed on the section drawn, and the epoch as long as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cachefile import scan_meta, write_cache

from nodulekit.data.loader import CropOptions, train_loader

SIZE, PATCH, PER_SCAN = 64, 24, 12


def _disc(mask, k, cy, cx, r):
    y, x = np.ogrid[:SIZE, :SIZE]
    mask[k][(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 1


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three scans of 12 slices at 64x64. Scan 0: a large nodule over slices 2-9 and, on
    slice 5 beside it, a one-slice nodule; scan 1: a nodule over slices 3-4; scan 2: one
    over slices 0-3 and another over slices 8-9 (the same place: two nodules, since slices
    4-7 between them are empty). Five nodules, 17 sections."""
    n = 3 * PER_SCAN
    hu = np.full((n, SIZE, SIZE), -900, np.int16)
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    for k in range(2, 10):
        _disc(mask, k, 20, 20, 9)
    _disc(mask, 5, 50, 50, 2)
    for k in (3, 4):
        _disc(mask, PER_SCAN + k, 40, 30, 3)
    for k in (0, 1, 2, 3, 8, 9):
        _disc(mask, 2 * PER_SCAN + k, 30, 40, 4)
    hu[mask == 1] = 50
    path = tmp_path_factory.mktemp("per_nodule") / "cache.h5"
    write_cache(path, {"train": dict(hu=hu, mask=mask, **scan_meta(3, PER_SCAN))})
    return path, mask


def _loader(path, balance=1.0, fraction=0.5):
    return train_loader(path, batch_size=4, empty_fraction=0.25, seed=3, num_workers=0,
                        crop=CropOptions(patch=PATCH, foreground_fraction=fraction,
                                         nodule_balance=balance))


def _nodule_of_section(index) -> np.ndarray:
    which = np.empty(len(index.row), np.int64)
    for j in range(index.nodules):
        which[index.by_nodule[index.starts[j]:index.starts[j + 1]]] = j
    return which


def test_sections_are_joined_into_nodules_across_consecutive_slices(scans):
    path, mask = scans
    with _loader(path) as loader:
        index = loader._nodules
        assert index.nodules == 5 and len(index.row) == 17
        which = _nodule_of_section(index)
        sizes = sorted(int(np.sum(which == j)) for j in range(5))
        assert sizes == [1, 2, 2, 4, 8]
        for s, row in enumerate(index.row):  # each section's pixels lie on its slice's mask
            pixels = index.pixels[index.offsets[s]:index.offsets[s + 1]]
            assert len(pixels) and mask[row].ravel()[pixels].all()
        # the two sections of slice 5 belong to different nodules
        on_5 = np.flatnonzero(index.row == 5)
        assert len(on_5) == 2 and which[on_5[0]] != which[on_5[1]]


def test_every_nodule_is_drawn_equally_often_and_the_epoch_keeps_its_length(scans):
    """Over 200 epochs each of the 5 nodules gets a binomial 1/5 of the nodule samples
    (within 4 standard deviations), its sections alike; with B = 0 the 8-slice
    nodule gets 8 of the 17 nodule slices' samples."""
    path, _ = scans
    with _loader(path) as loader, _loader(path, balance=0.0) as by_slice:
        assert loader.samples_per_epoch == by_slice.samples_per_epoch
        assert len(loader) == len(by_slice)
        which = _nodule_of_section(loader._nodules)
        drawn, rows = [], []
        for epoch in range(200):
            plan = loader.plan(epoch)
            drawn.append(np.concatenate(plan.section))
            rows.append(np.concatenate(plan.rows))
        drawn, rows = np.concatenate(drawn), np.concatenate(rows)
        on_nodule = drawn >= 0
        assert (loader._nodules.row[drawn[on_nodule]] == rows[on_nodule]).all()
        assert not loader._has_nodule[rows[~on_nodule]].any()  # the empty slices' samples
        n = int(on_nodule.sum())
        counts = np.bincount(which[drawn[on_nodule]], minlength=5)
        sd = math.sqrt(n * 0.2 * 0.8)
        assert np.all(np.abs(counts - n / 5) <= 4 * sd), counts
        big = int(np.argmax(np.bincount(which)))
        big_rows = set(loader._nodules.row[which == big].tolist())
        base = [np.concatenate(by_slice.plan(e).rows) for e in range(200)]
        share = np.mean([np.isin(r, list(big_rows)).sum() for r in base])
        assert share == pytest.approx(8 / 17 * (len(by_slice._base_rows)), rel=0.01)


def test_crops_placed_on_a_nodule_hold_the_section_drawn(scans):
    """A placed crop contains a pixel of its section (the one-slice nodule beside the large
    one included); the crops read back hold nodule pixels."""
    path, mask = scans
    with _loader(path, fraction=1.0) as loader:
        index = loader._nodules
        small = int(np.flatnonzero((index.row == 5) & (np.diff(index.offsets) < 20))[0])
        hits_small = 0
        for epoch in range(30):
            plan = loader.plan(epoch)
            for origin, placed, section in zip(plan.origin, plan.foreground, plan.section,
                                               strict=True):
                for (y0, x0), p, s in zip(origin, placed, section, strict=True):
                    assert p == (s >= 0)
                    if s < 0:
                        continue
                    y, x = np.divmod(index.pixels[index.offsets[s]:index.offsets[s + 1]],
                                     SIZE)
                    inside = (y >= y0) & (y < y0 + PATCH) & (x >= x0) & (x < x0 + PATCH)
                    assert inside.any()
                    hits_small += s == small
            for batch, placed in zip(loader.epoch(epoch), plan.foreground, strict=True):
                # rotation can turn a nodule at the crop's corner out of it: most, not all
                held = batch.mask.reshape(len(batch), -1).any(axis=1)
                assert held[placed].mean() >= 0.5
        assert hits_small > 0


def test_a_nodule_outside_the_region_is_never_drawn(tmp_path):
    """With a centre region that leaves out a nodule's slices, those slices are not drawn;
    with no nodule inside the region at all, sampling falls back to the nodule slices."""
    n = PER_SCAN
    hu = np.full((n, SIZE, SIZE), -900, np.int16)
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    _disc(mask, 2, 4, 4, 2)  # in the corner: outside a centred 40x40 region
    _disc(mask, 6, 32, 32, 3)
    path = write_cache(tmp_path / "c.h5", {"train": dict(hu=hu, mask=mask,
                                                         **scan_meta(1, n))})
    crop = CropOptions(region=(40, 40), patch=PATCH, foreground_fraction=1.0, nodule_balance=1.0)
    with train_loader(path, batch_size=2, seed=0, crop=crop) as loader:
        assert loader._nodules.nodules == 1
        rows = np.concatenate([np.concatenate(loader.plan(e).rows) for e in range(20)])
        assert set(rows.tolist()) == {6}
    mask[6] = 0
    _disc(mask, 6, 2, 60, 1)
    path = write_cache(tmp_path / "d.h5", {"train": dict(hu=hu, mask=mask,
                                                         **scan_meta(1, n))})
    with train_loader(path, batch_size=2, seed=0, crop=crop) as loader:
        assert loader._nodules is None
        rows = np.concatenate([np.concatenate(loader.plan(e).rows) for e in range(5)])
        assert set(rows.tolist()) == {2, 6}


def test_a_share_of_one_half_draws_half_the_nodule_samples_by_nodule(scans):
    """Balance 0.5: half the epoch's nodule samples (rounded) drawn nodule by nodule, the
    other half distinct nodule slices; the empty samples as many as before."""
    path, _ = scans
    loader = train_loader(path, batch_size=1, empty_fraction=0.25, seed=5,
                          crop=CropOptions(patch=PATCH, nodule_balance=0.5))
    with loader:
        n_nodule_slices = len(loader._base_rows)
        for epoch in range(5):
            plan = loader.plan(epoch)
            rows, section = np.concatenate(plan.rows), np.concatenate(plan.section)
            by_slice = rows[(section < 0) & loader._has_nodule[rows]]
            assert (section >= 0).sum() == round(n_nodule_slices / 2)
            assert len(by_slice) == n_nodule_slices - round(n_nodule_slices / 2)
            assert len(set(by_slice.tolist())) == len(by_slice)
            assert (~loader._has_nodule[rows]).sum() == loader._n_empty
    with pytest.raises(ValueError, match="nodule_balance must be in"):
        train_loader(path, crop=CropOptions(patch=PATCH, nodule_balance=1.5))


def test_resume_with_nodule_balance_is_bit_exact(tiny_data, tmp_path):
    """Two epochs straight = one, then resumed: the same weights and metrics bit for bit;
    the balance is in the configuration, the log says it, and it cannot change on resume."""
    from tiny import read_params, tiny_train

    from nodulekit.training.loop import train
    from nodulekit.training.runfiles import read_metrics_csv

    _, cache = tiny_data
    opts = dict(patch=16, nodule_balance=1.0, test=False)
    straight = tiny_train(cache, tmp_path / "straight", epochs=2, **opts)
    assert straight.config.nodule_balance == 1.0
    tiny_train(cache, tmp_path / "cut", epochs=1, **opts)
    first_epoch = read_params(tmp_path / "cut" / "checkpoint_last.h5")
    with pytest.raises(ValueError, match="nodule_balance is 1.0, cannot change it"):
        train(resume=str(tmp_path / "cut"), epochs=2, nodule_balance=0.0, device="cpu",
              progress=False, echo=lambda *_: None)
    train(resume=str(tmp_path / "cut"), epochs=2, device="cpu", workers=2, progress=False,
          test=False, echo=lambda *_: None)
    np.testing.assert_array_equal(read_params(tmp_path / "straight" / "checkpoint_last.h5"),
                                  read_params(tmp_path / "cut" / "checkpoint_last.h5"))
    drop = ("seconds", "train_seconds", "images_per_s")
    assert ([{k: v for k, v in r.items() if k not in drop}
             for r in read_metrics_csv(tmp_path / "straight" / "metrics.csv")]
            == [{k: v for k, v in r.items() if k not in drop}
                for r in read_metrics_csv(tmp_path / "cut" / "metrics.csv")])
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "100% of the nodule samples drawn nodule by nodule" in log
    other = tiny_train(cache, tmp_path / "by_slice", epochs=1, patch=16, test=False)
    assert other.config.nodule_balance == 0.0  # and its first epoch saw other samples
    assert not np.array_equal(read_params(tmp_path / "by_slice" / "checkpoint_last.h5"),
                              first_epoch)
