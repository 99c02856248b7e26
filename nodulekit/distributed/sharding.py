"""How the ranks share the data: each rank's part of every batch.

Training: every global batch is split into equal parts, one per rank
(`shard_global_batches`; the global batch must divide evenly, `check_global_batch`).
Evaluation: each rank takes a contiguous block of whole batches (`shard_batches`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodulekit.distributed.faults import DistributedError

if TYPE_CHECKING:
    from nodulekit.data.loader import Loader


def check_global_batch(batch_size: int, size: int) -> int:
    """The per-rank batch; DistributedError unless the global batch divides evenly."""
    if batch_size % size:
        raise DistributedError(
            f"the global batch of {batch_size} does not divide evenly over {size} ranks; "
            f"use a --batch-size that is a multiple of {size} (e.g. "
            f"{max(size, batch_size // size * size)} or {(batch_size // size + 1) * size})")
    return batch_size // size


def shard_global_batches(loader: Loader, rank: int, size: int) -> Loader:
    """Make `loader` (built for the GLOBAL batch) give this rank its part of every global
    batch: samples [rank*b, (rank+1)*b) with b = batch / size (the loader's "within").

    So every rank takes the same number of steps, an epoch still sees each sample once
    (over all ranks), and the samples and their augmentation are exactly those of one
    process with the global batch.
    """
    if size > 1:
        check_global_batch(loader.batch_size, size)
        loader.set_shard(rank, size, "within")
    return loader


def shard_batches(loader: Loader, rank: int, size: int) -> tuple[Loader, int]:
    """Make an evaluation `loader` give this rank a contiguous block of its batches (no
    batch dropped; block sizes differ by at most one batch; the loader's "blocks").
    Concatenating the ranks' results in rank order gives the cache order back. Returns
    (loader, batches here)."""
    if size > 1:
        loader.set_shard(rank, size, "blocks")
    return loader, len(loader)
