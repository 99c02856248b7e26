"""The demo's model, trained on synthetic CT only, on a real CT slice: it must not take
ordinary chest tissue for nodules, and it must still find the synthetic ones (else the first
test would pass for a model that predicts nothing).

tests/data/demo_model.h5 is the best checkpoint of `nodulekit train` (the demo: synth v2 at
512 x 512, width 8, batch norm, the nodulekit recipe with the Dice per nodule, epoch 16 of
20; README, "The default run"), kept without Adam's moments or history (1.9 MB), so it
predicts without the peak filter (the filter's threshold lives in the history). Remake it
after a change to the generator, the recipe or the network: run `nodulekit train --out RUN`,
then load RUN/checkpoint_best.h5 and save it with ``adam=None, history=[]`` (and the
machine's paths in its config blanked) over this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

MODEL = Path(__file__).with_name("data") / "demo_model.h5"
# The earlier 128 x 128 demo model marked 5,777 of this slice's 16,384 pixels (the whole
# soft tissue); "a few hundred" is the bar the issue set.
MAX_MARKED_PIXELS = 300


def test_a_real_ct_slice_is_not_taken_for_nodules(tmp_path):
    from PIL import Image
    from pydicom.data import get_testdata_file

    from nodulekit.inference.predict import PredictOptions, predict

    ct = get_testdata_file("CT_small.dcm")  # real CT, 128 x 128 at 0.66 mm, no nodule
    result = predict(MODEL, [ct], tmp_path / "pred",
                     PredictOptions(device="cpu", progress=False), report=lambda *_: None)
    assert result.written == 1 and not result.failed
    masks = list((tmp_path / "pred" / "masks").glob("*.png"))
    marked = int((np.asarray(Image.open(masks[0])) > 0).sum())
    assert marked <= MAX_MARKED_PIXELS, f"{marked} pixels marked as nodule on a real slice"


def test_the_same_model_finds_synthetic_nodules():
    """Slices of a synthetic patient the model never saw (seed 123): its nodule pixels found
    (0.97 of them when the model was kept; it also marks other pixels there, ~100 a slice
    unfiltered, ~250 with the 10-epoch default before it, ~80 with the recipe before the
    Dice per nodule, ~550 with the per-sample Dice recipe before that, which is not what
    this test guards)."""
    from nodulekit.data.synth import SynthConfig, render_slice
    from nodulekit.engine import get_backend
    from nodulekit.inference.tiling import run_hu
    from nodulekit.training.checkpoint import load_checkpoint, model_from_checkpoint

    be = get_backend("cpu")
    model = model_from_checkpoint(load_checkpoint(MODEL), be)
    cfg = SynthConfig(size=512, patients=1, slices_per_patient=32, seed=123)
    tp = fn = 0
    for k in range(cfg.slices_per_patient):
        hu, mask = render_slice(cfg, 0, k)[:2]
        logits, _, _ = run_hu(model, hu[None], mask[None])
        pred = be.to_host(logits)[0, :, :, 0] > 0
        truth = mask > 0
        tp += int((pred & truth).sum())
        fn += int((~pred & truth).sum())
    assert tp + fn > 0, "seed 123's patient has no nodule: choose another"
    assert tp / (tp + fn) > 0.5, f"found {tp} of {tp + fn} nodule pixels"
