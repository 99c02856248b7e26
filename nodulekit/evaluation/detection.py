"""Nodule-level results: which truth nodules a model finds, its false positives, FROC, CPM.

The unit is the scan (an exam: its slices stacked in cache order into a (Z, H, W) volume,
`nodulekit.evaluation.exams`). In it:

- truth nodules are the 26-connected 3-D components of the truth mask, each binned by its
  largest equal-area section diameter (the cache's ``nodule_diameter_mm``; the paper's
  Table 3 bins, `nodules.diameter_bin`);
- candidates are the 26-connected components of the thresholded prediction (p > 0.5),
  each scored by its highest probability (`nodules.components_3d` measures both).

The rule (`RULE`, also in summary.json): a truth nodule is detected when at least one
candidate overlaps it with an intersection over union of their voxels of at least 0.1
(`MATCH_IOU`, nnDetection's matching threshold); a candidate that detects no truth nodule is
a false positive (one that detects a nodule is never one, however many others detect it
too), so a component that merely touches a nodule, or swallows it in a region many times
its size, counts as a miss and a false positive; at a score threshold t only the
candidates scoring >= t count. At the model's own threshold every candidate counts.

FROC: the threshold swept over the candidates' scores (tied scores enter together),
sensitivity against the mean false positives per scan. CPM, the LUNA16 competition
performance metric, is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives
per scan, where the sensitivity at a rate is the best one reached with at most that many
false positives per scan (0 if none): the curve as a staircase. LUNA16's evaluation script
interpolates linearly between its ROC points, which is the same staircase except across a
threshold that adds a hit and a false positive at once (tied scores), where this is the
lower, unambiguous value. Without truth nodules the sensitivities are NaN (null in JSON).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from nodulekit.data.nodules import (
    BIN_LABELS,
    Component,
    LabelledVoxels,
    diameter_bin,
    measure,
)

# The overlap a candidate needs to detect a nodule: intersection over union of their
# voxels, as nnDetection matches at IoU 0.1. One voxel of contact is not enough: a model
# that marks the whole lung as one component would otherwise "detect" every nodule in it at
# no false positive (CPM 1).
MATCH_IOU = 0.1
RULE = ("a truth nodule (26-connected 3-D component of the truth mask) is detected when at "
        "least one predicted component (26-connected component of p > 0.5, scored by its "
        "maximum probability) overlaps it with an intersection over union of their voxels "
        f">= {MATCH_IOU}; a predicted component that detects no truth nodule is a false "
        "positive; at a score threshold t only the components scoring >= t count")
CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan (LUNA16)
CPM_DEFINITION = ("mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan "
                  "(LUNA16); the sensitivity at a rate is the best reached with at most that "
                  "many false positives per scan, 0 if none")
SPACING_RULE = ("a scan is an exam's slices in cache order; slice spacing = median |difference| "
                "of the finite slice positions, else the median slice thickness, else 1 mm; "
                "in-plane spacing = the median pixel spacing, else 1 mm")


@dataclass(frozen=True)
class Match:
    """Truth nodules against candidates in one scan."""

    truth_score: np.ndarray  # float64 [T]: best score of the candidates detecting it; NaN
    candidate_hit: np.ndarray  # bool [P]: the candidate detects a truth nodule (`MATCH_IOU`)


@dataclass(frozen=True)
class ScanResult:
    """One scan's truth nodules and candidates, matched."""

    patient: str
    exam: str
    rows: tuple[int, int]  # first and last cache row
    spacing_mm: tuple[float, float, float]  # (slice, row, column)
    spacing_from: str  # where the spacing came from (`exams.voxel_spacing`)
    truth: list[Component]
    candidates: list[Component]
    match: Match

    @property
    def detected(self) -> np.ndarray:
        """bool [T]: the truth nodules detected at the model's threshold (all candidates)."""
        return ~np.isnan(self.match.truth_score)


