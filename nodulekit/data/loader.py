"""Batches of HU slices, masks and augmentation parameters from the HDF5 cache.

What a batch is (`Batch`): ``hu`` int16 [B, H, W], ``mask`` uint8 [B, H, W] in {0, 1}, both
C-contiguous; ``aug`` float32 [B, 3] with columns (flip_h, flip_v, angle_deg): flips in
{0., 1.} with p = 0.5 each, the angle uniform in [-max_angle, max_angle] (docs/design.md: 20
degrees); all zeros when augmentation is off. ``index`` int64 [B]: the cache rows, to find
each slice's metadata. ``hu, mask, aug = batch`` unpacks the three arrays.

What a sample is (`CropOptions`): by default the whole slice. ``region`` keeps a centred
window of every slice (`--size`); ``patch`` (P_h, P_w) trains on crops of that size inside it
(native-resolution patch training, as nnU-Net): then H, W above are the patch's and
``origin`` int64 [B, 2] holds each crop's top-left (row, column) in the slice. A fraction
``foreground_fraction`` of the samples (default 1/3, nnU-Net's) has its crop placed on a
nodule: a nodule pixel of the slice is drawn at random, then a crop position containing it,
uniformly; the other samples, and those of slices without a nodule pixel in the region, get
a crop uniform over the region. The nodule pixels of every slice are indexed once when the
loader is built (at most `MAX_FOREGROUND_PIXELS` per slice, evenly spaced in raster order),
so planning an epoch reads no mask. Augmentation (`window_augment`: flips, rotation about the
crop's centre) is applied to the crop after cropping, image and mask alike; what the
rotation brings in from outside the crop is air (-1000 HU) and background, as for whole
slices. With ``context_slices`` K > 0, ``hu`` is int16 [B, 2K+1, H, W]: the K slices below,
the slice itself (channel K) and the K above, in the same patient and exam ordered by
slice position (`context_table`), the same window of each; at a scan's first or last slice
the edge slice repeats. ``mask`` stays the centre slice's.

What an epoch is (the paper's sampling): with ``sampling="nodules"`` the split's slices that
contain a nodule, plus, when ``empty_fraction`` > 0, that fraction of its empty slices drawn
afresh each epoch (the paper's fine-tuning uses 2%); with ``sampling="all"`` every slice in
cache order (evaluation). A nodule spans slices in proportion to its diameter, so an epoch of
nodule slices shows a 30 mm nodule about ten times as often as a 3 mm one; with
``nodule_balance`` B > 0 (`CropOptions`) a share B of the epoch's nodule samples (as many as
it has nodule slices) is drawn nodule by nodule instead: a 3-D nodule uniformly (`NoduleIndex`:
each slice's 8-connected components inside the region, joined where they overlap on
consecutive slices of a scan), then one of its slices uniformly, and a crop placed on a
nodule goes on that nodule's section there; the other 1 - B are nodule slices drawn without
repeats. Everything random (which empty slices, the order, the
augmentation parameters of each sample, which samples are placed on a nodule, the crop
positions) is drawn up front in the main thread from one RNG seeded by (seed, epoch), so an
epoch's batches depend on nothing else: not on `num_workers`, not on `queue_size`, not on
timing. The crops' draws come after all the others, so an epoch's rows and augmentation are
the same with or without patches, and a patch as large as the region draws nothing: its
batches are those of whole slices, bit for bit.

Workers are threads that read whole HDF5 chunks (one per slice) into the batch arrays (a
crop: the chunk, then its window; every chunk's checksum is checked either way); up
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
from nodulekit.data.nodules import NoduleLinker, components

AUG_COLUMNS = ("flip_h", "flip_v", "angle_deg")
MAX_ANGLE_DEG = 20.0
FOREGROUND_FRACTION = 1.0 / 3.0  # nnU-Net's oversample_foreground_percent
# Nodule pixels kept per slice to place crops on: a 30 mm nodule at 0.7 mm covers ~1,400
# pixels; 1,024 evenly spaced ones place crops as well and bound the index (18,534 nodule
# slices: at most 76 MB, in practice a few MB).
MAX_FOREGROUND_PIXELS = 1024
SAMPLINGS = ("nodules", "all")
SHARDS = ("batches", "within", "blocks")


def _evenly(found: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of `found`, evenly spaced (all of them when there are fewer)."""
    if len(found) <= most:
        return found
    return found[np.linspace(0, len(found) - 1, most).round().astype(np.int64)]


