"""`nodulekit predict`: DICOM slices -> nodule masks, overlays and probabilities as PNG.

Inputs are DICOM files or folders (searched recursively for .dcm / .dicom / .ima). Each
slice is read to HU (`nodulekit.data.dicom.read_slice`), windowed like in training, run
through the network and thresholded at p > 0.5 (logit > 0). Written under OUT, mirroring
each file's path below its input folder (a leading ``images/`` is dropped, so a UniToChest
split folder gives UniToChest's own mask names)::

    masks/<rel>.png          the predicted mask, 8-bit 0 / 255 (UniToChest's convention)
    overlays/<rel>.png       the windowed slice in grey with the paper's Fig. 4 colours:
                             agreement yellow, false positive green, false negative red
                             (without a truth mask: the prediction in cyan)
    probabilities/<rel>.png  with probabilities=True: p = sigmoid(logit) as 8-bit grey
                             (round(255 p))
    predictions.csv          one row per slice: input, mask, predicted pixels, and with a
                             truth mask tp, fp, fn, Dice, IoU (empty-empty scores 1)

Truth masks (`truth`): "auto" looks for UniToChest's mirror, ``<root>/masks/<rel>.png`` for
a slice at ``<root>/images/<rel>.dcm`` (a slice without its PNG has no nodule); a folder
name looks for ``<folder>/<rel>.png``; "none" draws predictions only.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
COLOURS = {"tp": (255, 255, 0), "fp": (0, 255, 0), "fn": (255, 0, 0), "pred": (0, 255, 255)}
OVERLAY_ALPHA = 0.6


@dataclass
class SliceInput:
    path: Path
    rel: Path  # output path without suffix, relative to OUT/masks etc.
    truth: Path | None  # the truth mask file, if any
    truth_known: bool  # whether a missing truth file means "no nodule"


@dataclass
class PredictResult:
    out: Path
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None  # metrics over slices with truth, when there were any


def find_inputs(inputs, truth: str | os.PathLike | None = "auto") -> list[SliceInput]:
    """The DICOM files under `inputs`, with output names and truth masks (see module doc)."""
    found: list[SliceInput] = []
    seen: dict[Path, Path] = {}
    truth_dir = None if truth in (None, "auto", "none") else Path(truth)
    if truth_dir is not None and not truth_dir.is_dir():
        raise ValueError(f"--truth {truth_dir}: no such folder")
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files = sorted(p for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
            if not files:
                raise ValueError(f"{item}: no DICOM files (*.dcm, *.dicom, *.ima) in it")
            pairs = [(p, p.relative_to(item)) for p in files]
        elif item.is_file():
            pairs = [(item, Path(item.name))]
        else:
            raise ValueError(f"{item}: no such file or folder")
        for path, rel in pairs:
            rel = rel.with_suffix("")
            if rel.parts and rel.parts[0] == "images" and len(rel.parts) > 1:
                rel = Path(*rel.parts[1:])
            if rel in seen:
                raise ValueError(f"{path} and {seen[rel]} would both be written as {rel}.png; "
                                 "predict them into separate --out folders")
            seen[rel] = path
            t, known = None, False
            if truth_dir is not None:
                t, known = truth_dir / f"{rel}.png", True
            elif truth == "auto":
                t, known = _unitochest_truth(path)
            found.append(SliceInput(path, rel, t, known))
    return found


def _unitochest_truth(path: Path) -> tuple[Path | None, bool]:
    parts = path.absolute().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            root = Path(*parts[:i])
            masks = root / "masks"
            if masks.is_dir():
                return masks / Path(*parts[i + 1:]).with_suffix(".png"), True
            return None, False
    return None, False


def predict(checkpoint, inputs, out, *, truth="auto", probabilities: bool = False,
            device: str = "auto", precision: str = "fp32", batch_size: int = 8,
            progress: bool = True, report=print) -> PredictResult:
    """Run a checkpoint (or a run folder's best one) over DICOM inputs; see the module doc."""
    from tqdm import tqdm

    from nodulekit.data.dicom import DicomError, read_slice
    from nodulekit.data.masks import MaskError, read_mask
    from nodulekit.engine import get_backend, resolve_device
    from nodulekit.training.checkpoint import (
        load_checkpoint,
        model_from_checkpoint,
        resolve_checkpoint,
    )
    from nodulekit.training.config import check_input_shape
    from nodulekit.evaluation.metrics import group_summary

    items = find_inputs(inputs, truth)
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint, prefer="best"))
    name, sentence = resolve_device(device)
    report(sentence)
    be = get_backend(name, precision)
    model = model_from_checkpoint(ckpt, be)
    cfg = ckpt.config
    center = float(cfg.get("window_center", -500.0))
    width = float(cfg.get("window_width", 1600.0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out=out)
    report(f"predicting {len(items)} slice(s) with {ckpt.path} (epoch {ckpt.epoch}) into {out}")

    pending: list[tuple[SliceInput, np.ndarray, np.ndarray | None]] = []
    counts_all, bins_all = [], []

    def flush():
        if not pending:
            return
        hu = np.stack([p[1] for p in pending])
        has_truth = [p[2] is not None for p in pending]
        mask = np.stack([p[2] if p[2] is not None else np.zeros(p[1].shape, np.uint8)
                         for p in pending])
        aug = np.zeros((len(pending), 3), np.float32)
        image, target = be.window_augment(be.asarray(hu), be.asarray(mask), be.asarray(aug),
                                          center, width)
        logits = model.forward(image, keep_for_backward=False)
        counts = be.to_host(be.confusion_counts(logits, target))
        z = be.to_host(logits)[..., 0]
        grey = be.to_host(image)[..., 0]
        for j, (item, _, t) in enumerate(pending):
            row = _write_outputs(out, item, z[j], grey[j], t, probabilities)
            if has_truth[j]:
                tp, fp, fn = (int(v) for v in counts[j])
                row.update(tp=tp, fp=fp, fn=fn, **_scores(tp, fp, fn))
                counts_all.append(counts[j])
                bins_all.append("empty" if not t.any() else "with nodule")
            result.rows.append(row)
            result.written += 1
        pending.clear()

    shape = None
    with tqdm(total=len(items), desc="predict", unit="slice", disable=not progress) as bar:
        for item in items:
            bar.update(1)
            try:
                hu = read_slice(item.path).hu
                check_input_shape(hu.shape, model.depth)
            except (DicomError, ValueError) as e:
                result.failed.append((str(item.path), str(e)))
                report(f"skipped {item.path}: {e}")
                continue
            t = None
            if item.truth is not None:
                try:
                    if item.truth.is_file():
                        t = read_mask(item.truth, shape=hu.shape)
                    elif item.truth_known:
                        t = np.zeros(hu.shape, np.uint8)
                except MaskError as e:
                    report(f"truth mask not used for {item.path}: {e}")
            if shape is not None and hu.shape != shape:
                flush()
            shape = hu.shape
            pending.append((item, np.ascontiguousarray(hu), t))
            if len(pending) >= batch_size:
                flush()
        flush()

    _write_csv(out / "predictions.csv", result.rows)
    if counts_all:
        counts = np.asarray(counts_all, dtype=np.int64)
        nodule = np.asarray([b != "empty" for b in bins_all], dtype=bool)
        result.summary = {"all": group_summary(counts),
                          "nodule_slices": group_summary(counts[nodule])}
    return result


def _scores(tp: int, fp: int, fn: int) -> dict:
    if tp + fp + fn == 0:
        return {"dice": 1.0, "iou": 1.0}
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn)}


