"""Which epoch a training run keeps as checkpoint_best: the validation scores and the rule.

The rule: the **latest validated epoch that finds a validation nodule**, that is whose
**validation nodule-slice Dice of found nodules** (``val_nodule_found_dice``) is above 0:
the per-slice Dice (p > 0.5) averaged over the validation slices whose truth has a nodule
pixel (MONAI DiceMetric's default, ``ignore_empty=True``), where a slice counts only if its
prediction overlaps the truth with an IoU of at least 0.1 (the evaluation's
`detection.MATCH_IOU`, nnDetection's: a touch is not a find) and scores 0 otherwise. With
the learning rate decaying to 0 that is the last epoch, unless it finds nothing (nnU-Net
likewise predicts with its final checkpoint).

Why not the epoch with the highest score (the rule until 2026-12-05): on the demo's 4
validation patients the score's standard error (0.04-0.06) is as large as most
differences between epochs, so the highest of ten scores is mostly the luckiest. Scored on
32 held-out patients, five runs of the demo (four seeds, and a fifth with other kernel
roundings) found 61 of 255 small nodules with the highest-scoring epoch and 79 with the
last, nodule-slice Dice 0.413 against 0.454, CPM 0.268 against 0.312 (more false
positives: 3.2 per scan against 4.0); the highest score won in one run of five. In the
fifth it kept epoch 10, which marked every empty validation slice (README, "Which model is
kept").

The score is 0 for two kinds of model, and the rule never keeps either while an epoch
that finds nodules exists:

- A model that predicts nothing scores 0, so "no nodule anywhere" is never kept over an
  epoch that found nodules. (The all-slice mean Dice or IoU, empty-empty slices scoring 1,
  rewards it: a run of issue 18 kept a model that predicted nothing, validation mean IoU
  0.81, global Dice 0.)
- A model that marks much of every slice touches a few nodule pixels by chance, and the
  plain nodule-slice mean (``val_nodule_dice``, still a column) rewards that touch over an
  epoch that found none: on a second synthetic set (README, "Recipes") it kept an epoch
  with validation nodule-slice Dice 0.006 that marked every empty test slice (64.7 false
  positives per scan) over later epochs that marked 28%. Its touches have IoU far below 0.1.

Where no epoch finds a validation nodule (a small validation split of small nodules) the
higher **validation nodule-slice soft Dice** decides (``val_nodule_soft_dice``: the loss's
per-slice Dice of the sigmoid, smoothing 1, over the same slices): it still tells an epoch
that moved probability onto them from one that predicts nothing. Then the lower
**empty-slice false-positive rate** (``val_empty_fp``: the fraction of the validation
slices with empty truth on which anything was predicted), then the earlier epoch.

The false-positive rate decides only among epochs that find nothing, never the score: the
paper's first stage trains on nodule slices alone and marks something on most empty slices
(README, "Normalisation layers"), so a score that multiplied the two would rate every epoch
of that stage near 0 and keep an arbitrary one. It is in metrics.csv, progress.png and the
epoch line beside the score, to be read with it.

A validation split without a slice with a nodule scores every epoch 0 (the false-positive
rate then decides); a run without a validation split keeps its last epoch.

Resuming: the best epoch's history row (stored in every checkpoint) holds its score. A run
from before this rule (its rows have no ``val_nodule_found_dice``: an earlier nodulekit kept
its best on validation mean IoU, a later one on the plain nodule-slice Dice) has its
checkpoint_best re-scored on validation when it resumes (`nodulekit.training.loop`), and the
loop says so.
"""

from __future__ import annotations

import math

import numpy as np

from nodulekit.evaluation import metrics
from nodulekit.evaluation.detection import MATCH_IOU

METRIC = "val_nodule_found_dice"
NODULE_DICE = "val_nodule_dice"  # MONAI's nodule-slice mean, touches included: shown, not kept on
TIE_BREAK = "val_empty_fp"
SCORE_SE = "val_nodule_found_dice_se"  # the score's standard error: shown, not selected on
SOFT_TIE_BREAK = "val_nodule_soft_dice"  # before TIE_BREAK; rows before it: 0
LEGACY_METRIC = "val_mean_iou"  # what runs before this rule selected on
VALIDATION_COLUMNS = ("val_loss", "val_dice", "val_iou", "val_global_dice", NODULE_DICE,
                      METRIC, SCORE_SE, SOFT_TIE_BREAK, TIE_BREAK)

