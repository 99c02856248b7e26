"""The embedded default data set: `nodulekit train` with no DATA trains on it.

A small synthetic chest CT set (`nodulekit.data.synth`) is generated once into the user's
cache directory and preprocessed to an HDF5 cache beside it; later runs reuse both:

    $NODULEKIT_CACHE  or  $XDG_CACHE_HOME/nodulekit  or  ~/.cache/nodulekit
        demo-<name>/data/        the DICOM + PNG data set (UniToChest layout)
        demo-<name>.h5           its cache

Both are written under temporary names and renamed into place, so an interrupted first
run leaves nothing half-made under the final names.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from nodulekit.host import cache_dir

# Real CT geometry (512 x 512 at 0.6-0.85 mm, synth v2's anatomy), small enough to generate
# in ~15 s on 2 cores. Seed 9: its three splits hold about the same mix of empty slices,
# slices with a nodule of 10 mm or more and slices with only smaller ones (train 67/20/13%,
# val 71/17/12%, test 64/23/12%).
DEMO_SYNTH = {"size": 512, "patients": 40, "slices_per_patient": 32, "seed": 9}
DEMO_NAME = "synth512-40x32-s9-v2"


def demo_paths(root: Path | None = None) -> tuple[Path, Path]:
    """(data-set folder, cache file) of the demo set."""
    root = cache_dir() if root is None else Path(root)
    return root / f"demo-{DEMO_NAME}" / "data", root / f"demo-{DEMO_NAME}.h5"


def ensure_demo_cache(report=print, progress: bool = True, workers: int | None = None) -> Path:
    """The demo cache's path, generating the data set and the cache first if needed (in
    `workers` processes: None, one per CPU; the data set is the same for any number)."""
    from nodulekit.data.cache import CacheError, open_cache
    from nodulekit.data.preprocess import preprocess
    from nodulekit.data.synth import SynthConfig, synthesize

    data, cache = demo_paths()
    if cache.is_file():
        try:
            open_cache(cache).close()
            return cache
        except CacheError as e:
            report(f"demo cache unusable ({e}); rebuilding it")
            cache.unlink()
    t0 = time.perf_counter()
    cfg = SynthConfig(**DEMO_SYNTH)
    if not (data / "synth.json").is_file():
        report(f"generating the demo data set ({cfg.patients} synthetic patients x "
               f"{cfg.slices_per_patient} slices, {cfg.size}x{cfg.size}) in {data.parent}")
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.parent / f".data.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        synthesize(tmp, cfg, overwrite=True, progress=progress, workers=workers)
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    report(f"preprocessing it into {cache}")
    result = preprocess(data, cache, overwrite=True, progress=progress)
    report(f"demo data set ready: {result.total_slices} slices in "
           f"{time.perf_counter() - t0:.1f} s")
    return cache
