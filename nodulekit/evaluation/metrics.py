"""Segmentation metrics on the thresholded prediction (p > 0.5, i.e. logit > 0).

Everything here starts from per-slice confusion counts ``(tp, fp, fn)`` (int64 ``[N, 3]``,
what `Backend.confusion_counts` returns), so the metrics are the same on every backend and
cost nothing to recompute:

- per slice (the paper's convention): ``Dice = 2 TP / (2 TP + FP + FN)`` and
  ``IoU = TP / (TP + FP + FN)``; a slice whose truth and prediction are both empty scores 1
  on both (there is nothing to find and nothing was found);
- their means over a set of slices ("mean Dice", "mean IoU": the paper's Dice 0.75 and IoU
  0.73 are these over the whole test split, empty slices included);
- the global Dice and IoU: the same formulas on the TP, FP, FN summed over all slices
  (pixel-level, dominated by the large nodules; 1 when there is nothing anywhere);
- all of the above again per nodule-diameter bin (the paper's Table 3 bins, from the
  cache's ``max_diameter_mm``) and for the empty slices.

Three Dice conventions, side by side in every summary (`group_summary`), because papers and
libraries differ exactly where most CT slices are, on slices without a nodule:

- ``mean_dice``: this project's, the exact per-slice Dice above, a slice with empty truth and
  empty prediction scoring 1 (MONAI's ``DiceMetric(ignore_empty=False)``): predicting nothing
  scores the share of empty slices;
- ``mean_dice_nodule``: the mean over the slices whose truth has a nodule pixel only
  (``TP + FN > 0``; MONAI's default, ``ignore_empty=True``, where an empty truth gives NaN and
  the mean skips it): predicting nothing scores 0, false positives on empty slices are not
  seen (``empty_fp_rate`` shows them);
- ``mean_dice_s1``: the paper's code (DeepHealth UC4_pipeline, ``Evaluator.DiceCoefficient``),
  Dice with smoothing 1 inside the metric, ``(2 TP + 1) / (2 TP + FP + FN + 1)`` per slice
  on the thresholded masks: 1 for empty-empty, 0.5 for one stray pixel on an empty slice,
  and a little above the exact Dice on a nodule slice (most on small nodules). Its IoU,
  ``(TP + 1e-6) / (TP + FP + FN + 1e-6)``, is ``mean_iou`` to within 1e-6 per slice.

And ``empty_fp_rate``: the fraction of the slices with empty truth on which anything was
predicted (``empty_fp_slices`` of ``empty_slices``).
"""

from __future__ import annotations

import math

import numpy as np

from nodulekit.data.nodules import BIN_LABELS, diameter_bin

EMPTY_LABEL = "empty"
TABLE_ROWS = (*BIN_LABELS, EMPTY_LABEL)


