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
from pathlib import Path

DEMO_SYNTH = {"size": 128, "patients": 40, "slices_per_patient": 24, "seed": 0}
DEMO_NAME = "synth128-v1"


def cache_dir() -> Path:
    """Where nodulekit keeps generated data: NODULEKIT_CACHE, else the XDG cache dir."""
    env = os.environ.get("NODULEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nodulekit"


def demo_paths(root: Path | None = None) -> tuple[Path, Path]:
    """(data-set folder, cache file) of the demo set."""
    root = cache_dir() if root is None else Path(root)
    return root / f"demo-{DEMO_NAME}" / "data", root / f"demo-{DEMO_NAME}.h5"


def ensure_demo_cache(report=print, progress: bool = True) -> Path:
    """The demo cache's path, generating the data set and the cache first if needed."""
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
    cfg = SynthConfig(**DEMO_SYNTH)
    if not (data / "synth.json").is_file():
        report(f"generating the demo data set ({cfg.patients} synthetic patients x "
               f"{cfg.slices_per_patient} slices, {cfg.size}x{cfg.size}) in {data.parent}")
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.parent / f".data.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        synthesize(tmp, cfg, overwrite=True, progress=progress, workers=None)
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    report(f"preprocessing it into {cache}")
    preprocess(data, cache, overwrite=True, progress=progress)
    return cache
