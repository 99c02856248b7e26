"""Metrics against hand-computed cases, empty slices included (nodulekit.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulekit.engine import get_backend
from nodulekit.evaluation import metrics


def test_slice_scores_by_hand():
    counts = np.array([
        [3, 1, 2],  # Dice 6/9, IoU 3/6
        [0, 0, 0],  # empty truth, empty prediction: 1 and 1
        [0, 5, 0],  # empty truth, false positives: 0
        [0, 0, 4],  # missed nodule: 0
        [7, 0, 0],  # perfect: 1
    ])
    dice, iou = metrics.slice_scores(counts)
    np.testing.assert_allclose(dice, [6 / 9, 1, 0, 0, 1])
    np.testing.assert_allclose(iou, [3 / 6, 1, 0, 0, 1])
    g_dice, g_iou = metrics.global_scores(counts)
    tp, fp, fn = 10, 6, 6
    assert g_dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert g_iou == pytest.approx(tp / (tp + fp + fn))
    assert metrics.global_scores(np.zeros((3, 3), int)) == (1.0, 1.0)


def test_confusion_counts_feed_the_metrics():
    """From logits and masks through the backend's confusion_counts, like evaluation does."""
    be = get_backend("cpu")
    logits = np.full((3, 4, 4, 1), -3.0, np.float32)
    target = np.zeros((3, 4, 4, 1), np.uint8)
    # slice 0: truth 4 pixels; predicted 3 of them plus 2 outside
    target[0, 0:2, 0:2] = 1
    logits[0, 0, 0:2] = 2.0
    logits[0, 1, 0] = 0.5
    logits[0, 3, 2:4] = 1.0
    # slice 1: empty truth, empty prediction (logit exactly 0 is not > 0.5 probability)
    logits[1, 2, 2] = 0.0
    # slice 2: empty truth, one false positive
    logits[2, 3, 3] = 4.0
    counts = be.confusion_counts(logits, target)
    np.testing.assert_array_equal(counts, [[3, 2, 1], [0, 0, 0], [0, 1, 0]])
    dice, iou = metrics.slice_scores(counts)
    np.testing.assert_allclose(dice, [6 / 9, 1.0, 0.0])
    np.testing.assert_allclose(iou, [3 / 6, 1.0, 0.0])


def test_summary_by_diameter_bins():
    counts = np.array([[3, 1, 2], [0, 0, 0], [0, 2, 0], [10, 0, 10], [1, 0, 0]])
    diam = np.array([5.0, np.nan, np.nan, 40.0, 2.0])
    bins = metrics.slice_bins(diam)
    assert bins == ["3-10mm", "empty", "empty", ">30mm", "<3mm"]
    s = metrics.summarize(counts, bins)
    assert s["all"]["slices"] == 5
    assert s["all"]["mean_dice"] == pytest.approx((6 / 9 + 1 + 0 + 20 / 30 + 1) / 5)
    assert s["all"]["mean_iou"] == pytest.approx((0.5 + 1 + 0 + 0.5 + 1) / 5)
    assert s["all"]["global_dice"] == pytest.approx(2 * 14 / (2 * 14 + 3 + 12))
    assert (s["all"]["tp"], s["all"]["fp"], s["all"]["fn"]) == (14, 3, 12)
    assert s["nodule_slices"]["slices"] == 3
    assert s["nodule_slices"]["mean_dice"] == pytest.approx((6 / 9 + 20 / 30 + 1) / 3)
    by = s["by_diameter"]
    assert by["empty"]["slices"] == 2 and by["empty"]["mean_dice"] == pytest.approx(0.5)
    assert by["3-10mm"]["mean_iou"] == pytest.approx(0.5)
    assert by["<3mm"]["mean_dice"] == 1.0
    assert by["10-30mm"]["slices"] == 0 and math.isnan(by["10-30mm"]["mean_dice"])
    table = metrics.format_table(s)
    assert "nodule 3-10mm" in table and "empty" in table and "all" in table
    assert table.splitlines()[-1].split()[1] == "5"


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        metrics.slice_scores(np.zeros((4, 2), int))
    with pytest.raises(ValueError, match="bin labels"):
        metrics.summarize(np.zeros((2, 3), int), ["empty"])
    with pytest.raises(ValueError, match="unknown bin"):
        metrics.summarize(np.zeros((1, 3), int), ["huge"])
