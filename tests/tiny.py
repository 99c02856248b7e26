"""The tiny training set-up the training tests share: its sizes and helpers (no tests).

Size 32, 6 patients x 12 slices: every split has slices with and without a nodule. The
fixture that builds it, `tiny_data`, is in conftest.py.
"""

from __future__ import annotations

import numpy as np

TINY = {"size": 32, "patients": 6, "slices_per_patient": 12, "seed": 0}
# The tiny model every training test uses: a few thousand parameters, milliseconds a step;
# the paper's recipe (one input channel, no norm, nodule slices only) unless a test asks.
TINY_MODEL = {"width": 4, "depth": 2, "batch_size": 4, "lr": 1e-3, "recipe": "paper"}


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
