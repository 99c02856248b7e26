"""Shared fixtures of the tests/test_train_*.py files: a tiny synthetic data set and cache.

Imported by those files (pytest finds fixtures imported into a test module); holds no tests.
Size 32, 6 patients x 12 slices: every split has slices with and without a nodule.
"""

from __future__ import annotations

import numpy as np
import pytest

TINY = {"size": 32, "patients": 6, "slices_per_patient": 12, "seed": 2}
# The tiny model every training test uses: a few thousand parameters, milliseconds a step.
TINY_MODEL = {"width": 4, "depth": 2, "batch_size": 4, "lr": 1e-3}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data-set folder, cache path) of the tiny synthetic set (written as DICOM and read
    back with pydicom: where pydicom is missing, as on a GPU machine without the carried
    wheels, the tests that need it skip, saying so)."""
    pytest.importorskip("pydicom", reason="the tiny data set is DICOM: pydicom is not "
                        "installed (carry its wheel: bash bench/gpu_check.sh --fetch-wheels)")
    from nodulekit.data.cache import open_cache
    from nodulekit.data.preprocess import preprocess
    from nodulekit.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "data", SynthConfig(**TINY), workers=0)
    preprocess(root / "data", root / "cache.h5", workers=0, progress=False)
    with open_cache(root / "cache.h5") as c:
        for split in ("train", "val", "test"):
            has = c.split(split).meta["has_nodule"].astype(bool)
            assert has.any() and (~has).any(), (
                f"the tiny set's {split} split should hold slices with and without a nodule; "
                f"synth changed? adjust TINY ({TINY})")
    return root / "data", root / "cache.h5"


def tiny_train(cache, out, **kw):
    """Train the tiny model quietly; keyword arguments override the defaults."""
    from nodulekit.training.loop import train

    opts = dict(TINY_MODEL, epochs=2, device="cpu", workers=0, progress=False)
    opts.update(kw)
    hooks = {k: opts.pop(k) for k in ("echo", "callback", "comm") if k in opts}
    hooks.setdefault("echo", lambda *_: None)
    return train(data=str(cache), out=str(out), **opts, **hooks)


def read_params(path) -> np.ndarray:
    from nodulekit.training.checkpoint import load_checkpoint

    return load_checkpoint(path).params
