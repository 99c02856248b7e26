"""The peak filter: keep a predicted component only where the network was sure somewhere in it.

A prediction (p > 0.5, logit > 0) falls into 2-D components (8-connected, per slice). The
filter keeps a component when its peak logit reaches ``min_peak_logit`` and drops it
otherwise; the kept components keep every pixel they had (the mask's outline is the
network's, p > 0.5). This is hysteresis thresholding with the low threshold at p = 0.5: a
nodule the network sees is a blob with a confident core, while a vessel crossing the slice
that looks a little like one tends to come out as a faint blob that barely crosses 0.5.
Measured on the demo (README, "The default run"): the default run's model marks something
on 40 of 82 empty test slices; with the filter chosen on validation (p >= 0.994) 3 of 82,
false positives per scan 10.5 -> 1.75, at the price of the one 3-10 mm nodule its raw
masks found (3-10 mm Dice 0.12 -> 0; nodule-slice mean Dice 0.41 -> 0.34).

Where the threshold comes from (`calibrate`): chosen on the validation split after each
epoch, as nnU-Net chooses its post-processing on validation, and stored in that epoch's
checkpoint. The choice maximises the geometric mean of two validation scores:

    nodule-slice mean Dice (after the filter)  x  fraction of empty slices left clean

"predict nothing" scores 0 on the first, "keep everything" is scored as it is, so the
filter is only as strict as the validation slices say it pays to be. Among the candidate
thresholds (every component's peak, and "keep all"), the best one's threshold is placed
halfway, in logits, between the weakest component it keeps and the strongest it drops. A
validation split without a slice with a nodule, or without an empty slice, cannot say
where that balance lies: the filter is then off.

`evaluate` and `predict` apply the checkpoint's threshold unless told otherwise
(``--min-peak off`` or a probability); a checkpoint from before the filter has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulekit.data.nodules import EIGHT_CONNECTED

OFF = "off"


@dataclass(frozen=True)
class ComponentStats:
    """The predicted components of one slice: peak logit, and pixels on and off the truth."""

    peak: np.ndarray  # float64 [C]: the component's highest logit
    tp: np.ndarray  # int64 [C]: its pixels inside the truth mask
    fp: np.ndarray  # int64 [C]: its pixels outside it


def probability_of(logit: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * float(logit)))


def logit_of(probability: float) -> float:
    p = float(probability)
    if not 0.5 <= p < 1.0:
        raise ValueError(f"a peak probability must lie in [0.5, 1), got {p}")
    return math.log(p / (1.0 - p))


def components(predicted: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of a 2-D boolean mask's 8-connected components."""
    from scipy import ndimage

    return ndimage.label(predicted, structure=EIGHT_CONNECTED)


def keep_mask(logits: np.ndarray, min_peak_logit: float | None) -> np.ndarray:
    """The filtered prediction of one slice's logits [H, W]: logit > 0, components whose peak
    is below `min_peak_logit` removed (None: nothing removed). `kept_pixels` on the slice's
    predicted pixels, so the dense and the sparse paths are one computation."""
    logits = np.asarray(logits)
    predicted = logits > 0
    if min_peak_logit is None or not predicted.any():
        return predicted
    pixels = np.flatnonzero(predicted)
    keep, _ = kept_pixels(pixels, logits.reshape(-1)[pixels], logits.shape, min_peak_logit)
    out = np.zeros(predicted.size, dtype=bool)
    out[pixels[keep]] = True
    return out.reshape(predicted.shape)


def keep_masks(logits: np.ndarray, min_peak_logit: float | None) -> np.ndarray:
    """`keep_mask` on every slice of logits [N, H, W] (or one slice [H, W])."""
    logits = np.asarray(logits)
    if logits.ndim == 2:
        return keep_mask(logits, min_peak_logit)
    if len(logits) == 0:
        return logits > 0
    return np.stack([keep_mask(z, min_peak_logit) for z in logits])


def _label_pixels(pixels: np.ndarray, shape) -> tuple[np.ndarray, int]:
    """(component index of each sparse predicted pixel, number of components)."""
    image = np.zeros(int(shape[0]) * int(shape[1]), dtype=bool)
    image[pixels] = True
    labels, count = components(image.reshape(int(shape[0]), int(shape[1])))
    return labels.reshape(-1)[pixels] - 1, count  # every predicted pixel is in one


def _peaks(label_of: np.ndarray, count: int, logits: np.ndarray) -> np.ndarray:
    peak = np.full(count, -np.inf)
    np.maximum.at(peak, label_of, np.asarray(logits, np.float64))
    return peak


def slice_components(pixels: np.ndarray, logits: np.ndarray, truth: np.ndarray,
                     shape: tuple[int, int]) -> tuple[np.ndarray, ComponentStats]:
    """(component index of each pixel, the components' stats) of one slice's sparse
    prediction: `pixels` (flat indices into H x W, every pixel with logit > 0), their
    `logits` and whether each is in the `truth` mask."""
    if len(pixels) == 0:
        empty = np.zeros(0, np.int64)
        return empty, ComponentStats(np.zeros(0), empty, empty)
    label_of, count = _label_pixels(pixels, shape)
    truth = np.asarray(truth, dtype=bool)
    tp = np.bincount(label_of, weights=truth, minlength=count).astype(np.int64)
    fp = np.bincount(label_of, weights=~truth, minlength=count).astype(np.int64)
    return label_of, ComponentStats(_peaks(label_of, count, logits), tp, fp)


