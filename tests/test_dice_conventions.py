"""The three Dice conventions `evaluate` reports side by side, against hand-computed cases
(nodulekit.evaluation.metrics): this project's exact per-slice Dice (empty-empty = 1, MONAI's
ignore_empty=False), the nodule-slice mean (MONAI's default ignore_empty=True), and the
paper's code (smoothing 1 inside the metric, UC4_pipeline's Evaluator.DiceCoefficient)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulekit.engine import get_backend
from nodulekit.evaluation import metrics
from nodulekit.evaluation.evaluate import TABLE_COLUMNS, table_rows, write_table_csv

# (tp, fp, fn) per slice, and each convention's value worked out by hand
CASES = [
    # counts      exact Dice  paper (s=1)        truth has a nodule
    ((3, 1, 2), 6 / 9, 7 / 10, True),
    ((0, 0, 0), 1.0, 1.0, False),  # empty truth, empty prediction
    ((0, 1, 0), 0.0, 0.5, False),  # empty truth, one stray pixel: 0 exact, 1/2 in the paper's
    ((0, 0, 4), 0.0, 1 / 5, True),  # a missed nodule of 4 pixels
    ((7, 0, 0), 1.0, 15 / 15, True),  # perfect
    ((0, 3, 0), 0.0, 1 / 4, False),  # empty truth, 3 stray pixels
]


def _counts():
    return np.array([c for c, *_ in CASES], dtype=np.int64)


def test_each_convention_by_hand():
    counts = _counts()
    exact = [d for _, d, _, _ in CASES]
    paper = [p for _, _, p, _ in CASES]
    nodule = np.array([n for *_, n in CASES])
    dice, _ = metrics.slice_scores(counts)
    np.testing.assert_allclose(dice, exact)
    np.testing.assert_allclose(metrics.slice_dice_s1(counts), paper)
    s = metrics.group_summary(counts)
    assert s["mean_dice"] == pytest.approx(np.mean(exact))
    assert s["mean_dice_nodule"] == pytest.approx((6 / 9 + 0 + 1) / 3)
    assert s["mean_dice_nodule"] == pytest.approx(np.mean(np.array(exact)[nodule]))
    assert s["mean_dice_s1"] == pytest.approx(np.mean(paper))
    # 3 slices with empty truth, 2 of them with a predicted pixel
    assert (s["nonempty_slices"], s["empty_slices"], s["empty_fp_slices"]) == (3, 3, 2)
    assert s["empty_fp_rate"] == pytest.approx(2 / 3)


def test_empty_slices_in_each_convention():
    # empty truth, empty prediction: 1 in the exact and the paper's; no nodule slice: NaN
    s = metrics.group_summary(np.zeros((4, 3), np.int64))
    assert s["mean_dice"] == 1.0 and s["mean_dice_s1"] == 1.0
    assert math.isnan(s["mean_dice_nodule"]) and s["empty_fp_rate"] == 0.0
    # one stray pixel on an empty slice: 0 exact, 0.5 in the paper's convention
    s = metrics.group_summary(np.array([[0, 1, 0]]))
    assert s["mean_dice"] == 0.0 and s["mean_dice_s1"] == 0.5 and s["empty_fp_rate"] == 1.0
    # predicting nothing: every empty slice 1, every nodule slice 0, the nodule mean 0
    nothing = np.array([[0, 0, 0]] * 8 + [[0, 0, 5]] * 2)
    s = metrics.group_summary(nothing)
    assert s["mean_dice"] == pytest.approx(0.8) and s["mean_dice_nodule"] == 0.0
    assert s["mean_dice_s1"] == pytest.approx((8 + 2 / 6) / 10)
    # no slice at all: NaN means
    s = metrics.group_summary(np.zeros((0, 3), np.int64))
    assert s["slices"] == 0 and math.isnan(s["mean_dice"]) and math.isnan(s["mean_dice_s1"])
    assert math.isnan(s["empty_fp_rate"])


def test_paper_convention_equals_uc4_pipeline_on_masks(rng):
    """From masks through the backend's confusion counts, the paper's Dice is UC4_pipeline's
    Evaluator.DiceCoefficient (thresholded at 0.5, smooth 1) slice by slice."""
    be = get_backend("cpu")
    n, h, w = 6, 12, 10
    logits = rng.normal(-1.5, 1.5, (n, h, w, 1)).astype(np.float32)
    target = (rng.random((n, h, w, 1)) < 0.1).astype(np.uint8)
    target[:2] = 0  # two slices without a nodule
    logits[0] = -5.0  # ... one of them with an empty prediction
    counts = be.to_host(be.confusion_counts(logits, target))
    a = (1 / (1 + np.exp(-logits.astype(np.float64))) > 0.5).reshape(n, -1).astype(float)
    b = target.reshape(n, -1).astype(float)
    uc4 = (2 * (a * b).sum(1) + 1) / (a.sum(1) + b.sum(1) + 1)
    np.testing.assert_allclose(metrics.slice_dice_s1(counts), uc4)
    assert uc4[0] == 1.0
    # MONAI's DiceMetric: ignore_empty=False is our exact Dice, ignore_empty=True our nodule mean
    inter, pred_o, truth_o = (a * b).sum(1), a.sum(1), b.sum(1)
    denominator = pred_o + truth_o
    monai_keep = np.where(denominator > 0, 2 * inter / np.where(denominator > 0, denominator, 1),
                          1.0)
    monai_ignore = np.where(truth_o > 0, 2 * inter / np.where(denominator > 0, denominator, 1),
                            np.nan)
    np.testing.assert_allclose(metrics.slice_scores(counts)[0], monai_keep)
    s = metrics.group_summary(counts)
    assert s["mean_dice"] == pytest.approx(monai_keep.mean())
    assert s["mean_dice_nodule"] == pytest.approx(np.nanmean(monai_ignore))


def test_table_and_csv_show_every_convention(tmp_path):
    counts = _counts()
    bins = ["3-10mm", metrics.EMPTY_LABEL, metrics.EMPTY_LABEL, ">30mm", "<3mm",
            metrics.EMPTY_LABEL]
    summary = metrics.summarize(counts, bins)
    table = metrics.format_table(summary)
    assert "Dice s=1" in table.splitlines()[0]
    all_row = table.splitlines()[-1].split()
    assert all_row[0] == "all" and float(all_row[3]) == pytest.approx(
        summary["all"]["mean_dice_s1"], abs=5e-5)
    text = metrics.format_conventions(summary["all"])
    assert "ignore_empty=False" in text and "ignore_empty=True" in text
    assert "2 of 3 (66.7%)" in text and "over the 3 slices with a nodule" in text
    empty = summary["by_diameter"][metrics.EMPTY_LABEL]
    assert empty["mean_dice_s1"] == pytest.approx((1 + 0.5 + 0.25) / 3)
    write_table_csv(tmp_path / "table.csv", summary)
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert lines[0].split(",") == list(TABLE_COLUMNS)
    rows = {r["group"]: r for r in table_rows(summary)}
    assert set(rows) == {"nodule <3mm", "nodule 3-10mm", "nodule 10-30mm", "nodule >30mm",
                         "empty", "with nodule", "all"}
    last = dict(zip(TABLE_COLUMNS, lines[-1].split(","), strict=True))
    assert last["group"] == "all"
    assert float(last["mean_dice_nodule"]) == pytest.approx(summary["all"]["mean_dice_nodule"],
                                                            rel=1e-5)
    assert last["empty_fp_slices"] == "2"


def test_predictions_csv_scores():
    from nodulekit.inference.writers import _scores

    assert _scores(0, 0, 0) == {"dice": 1.0, "iou": 1.0, "dice_s1": 1.0}
    assert _scores(0, 1, 0) == {"dice": 0.0, "iou": 0.0, "dice_s1": 0.5}
    assert _scores(3, 1, 2)["dice_s1"] == pytest.approx(7 / 10)