@dataclass(frozen=True)
class NoduleIndex:
    """The 3-D nodules of a split, for drawing samples nodule by nodule.

    A *section* is one nodule's 8-connected component on one slice. ``row`` int64 [S]:
    each section's cache row; its pixels (flat y * W + x in the slice, at most
    `MAX_FOREGROUND_PIXELS`, evenly spaced) are ``pixels[offsets[s]:offsets[s + 1]]``;
    ``by_nodule`` lists the sections nodule by nodule, nodule j's being
    ``by_nodule[starts[j]:starts[j + 1]]``.
    """

    row: np.ndarray
    offsets: np.ndarray
    pixels: np.ndarray
    by_nodule: np.ndarray
    starts: np.ndarray

    @classmethod
    def build(cls, row: np.ndarray, sections: list[np.ndarray], label: np.ndarray,
              most: int) -> NoduleIndex:
        """From each section's row, pixels and nodule label (any numbering: the nodules are
        renumbered in the order of their first section)."""
        n = len(sections)
        _, first, nodule = np.unique(label, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        nodule, count = rank[nodule.reshape(-1)], len(first)
        kept = [_evenly(p, most).astype(np.int32) for p in sections]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(p) for p in kept], out=offsets[1:])
        flat = np.concatenate(kept) if kept else np.zeros(0, np.int32)
        by_nodule = np.argsort(nodule, kind="stable").astype(np.int64)
        starts = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(np.bincount(nodule, minlength=count), out=starts[1:])
        return cls(row=row, offsets=offsets, pixels=flat, by_nodule=by_nodule, starts=starts)

    @property
    def nodules(self) -> int:
        return len(self.starts) - 1

    def draw(self, n: int, rng) -> np.ndarray:
        """n sections (int64): a nodule uniformly, then one of its sections uniformly."""
        which = rng.integers(0, self.nodules, n)
        size = self.starts[which + 1] - self.starts[which]
        k = np.minimum((rng.random(n) * size).astype(np.int64), size - 1)
        return self.by_nodule[self.starts[which] + k]


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
    hu: np.ndarray  # int16 [B, H, W]; with context slices [B, 2K+1, H, W]
    mask: np.ndarray  # uint8 [B, H, W], {0, 1}
    aug: np.ndarray  # float32 [B, 3]: flip_h, flip_v, angle_deg
    index: np.ndarray  # int64 [B]: rows of the split in the cache
    origin: np.ndarray | None = None  # int64 [B, 2]: each window's top-left (None: whole)

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
    origin: list[np.ndarray] | None = None  # int64 [b, 2] per batch (None: whole slices)
    foreground: list[np.ndarray] | None = None  # bool [b] per batch: crop placed on a nodule
    # int64 [b] per batch, nodule_balance > 0 only: the section drawn (NoduleIndex; -1: none)
    section: list[np.ndarray] | None = None


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


@dataclass(frozen=True)
class CropOptions:
    """What each sample is: which window of its slice, with which channels (module doc).

    region: (H, W) of the centred window of every slice that samples come from (a centre
        crop, `--size`); None: the whole slice.
    patch: (H, W) (or one int: square) of the training crops inside the region; None or the
        region's size: the whole region, no random crop.
    foreground_fraction: of the samples, the fraction whose crop is placed on a nodule.
    nodule_balance: of the epoch's nodule samples, the share drawn nodule by nodule (module
        doc): a 3-D nodule uniformly, then one of its slices, so that every nodule comes as
        often as every other whatever its size; the rest are nodule slices drawn without
        repeats. 0: each nodule slice once (what an epoch was before).
    context_slices: K slices below and above as extra channels (hu [B, 2K+1, H, W]).
    progress: a progress bar while the nodule pixels are indexed (when that takes a while).
    """

    region: tuple[int, int] | None = None
    patch: tuple[int, int] | int | None = None
    foreground_fraction: float = FOREGROUND_FRACTION
    nodule_balance: float = 0.0
    context_slices: int = 0
    progress: bool = False