def slice_stats(pixels: np.ndarray, logits: np.ndarray, truth: np.ndarray,
                shape: tuple[int, int]) -> ComponentStats:
    """The components' stats of one slice's sparse prediction (`slice_components`)."""
    return slice_components(pixels, logits, truth, shape)[1]


def kept_pixels(pixels: np.ndarray, logits: np.ndarray, shape,
                min_peak_logit: float | None) -> tuple[np.ndarray, int]:
    """(bool [P]: which of a slice's sparse predicted pixels the filter keeps, number of
    components it drops)."""
    if min_peak_logit is None or len(pixels) == 0:
        return np.ones(len(pixels), dtype=bool), 0
    label_of, count = _label_pixels(pixels, shape)
    kept = _peaks(label_of, count, logits) >= min_peak_logit
    return kept[label_of], int(count - kept.sum())


def filtered_counts(stats: list[ComponentStats], truth_pixels: np.ndarray,
                    min_peak_logit: float | None) -> np.ndarray:
    """int64 [N, 3]: (tp, fp, fn) per slice once the components below the threshold are
    gone. truth_pixels: int [N], each slice's nodule pixels."""
    out = np.zeros((len(stats), 3), np.int64)
    for j, s in enumerate(stats):
        kept = (np.ones(len(s.peak), bool) if min_peak_logit is None
                else s.peak >= min_peak_logit)
        tp, fp = int(s.tp[kept].sum()), int(s.fp[kept].sum())
        out[j] = tp, fp, int(truth_pixels[j]) - tp
    return out


