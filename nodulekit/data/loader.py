"""Batches of HU slices, masks and augmentation parameters from the HDF5 cache.

What a batch is (`Batch`): ``hu`` int16 [B, H, W], ``mask`` uint8 [B, H, W] in {0, 1}, both
C-contiguous; ``aug`` float32 [B, 3] with columns (flip_h, flip_v, angle_deg): flips in
{0., 1.} with p = 0.5 each, the angle uniform in [-max_angle, max_angle] (docs/design.md: 20
degrees); all zeros when augmentation is off. ``index`` int64 [B]: the cache rows, to find
each slice's metadata. ``hu, mask, aug = batch`` unpacks the three arrays.

What an epoch is (the paper's sampling): with ``sampling="nodules"`` the split's slices that
contain a nodule, plus, when ``empty_fraction`` > 0, that fraction of its empty slices drawn
afresh each epoch (the paper's fine-tuning uses 2%); with ``sampling="all"`` every slice in
cache order (evaluation). Everything random (which empty slices, the order, the
augmentation parameters of each sample) is drawn up front in the main thread from one RNG
seeded by (seed, epoch), so an epoch's batches depend on nothing else: not on
`num_workers`, not on `queue_size`, not on timing.

Workers are threads that read whole HDF5 chunks (one per slice) into the batch arrays; up
to `queue_size` batches are read ahead of the consumer, like ECVL's `num_workers` and
`queue_ratio_size` (ECVL's queue holds queue_ratio_size x num_workers batches). Threads are
enough: a batch costs a few memory copies, and the consumer (a training step) releases the
GIL while it computes.

For data parallelism, ``rank``/``world_size`` with ``shard`` say which part of the epoch
this rank reads (all three disjoint, together the whole epoch):

- ``"batches"``: every world_size-th batch, truncated so every rank gets the same number;
- ``"within"``: samples [rank*b, (rank+1)*b) of every batch, b = batch_size / world_size,
  so the ranks together compute exactly one process's batches (data-parallel training);
- ``"blocks"``: a contiguous block of whole batches, none dropped (evaluation, whose
  results concatenated in rank order come back in cache order).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nodulekit.data.cache import READ_ERRORS, Cache, CacheError, CacheSplit, damaged
from nodulekit.data.checksum import CHECKSUM_BYTES, chunk_ok

AUG_COLUMNS = ("flip_h", "flip_v", "angle_deg")
MAX_ANGLE_DEG = 20.0
SAMPLINGS = ("nodules", "all")
SHARDS = ("batches", "within", "blocks")


def split_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's contiguous part [lo, hi) of n items; the first n % size ranks get one more."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class LoaderError(ValueError):
    """A loader that cannot be built as asked; the message says why."""


class NoNoduleSlices(LoaderError):
    """sampling="nodules" on a split without a slice with a nodule."""


@dataclass(frozen=True)
class Batch:
    hu: np.ndarray  # int16 [B, H, W]
    mask: np.ndarray  # uint8 [B, H, W], {0, 1}
    aug: np.ndarray  # float32 [B, 3]: flip_h, flip_v, angle_deg
    index: np.ndarray  # int64 [B]: rows of the split in the cache

    def __iter__(self):
        """``hu, mask, aug = batch``."""
        return iter((self.hu, self.mask, self.aug))

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class EpochPlan:
    """Which rows go in which batch, and each sample's augmentation, for one epoch."""

    rows: list[np.ndarray]  # int64 per batch
    aug: list[np.ndarray]  # float32 [b, 3] per batch


@dataclass(frozen=True)
class SampleOptions:
    """What an epoch holds, in which order, with which augmentation (see the module doc).

    sampling: "nodules" (slices with a nodule, plus `empty_fraction` of the empty ones per
        epoch) or "all" (every slice).
    shuffle, augment, drop_last: training defaults; `eval_loader` turns them off.
    seed: with the epoch, seeds everything random; max_angle_deg: the rotation range.
    """

    sampling: str = "nodules"
    empty_fraction: float = 0.0
    shuffle: bool = True
    augment: bool = True
    drop_last: bool = True
    seed: int = 0
    max_angle_deg: float = MAX_ANGLE_DEG


@dataclass(frozen=True)
class ReadOptions:
    """How the batches are read.

    num_workers: reading threads (0: read in the consumer's thread when it asks).
    queue_size: batches read ahead of the consumer (default 2 x num_workers).
    in_memory: read the whole split into RAM once (small caches, tests).
    """

    num_workers: int = 0
    queue_size: int | None = None
    in_memory: bool = False