def _pair(value, what: str) -> tuple[int, int]:
    h, w = (value, value) if np.isscalar(value) else tuple(value)
    if int(h) < 1 or int(w) < 1:
        raise LoaderError(f"{what} must be at least 1x1, got {h}x{w}")
    return int(h), int(w)


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
    crop: each sample's window and channels (`CropOptions`; default: the whole slice).
    """

    def __init__(self, cache: str | os.PathLike | Cache, split: str = "train", *,
                 batch_size: int = 12, sample: SampleOptions | None = None,
                 read: ReadOptions | None = None, rank: int = 0, world_size: int = 1,
                 shard: str = "batches", crop: CropOptions | None = None):
        sample = SampleOptions() if sample is None else sample
        read = ReadOptions() if read is None else read
        crop = CropOptions() if crop is None else crop
        _check_options(batch_size, sample, read)
        if not 0.0 <= crop.foreground_fraction <= 1.0:
            raise LoaderError("foreground_fraction must be in [0, 1], got "
                              f"{crop.foreground_fraction}")
        if not 0.0 <= crop.nodule_balance <= 1.0:
            raise LoaderError(f"nodule_balance must be in [0, 1], got {crop.nodule_balance}")
        if crop.context_slices < 0:
            raise LoaderError(f"context_slices must be >= 0, got {crop.context_slices}")
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
        try:
            self._set_window(crop)
        except BaseException:
            self.close()
            raise

    def _set_window(self, crop: CropOptions) -> None:
        """The region, the patch, the context table and the nodule-pixel index."""
        h, w = self.split.image_shape
        rh, rw = (h, w) if crop.region is None else _pair(crop.region, "region")
        if rh > h or rw > w:
            raise LoaderError(f"{self.cache.path}: region {rh}x{rw} is larger than the "
                              f"{h}x{w} slices")
        ph, pw = (rh, rw) if crop.patch is None else _pair(crop.patch, "patch")
        if ph > rh or pw > rw:
            raise LoaderError(f"patch {ph}x{pw} is larger than the {rh}x{rw} slices it is "
                              "cropped from")
        self.region = ((h - rh) // 2, (w - rw) // 2, rh, rw)  # top, left, height, width
        self.patch = (ph, pw)
        self.foreground_fraction = float(crop.foreground_fraction)
        self.context_slices = int(crop.context_slices)
        self._cropping = (ph, pw) != (rh, rw)  # random crop positions
        self._windowed = (ph, pw) != (h, w) or self.context_slices > 0
        self._neighbours = None
        if self.context_slices:
            m = self.split.meta
            self._neighbours = context_table(self.context_slices, m["patient"], m["exam"],
                                             m["slice_position"], m["slice"],
                                             m["instance_number"])
        self._fg_offsets = self._fg_pixels = None
        self.nodule_balance = (float(crop.nodule_balance) if self.sampling == "nodules"
                               else 0.0)
        self._nodules: NoduleIndex | None = None
        self._section_first = None  # each section's first pixel in _fg_pixels
        if self.nodule_balance or (self._cropping and self.foreground_fraction > 0):
            self._fg_offsets, self._fg_pixels = self._index_foreground(crop.progress)

    def _index_foreground(self, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64 [N + 1], pixels int32): row i's nodule pixels inside the region, as
        linear indices y * W + x, are pixels[offsets[i]:offsets[i + 1]]."""
        from tqdm import tqdm

        rows = np.flatnonzero(self._has_nodule)
        w = self.split.image_shape[1]
        r0, c0, rh, rw = self.region

        def pixels(row: int):
            window = self._reader.mask(int(row))[r0:r0 + rh, c0:c0 + rw]
            found = _evenly(np.flatnonzero(window), MAX_FOREGROUND_PIXELS)
            y, x = np.divmod(found, rw)
            at = ((y + r0) * w + (x + c0)).astype(np.int32)
            if not self.nodule_balance:
                return at, None
            sections = []  # flat in the slice, all their pixels (sorted: the window's are)
            for part in components(window):
                py, px = np.divmod(part, rw)
                sections.append((py + r0) * w + (px + c0))
            return at, sections

        if self.num_workers and len(rows) > 1:
            self._executor = ThreadPoolExecutor(self.num_workers,
                                                thread_name_prefix="nodulekit-loader")
            found = self._executor.map(pixels, rows)
        else:
            found = map(pixels, rows)
        both = list(tqdm(found, total=len(rows), desc="indexing nodule pixels",
                         unit="slice", leave=False, delay=2.0, disable=not progress))
        parts = [at for at, _ in both]
        counts = np.zeros(len(self.split), dtype=np.int64)
        counts[rows] = [len(p) for p in parts]
        offsets = np.zeros(len(self.split) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        if self.nodule_balance:
            index = self._link_nodules(rows, [c for _, c in both])
            if index.nodules:  # else none inside the region: sampling by slice
                self._nodules = index
                # the sections' pixels after the rows', joined once for `_place`
                self._section_first = index.offsets + len(flat)
                flat = np.concatenate([flat, index.pixels])
        return offsets, flat

    def _link_nodules(self, rows: np.ndarray, parts: list[list[np.ndarray]]) -> NoduleIndex:
        """The 3-D nodules of the split's nodule slices: each slice's components (inside
        the region), numbered in row order, joined as preprocessing joins them
        (`NoduleLinker`, fed each scan's slices in order)."""
        m = self.split.meta
        of_row = dict(zip(rows.tolist(), parts, strict=True))
        first = np.zeros(len(self.split) + 1, dtype=np.int64)  # row -> its first section
        first[rows + 1] = [len(p) for p in parts]
        np.cumsum(first, out=first)
        linker, fed = NoduleLinker(), []
        for order in scan_orders(m["patient"], m["exam"], m["slice_position"], m["slice"],
                                 m["instance_number"]):
            for position, row in enumerate(order.tolist()):
                sections = of_row.get(row, [])
                linker.add(row, position, sections)
                fed += range(first[row], first[row] + len(sections))
        label = np.empty(len(fed), dtype=np.int64)
        label[fed] = linker.labels()
        section_row = np.repeat(rows, [len(p) for p in parts])
        return NoduleIndex.build(section_row, [c for p in parts for c in p], label,
                                 MAX_FOREGROUND_PIXELS)

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
        """The epoch's batches (rows, augmentation, crops) for this rank; cheap, no I/O."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        rows = self._base_rows
        section = None  # per sample: the nodule section its crop goes on (-1: any pixel)
        if self._nodules is not None:
            n_nodule = int(round(self.nodule_balance * len(rows)))
            slices = rows[:0] if n_nodule == len(rows) else np.sort(
                rng.choice(rows, size=len(rows) - n_nodule, replace=False))
            drawn = self._nodules.draw(n_nodule, rng)
            rows = np.concatenate([slices, self._nodules.row[drawn]])
            section = np.concatenate([np.full(len(slices), -1, np.int64), drawn])
        if self._n_empty:
            extra = rng.choice(self._empty_rows, size=self._n_empty, replace=False)
            rows = np.concatenate([rows, np.sort(extra)])
            if section is not None:
                section = np.concatenate([section, np.full(len(extra), -1, np.int64)])
        if self.shuffle:
            order = rng.permutation(len(rows))
            rows = rows[order]
            section = None if section is None else section[order]
        aug = np.zeros((len(rows), 3), dtype=np.float32)
        if self.augment:
            aug[:, 0:2] = rng.random((len(rows), 2)) < 0.5
            aug[:, 2] = rng.uniform(-self.max_angle_deg, self.max_angle_deg, len(rows))
        origin, foreground = self._place(rows, rng, section)  # last: the draws above stay
        b = self.batch_size
        starts = [k * b for k in range(self._batches_all_ranks())]
        if self.shard == "within":
            per = b // self.world_size
            spans = [(s + self.rank * per, s + (self.rank + 1) * per) for s in starts]
        else:
            if self.shard == "blocks":
                mine = starts[slice(*split_range(len(starts), self.rank, self.world_size))]
            else:
                mine = starts[self.rank::self.world_size][:len(self)]
            spans = [(s, s + b) for s in mine]

        def cut(a):
            return None if a is None else [a[lo:hi] for lo, hi in spans]

        return EpochPlan(rows=cut(rows), aug=cut(aug), origin=cut(origin),
                         foreground=cut(foreground), section=cut(section))

    def _place(self, rows: np.ndarray, rng, section: np.ndarray | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(origin int64 [n, 2], placed-on-a-nodule bool [n]) of each sample's window; (None,
        None) for whole slices. Draws nothing unless the patch is smaller than the region.
        With `section` (nodule_balance) a crop placed on a nodule goes on that section."""
        n = len(rows)
        r0, c0, rh, rw = self.region
        if not self._windowed:
            return None, None
        if not self._cropping:
            return np.tile(np.array([[r0, c0]], dtype=np.int64), (n, 1)), np.zeros(n, bool)
        ph, pw = self.patch
        wants = rng.random(n) < self.foreground_fraction
        pick = rng.random(n)
        where = rng.random((n, 2))
        lo = np.tile(np.array([[r0, c0]], dtype=np.int64), (n, 1))
        hi = np.tile(np.array([[r0 + rh - ph, c0 + rw - pw]], dtype=np.int64), (n, 1))
        placed = np.zeros(n, dtype=bool)
        if self._fg_offsets is not None:
            first = self._fg_offsets[rows]
            count = self._fg_offsets[rows + 1] - first
            pixels = self._fg_pixels
            if section is not None:  # a drawn section: its own pixels
                on = section >= 0
                first[on] = self._section_first[section[on]]
                count[on] = self._section_first[section[on] + 1] - first[on]
            placed = wants & (count > 0)
            k = first[placed] + np.minimum((pick[placed] * count[placed]).astype(np.int64),
                                           count[placed] - 1)
            y, x = np.divmod(pixels[k].astype(np.int64), self.split.image_shape[1])
            hi[placed] = np.minimum(np.stack([y, x], axis=1), hi[placed])
            lo[placed] = np.maximum(np.stack([y - ph + 1, x - pw + 1], axis=1), lo[placed])
        origin = lo + np.minimum((where * (hi - lo + 1)).astype(np.int64), hi - lo)
        return origin, placed

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
        origins = plan.origin if plan.origin is not None else [None] * len(plan.rows)
        if self.num_workers == 0:
            for rows, aug, origin in zip(plan.rows, plan.aug, origins, strict=True):
                yield self._make(rows, aug, origin)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers,
                                                thread_name_prefix="nodulekit-loader")
        pending: deque = deque()
        jobs = iter(zip(plan.rows, plan.aug, origins, strict=True))
        try:
            for job in jobs:
                pending.append(self._executor.submit(self._make, *job))
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

    def _make(self, rows: np.ndarray, aug: np.ndarray, origin: np.ndarray | None) -> Batch:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if origin is None:
            hu, mask = self._reader.read(rows)
        else:
            channels = None if self._neighbours is None else self._neighbours[rows]
            hu, mask = self._reader.read_windows(rows, origin, self.patch, channels)
        return Batch(hu=hu, mask=mask, aug=np.ascontiguousarray(aug, dtype=np.float32),
                     index=rows, origin=origin)

    def read(self, rows) -> Batch:
        """The samples of the given rows as evaluation sees them: the region of each slice
        (no random crop: the centred window of the patch size), with its context channels,
        no augmentation; read in this thread."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        origin = None
        if self._windowed:
            r0, c0, rh, rw = self.region
            ph, pw = self.patch
            origin = np.tile(np.array([[r0 + (rh - ph) // 2, c0 + (rw - pw) // 2]],
                                      dtype=np.int64), (len(rows), 1))
        return self._make(rows, np.zeros((len(rows), 3), np.float32), origin)

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
                 in_memory: bool = False, crop: CropOptions | None = None) -> Loader:
    """The paper's training loader: nodule slices (+ a fraction of empty ones), shuffled,
    augmented, incomplete last batch dropped; `crop`: patches and context (`CropOptions`)."""
    try:
        return Loader(cache, "train", batch_size=batch_size,
                      sample=SampleOptions(sampling="nodules", empty_fraction=empty_fraction,
                                           shuffle=True, augment=True, drop_last=True,
                                           seed=seed),
                      read=ReadOptions(num_workers=num_workers, queue_size=queue_size,
                                       in_memory=in_memory),
                      rank=rank, world_size=world_size, crop=crop)
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
                in_memory: bool = False, context_slices: int = 0) -> Loader:
    """Every slice of a split (or only the nodule slices) in cache order, whole, no
    augmentation, the last partial batch kept. context_slices K > 0: hu [B, 2K+1, H, W],
    the slice in channel K between its neighbours, as the model was trained."""
    return Loader(cache, split, batch_size=batch_size,
                  sample=SampleOptions(sampling=sampling, shuffle=False, augment=False,
                                       drop_last=False),
                  read=ReadOptions(num_workers=num_workers, queue_size=queue_size,
                                   in_memory=in_memory),
                  rank=rank, world_size=world_size,
                  crop=CropOptions(context_slices=context_slices))


def context_table(k: int, patient, exam, slice_position=None, slice_number=None,
                  instance_number=None) -> np.ndarray:
    """int64 [N, 2k+1]: for each of N slices, the indices of the k slices below it, itself
    (column k) and the k above, among the slices of its scan (same patient and exam).

    A scan's slices are ordered by `slice_position` (mm, ascending: column 0 is the lowest
    z) when every one of them has a distinct finite position, else by `slice_number`, else
    by `instance_number` (each when all are distinct and >= 0), else as given. At a scan's
    first and last slice the edge slice repeats. Any argument but k and the scan keys may be
    None (absent). `predict` can call it with its series: patient, series, z position.
    """
    k = int(k)
    offsets = np.arange(-k, k + 1)
    table = np.empty((len(np.asarray(patient).reshape(-1)), 2 * k + 1), dtype=np.int64)
    for order in scan_orders(patient, exam, slice_position, slice_number, instance_number):
        at = np.clip(np.arange(len(order))[:, None] + offsets, 0, len(order) - 1)
        table[order] = order[at]
    return table


def scan_orders(patient, exam, slice_position=None, slice_number=None,
                instance_number=None) -> list[np.ndarray]:
    """Each scan's (patient and exam's) slice indices from the lowest slice up, ordered as
    `context_table` says."""
    patient = np.asarray(patient).reshape(-1)
    exam = np.asarray(exam).reshape(-1)
    scans: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(patient.tolist(), exam.tolist(), strict=True)):
        scans.setdefault(key, []).append(i)
    keys = [None if v is None else np.asarray(v).reshape(-1)
            for v in (slice_position, slice_number, instance_number)]
    return [_scan_order(np.asarray(members, dtype=np.int64), keys)
            for members in scans.values()]


def _scan_order(rows: np.ndarray, keys: list) -> np.ndarray:
    """`rows` sorted by the first key whose values there are all valid and distinct."""
    for j, key in enumerate(keys):
        if key is None:
            continue
        v = key[rows]
        valid = np.isfinite(v) if j == 0 else v >= 0
        if valid.all() and len(np.unique(v)) == len(v):
            return rows[np.argsort(v, kind="stable")]
    return rows


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

    def mask(self, row: int) -> np.ndarray:
        """One slice's mask [H, W] (zeros for a slice without a nodule)."""
        if self.memory is not None:
            return self.memory[1][row]
        if not self.has_nodule[row]:
            return np.zeros((self.h, self.w), dtype=np.uint8)
        if not self.raw:
            return self.split.mask[row]
        out = np.empty(self.h * self.w + CHECKSUM_BYTES, dtype=np.uint8)
        self._chunk(self.split.mask, row, out)
        return out[:-CHECKSUM_BYTES].reshape(self.h, self.w)

    def read_windows(self, rows: np.ndarray, origin: np.ndarray, shape: tuple[int, int],
                     channels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The `shape` windows at `origin` [b, 2] of the rows: hu [b, H, W] ([b, C, H, W]
        from the rows `channels` [b, C] when given), mask [b, H, W] (the rows' own). Each
        chunk is read whole and checked, then its window copied."""
        b, (ph, pw) = len(rows), shape
        sources = rows[:, None] if channels is None else channels
        hu = np.empty((b, sources.shape[1], ph, pw), dtype=np.int16)
        mask = np.zeros((b, ph, pw), dtype=np.uint8)
        buffers = None
        if self.memory is None and self.raw:
            buffers = (np.empty(self.h * self.w * 2 + CHECKSUM_BYTES, dtype=np.uint8),
                       np.empty(self.h * self.w + CHECKSUM_BYTES, dtype=np.uint8))
        for j, (y0, x0) in enumerate(origin.tolist()):
            window = np.s_[y0:y0 + ph, x0:x0 + pw]
            for c, row in enumerate(sources[j].tolist()):
                hu[j, c] = self._window(0, row, window, buffers)
            if self.has_nodule[rows[j]]:
                mask[j] = self._window(1, int(rows[j]), window, buffers)
        return (hu.reshape(b, ph, pw) if channels is None else hu), mask

    def _window(self, which: int, row: int, window, buffers) -> np.ndarray:
        """`window` of row `row` of hu (which 0) or mask (1)."""
        if self.memory is not None:
            return self.memory[which][row][window]
        ds = (self.split.hu, self.split.mask)[which]
        if buffers is None:
            return ds[(row, *window)]
        out = buffers[which]
        self._chunk(ds, row, out)
        dtype = np.int16 if which == 0 else np.uint8
        return out[:-CHECKSUM_BYTES].view(dtype).reshape(self.h, self.w)[window]

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