def _write_outputs(out: Path, item: SliceInput, logits: np.ndarray, grey: np.ndarray,
                   truth: np.ndarray | None, probabilities: bool) -> dict:
    from PIL import Image

    from nodulekit.data.masks import write_mask

    pred = logits > 0
    mask_path = out / "masks" / f"{item.rel}.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    write_mask(mask_path, pred)
    overlay_path = out / "overlays" / f"{item.rel}.png"
    overlay_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(grey, pred, truth)).save(overlay_path)
    row = {"input": str(item.path), "mask": str(mask_path.relative_to(out)),
           "overlay": str(overlay_path.relative_to(out)), "predicted_pixels": int(pred.sum()),
           "truth": str(item.truth) if truth is not None and item.truth is not None
           and item.truth.is_file() else ("(none: no nodule)" if truth is not None else "")}
    if probabilities:
        prob_path = out / "probabilities" / f"{item.rel}.png"
        prob_path.parent.mkdir(parents=True, exist_ok=True)
        p = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))
        Image.fromarray(np.rint(p * 255).astype(np.uint8)).save(prob_path)
        row["probabilities"] = str(prob_path.relative_to(out))
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


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = ["input", "mask", "overlay", "probabilities", "predicted_pixels", "truth",
               "tp", "fp", "fn", "dice", "iou"]
    used = [c for c in columns if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=used, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