def match(truth: LabelledVoxels, predicted: LabelledVoxels, scores) -> Match:
    """The rule (module docstring) on one scan: `truth` and `predicted` voxels of the same
    volume, labelled; `scores[j]` is candidate j + 1's score."""
    if truth.shape != predicted.shape:
        raise ValueError(f"truth {truth.shape} and prediction {predicted.shape} differ")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != predicted.count:
        raise ValueError(f"{scores.size} scores for {predicted.count} candidates")
    _, in_truth, in_predicted = np.intersect1d(truth.flat, predicted.flat, assume_unique=True,
                                               return_indices=True)
    t = truth.labels[in_truth].astype(np.int64) - 1
    p = predicted.labels[in_predicted].astype(np.int64) - 1
    # every overlapping (nodule, candidate) pair once, with its voxels in common
    pairs, common = np.unique(t * max(predicted.count, 1) + p, return_counts=True)
    t, p = np.divmod(pairs, max(predicted.count, 1))
    truth_size = np.bincount(truth.labels, minlength=truth.count + 1)[1:]
    predicted_size = np.bincount(predicted.labels, minlength=predicted.count + 1)[1:]
    iou = common / (truth_size[t] + predicted_size[p] - common)
    t, p = t[iou >= MATCH_IOU], p[iou >= MATCH_IOU]
    truth_score = np.full(truth.count, np.nan)
    np.fmax.at(truth_score, t, scores[p])  # fmax: NaN (no candidate yet) loses
    candidate_hit = np.zeros(predicted.count, dtype=bool)
    candidate_hit[p] = True
    return Match(truth_score, candidate_hit)


def detect(truth: LabelledVoxels, predicted: LabelledVoxels, spacing_zyx,
           probability) -> tuple[list[Component], list[Component], Match]:
    """(truth nodules, candidates, their match) of one scan; `probability`: one per predicted
    voxel, in the order of `predicted.flat` (the candidates' scores come from it)."""
    if probability is None:
        raise ValueError("candidates need their probabilities: their scores come from them")
    nodules = measure(truth, spacing_zyx)
    candidates = measure(predicted, spacing_zyx, probability)
    return nodules, candidates, match(truth, predicted, [c.max_probability for c in candidates])


# -------------------------------------------------------------------------------- FROC


@dataclass(frozen=True)
class Froc:
    """The threshold sweep: one point per distinct candidate score, highest first."""

    thresholds: np.ndarray  # float64 [K], descending
    false_positives: np.ndarray  # int64 [K]: false positives scoring >= the threshold
    detected: np.ndarray  # int64 [K]: truth nodules with a candidate scoring >= it
    scans: int
    nodules: int

    @property
    def fp_per_scan(self) -> np.ndarray:
        return self.false_positives / self.scans

    @property
    def sensitivity(self) -> np.ndarray:
        """float64 [K]; NaN without truth nodules."""
        if self.nodules == 0:
            return np.full(len(self.thresholds), np.nan)
        return self.detected / self.nodules

    def corners(self) -> np.ndarray:
        """Indices of the points where the sensitivity rises, and the last point: the
        staircase (`sensitivity_at`) is the same from these alone."""
        sens = self.sensitivity
        rises = np.diff(np.r_[0.0, sens]) > 0  # NaN compares False
        if len(sens):
            rises[-1] = True
        return np.flatnonzero(rises)


def froc(candidate_scores, candidate_is_fp, truth_scores, scans: int) -> Froc:
    """The FROC of candidates pooled over `scans` scans: their scores and whether each is a
    false positive, and per truth nodule the best score of the candidates hitting it (NaN:
    none)."""
    if scans < 1:
        raise ValueError(f"a FROC needs at least one scan, got {scans}")
    scores = np.asarray(candidate_scores, dtype=np.float64).reshape(-1)
    is_fp = np.asarray(candidate_is_fp, dtype=bool).reshape(-1)
    if scores.shape != is_fp.shape:
        raise ValueError(f"{scores.size} candidate scores, {is_fp.size} false-positive flags")
    if np.isnan(scores).any():
        raise ValueError("candidate scores must not be NaN")
    truth = np.asarray(truth_scores, dtype=np.float64).reshape(-1)
    thresholds = np.unique(scores)[::-1]
    return Froc(thresholds, _at_least(scores[is_fp], thresholds),
                _at_least(truth[~np.isnan(truth)], thresholds), int(scans), truth.size)