# metrics.csv's columns of the filter chosen after each epoch: its threshold (logit; 0: off,
# as every component's peak is above 0; NaN: no validation), and the validation
# nodule-slice Dice and empty-slice false-positive rate under it
COLUMNS = ("val_peak_logit", "val_filtered_nodule_dice", "val_filtered_empty_fp")


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` chose and why: config.json, metrics.csv and the checkpoint keep it."""

    min_peak_logit: float | None  # None: the filter is off
    score: float  # the geometric mean it reached (NaN when it could not be measured)
    nodule_dice: float  # nodule-slice mean Dice after the filter
    empty_clean: float  # fraction of empty slices with nothing left on them
    components_dropped: int
    components: int
    reason: str = ""  # why the filter is off, when it is

    @property
    def min_peak_probability(self) -> float | None:
        return None if self.min_peak_logit is None else probability_of(self.min_peak_logit)

    def columns(self) -> dict:
        """The metrics row's `COLUMNS`."""
        off = self.min_peak_logit is None
        return {"val_peak_logit": 0.0 if off else float(self.min_peak_logit),
                "val_filtered_nodule_dice": self.nodule_dice,
                "val_filtered_empty_fp": 1.0 - self.empty_clean}


def resolve(option, history: list[dict], epoch: int) -> tuple[float | None, str]:
    """(threshold logit or None, a sentence saying which) for `--min-peak`: "model" (the
    checkpoint's own, from its epoch's history row), "off", or a peak probability."""
    if option is None or str(option) == "model":
        row = next((r for r in history or [] if int(r.get("epoch", -1)) == int(epoch)), None)
        logit = from_row(row)
        if logit is None:
            why = ("chosen off on validation" if row is not None and "val_peak_logit" in row
                   else "none in the checkpoint (trained before the filter, or without "
                        "validation)")
            return None, f"peak filter: off ({why})"
        return logit, (f"peak filter: components kept where p reaches "
                       f"{probability_of(logit):.4f} (logit {logit:.3f}; chosen on "
                       f"validation at epoch {epoch}; --min-peak off to see all)")
    if str(option) == OFF:
        return None, "peak filter: off (--min-peak off)"
    try:
        logit = logit_of(float(option))
    except ValueError as e:
        raise ValueError(f"--min-peak: 'model', 'off' or a probability in [0.5, 1), got "
                         f"{option!r}") from e
    return logit, f"peak filter: components kept where p reaches {float(option):g} (--min-peak)"


def parse_option(value: str) -> str:
    """Check a `--min-peak` value early (the CLI): returns it unchanged."""
    resolve(value, [], 0)
    return value


def from_row(row: dict | None) -> float | None:
    """The threshold (logit) a checkpoint's own history row holds; None: off or none."""
    v = (row or {}).get("val_peak_logit")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


class _Flat:
    """Every slice's components in flat arrays, so each candidate threshold is a few numpy
    calls (a validation split has a few thousand components)."""

    def __init__(self, stats: list[ComponentStats], truth_pixels: np.ndarray):
        self.peak = np.concatenate([s.peak for s in stats]) if stats else np.zeros(0)
        self.tp = np.concatenate([s.tp for s in stats]) if stats else np.zeros(0, np.int64)
        self.fp = np.concatenate([s.fp for s in stats]) if stats else np.zeros(0, np.int64)
        self.slice = np.repeat(np.arange(len(stats)), [len(s.peak) for s in stats])
        self.truth = truth_pixels
        self.nodule = truth_pixels > 0

    def scores(self, threshold: float) -> tuple[float, float]:
        """(nodule-slice mean Dice, empty clean fraction) keeping peaks >= threshold: the
        definition, one threshold at a time (`kept_scores` gives every threshold at once)."""
        kept = self.peak >= threshold
        n = len(self.truth)
        tp = np.bincount(self.slice, weights=self.tp * kept, minlength=n)
        fp = np.bincount(self.slice, weights=self.fp * kept, minlength=n)
        t, f, g = tp[self.nodule], fp[self.nodule], self.truth[self.nodule]
        dice = 2 * t / np.maximum(1, t + f + g)  # 2TP / (2TP + FP + FN), FN = G - TP
        return float(dice.mean()), float((fp[~self.nodule] == 0).mean())

    def kept_scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(peaks in descending order, nodule-slice mean Dice, empty clean fraction), the
        last two for keeping the m strongest components, m = 0..C: float64 [C], [C + 1],
        [C + 1]. What `scores` gives for one threshold, for all of them in O(C log C): a
        model that marks salt and pepper has tens of thousands of components, and one
        `scores` call per candidate threshold was quadratic (minutes per validation).

        Adding the components from the strongest down changes one slice at a time; each
        one's change of its slice's Dice (and whether it makes an empty slice dirty) comes
        from running sums within its slice, and the totals are running sums of those."""
        order = np.argsort(-self.peak, kind="stable")
        peak, slice_of = self.peak[order], self.slice[order]
        tp, fp = self.tp[order].astype(np.float64), self.fp[order].astype(np.float64)
        by_slice = np.argsort(slice_of, kind="stable")  # each slice's components in order
        s, t, f = slice_of[by_slice], tp[by_slice], fp[by_slice]
        first = np.ones(len(s), bool)  # a slice's first component
        first[1:] = s[1:] != s[:-1]
        group = np.cumsum(first) - 1
        run_tp, run_fp = np.cumsum(t), np.cumsum(f)
        tp_after = run_tp - (run_tp - t)[first][group]  # within the slice, this one included
        fp_after = run_fp - (run_fp - f)[first][group]
        tp_before, fp_before = tp_after - t, fp_after - f
        g = self.truth[s].astype(np.float64)
        nodule = g > 0

        def dice(a, b):  # 2TP / (2TP + FP + FN), FN = G - TP
            return np.where(nodule, 2 * a / np.maximum(1.0, a + b + g), 0.0)

        change, dirtied = np.empty(len(s)), np.empty(len(s))
        change[by_slice] = dice(tp_after, fp_after) - dice(tp_before, fp_before)
        dirtied[by_slice] = ~nodule & (fp_before == 0) & (fp_after > 0)
        nodules, empties = int(self.nodule.sum()), int((~self.nodule).sum())
        dice_mean = np.r_[0.0, np.cumsum(change)] / max(1, nodules)
        clean = 1.0 - np.r_[0.0, np.cumsum(dirtied)] / max(1, empties)
        return peak, dice_mean, clean


def calibrate(stats: list[ComponentStats], truth_pixels) -> Calibration:
    """The peak threshold that maximises sqrt(nodule-slice Dice x empty clean fraction) on
    these (validation) slices; see the module docstring. truth_pixels: int [N], each
    slice's nodule pixels."""
    truth_pixels = np.asarray(truth_pixels, np.int64)
    flat = _Flat(stats, truth_pixels)
    total = len(flat.peak)
    if not flat.nodule.any() or flat.nodule.all():
        why = "no slice with a nodule" if not flat.nodule.any() else "no empty slice"
        return Calibration(None, math.nan, math.nan, math.nan, 0, total,
                           f"the validation split has {why}: the filter is off")
    # "keep all" first, then each peak as the weakest kept one: the first maximum wins, so
    # the least strict of equal scores is chosen
    descending, dice, clean = flat.kept_scores()
    peaks = np.unique(flat.peak)
    kept = total - np.searchsorted(descending[::-1], peaks, side="left")  # peak >= threshold
    kept = np.r_[total, kept]
    candidates = [-math.inf, *peaks.tolist()]
    scores = np.sqrt(dice[kept] * clean[kept])
    best_at = int(np.argmax(scores))
    best, best_parts = float(scores[best_at]), (float(dice[kept[best_at]]),
                                                 float(clean[kept[best_at]]))
    # halfway between the weakest kept peak and the strongest dropped one (best_at >= 2:
    # the smallest peak keeps what "keep all" keeps, so it never scores higher)
    threshold = None if best_at == 0 else 0.5 * (candidates[best_at] + candidates[best_at - 1])
    dropped = 0 if threshold is None else int((flat.peak < threshold).sum())
    return Calibration(threshold, best, best_parts[0], best_parts[1], dropped, total)
