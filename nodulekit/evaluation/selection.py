"""Which epoch a training run keeps as checkpoint_best: the validation scores and the rule.

The rule: the highest **validation nodule-slice mean Dice** (``val_nodule_dice``): the
per-slice Dice (p > 0.5) averaged over the validation slices whose truth has a nodule pixel,
MONAI DiceMetric's default (``ignore_empty=True``). A model that predicts nothing scores 0 on
it, so "no nodule anywhere" is never kept over an epoch that found nodules. (The all-slice
mean Dice or IoU, empty-empty slices scoring 1, rewards it: a run of issue 18 kept a model
that predicted nothing, validation mean IoU 0.81, global Dice 0.) Equal scores (two epochs
that both find nothing score 0 alike) go to the lower **empty-slice false-positive rate**
(``val_empty_fp``: the fraction of the validation slices with empty truth on which anything
was predicted), then to the earlier epoch. Before the false-positive rate comes the
**validation nodule-slice soft Dice** (``val_nodule_soft_dice``: the loss's per-slice Dice
of the sigmoid, smoothing 1, over the same slices): where no epoch finds a validation
nodule pixel above 0.5 (a small validation split of small nodules), it still tells an
epoch that moved probability onto them from one that predicts nothing, which the
false-positive rate alone would keep (an epoch-1 model that found nothing on the test split
either, where the last epoch's found its 10-30 mm nodule at Dice 0.75).

The false-positive rate decides ties only, not the score: the paper's first stage trains on
nodule slices alone and marks something on most empty slices (README, "Normalisation
layers"), so a score that multiplied the two would rate every epoch of that stage near 0
and keep an arbitrary one. It is in metrics.csv, progress.png and the epoch line beside the
score, to be read with it.

A validation split without a slice with a nodule scores every epoch 0 (the false-positive
rate then decides); a run without a validation split keeps its last epoch.

Resuming: the best epoch's history row (stored in every checkpoint) holds its score. A run
from before this rule (its rows have no ``val_nodule_dice``) kept its best on validation
mean IoU; the loop re-scores that checkpoint_best on validation when it resumes
(`nodulekit.training.loop`), and says so.
"""

from __future__ import annotations

import math

import numpy as np

from nodulekit.evaluation import metrics

METRIC = "val_nodule_dice"
TIE_BREAK = "val_empty_fp"
SOFT_TIE_BREAK = "val_nodule_soft_dice"  # before TIE_BREAK; rows before it: 0
LEGACY_METRIC = "val_mean_iou"  # what runs before this rule selected on
VALIDATION_COLUMNS = ("val_loss", "val_dice", "val_iou", "val_global_dice", METRIC,
                      SOFT_TIE_BREAK, TIE_BREAK)

Key = tuple  # (score, soft score, -false-positive rate): higher is better


def describe() -> dict:
    """config.json's "selection": what checkpoint_best is chosen on."""
    return {
        "metric": METRIC,
        "definition": "validation nodule-slice mean Dice: per-slice Dice (p > 0.5) averaged "
                      "over the validation slices whose truth has a nodule pixel (MONAI "
                      "DiceMetric default, ignore_empty=True); predicting nothing scores 0",
        "higher_is_better": True,
        "tie_break": f"higher {SOFT_TIE_BREAK} (the sigmoid's per-slice Dice, smoothing 1, "
                     f"over the same slices), then lower {TIE_BREAK} (fraction of empty-truth "
                     "validation slices with any predicted pixel), then the earlier epoch",
        "no_validation": "the last epoch",
        "replaces": f"{LEGACY_METRIC} (before 2026-12: empty slices scored 1, so a model "
                    "predicting nothing could be kept)",
    }


def validation_columns(counts, loss: float, soft_dice=None) -> dict:
    """A metrics row's validation columns from the per-slice (tp, fp, fn) of the validation
    split, its mean loss and its per-slice soft Dice (float [N]; None: NaN)."""
    s = metrics.group_summary(counts)
    soft = math.nan
    if soft_dice is not None:
        counts = np.asarray(counts)
        nodule = (counts[:, 0] + counts[:, 2]) > 0  # truth has a pixel: tp + fn > 0
        if nodule.any():
            soft = float(np.mean(np.asarray(soft_dice, dtype=np.float64)[nodule]))
    return {"val_loss": loss, "val_dice": s["mean_dice"], "val_iou": s["mean_iou"],
            "val_global_dice": s["global_dice"], METRIC: s["mean_dice_nodule"],
            SOFT_TIE_BREAK: soft, TIE_BREAK: s["empty_fp_rate"]}


def no_validation_columns() -> dict:
    return dict.fromkeys(VALIDATION_COLUMNS, math.nan)


def key(row: dict, validated: bool = True) -> Key | None:
    """The row's selection key (compare with >), or None for a row from before this rule.
    validated: False for a run without a validation split (the later epoch wins)."""
    if not validated:
        return (float(row["epoch"]), 0.0, 0.0)
    if METRIC not in row or TIE_BREAK not in row:
        return None
    score, soft, fp = (float(row.get(k, math.nan)) for k in (METRIC, SOFT_TIE_BREAK, TIE_BREAK))
    return (score if math.isfinite(score) else 0.0, soft if math.isfinite(soft) else 0.0,
            -fp if math.isfinite(fp) else 0.0)


def improves(candidate: Key, best: Key | None) -> bool:
    """Whether `candidate` replaces the best so far (None: there is none yet)."""
    return best is None or tuple(candidate) > tuple(best)


def best_row(history: list[dict], best_epoch: int) -> dict | None:
    """The history row of epoch `best_epoch` (None if there is none)."""
    for row in history:
        if int(row.get("epoch", -1)) == int(best_epoch):
            return row
    return None


def select(rows: list[dict], validated: bool = True) -> int:
    """The epoch this rule keeps among `rows` (0 for none): what the training loop does
    epoch by epoch, in one call (for tests and for reading a metrics.csv)."""
    best, epoch = None, 0
    for row in rows:
        k = key(row, validated)
        if k is not None and improves(k, best):
            best, epoch = k, int(row["epoch"])
    return epoch