def _check_options(batch_size: int, sample: SampleOptions, read: ReadOptions) -> None:
    if batch_size < 1:
        raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
    if sample.sampling not in SAMPLINGS:
        raise LoaderError(f"sampling must be one of {SAMPLINGS}, got {sample.sampling!r}")
    if not 0.0 <= sample.empty_fraction <= 1.0:
        raise LoaderError(f"empty_fraction must be in [0, 1], got {sample.empty_fraction}")
    if sample.sampling == "all" and sample.empty_fraction:
        raise LoaderError("empty_fraction applies to sampling='nodules'; 'all' already "
                          "takes every empty slice")
    if read.num_workers < 0:
        raise LoaderError(f"num_workers must be >= 0, got {read.num_workers}")


class Loader:
    """Batches from one split of a cache; see the module docstring.

    cache: a cache path or an open `Cache` (then the caller closes it).
    sample: what each epoch holds (`SampleOptions`; default: the training loader's).
    read: how it is read (`ReadOptions`).
    rank, world_size, shard: this rank's part of each epoch (`set_shard`).
    """

    def __init__(self, cache: str | os.PathLike | Cache, split: str = "train", *,
                 batch_size: int = 12, sample: SampleOptions | None = None,
                 read: ReadOptions | None = None, rank: int = 0, world_size: int = 1,
                 shard: str = "batches"):
        sample = SampleOptions() if sample is None else sample
        read = ReadOptions() if read is None else read
        _check_options(batch_size, sample, read)
        self.sample_options, self.read_options = sample, read
        self._own_cache = not isinstance(cache, Cache)
        self.cache = Cache(cache) if self._own_cache else cache
        try:
            self.split: CacheSplit = self.cache.split(split)
        except BaseException:
            self.close()
            raise
        self.batch_size = int(batch_size)
        self.sampling = sample.sampling
        self.empty_fraction = float(sample.empty_fraction)
        self.shuffle, self.augment = bool(sample.shuffle), bool(sample.augment)
        self.drop_last = sample.drop_last
        self.seed = int(sample.seed)
        self.num_workers = int(read.num_workers)
        self.queue_size = max(1, 2 * self.num_workers if read.queue_size is None
                              else int(read.queue_size))
        try:
            self.set_shard(rank, world_size, shard)
        except LoaderError:
            self.close()
            raise
        self.max_angle_deg = float(sample.max_angle_deg)
        self._epoch = 0
        self._executor: ThreadPoolExecutor | None = None

        has_nodule = self.split.meta["has_nodule"].astype(bool)
        self._has_nodule = has_nodule
        if self.sampling == "nodules":
            self._base_rows = np.flatnonzero(has_nodule).astype(np.int64)
            self._empty_rows = np.flatnonzero(~has_nodule).astype(np.int64)
            self._n_empty = int(round(self.empty_fraction * len(self._empty_rows)))
            if len(self._base_rows) == 0:
                path = self.cache.path
                self.close()
                raise NoNoduleSlices(f"{path}: split {split!r} has no slice with a nodule, "
                                     "so sampling='nodules' has nothing to draw (use "
                                     "sampling='all')")
        else:
            self._base_rows = np.arange(len(self.split), dtype=np.int64)
            self._empty_rows = np.empty(0, dtype=np.int64)
            self._n_empty = 0
        self._reader = _RowReader(self.split, has_nodule, read.in_memory)

    # ------------------------------------------------------------------------- planning

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch over all ranks, before batching."""
        return len(self._base_rows) + self._n_empty

    def set_shard(self, rank: int, world_size: int, shard: str = "batches") -> None:
        """Read only this rank's part of each epoch (see the module doc)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f"need 0 <= rank < world_size, got rank {rank}, world_size "
                              f"{world_size}")
        if shard not in SHARDS:
            raise LoaderError(f"shard must be one of {SHARDS}, got {shard!r}")
        if shard == "within" and (self.batch_size % world_size or not self.drop_last):
            raise LoaderError(f"shard='within' splits every batch of {self.batch_size} over "
                              f"{world_size} ranks: needs drop_last and a batch size that "
                              "is a multiple of the rank count")
        self.rank, self.world_size, self.shard = int(rank), int(world_size), shard

    def _batches_all_ranks(self) -> int:
        n = self.samples_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        batches = self._batches_all_ranks()
        if self.shard == "within":
            return batches
        if self.shard == "blocks":
            lo, hi = split_range(batches, self.rank, self.world_size)
            return hi - lo
        return batches // self.world_size

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's batches (rows and augmentation) for this rank; cheap, no I/O."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        rows = self._base_rows
        if self._n_empty:
            extra = rng.choice(self._empty_rows, size=self._n_empty, replace=False)
            rows = np.concatenate([rows, np.sort(extra)])
        if self.shuffle:
            rows = rows[rng.permutation(len(rows))]
        aug = np.zeros((len(rows), 3), dtype=np.float32)
        if self.augment:
            aug[:, 0:2] = rng.random((len(rows), 2)) < 0.5
            aug[:, 2] = rng.uniform(-self.max_angle_deg, self.max_angle_deg, len(rows))
        b = self.batch_size
        starts = [k * b for k in range(self._batches_all_ranks())]
        if self.shard == "within":
            per = b // self.world_size
            lo, hi = self.rank * per, (self.rank + 1) * per
            return EpochPlan(rows=[rows[s + lo:s + hi] for s in starts],
                             aug=[aug[s + lo:s + hi] for s in starts])
        if self.shard == "blocks":
            mine = starts[slice(*split_range(len(starts), self.rank, self.world_size))]
        else:
            mine = starts[self.rank::self.world_size][:len(self)]
        return EpochPlan(rows=[rows[s:s + b] for s in mine], aug=[aug[s:s + b] for s in mine])

    # ------------------------------------------------------------------------- iterating

    def set_epoch(self, epoch: int) -> None:
        """The epoch that the next `iter(loader)` gives."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        """This epoch's batches; the next `iter` gives the next epoch."""
        epoch = self._epoch
        self._epoch += 1
        return self.epoch(epoch)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch` for this rank, in order."""
        plan = self.plan(epoch)
        if self.num_workers == 0:
            for rows, aug in zip(plan.rows, plan.aug, strict=True):
                yield self._make(rows, aug)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers,
                                                thread_name_prefix="nodulekit-loader")
        pending: deque = deque()
        jobs = iter(zip(plan.rows, plan.aug, strict=True))
        try:
            for rows, aug in jobs:
                pending.append(self._executor.submit(self._make, rows, aug))
                if len(pending) >= self.queue_size:
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(jobs, None)
                if nxt is not None:
                    pending.append(self._executor.submit(self._make, *nxt))
                yield batch
        finally:
            for future in pending:  # the consumer stopped early: drop what was read ahead
                future.cancel()

    def _make(self, rows: np.ndarray, aug: np.ndarray) -> Batch:
        hu, mask = self._reader.read(rows)
        return Batch(hu=hu, mask=mask, aug=np.ascontiguousarray(aug, dtype=np.float32),
                     index=np.ascontiguousarray(rows, dtype=np.int64))

    # ------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if getattr(self, "_own_cache", False) and getattr(self, "cache", None) is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fits_in_memory(cache: str | os.PathLike | Cache, split: str,
                   limit_bytes: int = 256 << 20) -> bool:
    """Whether a split is small enough to read into memory once (faster, fewer reads):
    its HU (int16) and masks (uint8) take at most `limit_bytes`."""
    own = not isinstance(cache, Cache)
    c = Cache(cache) if own else cache
    try:
        s = c.split(split)
        h, w = s.image_shape
        return len(s) * h * w * 3 <= limit_bytes
    finally:
        if own:
            c.close()


def train_loader(cache: str | os.PathLike | Cache, *, batch_size: int = 12,
                 empty_fraction: float = 0.0, seed: int = 0, num_workers: int = 2,
                 queue_size: int | None = None, rank: int = 0, world_size: int = 1,
                 in_memory: bool = False) -> Loader:
    """The paper's training loader: nodule slices (+ a fraction of empty ones), shuffled,
    augmented, incomplete last batch dropped."""
    try:
        return Loader(cache, "train", batch_size=batch_size,
                      sample=SampleOptions(sampling="nodules", empty_fraction=empty_fraction,
                                           shuffle=True, augment=True, drop_last=True,
                                           seed=seed),
                      read=ReadOptions(num_workers=num_workers, queue_size=queue_size,
                                       in_memory=in_memory),
                      rank=rank, world_size=world_size)
    except NoNoduleSlices:
        path = cache.path if isinstance(cache, Cache) else cache
        raise LoaderError(
            f"{path}: its train split has no slice with a nodule, so there is nothing to "
            "train on: the masks were not found, or mark nothing. `nodulekit preprocess "
            "DATA OUT.h5` lists the files it could not pair (beside X.dcm, a mask is read "
            "as X.png or X_mask.png, or under a mirrored masks/ folder)") from None


