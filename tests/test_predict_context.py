"""`predict` with a model trained on context slices (`--context-slices K`): each slice gets
its K neighbours below and above from its series, as in training, whatever order the files
come in; the same slices evaluated from the cache give the same counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import tiny_train

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def context_run(tiny_data, tmp_path_factory):
    _, cache = tiny_data
    run = tmp_path_factory.mktemp("ctx") / "run"
    tiny_train(cache, run, epochs=1, context_slices=1, test=False)
    return run


def _captured(monkeypatch):
    """Every batch's hu as `Network.run` passes it on, by slice path."""
    from nodulekit.inference import predict as predict_module

    seen: dict[str, np.ndarray] = {}
    original = predict_module.Network.run

    def run(self, batch):
        for s in batch:
            seen[str(s.item.path)] = (s.hu if s.context is None else s.context).copy()
        return original(self, batch)

    monkeypatch.setattr(predict_module.Network, "run", run)
    return seen


def _by_position(folder):
    """{patient: [(z, path, hu)]} of the DICOMs under folder, sorted by z (read here with
    pydicom alone, not with the code under test)."""
    scans: dict[str, list] = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        scans.setdefault(ds.PatientID, []).append(
            (float(ds.ImagePositionPatient[2]), str(path), hu.astype(np.int16)))
    return {p: sorted(v) for p, v in scans.items()}


def test_each_slice_gets_its_neighbours_in_z_order(context_run, tiny_data, tmp_path,
                                                   monkeypatch):
    from nodulekit.inference.predict import PredictOptions, predict

    data, _ = tiny_data
    seen = _captured(monkeypatch)
    files = sorted((data / "test" / "images").rglob("*.dcm"))
    reordered = files[::-1]  # the order of the inputs must not matter
    predict(context_run / "checkpoint_best.h5", reordered, tmp_path / "pred",
            PredictOptions(device="cpu", progress=False, truth="none"), report=lambda *_: None)
    checked = 0
    for scan in _by_position(data / "test" / "images").values():
        for i, (_, path, _) in enumerate(scan):
            below, above = scan[max(i - 1, 0)][2], scan[min(i + 1, len(scan) - 1)][2]
            np.testing.assert_array_equal(seen[path], np.stack([below, scan[i][2], above]))
            checked += 1
    assert checked == len(files) > 2


def test_predict_agrees_with_evaluate(context_run, tiny_data, tmp_path):
    """The test split's slices through predict (with truth) and through evaluate (from the
    cache, context from the loader): the same TP/FP/FN per slice."""
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate
    from nodulekit.inference.predict import PredictOptions, predict

    data, cache = tiny_data
    result = predict(context_run / "checkpoint_best.h5", [data / "test"], tmp_path / "pred",
                     PredictOptions(device="cpu", progress=False), report=lambda *_: None)
    evaluate(EvaluateOptions(str(context_run), str(cache), split="test", device="cpu",
                             out=str(tmp_path / "ev"), progress=False), report=lambda *_: None)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert len(summary["slices"]) == len(result.rows) > 2
    predicted = sorted((int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in result.rows)
    evaluated = sorted((s["tp"], s["fp"], s["fn"]) for s in summary["slices"])
    assert predicted == evaluated
    assert sum(tp + fp for tp, fp, _ in predicted) > 0, "the model marks nothing: no test"


def test_a_lone_slice_repeats_itself_and_says_so(context_run, tiny_data, tmp_path,
                                                 monkeypatch):
    from nodulekit.inference.predict import PredictOptions, predict

    data, _ = tiny_data
    seen = _captured(monkeypatch)
    one = sorted((data / "test" / "images").rglob("*.dcm"))[3]
    said = []
    predict(context_run / "checkpoint_best.h5", [one], tmp_path / "pred",
            PredictOptions(device="cpu", progress=False, truth="none"), report=said.append)
    stack = seen[str(one)]
    assert stack.shape[0] == 3 and (stack == stack[1]).all()
    assert any("no neighbour in their series" in line for line in said)
