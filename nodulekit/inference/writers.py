"""`nodulekit predict`'s outputs: one slice's PNGs, and predictions.csv.

Under OUT, for a slice with output name <rel> (see `nodulekit.inference.inputs`)::

    masks/<rel>.png          the predicted mask (logit > 0), 8-bit 0 / 255 (UniToChest's)
    overlays/<rel>.png       the windowed slice in grey with the paper's Fig. 4 colours:
                             agreement yellow, false positive green, false negative red
                             (without a truth mask: the prediction in cyan)
    probabilities/<rel>.png  when asked for: p = sigmoid(logit) as 8-bit grey (round(255 p))
    predictions.csv          one row per slice: input, mask, overlay, probabilities,
                             predicted pixels, truth, and with a truth mask tp, fp, fn, Dice,
                             IoU (empty-empty scores 1) and dice_s1, the Dice with smoothing 1
                             of the paper's code ((2TP+1)/(2TP+FP+FN+1): one stray pixel on
                             an empty slice scores 0.5); floats with 6 decimals
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nodulekit.inference.inputs import SliceInput
    from nodulekit.inference.predict import SlicePrediction

COLOURS = {"tp": (255, 255, 0), "fp": (0, 255, 0), "fn": (255, 0, 0), "pred": (0, 255, 255)}
OVERLAY_ALPHA = 0.6
CSV_COLUMNS = ["input", "mask", "overlay", "probabilities", "predicted_pixels", "truth",
               "tp", "fp", "fn", "dice", "iou", "dice_s1"]


def write_slice(out: Path, p: SlicePrediction, probabilities: bool) -> dict:
    """Write `p`'s mask, overlay (and with `probabilities` its probabilities) under `out`;
    return its predictions.csv row."""
    from PIL import Image

    from nodulekit.data.masks import write_mask

    pred = p.mask
    mask_path = _output_path(out, "masks", p.item.rel)
    write_mask(mask_path, pred)
    overlay_path = _output_path(out, "overlays", p.item.rel)
    Image.fromarray(overlay(p.grey, pred, p.truth)).save(overlay_path)
    row = {"input": str(p.item.path), "mask": str(mask_path.relative_to(out)),
           "overlay": str(overlay_path.relative_to(out)), "predicted_pixels": int(pred.sum()),
           "truth": _truth_cell(p.item, p.truth)}
    if probabilities:
        prob_path = _output_path(out, "probabilities", p.item.rel)
        Image.fromarray(probability_grey(p.logits)).save(prob_path)
        row["probabilities"] = str(prob_path.relative_to(out))
    if p.counts is not None:
        tp, fp, fn = (int(v) for v in p.counts)
        row.update(tp=tp, fp=fp, fn=fn, **_scores(tp, fp, fn))
    return row


def overlay(grey: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8: the windowed slice (grey in [0, 1]) with the Fig. 4 colours blended in."""
    base = np.clip(np.rint(np.asarray(grey, np.float64) * 255), 0, 255)
    rgb = np.repeat(base[..., None], 3, axis=2)
    pred = np.asarray(pred, bool)
    if truth is None:
        layers = [(pred, COLOURS["pred"])]
    else:
        t = np.asarray(truth) != 0
        layers = [(pred & t, COLOURS["tp"]), (pred & ~t, COLOURS["fp"]),
                  (~pred & t, COLOURS["fn"])]
    for where, colour in layers:
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float64)
    return np.rint(rgb).astype(np.uint8)


def probability(logits: np.ndarray) -> np.ndarray:
    """p = sigmoid(logits) in float64 (in float32 every logit above ~16.6 would be 1.0),
    without overflow for large |logit|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def probability_grey(logits: np.ndarray) -> np.ndarray:
    """uint8: p = sigmoid(logits) as round(255 p)."""
    return np.rint(probability(logits) * 255).astype(np.uint8)


def write_csv(path: Path, rows: list[dict]) -> None:
    """predictions.csv: the columns of `CSV_COLUMNS` that some row has, in that order."""
    used = [c for c in CSV_COLUMNS if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=used, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def _output_path(out: Path, kind: str, rel: Path) -> Path:
    """``out/kind/<rel>.png``, its folder made."""
    path = out / kind / f"{rel}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _truth_cell(item: SliceInput, truth: np.ndarray | None) -> str:
    """The truth column: the mask file, "(none: no nodule)" when a missing file meant an empty
    mask, empty without a truth mask."""
    if truth is None:
        return ""
    if item.truth is not None and item.truth.is_file():
        return str(item.truth)
    return "(none: no nodule)"


def _scores(tp: int, fp: int, fn: int) -> dict:
    s1 = (2 * tp + 1) / (2 * tp + fp + fn + 1)
    if tp + fp + fn == 0:
        return {"dice": 1.0, "iou": 1.0, "dice_s1": s1}
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn), "dice_s1": s1}
