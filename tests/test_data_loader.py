"""The loader: the paper's sampling, seeded epochs, workers that change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.data.cache import Cache
from nodulekit.data.loader import (
    Batch,
    Loader,
    LoaderError,
    SampleOptions,
    eval_loader,
    train_loader,
)
from nodulekit.data.preprocess import preprocess
from nodulekit.data.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    data = synthesize(base / "data", SynthConfig(size=64, patients=5, slices_per_patient=24,
                                                 seed=5))
    out = base / "cache.h5"
    preprocess(data.root, out, workers=0, progress=False)
    return out


def _epoch(loader: Loader, epoch: int) -> list[Batch]:
    return list(loader.epoch(epoch))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.hu, y.hu) and np.array_equal(x.mask, y.mask)
        and np.array_equal(x.aug, y.aug) and np.array_equal(x.index, y.index)
        for x, y in zip(a, b, strict=True))


def test_same_batches_with_0_1_and_3_workers(cache_path):
    runs = []
    for workers, queue in ((0, None), (1, 1), (3, 5)):
        with train_loader(cache_path, batch_size=5, empty_fraction=0.1, seed=3,
                          num_workers=workers, queue_size=queue) as loader:
            runs.append([_epoch(loader, e) for e in range(3)])
    assert len(runs[0][0]) > 1
    for other in runs[1:]:
        for e in range(3):
            assert _same(runs[0][e], other[e])


def test_batches_have_the_promised_types(cache_path):
    with train_loader(cache_path, batch_size=4, num_workers=2) as loader:
        batch = next(iter(loader))
    hu, mask, aug = batch  # unpacks as the three arrays
    assert hu.dtype == np.int16 and hu.shape == (4, 64, 64) and hu.flags.c_contiguous
    assert mask.dtype == np.uint8 and mask.shape == (4, 64, 64) and mask.flags.c_contiguous
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert aug.dtype == np.float32 and aug.shape == (4, 3)
    assert batch.index.dtype == np.int64 and len(batch) == 4


def test_training_epochs_sample_nodule_slices_with_seeded_shuffles(cache_path):
    with Cache(cache_path) as cache:
        nodule_rows = set(cache.split("train").nodule_rows().tolist())
    with train_loader(cache_path, batch_size=3, seed=1) as loader:
        e0, e0_again, e1 = _epoch(loader, 0), _epoch(loader, 0), _epoch(loader, 1)
        rows0 = np.concatenate([b.index for b in e0])
        rows1 = np.concatenate([b.index for b in e1])
        assert set(rows0.tolist()) <= nodule_rows
        assert len(rows0) == len(nodule_rows) // 3 * 3  # drop_last
        assert len(set(rows0.tolist())) == len(rows0)
        assert _same(e0, e0_again)  # reproducible from (seed, epoch)
        assert not np.array_equal(rows0, rows1)  # a new order each epoch
        # iter() walks the epochs in turn; set_epoch goes back.
        assert _same(list(loader), e0) and _same(list(loader), e1)
        loader.set_epoch(0)
        assert _same(list(loader), e0)
    with train_loader(cache_path, batch_size=3, seed=2) as other:
        assert not _same(_epoch(other, 0), e0)


def test_augmentation_parameters(cache_path):
    with train_loader(cache_path, batch_size=4, seed=0) as loader:
        aug = np.concatenate([b.aug for e in range(4) for b in loader.epoch(e)])
    flips = aug[:, :2]
    assert set(np.unique(flips).tolist()) == {0.0, 1.0}
    assert 0.25 < flips.mean() < 0.75
    assert np.all(np.abs(aug[:, 2]) <= 20.0) and aug[:, 2].std() > 5.0
    with eval_loader(cache_path, "train", batch_size=4) as loader:
        assert all(not b.aug.any() for b in loader)


def test_empty_fraction_adds_fresh_empty_slices_each_epoch(cache_path):
    with Cache(cache_path) as cache:
        split = cache.split("train")
        n_nodule, empty = len(split.nodule_rows()), set(split.empty_rows().tolist())
    with Loader(cache_path, "train", batch_size=1,
                sample=SampleOptions(empty_fraction=0.25, seed=4, drop_last=False)) as loader:
        expected = round(0.25 * len(empty))
        assert expected > 0 and loader.samples_per_epoch == n_nodule + expected
        picks = []
        for e in range(2):
            rows = np.concatenate([b.index for b in loader.epoch(e)])
            chosen = [r for r in rows.tolist() if r in empty]
            assert len(chosen) == expected
            picks.append(set(chosen))
        assert picks[0] != picks[1]


def test_eval_loader_covers_the_split_in_order(cache_path):
    with Cache(cache_path) as cache:
        n = len(cache.split("val"))
    with eval_loader(cache_path, "val", batch_size=7, num_workers=2) as loader:
        batches = list(loader)
    rows = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(rows, np.arange(n))
    assert len(batches[-1]) == n - 7 * (len(batches) - 1)  # the partial batch is kept


def test_ranks_get_disjoint_equal_shares(cache_path):
    world = 3
    shares = []
    for rank in range(world):
        with train_loader(cache_path, batch_size=2, seed=9, rank=rank,
                          world_size=world) as loader:
            shares.append([b.index for b in loader.epoch(0)])
    with train_loader(cache_path, batch_size=2, seed=9) as single:
        whole = [b.index for b in single.epoch(0)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(whole) // world
    flat = [tuple(b.tolist()) for s in shares for b in s]
    assert len(set(flat)) == len(flat)
    assert set(flat) <= {tuple(b.tolist()) for b in whole}


def test_within_and_blocks_shards_rebuild_the_single_process_epoch(cache_path):
    """'within': rank r's batch k is samples [r*b, (r+1)*b) of the single process's batch k
    (rows and augmentation); 'blocks': the ranks' batches, concatenated, are the single
    process's, none dropped."""
    world = 2
    with train_loader(cache_path, batch_size=4, seed=5) as single:
        whole = single.epoch(0)
        whole = [(b.index.copy(), b.aug.copy()) for b in whole]
    for rank in range(world):
        with Loader(cache_path, batch_size=4, sample=SampleOptions(seed=5), rank=rank,
                    world_size=world, shard="within") as loader:
            mine = [(b.index, b.aug) for b in loader.epoch(0)]
        assert len(mine) == len(whole)
        for (rows, aug), (all_rows, all_aug) in zip(mine, whole, strict=True):
            np.testing.assert_array_equal(rows, all_rows[2 * rank:2 * rank + 2])
            np.testing.assert_array_equal(aug, all_aug[2 * rank:2 * rank + 2])
    with eval_loader(cache_path, "val", batch_size=3) as single:
        want = [b.index for b in single.epoch(0)]
    got = []
    for rank in range(world):
        with eval_loader(cache_path, "val", batch_size=3) as loader:
            loader.set_shard(rank, world, "blocks")
            got += [b.index for b in loader.epoch(0)]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))


def test_in_memory_reads_the_same(cache_path):
    with train_loader(cache_path, batch_size=4, seed=1) as a, \
            train_loader(cache_path, batch_size=4, seed=1, in_memory=True) as b:
        assert _same(_epoch(a, 0), _epoch(b, 0))


def test_stopping_early_and_closing(cache_path):
    loader = train_loader(cache_path, batch_size=2, num_workers=2, queue_size=4)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert len(list(loader)) == len(loader)
    loader.close()


def test_bad_loader_arguments(cache_path):
    with pytest.raises(LoaderError, match="batch_size"):
        Loader(cache_path, batch_size=0)
    with pytest.raises(LoaderError, match="rank"):
        Loader(cache_path, rank=2, world_size=2)
    with pytest.raises(LoaderError, match="shard must be one of"):
        Loader(cache_path, world_size=2, shard="rows")
    with pytest.raises(LoaderError, match="multiple of the rank count"):
        Loader(cache_path, batch_size=5, world_size=2, shard="within")
    with pytest.raises(LoaderError, match="sampling"):
        Loader(cache_path, sample=SampleOptions(sampling="some"))
    with pytest.raises(Exception, match="no split 'dev'"):
        Loader(cache_path, "dev")