def _check_counts(counts) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != 3:
        raise ValueError(f"confusion counts must be [N, 3] (tp, fp, fn), got shape "
                         f"{counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError("confusion counts must be >= 0")
    return counts.astype(np.int64, copy=False)


def slice_scores(counts) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (dice, iou), float64 [N]; 1 where truth and prediction are both empty."""
    counts = _check_counts(counts)
    tp, fp, fn = (counts[:, i].astype(np.float64) for i in range(3))
    union = tp + fp + fn
    empty = union == 0
    dice = np.where(empty, 1.0, 2 * tp / np.where(empty, 1.0, 2 * tp + fp + fn))
    iou = np.where(empty, 1.0, tp / np.where(empty, 1.0, union))
    return dice, iou


def slice_dice_s1(counts) -> np.ndarray:
    """Per-slice Dice with smoothing 1 inside the metric (the paper's code), float64 [N]:
    ``(2 TP + 1) / (2 TP + FP + FN + 1)``; 1 for empty-empty, 0.5 for one stray pixel on an
    empty slice."""
    counts = _check_counts(counts)
    tp, fp, fn = (counts[:, i].astype(np.float64) for i in range(3))
    return (2 * tp + 1) / (2 * tp + fp + fn + 1)


def global_scores(counts) -> tuple[float, float]:
    """(Dice, IoU) of the summed counts; 1.0 when there is no positive pixel anywhere."""
    tp, fp, fn = (int(v) for v in _check_counts(counts).sum(axis=0))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def group_summary(counts) -> dict:
    """Means (the three Dice conventions of the module docstring), global scores, counts and
    the empty-slice false-positive rate of a set of slices (NaN for a mean over no slice)."""
    counts = _check_counts(counts)
    dice, iou = slice_scores(counts)
    tp, fp, fn = (int(v) for v in counts.sum(axis=0))
    g_dice, g_iou = global_scores(counts)
    n = len(counts)
    truth = (counts[:, 0] + counts[:, 2]) > 0  # the truth has a nodule pixel
    empty_fp = ~truth & (counts[:, 1] > 0)
    n_empty = int((~truth).sum())
    return {
        "slices": n,
        "mean_dice": _mean(dice),
        "mean_dice_nodule": _mean(dice[truth]),
        "mean_dice_s1": _mean(slice_dice_s1(counts)),
        "mean_iou": _mean(iou),
        "global_dice": g_dice if n else math.nan,
        "global_iou": g_iou if n else math.nan,
        "tp": tp, "fp": fp, "fn": fn,
        "nonempty_slices": int(truth.sum()),
        "empty_slices": n_empty,
        "empty_fp_slices": int(empty_fp.sum()),
        "empty_fp_rate": int(empty_fp.sum()) / n_empty if n_empty else math.nan,
    }


def slice_bins(max_diameter_mm) -> list[str]:
    """Per slice: its Table 3 bin label, or "empty" for a slice without a nodule."""
    return [diameter_bin(d) or EMPTY_LABEL for d in np.asarray(max_diameter_mm).tolist()]


def summarize(counts, bins) -> dict:
    """Overall, nodule-slice and per-bin summaries of per-slice counts.

    bins: per slice, a label from ``TABLE_ROWS`` (`slice_bins`).
    """
    counts = _check_counts(counts)
    bins = list(bins)
    if len(bins) != len(counts):
        raise ValueError(f"{len(bins)} bin labels for {len(counts)} slices")
    unknown = sorted(set(bins) - set(TABLE_ROWS))
    if unknown:
        raise ValueError(f"unknown bin labels {unknown}; expected {TABLE_ROWS}")
    labels = np.asarray(bins, dtype=object)
    nodule = labels != EMPTY_LABEL
    out = {"all": group_summary(counts), "nodule_slices": group_summary(counts[nodule])}
    out["by_diameter"] = {row: group_summary(counts[labels == row]) for row in TABLE_ROWS}
    return out


def format_table(summary: dict, title: str = "") -> str:
    """The per-diameter table (the paper's Table 3 bins) as text: per row the slices, the
    mean Dice (empty-empty = 1), the mean Dice with smoothing 1 (the paper's code), the mean
    IoU, the global Dice and the summed counts."""
    head = f"{'slices':<14s}{'n':>7s}{'mean Dice':>11s}{'Dice s=1':>10s}{'mean IoU':>10s}" \
           f"{'global Dice':>13s}{'TP':>10s}{'FP':>10s}{'FN':>10s}"
    lines = ([title] if title else []) + [head, "-" * len(head)]

    def row(name, s):
        def f(v):
            return "      -" if isinstance(v, float) and math.isnan(v) else f"{v:7.4f}"
        lines.append(f"{name:<14s}{s['slices']:7d}{f(s['mean_dice']):>11s}"
                     f"{f(s.get('mean_dice_s1', math.nan)):>10s}"
                     f"{f(s['mean_iou']):>10s}{f(s['global_dice']):>13s}"
                     f"{s['tp']:10d}{s['fp']:10d}{s['fn']:10d}")

    for label in TABLE_ROWS:
        row(label if label == EMPTY_LABEL else f"nodule {label}", summary["by_diameter"][label])
    lines.append("-" * len(head))
    row("with nodule", summary["nodule_slices"])
    row("all", summary["all"])
    return "\n".join(lines)


def format_conventions(group: dict) -> str:
    """The Dice conventions of one `group_summary` (all slices), one per line, with the
    empty-slice false-positive rate."""
    def f(v):
        return "     -" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"

    n, nod, empty = group["slices"], group.get("nonempty_slices", 0), group.get("empty_slices", 0)
    fp = group.get("empty_fp_slices", 0)
    rate = f"{100 * fp / empty:.1f}%" if empty else "-"
    return "\n".join([
        f"Dice of the {n} slices in three conventions:",
        f"  {f(group['mean_dice'])}  exact per slice, empty truth + empty prediction = 1 "
        "(nodulekit; MONAI ignore_empty=False)",
        f"  {f(group.get('mean_dice_nodule', math.nan))}  the same, mean over the {nod} slices "
        "with a nodule (MONAI's default, ignore_empty=True)",
        f"  {f(group.get('mean_dice_s1', math.nan))}  (2TP+1)/(2TP+FP+FN+1) per slice (the "
        "paper's code: a stray pixel on an empty slice = 0.5)",
        f"empty slices with a predicted pixel: {fp} of {empty} ({rate})"])
