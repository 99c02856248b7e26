"""The peak filter (`nodulekit.inference.peak_filter`): which components it keeps, how the
threshold is chosen on validation, and that evaluate, predict and training apply and record
it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulekit.inference import peak_filter as pf


def _blob(logits, r, c, radius, peak):
    """A disc of logits rising to `peak` at its centre (every pixel of it > 0)."""
    yy, xx = np.mgrid[:logits.shape[0], :logits.shape[1]]
    d = np.hypot(yy - r, xx - c)
    inside = d <= radius
    logits[inside] = np.maximum(logits[inside], 0.1 + (peak - 0.1) * (1 - d[inside] / (radius + 1)))


def _slice(blobs, shape=(40, 50)):
    z = np.full(shape, -3.0, np.float32)
    for b in blobs:
        _blob(z, *b)
    return z


def test_keep_mask_drops_only_the_components_below_the_peak():
    z = _slice([(10, 10, 4, 6.0), (30, 35, 3, 1.0)])
    everything = pf.keep_mask(z, None)
    np.testing.assert_array_equal(everything, z > 0)
    kept = pf.keep_mask(z, 3.0)
    strong = pf.keep_mask(_slice([(10, 10, 4, 6.0)]), None)
    np.testing.assert_array_equal(kept, strong)  # the strong disc whole, the weak one gone
    assert kept.sum() > 0 and (z > 0).sum() > kept.sum()
    assert not pf.keep_mask(z, 7.0).any()
    # a component touching another diagonally is one component (8-connected)
    z2 = np.full((5, 5), -1.0, np.float32)
    z2[1, 1], z2[2, 2] = 5.0, 0.5
    np.testing.assert_array_equal(pf.keep_mask(z2, 3.0), z2 > 0)
    np.testing.assert_array_equal(pf.keep_masks(np.stack([z, z]), 3.0)[1], kept)


def test_sparse_stats_and_kept_pixels_match_the_dense_mask():
    rng = np.random.default_rng(3)
    z = rng.normal(-1.0, 2.0, (37, 29)).astype(np.float32)
    truth = rng.random((37, 29)) < 0.3
    pixels = np.flatnonzero(z > 0)
    stats = pf.slice_stats(pixels, z.reshape(-1)[pixels], truth.reshape(-1)[pixels], z.shape)
    labels, count = pf.components(z > 0)
    assert len(stats.peak) == count
    for k in range(count):  # the same components, in label order
        inside = labels == k + 1
        assert stats.peak[k] == pytest.approx(float(z[inside].max()))
        assert stats.tp[k] == int((inside & truth).sum())
        assert stats.fp[k] == int((inside & ~truth).sum())
    for threshold in (0.5, 2.0, 4.0):
        keep, dropped = pf.kept_pixels(pixels, z.reshape(-1)[pixels], z.shape, threshold)
        dense = pf.keep_mask(z, threshold)
        np.testing.assert_array_equal(np.flatnonzero(dense), pixels[keep])
        assert dropped == int((stats.peak < threshold).sum())
        counts = pf.filtered_counts([stats], [int(truth.sum())], threshold)[0]
        assert tuple(counts) == (int((dense & truth).sum()), int((dense & ~truth).sum()),
                                 int((~dense & truth).sum()))


def _stats(z, truth):
    pixels = np.flatnonzero(z > 0)
    return pf.slice_stats(pixels, z.reshape(-1)[pixels], truth.reshape(-1)[pixels], z.shape)


def test_calibrate_drops_the_faint_false_positives_and_keeps_the_nodules():
    # nodules with confident cores (peak 6) on half the slices, faint look-alikes (peak 1.5)
    # on every slice: the filter must land between 1.5 and 6
    stats, truth_pixels = [], []
    for j in range(10):
        blobs = [(30, 35, 3, 1.5)]
        truth = np.zeros((40, 50), bool)
        if j % 2 == 0:
            blobs.append((10, 10, 4, 6.0))
            truth = _slice([(10, 10, 4, 6.0)]) > 0
        z = _slice(blobs)
        stats.append(_stats(z, truth))
        truth_pixels.append(int(truth.sum()))
    c = pf.calibrate(stats, truth_pixels)
    assert c.min_peak_logit is not None and 1.5 < c.min_peak_logit < 6.0
    # halfway between the weakest kept peak (6) and the strongest dropped one (1.5)
    assert c.min_peak_logit == pytest.approx(3.75)
    assert c.nodule_dice == pytest.approx(1.0) and c.empty_clean == pytest.approx(1.0)
    assert c.score == pytest.approx(1.0)
    assert c.components_dropped == 10 and c.components == 15
    assert 0.5 < c.min_peak_probability < 1
    cols = c.columns()
    assert cols["val_peak_logit"] == c.min_peak_logit and cols["val_filtered_empty_fp"] == 0


def test_calibrate_keeps_everything_when_the_false_positives_are_the_confident_ones():
    stats, truth_pixels = [], []
    for j in range(6):
        truth = _slice([(10, 10, 4, 2.0)]) > 0 if j % 2 == 0 else np.zeros((40, 50), bool)
        blobs = [(10, 10, 4, 2.0)] if j % 2 == 0 else []
        if j == 1:
            blobs.append((30, 35, 3, 8.0))  # one confident false positive
        stats.append(_stats(_slice(blobs), truth))
        truth_pixels.append(int(truth.sum()))
    c = pf.calibrate(stats, truth_pixels)
    # dropping the false positive (peak 8) would drop every nodule too: "predict nothing"
    # scores 0, keeping all scores sqrt(1 x 2/3)
    assert c.min_peak_logit is None and c.components_dropped == 0
    assert c.score == pytest.approx(math.sqrt(2 / 3))
    assert c.columns()["val_peak_logit"] == 0.0


def _random_stats(seed, slices=40):
    """Random components: 0-12 per slice, peaks drawn from a few values (ties), some with
    nodule pixels; a third of the slices empty."""
    rng = np.random.default_rng(seed)
    stats, truth_pixels = [], []
    for j in range(slices):
        n = int(rng.integers(0, 13))
        truth = 0 if j % 3 == 0 else int(rng.integers(5, 200))
        tp = (rng.integers(0, 30, n) * (rng.random(n) < 0.3)) if truth else np.zeros(n, int)
        tp = np.minimum(tp, truth)
        stats.append(pf.ComponentStats(peak=rng.choice([0.5, 1.0, 2.5, 4.0, 7.0], n)
                                       + rng.integers(0, 3, n) * 0.25,
                                       tp=tp.astype(np.int64),
                                       fp=rng.integers(0, 40, n).astype(np.int64)))
        truth_pixels.append(truth)
    return stats, np.asarray(truth_pixels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_threshold_at_once_equals_one_threshold_at_a_time(seed):
    """`kept_scores` (running sums, O(C log C)) against `scores` (the definition) at every
    candidate threshold, and calibrate's choice against the loop over candidates it
    replaced (which was quadratic: minutes for a model marking salt and pepper)."""
    stats, truth = _random_stats(seed)
    flat = pf._Flat(stats, truth)
    descending, dice, clean = flat.kept_scores()
    assert np.all(np.diff(descending) <= 0) and len(dice) == len(descending) + 1
    for threshold in [-math.inf, *np.unique(flat.peak).tolist(), math.inf]:
        m = int((flat.peak >= threshold).sum())
        d, c = flat.scores(threshold)
        assert dice[m] == pytest.approx(d, abs=1e-12) and clean[m] == pytest.approx(c)
    best, best_at = -1.0, 0
    candidates = [-math.inf, *np.unique(flat.peak).tolist()]
    for i, threshold in enumerate(candidates):
        score = math.sqrt(math.prod(flat.scores(threshold)))
        if score > best + 1e-12:
            best, best_at = score, i
    chosen = pf.calibrate(stats, truth)
    expected = (None if best_at == 0
                else 0.5 * (candidates[best_at] + candidates[best_at - 1]))
    assert chosen.min_peak_logit == expected and chosen.score == pytest.approx(best)


@pytest.mark.parametrize("nodules", [0, 3])
def test_calibrate_is_off_without_nodule_or_without_empty_slices(nodules):
    z = _slice([(10, 10, 4, 6.0)])
    truth = z > 0 if nodules else np.zeros_like(z, bool)
    c = pf.calibrate([_stats(z, truth)] * 3, [int(truth.sum())] * 3)
    assert c.min_peak_logit is None
    assert ("no empty slice" if nodules else "no slice with a nodule") in c.reason


def test_resolve_reads_the_checkpoint_row_and_the_options():
    history = [{"epoch": 1, "val_peak_logit": 0.0}, {"epoch": 2, "val_peak_logit": 3.5}]
    logit, words = pf.resolve("model", history, 2)
    assert logit == 3.5 and "epoch 2" in words
    logit, words = pf.resolve("model", history, 1)
    assert logit is None and "chosen off on validation" in words
    logit, words = pf.resolve("model", [{"epoch": 1, "val_dice": 0.5}], 1)
    assert logit is None and "none in the checkpoint" in words
    assert pf.resolve("off", history, 2)[0] is None
    assert pf.resolve("0.9", history, 2)[0] == pytest.approx(math.log(9))
    for bad in ("0.3", "1", "abc"):
        with pytest.raises(ValueError, match="--min-peak"):
            pf.resolve(bad, history, 2)


def test_evaluate_filter_equals_the_dense_filter_of_the_logits():
    """`apply_peak_filter` on a split's sparse predictions gives the counts and pixels of
    `keep_mask` on the whole logits, slice by slice."""
    from nodulekit.engine import get_backend
    from nodulekit.evaluation.evaluate import SplitResult, apply_peak_filter, sparse_predictions

    be = get_backend("cpu")
    rng = np.random.default_rng(5)
    logits = rng.normal(-1.0, 2.5, (6, 23, 31, 1)).astype(np.float32)
    target = (rng.random((6, 23, 31, 1)) < 0.2).astype(np.uint8)
    target[2] = 0  # an empty slice
    counts = be.to_host(be.confusion_counts(logits, target)).astype(np.int64)
    result = SplitResult(counts, np.zeros(6), np.arange(6), 0.0,
                         sparse_predictions(be, logits, target))
    for threshold in (None, 1.0, 3.0, 6.0):
        filtered, dropped = apply_peak_filter(result, (23, 31), threshold)
        total_dropped = 0
        for j in range(6):
            dense = pf.keep_mask(logits[j, ..., 0], threshold)
            t = target[j, ..., 0] > 0
            assert tuple(filtered.counts[j]) == (int((dense & t).sum()), int((dense & ~t).sum()),
                                                 int((~dense & t).sum()))
            np.testing.assert_array_equal(filtered.predictions[j].pixels, np.flatnonzero(dense))
            np.testing.assert_array_equal(filtered.predictions[j].truth,
                                          t.reshape(-1)[dense.reshape(-1)])
            labels, n = pf.components(logits[j, ..., 0] > 0)
            total_dropped += n - len(np.unique(labels[dense]))
        assert dropped == total_dropped
        if threshold == 3.0:
            assert 0 < dropped and (filtered.counts[:, 1] < counts[:, 1]).any()


def test_training_records_the_filter_and_evaluate_and_predict_apply_it(tiny_data, tmp_path):
    """Each epoch's row holds the threshold chosen on validation; `evaluate` uses the best
    checkpoint's by default, `--min-peak off` none, a probability that one; predict's masks
    are the filtered ones."""
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate
    from nodulekit.inference.predict import PredictOptions, predict
    from nodulekit.training.checkpoint import load_checkpoint
    from nodulekit.training.runfiles import read_metrics_csv
    from tests.tiny import tiny_train

    data, cache = tiny_data
    result = tiny_train(cache, tmp_path / "run", epochs=2, recipe="nodulekit", norm="batch")
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    for row in rows:
        assert set(pf.COLUMNS) <= set(row)
        assert row["val_peak_logit"] >= 0  # 0: off
        assert 0 <= row["val_filtered_empty_fp"] <= row["val_empty_fp"] + 1e-12
    best = load_checkpoint(tmp_path / "run" / "checkpoint_best.h5")
    own = pf.from_row(next(r for r in best.history if r["epoch"] == best.epoch))
    assert best.epoch == result.best_epoch

    def run(min_peak, name):
        s, _ = evaluate(EvaluateOptions(tmp_path / "run", cache, split="val",
                                        out=tmp_path / name, device="cpu", workers=0,
                                        progress=False, min_peak=min_peak),
                        report=lambda *_: None)
        return s

    model, off = run("model", "model"), run("off", "off")
    assert model["peak_filter"]["min_peak_logit"] == own
    assert off["peak_filter"]["min_peak_logit"] is None
    assert off["peak_filter"]["components_dropped"] == 0
    strict = run("0.9999", "strict")
    a, b = off["all"], strict["all"]
    assert b["tp"] <= a["tp"] and b["fp"] <= a["fp"] and b["tp"] + b["fn"] == a["tp"] + a["fn"]
    if a["tp"] + a["fp"]:  # something was predicted: the strict filter dropped some of it
        assert strict["peak_filter"]["components_dropped"] > 0 or b == a
    with pytest.raises(ValueError, match="--min-peak"):
        run("0.2", "bad")
    # predict writes the filtered masks: at p >= 0.9999 no more pixels than without a filter
    images = sorted((data / "val" / "images").rglob("*.dcm"))[:6]
    assert images
    pixels = {}
    for min_peak in ("off", "0.9999"):
        out = predict(tmp_path / "run", images, tmp_path / f"pred-{min_peak}",
                      PredictOptions(device="cpu", progress=False, min_peak=min_peak),
                      report=lambda *_: None)
        pixels[min_peak] = [r["predicted_pixels"] for r in out.rows]
    assert all(s <= o for s, o in zip(pixels["0.9999"], pixels["off"], strict=True))
