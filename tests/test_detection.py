"""Nodule-level results (nodulekit.evaluation.detection, exams; nodules.components_3d): 3-D
components, the detection rule, FROC and CPM against hand-computed cases, and `evaluate`
writing its nodules section, nodules.csv and froc.png."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from cachefile import scan_meta, write_cache

from nodulekit.data.nodules import components, components_3d, label_voxels
from nodulekit.evaluation import detection, exams

SPACING = (2.5, 0.7, 0.7)


def _labelled(mask):
    return label_voxels(np.flatnonzero(mask), mask.shape)


# ----------------------------------------------------------------------------- components


def test_diagonal_neighbours_in_adjacent_slices_are_one_component():
    m = np.zeros((3, 5, 5), dtype=bool)
    m[0, 1, 1] = m[1, 2, 2] = True  # touch at a corner only: 26-connected
    m[2, 4, 4] = True  # two slices down, two pixels over: apart
    p = np.where(m, 0.6, 0.0).astype(np.float32)
    p[1, 2, 2] = 0.9
    first, second = components_3d(m, (2.0, 0.5, 0.5), probability=p)
    assert (first.label, first.voxels, first.slices, second.slices) == (1, 2, (0, 1), (2, 2))
    assert first.centroid == (0.5, 1.5, 1.5)
    assert first.volume_mm3 == pytest.approx(2 * 2.0 * 0.5 * 0.5)
    assert first.diameter_mm == pytest.approx(2 * (3 * 1.0 / (4 * math.pi)) ** (1 / 3))
    # one pixel is its largest section: 0.25 mm2
    assert first.section_diameter_mm == pytest.approx(2 * math.sqrt(0.25 / math.pi))
    assert first.max_probability == pytest.approx(0.9)
    assert first.mean_probability == pytest.approx(0.75)
    assert math.isnan(components_3d(m, SPACING)[0].max_probability)
    assert components_3d(np.zeros((2, 3, 3)), SPACING) == []


def test_largest_section_is_the_nodule_diameter():
    m = np.zeros((3, 8, 8), dtype=bool)
    m[0, 2:4, 2:4] = True  # 4 pixels
    m[1, 1:6, 1:4] = True  # 15 pixels: the largest section
    m[2, 3, 3] = True
    (c,) = components_3d(m, SPACING)
    assert c.voxels == 20 and c.slices == (0, 2)
    assert c.section_diameter_mm == pytest.approx(2 * math.sqrt(15 * 0.49 / math.pi))


def _flood_fill_26(mask):
    seen, out = np.zeros_like(mask, dtype=bool), set()
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, part = [start], set()
        seen[start] = True
        while stack:
            v = stack.pop()
            part.add(int(np.ravel_multi_index(v, mask.shape)))
            for d in np.ndindex(3, 3, 3):
                w = tuple(int(a) + int(b) - 1 for a, b in zip(v, d, strict=True))
                if all(0 <= x < n for x, n in zip(w, mask.shape, strict=True)) and \
                        mask[w] and not seen[w]:
                    seen[w] = True
                    stack.append(w)
        out.add(frozenset(part))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_labels_match_a_26_connected_flood_fill(seed):
    rng = np.random.default_rng(seed)
    m = rng.random((5, 9, 11)) < rng.uniform(0.05, 0.3)
    v = _labelled(m)
    parts = {frozenset(v.flat[v.labels == j].tolist()) for j in range(1, v.count + 1)}
    assert parts == _flood_fill_26(m)
    sizes = [c.voxels for c in components_3d(m, SPACING)]
    assert sizes == [int((v.labels == j).sum()) for j in range(1, v.count + 1)]


def test_2d_components_come_in_reading_order_of_their_first_pixel():
    m = np.zeros((6, 6), dtype=np.uint8)
    m[0, 4] = m[1, 3] = 1  # first in reading order, diagonal
    m[1, 0] = m[2, 0] = 1
    m[5, 5] = 1
    parts = components(m)
    assert [p.tolist() for p in parts] == [[4, 9], [6, 12], [35]]
    assert all(p.dtype == np.int64 for p in parts)


# ----------------------------------------------------------------------------- the rule


def test_overlap_of_iou_tenth_detects_and_a_lone_component_is_a_false_positive():
    truth = np.zeros((4, 10, 10), dtype=bool)
    truth[1:3, 1:4, 1:4] = True  # nodule 1: 18 voxels
    truth[1, 7:9, 7:9] = True  # nodule 2: no candidate
    pred = np.zeros_like(truth)
    pred[2, 2:4, 2:4] = True  # 4 voxels inside nodule 1 ...
    pred[3, 4, 4] = True  # ... and one outside (one candidate): IoU 4 / 19 = 0.21
    pred[0, 8, 1] = True  # candidate 2: nowhere near a nodule
    prob = np.where(pred, 0.7, 0.0)
    prob[3, 4, 4] = 0.8
    t, p = _labelled(truth), _labelled(pred)
    nodules, candidates, m = detection.detect(t, p, SPACING, prob.reshape(-1)[p.flat])
    assert len(nodules) == 2 and len(candidates) == 2
    # candidate labels follow C order: the lone one (slice 0) first
    assert [c.max_probability for c in candidates] == [pytest.approx(0.7), pytest.approx(0.8)]
    np.testing.assert_array_equal(m.candidate_hit, [False, True])
    np.testing.assert_allclose(m.truth_score, [0.8, np.nan])


def test_a_touch_or_a_region_swallowing_nodules_detects_nothing():
    """IoU below 0.1: the candidate is a false positive and the nodules are missed (a model
    marking everything must not score a perfect CPM)."""
    truth = np.zeros((3, 20, 20), dtype=bool)
    truth[1, 2:5, 2:5] = True  # 9 voxels
    truth[1, 12:15, 12:15] = True
    touching = np.zeros_like(truth)
    touching[1, 4, 4] = True  # one voxel of nodule 1 ...
    touching[1, 5:10, 5] = True  # ... in a 6-voxel candidate: IoU 1 / 14
    everything = np.ones_like(truth)  # one component holding both: IoU 9 / 1200
    for pred in (touching, everything):
        t, p = _labelled(truth), _labelled(pred)
        m = detection.match(t, p, [0.9])
        assert np.isnan(m.truth_score).all() and not m.candidate_hit.any()
    curve = detection.froc([0.9], [True], [np.nan, np.nan], scans=1)
    assert detection.cpm(curve) == 0.0


def test_two_candidates_on_one_nodule_are_no_false_positive_and_the_best_counts():
    truth = np.zeros((1, 6, 8), dtype=bool)
    truth[0, 1:5, 1:7] = True  # 24 voxels
    t = _labelled(truth)
    pred = np.zeros_like(truth)
    pred[0, 1:3, 1:3] = True  # IoU 4 / 24
    pred[0, 1:4, 5:7] = True  # IoU 6 / 24, two columns apart: a second candidate
    p = _labelled(pred)
    m = detection.match(t, p, [0.6, 0.9])
    assert m.candidate_hit.tolist() == [True, True] and m.truth_score.tolist() == [0.9]
    # one candidate over two nodules (IoU 4 / 16 each) detects both
    truth = np.zeros((1, 6, 6), dtype=bool)
    truth[0, 1:5, 1] = truth[0, 1:5, 4] = True
    pred = np.zeros_like(truth)
    pred[0, 1:5, 1:5] = True
    m = detection.match(_labelled(truth), _labelled(pred), [0.7])
    assert _labelled(truth).count == 2 and m.truth_score.tolist() == [0.7, 0.7]


# ----------------------------------------------------------------------------- FROC and CPM

# 4 scans, nodules A, B, C, D; candidates by score: hit (a nodule's letter) or a false positive
CANDIDATES = [(0.95, "A"), (0.90, None), (0.85, "B"), (0.80, None), (0.75, None),
              (0.70, "A"), (0.65, None), (0.60, None), (0.55, "C")] + [(0.51, None)] * 30
TRUTH = {"A": 0.95, "B": 0.85, "C": 0.55, "D": math.nan}  # D: never hit


def _hand_curve():
    scores = [s for s, _ in CANDIDATES]
    is_fp = [hit is None for _, hit in CANDIDATES]
    return detection.froc(scores, is_fp, list(TRUTH.values()), scans=4)


def test_froc_points_by_hand():
    curve = _hand_curve()
    np.testing.assert_allclose(curve.thresholds, [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65,
                                                  0.6, 0.55, 0.51])
    assert curve.false_positives.tolist() == [0, 1, 1, 2, 3, 3, 4, 5, 5, 35]
    assert curve.detected.tolist() == [1, 1, 2, 2, 2, 2, 2, 2, 3, 3]  # A's second: not again
    np.testing.assert_allclose(curve.fp_per_scan[[0, 2, 8, 9]], [0, 0.25, 1.25, 8.75])
    assert curve.corners().tolist() == [0, 2, 8, 9]


def test_cpm_by_hand():
    curve = _hand_curve()
    # at 1/8: 0.25 (A at no FP); 1/4 .. 1: 0.5 (B at 1/4); 2, 4: 0.75 (C at 1.25); 8: the
    # last point is at 8.75 FPs per scan, so still 0.75
    expected = [0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75]
    assert [detection.sensitivity_at(curve, r) for r in detection.CPM_RATES] == expected
    assert detection.cpm(curve) == pytest.approx(4 / 7)
    # below the first point with a false positive ... : a curve that starts with one
    late = detection.froc([0.9, 0.8], [True, False], [0.8], scans=1)
    assert detection.sensitivity_at(late, 0.5) == 0.0 and detection.sensitivity_at(late, 1) == 1


def test_tied_scores_enter_together():
    curve = detection.froc([0.7, 0.7, 0.6], [True, False, True], [0.7, math.nan], scans=2)
    assert curve.thresholds.tolist() == [0.7, 0.6]
    assert curve.false_positives.tolist() == [1, 2] and curve.detected.tolist() == [1, 1]
    assert detection.sensitivity_at(curve, 0.25) == 0.0  # the hit needs the FP at 0.5/scan
    assert detection.sensitivity_at(curve, 0.5) == 0.5


def test_no_candidates_and_no_truth():
    nothing = detection.froc([], [], [math.nan, math.nan], scans=3)
    assert len(nothing.thresholds) == 0 and nothing.corners().tolist() == []
    assert detection.cpm(nothing) == 0.0  # nodules, none found
    no_truth = detection.froc([0.9, 0.6], [True, True], [], scans=2)
    assert math.isnan(detection.cpm(no_truth)) and np.isnan(no_truth.sensitivity).all()
    assert no_truth.corners().tolist() == [1]
    assert math.isnan(detection.cpm(detection.froc([], [], [], scans=1)))
    with pytest.raises(ValueError, match="at least one scan"):
        detection.froc([], [], [], scans=0)


def _scan(truth, pred, prob, name="0000"):
    t, p = _labelled(truth), _labelled(pred)
    nodules, candidates, m = detection.detect(t, p, SPACING, prob.reshape(-1)[p.flat])
    return detection.ScanResult(name, "1", (0, truth.shape[0] - 1), SPACING, "test",
                                nodules, candidates, m)


def test_summary_without_truth_writes_null_and_formats(tmp_path):
    from nodulekit.training.runfiles import write_json

    pred = np.zeros((2, 6, 6), dtype=bool)
    pred[0, 0, 0] = True
    section = detection.summarize([_scan(np.zeros_like(pred), pred, pred * 0.8)])
    assert (section["truth_nodules"], section["false_positives"], section["fp_per_scan"]) == \
        (0, 1, 1.0)
    write_json(tmp_path / "s.json", section)
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["cpm"] is None and back["sensitivity"] is None
    assert back["froc"]["sensitivity"] == [None] * 7
    assert "CPM n/a" in detection.format_nodules(back)
    detection.write_froc_png(tmp_path / "froc.png", back)
    detection.write_csv(tmp_path / "nodules.csv", back)
    assert (tmp_path / "froc.png").stat().st_size > 1000
    assert "nan" in (tmp_path / "nodules.csv").read_text().splitlines()[1]


# ----------------------------------------------------------------------------- exams


def test_exam_ranges_and_voxel_spacing():
    assert exams.exam_ranges(["a", "a", "b", "b", "b"], ["1", "2", "2", "2", "3"]) == \
        [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert exams.exam_ranges([], []) == []
    nan = math.nan
    meta = {"slice_position": np.array([10.0, 8.0, nan, 4.0, 2.0, 1.0]),
            "slice_thickness": np.array([3.0] * 6),
            "pixel_spacing": np.array([[0.7, 0.8]] * 5 + [[nan, nan]])}
    spacing, where = exams.voxel_spacing(meta, 0, 6)
    assert spacing == (2.0, 0.7, 0.8) and where == "slice positions; pixel spacing"
    meta["slice_position"][:] = nan
    assert exams.voxel_spacing(meta, 0, 6)[0][0] == 3.0
    meta["slice_thickness"][:] = nan
    meta["pixel_spacing"][:] = nan
    assert exams.voxel_spacing(meta, 0, 6) == (
        (1.0, 1.0, 1.0), "1 mm (no slice position or thickness); 1 mm (no pixel spacing)")


def test_sparse_predictions_are_the_thresholded_logits():
    from nodulekit.engine import get_backend
    from nodulekit.evaluation.evaluate import sparse_predictions

    be = get_backend("cpu")
    logits = np.random.default_rng(0).normal(-1, 1, (3, 4, 5, 1)).astype(np.float32)
    logits[1] = -1.0  # a slice without prediction
    got = sparse_predictions(be, logits)
    assert len(got) == 3 and got[1].pixels.size == 0
    for j, s in enumerate(got):
        np.testing.assert_array_equal(s.pixels, np.flatnonzero(logits[j, ..., 0] > 0))
        assert s.pixels.dtype == np.int32 and s.probability.dtype == np.float64
        np.testing.assert_allclose(
            s.probability, 1 / (1 + np.exp(-logits[j, ..., 0].reshape(-1)[s.pixels])),
            rtol=1e-6)
    # confident pixels keep their order: float32 would make both 1.0
    high = sparse_predictions(be, np.array([20.0, 25.0], np.float32).reshape(1, 1, 2, 1))
    assert high[0].probability[0] < high[0].probability[1] < 1.0


# ----------------------------------------------------------------------------- end to end

SIZE, PER_SCAN = 24, 5


def _nodule_cache(path):
    """3 scans of 5 slices: scan 0 with a <3mm and a 3-10mm nodule, scan 1 with one <3mm
    nodule of two voxels touching diagonally across slices, scan 2 without."""
    mask = np.zeros((3 * PER_SCAN, SIZE, SIZE), np.uint8)
    mask[1:4, 4:7, 4:7] = 1  # 3 x 3 pixels at 0.7 mm: 2.4 mm
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask[2:4][:, (yy - 16) ** 2 + (xx - 16) ** 2 <= 25] = 1  # 81 pixels: 7.1 mm
    mask[PER_SCAN, 10, 10] = mask[PER_SCAN + 1, 11, 11] = 1
    hu = np.full(mask.shape, -800, np.int16)
    return write_cache(path, {"test": {"hu": hu, "mask": mask, **scan_meta(3, PER_SCAN)}})


def _constant_model(path, logit: float):
    """A checkpoint whose every output is `logit` (all weights 0, the head's bias)."""
    from nodulekit.engine import get_backend
    from nodulekit.nn import UNet
    from nodulekit.training.checkpoint import Checkpoint, layout_list, save_checkpoint

    model = UNet(get_backend("cpu"), depth=2, width=4, seed=0)
    params = np.zeros_like(model.params)
    params[model.layout.slots["head.b"].offset] = logit
    save_checkpoint(path, Checkpoint(params=params, layout=layout_list(model.layout),
                                     config={"depth": 2, "width": 4, "seed": 0,
                                             "batch_size": 4}))
    return path


def _evaluate(ckpt, cache, out):
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate, format_summary

    summary, path = evaluate(EvaluateOptions(ckpt, cache, split="test", out=out, device="cpu",
                                             workers=0, progress=False), report=lambda *_: None)
    return summary, json.loads(path.read_text()), format_summary(summary)


def test_evaluate_writes_the_nodule_results(tmp_path):
    """Everything predicted: one candidate per scan covering it, far too large to detect a
    nodule (IoU < 0.1), so three false positives, nothing found, CPM 0. Nothing predicted:
    no candidate, nothing found, CPM 0."""
    from PIL import Image

    cache = _nodule_cache(tmp_path / "cache.h5")
    summary, written, text = _evaluate(_constant_model(tmp_path / "all.h5", 2.0), cache,
                                       tmp_path / "all")
    n = written["nodules"]
    assert (n["scans"], n["truth_nodules"], n["detected"], n["missed"]) == (3, 3, 0, 3)
    assert (n["candidates"], n["false_positives"]) == (3, 3)
    assert n["fp_per_scan"] == pytest.approx(1.0) and n["cpm"] == 0.0
    assert {k: (v["truth_nodules"], v["detected"]) for k, v in n["by_diameter"].items()} == \
        {"<3mm": (2, 0), "3-10mm": (1, 0), "10-30mm": (0, 0), ">30mm": (0, 0)}
    assert n["rule"] == detection.RULE and "all" in written and "slices" in written
    first = n["per_scan"][0]
    assert (first["first_row"], first["last_row"], first["spacing_mm"]) == \
        (0, 4, [2.5, pytest.approx(0.7), pytest.approx(0.7)])
    diameters = sorted(x["diameter_mm"] for x in first["nodules"])
    assert diameters == [pytest.approx(2 * math.sqrt(9 * 0.49 / math.pi), rel=1e-5),
                         pytest.approx(2 * math.sqrt(81 * 0.49 / math.pi), rel=1e-5)]
    assert n["per_scan"][1]["nodules"][0]["voxels"] == 2  # diagonal across slices: one
    score = 1 / (1 + math.exp(-2.0))
    assert n["froc"]["points"] == [{"threshold": pytest.approx(score), "fp_per_scan":
                                    pytest.approx(1.0), "sensitivity": 0.0,
                                    "false_positives": 3, "detected": 0}]
    assert summary["nodules"]["cpm"] == n["cpm"]
    with open(tmp_path / "all" / "nodules.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == ["0000", "0001", "0002"]
    assert [(r["truth_nodules"], r["detected"], r["false_positives"]) for r in rows] == \
        [("2", "0", "1"), ("1", "0", "1"), ("0", "0", "1")]
    assert rows[0]["nodules_3-10mm"] == "1" and rows[2]["sensitivity"] == "nan"
    assert list(rows[0]) == list(detection.CSV_COLUMNS)
    assert Image.open(tmp_path / "all" / "froc.png").size[0] >= 500
    assert "CPM 0.0000" in text and "mean Dice" in text

    _, written, text = _evaluate(_constant_model(tmp_path / "none.h5", -2.0), cache,
                                 tmp_path / "none")
    n = written["nodules"]
    assert (n["detected"], n["candidates"], n["false_positives"], n["cpm"]) == (0, 0, 0, 0.0)
    assert n["froc"]["points"] == [] and n["froc"]["sensitivity"] == [0.0] * 7
    assert (tmp_path / "none" / "froc.png").is_file()


def test_scans_found_when_the_prediction_is_the_truth_and_one_speck_more(tmp_path):
    """The aggregation over a split's exams with predictions that are the truth masks (p 0.8)
    plus one false-positive speck in the empty scan (p 0.6): every nodule found, one false
    positive in three scans, found before it in the FROC: CPM 1."""
    from nodulekit.data.cache import open_cache
    from nodulekit.evaluation.evaluate import SlicePrediction, SplitResult

    path = _nodule_cache(tmp_path / "cache.h5")
    with open_cache(path) as c:
        split = c.split("test")
        masks = np.asarray(split.mask[:])
        n = len(split)
        predictions = []
        for k in range(n):
            pixels = np.flatnonzero(masks[k]).astype(np.int32)
            prob = np.full(pixels.size, 0.8)
            if k == 2 * PER_SCAN + 2:  # the empty scan
                pixels, prob = np.array([50], np.int32), np.array([0.6])
            predictions.append(SlicePrediction(pixels, prob))
        result = SplitResult(np.zeros((n, 3), np.int64), np.zeros(n), np.arange(n), 0.0,
                             predictions)
        scans = exams.scan_results(split, result, (SIZE, SIZE))
    section = detection.summarize(scans)
    assert (section["truth_nodules"], section["detected"], section["false_positives"]) == \
        (3, 3, 1)
    assert section["fp_per_scan"] == pytest.approx(1 / 3) and section["cpm"] == 1.0
    assert [p["detected"] for p in section["froc"]["points"]] == [3, 3]


def test_infer_split_keeps_predictions_only_when_asked(tmp_path):
    """A random model: each slice's sparse prediction is its predicted pixels (tp + fp of the
    counts on the device), the tp among them on the truth."""
    from nodulekit.data.cache import open_cache
    from nodulekit.engine import get_backend
    from nodulekit.evaluation.evaluate import InferSettings, infer_split
    from nodulekit.nn import UNet

    cache = _nodule_cache(tmp_path / "cache.h5")
    model = UNet(get_backend("cpu"), depth=2, width=4, seed=3)
    settings = InferSettings(batch_size=4, workers=0)
    assert infer_split(model, cache, "test", settings).predictions is None
    result = infer_split(model, cache, "test", settings, predictions=True)
    with open_cache(cache) as c:
        truth = c.split("test").mask[()].reshape(len(result.rows), -1)
    assert len(result.predictions) == len(result.rows)
    for (tp, fp, _), row, s in zip(result.counts, result.rows, result.predictions, strict=True):
        assert s.pixels.size == tp + fp and np.all(s.probability > 0.5)
        assert int(truth[row][s.pixels].sum()) == tp