def eval_loader(cache: str | os.PathLike | Cache, split: str = "test", *,
                batch_size: int = 12, sampling: str = "all", num_workers: int = 2,
                queue_size: int | None = None, rank: int = 0, world_size: int = 1,
                in_memory: bool = False) -> Loader:
    """Every slice of a split (or only the nodule slices) in cache order, no augmentation,
    the last partial batch kept."""
    return Loader(cache, split, batch_size=batch_size,
                  sample=SampleOptions(sampling=sampling, shuffle=False, augment=False,
                                       drop_last=False),
                  read=ReadOptions(num_workers=num_workers, queue_size=queue_size,
                                   in_memory=in_memory),
                  rank=rank, world_size=world_size)


class _RowReader:
    """Reads cache rows into fresh batch arrays, as cheaply as the cache's layout allows.

    Every read is checked: through HDF5, its Fletcher-32 filter checks each chunk; raw, a
    chunk is read with its checksum and checked here (`checksum.chunk_ok`, without the GIL,
    so the loader's threads check in parallel). A chunk that fails raises `CacheError`
    naming the file, the dataset and the row.
    """

    def __init__(self, split: CacheSplit, has_nodule: np.ndarray, in_memory: bool):
        self.split = split
        self.path = split.path
        self.has_nodule = has_nodule
        self.h, self.w = split.image_shape
        self.memory: tuple[np.ndarray, np.ndarray] | None = None
        if in_memory:
            self.memory = (split.hu[()], split.mask[()])
        # Whole-chunk reads skip HDF5's selection machinery (about 4x faster); they need
        # one chunk per slice with only the checksum filter, which is what `preprocess`
        # writes, in the byte order of this machine.
        self.raw = sys.byteorder == "little" and all(
            ds.chunks == (1, self.h, self.w) and _checksum_only(ds) and ds.dtype.isnative
            for ds in (split.hu, split.mask))

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = len(rows)
        if self.memory is not None:
            return (np.ascontiguousarray(self.memory[0][rows]),
                    np.ascontiguousarray(self.memory[1][rows]))
        if not self.raw:
            hu = np.empty((b, self.h, self.w), dtype=np.int16)
            mask = np.zeros((b, self.h, self.w), dtype=np.uint8)
            for j, i in enumerate(rows.tolist()):
                self.split.hu.read_direct(hu, np.s_[i], np.s_[j])
                self.split.mask.read_direct(mask, np.s_[i], np.s_[j])
            return hu, mask
        # Chunk j is read into bytes [j * n, (j + 1) * n + 4) of one buffer: its checksum
        # lands on the first bytes of row j + 1 (or the 4 spare bytes at the end), is
        # checked, and is then overwritten by the next chunk or cleared.
        n_hu, n_mask = self.h * self.w * 2, self.h * self.w
        hu_bytes = np.empty(b * n_hu + CHECKSUM_BYTES, dtype=np.uint8)
        mask_bytes = np.zeros(b * n_mask + CHECKSUM_BYTES, dtype=np.uint8)
        for j, i in enumerate(rows.tolist()):
            self._chunk(self.split.hu, i, hu_bytes[j * n_hu:(j + 1) * n_hu + CHECKSUM_BYTES])
            if self.has_nodule[i]:  # an empty slice's mask chunk was never written
                self._chunk(self.split.mask, i,
                            mask_bytes[j * n_mask:(j + 1) * n_mask + CHECKSUM_BYTES])
        hu = hu_bytes[:b * n_hu].view(np.int16).reshape(b, self.h, self.w)
        mask = mask_bytes[:b * n_mask].reshape(b, self.h, self.w)
        return hu, mask

    def _chunk(self, ds, row: int, out: np.ndarray) -> None:
        """Chunk `row` of `ds` as stored (data, then checksum) into `out`, checked; then its
        checksum bytes are cleared."""
        try:
            filter_mask, _ = ds.id.read_direct_chunk((row, 0, 0), out=out)
        except READ_ERRORS as e:
            raise damaged(self.path, f"{ds.name} row {row}", e) from None
        if filter_mask != 0 or not chunk_ok(out):
            raise CacheError(f"{self.path}: {ds.name} row {row}: checksum mismatch: the file "
                             "is damaged; rebuild it with `nodulekit preprocess DATA "
                             f"{self.path} --overwrite`")
        out[-CHECKSUM_BYTES:] = 0


def _checksum_only(ds) -> bool:
    """Whether `ds`'s chunks go through HDF5's Fletcher-32 filter and nothing else."""
    import h5py

    plist = ds.id.get_create_plist()
    return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32