def _at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of `values` are >= each threshold."""
    ordered = np.sort(values)
    return (ordered.size - np.searchsorted(ordered, thresholds, side="left")).astype(np.int64)


def sensitivity_at(curve: Froc, rate: float) -> float:
    """The best sensitivity with at most `rate` false positives per scan (0 if none; NaN
    without truth nodules)."""
    if curve.nodules == 0:
        return math.nan
    return _staircase(curve.fp_per_scan, curve.sensitivity, rate)


def _staircase(fp_per_scan, sensitivity, rate: float) -> float:
    ok = np.asarray(fp_per_scan) <= rate
    return float(np.max(np.asarray(sensitivity)[ok])) if ok.any() else 0.0


def cpm(curve: Froc, rates=CPM_RATES) -> float:
    """The mean of `sensitivity_at` over `rates` (LUNA16's CPM by default)."""
    return float(np.mean([sensitivity_at(curve, r) for r in rates]))


# -------------------------------------------------------------------------- summary


def summarize(scans: list[ScanResult]) -> dict:
    """summary.json's "nodules" section: the rule, totals and the table by diameter bin at
    the model's threshold, false positives per scan, the FROC (its `Froc.corners`), CPM,
    and one row per scan."""
    n = len(scans)
    truth_bins = [diameter_bin(c.section_diameter_mm) for s in scans for c in s.truth]
    detected = np.concatenate([s.detected for s in scans]) if scans else np.zeros(0, bool)
    scores = [c.max_probability for s in scans for c in s.candidates]
    is_fp = np.concatenate([~s.match.candidate_hit for s in scans]) if scans else []
    truth_scores = (np.concatenate([s.match.truth_score for s in scans]) if scans
                    else np.zeros(0))
    curve = froc(scores, is_fp, truth_scores, max(n, 1))
    false_positives = int(np.count_nonzero(is_fp))
    by_bin = {label: _counts(detected[np.array([b == label for b in truth_bins], bool)])
              for label in BIN_LABELS}
    corners = curve.corners()
    return {
        "rule": RULE,
        "spacing": SPACING_RULE,
        "scans": n,
        **_counts(detected),
        "by_diameter": by_bin,
        "candidates": len(scores),
        "false_positives": false_positives,
        "fp_per_scan": false_positives / n if n else math.nan,
        "froc": {
            "points": [{"threshold": float(curve.thresholds[i]),
                        "fp_per_scan": float(curve.fp_per_scan[i]),
                        "sensitivity": float(curve.sensitivity[i]),
                        "false_positives": int(curve.false_positives[i]),
                        "detected": int(curve.detected[i])} for i in corners],
            "points_are": "the threshold sweep where the sensitivity rises, and its lowest "
                          "threshold (the model's operating point)",
            "rates": list(CPM_RATES),
            "sensitivity": [sensitivity_at(curve, r) for r in CPM_RATES],
        },
        "cpm": cpm(curve),
        "cpm_definition": CPM_DEFINITION,
        "per_scan": [_scan_row(s) for s in scans],
    }


def _counts(detected: np.ndarray) -> dict:
    total, found = int(detected.size), int(np.count_nonzero(detected))
    return {"truth_nodules": total, "detected": found, "missed": total - found,
            "sensitivity": found / total if total else math.nan}


def _scan_row(s: ScanResult) -> dict:
    false_positives = int(np.count_nonzero(~s.match.candidate_hit))
    nodules = []
    for c, score in zip(s.truth, s.match.truth_score.tolist(), strict=True):
        nodules.append({
            "diameter_mm": c.section_diameter_mm, "bin": diameter_bin(c.section_diameter_mm),
            "sphere_diameter_mm": c.diameter_mm, "voxels": c.voxels,
            "volume_mm3": c.volume_mm3, "centroid": list(c.centroid), "slices": list(c.slices),
            "detected": not math.isnan(score), "score": score})
    return {
        "patient": s.patient, "exam": s.exam, "first_row": s.rows[0], "last_row": s.rows[1],
        "slices": s.rows[1] - s.rows[0] + 1, "spacing_mm": list(s.spacing_mm),
        "spacing_from": s.spacing_from, **_counts(s.detected),
        "by_diameter": {label: _counts(s.detected[np.array([n["bin"] == label
                                                            for n in nodules], bool)])
                        for label in BIN_LABELS},
        "candidates": len(s.candidates), "false_positives": false_positives,
        "nodules": nodules,
    }


# ---------------------------------------------------------------------- text and files

CSV_COLUMNS = ("patient", "exam", "first_row", "last_row", "slices", "spacing_z_mm",
               "spacing_y_mm", "spacing_x_mm", "truth_nodules", "detected", "missed",
               "sensitivity", "candidates", "false_positives",
               *(f"{what}_{label}" for label in BIN_LABELS for what in ("nodules", "detected")))


def csv_rows(section: dict) -> list[dict]:
    """nodules.csv's rows: one per scan, `CSV_COLUMNS`."""
    rows = []
    for r in section["per_scan"]:
        row = {k: r[k] for k in CSV_COLUMNS if k in r}
        row.update(zip(("spacing_z_mm", "spacing_y_mm", "spacing_x_mm"), r["spacing_mm"],
                       strict=True))
        for label in BIN_LABELS:
            row[f"nodules_{label}"] = r["by_diameter"][label]["truth_nodules"]
            row[f"detected_{label}"] = r["by_diameter"][label]["detected"]
        rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, section: dict) -> None:
    """nodules.csv: `csv_rows`, floats with 6 significant digits, NaN (None, as read back
    from summary.json) as "nan"."""
    import csv

    from nodulekit.training.runfiles import write_text_atomic

    def cell(v):
        if v is None:
            return "nan"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.6g}"
        return v

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows([cell(r[k]) for k in CSV_COLUMNS] for r in csv_rows(section))
    write_text_atomic(path, text.getvalue())