# higher is better: (1, epoch, score, soft score, -false-positive rate) for an epoch that
# finds a validation nodule, (0, soft score, -false-positive rate, 0, 0) for one that does not
Key = tuple


def describe() -> dict:
    """config.json's "selection": what checkpoint_best is chosen on."""
    return {
        "metric": METRIC,
        "rule": f"the latest validated epoch whose {METRIC} is above 0 (finds a validation "
                "nodule): the last epoch unless it finds nothing; if no epoch finds one, "
                "the tie-break",
        "definition": "validation nodule-slice Dice of found nodules: per-slice Dice "
                      "(p > 0.5) averaged over the validation slices whose truth has a "
                      "nodule pixel (MONAI DiceMetric default, ignore_empty=True), a slice "
                      f"scoring 0 unless prediction and truth overlap with IoU >= {MATCH_IOU}; "
                      "predicting nothing scores 0, and so does touching a nodule by "
                      "marking much of the slice",
        "tie_break": f"among epochs that find nothing: higher {SOFT_TIE_BREAK} (the "
                     "sigmoid's per-slice Dice, smoothing 1, over the same slices), then "
                     f"lower {TIE_BREAK} (fraction of empty-truth validation slices with "
                     "any predicted pixel), then the earlier epoch",
        "no_validation": "the last epoch",
        "replaces": f"the highest {METRIC} (2026-12-05: the highest of noisy scores, "
                    "worse on held-out patients than the last epoch), before it "
                    f"{NODULE_DICE} (2026-12-01 to 2026-12-05: an epoch that marked every "
                    "slice could be kept for touching a nodule), before it "
                    f"{LEGACY_METRIC} (empty slices scored 1, so a model predicting nothing "
                    "could be kept)",
    }


def validation_columns(counts, loss: float, soft_dice=None) -> dict:
    """A metrics row's validation columns from the per-slice (tp, fp, fn) of the validation
    split, its mean loss and its per-slice soft Dice (float [N]; None: NaN)."""
    s = metrics.group_summary(counts)
    found = _found_scores(counts)  # once, for the score and its standard error
    soft = math.nan
    if soft_dice is not None:
        counts = np.asarray(counts)
        nodule = (counts[:, 0] + counts[:, 2]) > 0  # truth has a pixel: tp + fn > 0
        if nodule.any():
            soft = float(np.mean(np.asarray(soft_dice, dtype=np.float64)[nodule]))
    return {"val_loss": loss, "val_dice": s["mean_dice"], "val_iou": s["mean_iou"],
            "val_global_dice": s["global_dice"], NODULE_DICE: s["mean_dice_nodule"],
            METRIC: _mean(found), SCORE_SE: _standard_error(found),
            SOFT_TIE_BREAK: soft, TIE_BREAK: s["empty_fp_rate"]}


def _found_scores(counts) -> np.ndarray:
    """Per nodule slice: its Dice, or 0 where prediction and truth overlap with IoU below
    `MATCH_IOU`. counts: per-slice (tp, fp, fn)."""
    counts = np.asarray(counts)
    nodule = (counts[:, 0] + counts[:, 2]) > 0
    dice, iou = metrics.slice_scores(counts[nodule])
    return np.where(iou >= MATCH_IOU, dice, 0.0)


def found_dice(counts) -> float:
    """The nodule-slice mean Dice where a slice whose prediction overlaps its truth with IoU
    below `MATCH_IOU` scores 0 (NaN without a nodule slice). counts: per-slice (tp, fp, fn)."""
    return _mean(_found_scores(counts))


def _mean(scores: np.ndarray) -> float:
    return float(np.mean(scores)) if len(scores) else math.nan


def _standard_error(scores: np.ndarray) -> float:
    """The scores' sample standard deviation over the square root of their number (NaN
    with fewer than two): shown beside the score (metrics.csv, the epoch line) so that a
    difference between epochs can be read against the noise of a small validation split;
    not selected on (README, "Which model is kept")."""
    if len(scores) < 2:
        return math.nan
    return float(np.std(scores, ddof=1) / math.sqrt(len(scores)))


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
    soft = soft if math.isfinite(soft) else 0.0
    fp = -fp if math.isfinite(fp) else 0.0
    if math.isfinite(score) and score > 0:
        return (1.0, float(row["epoch"]), score, soft, fp)
    return (0.0, soft, fp, 0.0, 0.0)


def found_score(row: dict) -> float:
    """The row's validation found-nodule Dice (0 where it has none: NaN, no validation)."""
    score = float(row.get(METRIC, math.nan))
    return score if math.isfinite(score) else 0.0


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