def format_nodules(section: dict) -> str:
    """A few lines for the terminal: detected of total by bin, false positives, CPM."""
    lines = [f"nodules (3-D, 26-connected; detected: a predicted component overlaps it with "
             f"IoU >= {MATCH_IOU})",
             f"{'diameter':<10}{'nodules':>9}{'detected':>10}{'missed':>8}{'sensitivity':>13}"]
    groups = [(label, section["by_diameter"][label]) for label in BIN_LABELS]
    for name, g in [*groups, ("all", section)]:
        sens = g["sensitivity"]
        shown = "-" if sens is None or math.isnan(sens) else f"{sens:.4f}"
        lines.append(f"{name:<10}{g['truth_nodules']:>9}{g['detected']:>10}{g['missed']:>8}"
                     f"{shown:>13}")
    value = section["cpm"]
    cpm_text = "n/a (no truth nodule)" if value is None or math.isnan(value) else f"{value:.4f}"
    fp, n = section["false_positives"], section["scans"]
    lines.append(f"false positives: {fp} component{'s' * (fp != 1)} in {n} scan{'s' * (n != 1)} "
                 f"({section['fp_per_scan']:.2f} per scan); CPM {cpm_text} (mean sensitivity "
                 "at 1/8..8 FPs per scan)")
    return "\n".join(lines)


def write_froc_png(path: str | os.PathLike, section: dict) -> None:
    """froc.png: sensitivity against false positives per scan (log axis, 1/8 to 8), the
    staircase of `section["froc"]["points"]`, the CPM's rates marked, CPM in the title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from nodulekit.training.runfiles import write_file_atomic

    f = section["froc"]
    fps = np.array([p["fp_per_scan"] for p in f["points"]], dtype=np.float64)
    sens = np.array([_nan(p["sensitivity"]) for p in f["points"]], dtype=np.float64)
    lo, hi = CPM_RATES[0], CPM_RATES[-1]
    steps = np.unique(np.r_[lo, fps[(fps > lo) & (fps < hi)], hi])  # where the stairs turn
    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.subplots()
    if section["truth_nodules"]:
        ax.plot(steps, [_staircase(fps, sens, x) for x in steps], "-", lw=2,
                drawstyle="steps-post", label="FROC")
        ax.plot(f["rates"], [_nan(v) for v in f["sensitivity"]], "o", label="CPM rates")
    else:
        ax.text(0.5, 0.5, "no truth nodule: sensitivity undefined", ha="center",
                transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_xticks(list(CPM_RATES), ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("sensitivity (truth nodules detected)")
    ax.grid(alpha=0.3, which="both")
    if section["truth_nodules"]:
        ax.legend(loc="lower right")
    value = _nan(section["cpm"])
    cpm_text = "n/a" if math.isnan(value) else f"{value:.3f}"
    ax.set_title(f"FROC: CPM {cpm_text} ({section['truth_nodules']} nodules, "
                 f"{section['scans']} scans)")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    write_file_atomic(path, image.getbuffer())


def _nan(v) -> float:
    """A summary value back as a float: None (NaN as it reads from summary.json) is NaN."""
    return math.nan if v is None else float(v)
