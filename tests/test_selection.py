"""Which epoch training keeps as checkpoint_best (nodulekit.evaluation.selection): never a model
that predicts nothing when another epoch found nodules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny import tiny_train

from nodulekit.evaluation import selection
from nodulekit.training.checkpoint import load_checkpoint, save_checkpoint
from nodulekit.training.runfiles import read_metrics_csv, write_metrics_csv

# validation counts (tp, fp, fn) of 8 empty slices and 2 nodule slices
NOTHING = np.array([[0, 0, 0]] * 8 + [[0, 0, 6], [0, 0, 9]])  # predicts nothing at all
FOUND = np.array([[0, 0, 0]] * 5 + [[0, 4, 0]] * 3 + [[4, 2, 2], [3, 0, 6]])  # finds some


def _row(epoch, counts):
    return {"epoch": epoch, **selection.validation_columns(counts, loss=0.5)}


def test_predicting_nothing_scores_zero_and_is_not_kept():
    nothing, found = _row(1, NOTHING), _row(2, FOUND)
    # the all-slice means favour predicting nothing (empty slices score 1) ...
    assert nothing["val_dice"] > found["val_dice"] and nothing["val_iou"] > found["val_iou"]
    # ... the nodule-slice mean does not
    assert nothing[selection.METRIC] == 0.0 and found[selection.METRIC] > 0
    assert found[selection.TIE_BREAK] == pytest.approx(3 / 8)
    for order in ([nothing, found], [found, nothing]):
        rows = [dict(r, epoch=i + 1) for i, r in enumerate(order)]
        kept = selection.select(rows)
        assert rows[kept - 1][selection.METRIC] > 0
    # more epochs that find nothing after one that did: still the one that did
    rows = [_row(1, NOTHING), _row(2, FOUND), _row(3, NOTHING), _row(4, NOTHING)]
    assert selection.select(rows) == 2


def test_ties_go_to_fewer_false_positives_then_the_earlier_epoch():
    blind = np.array([[0, 0, 0]] * 4 + [[0, 0, 5]])  # finds nothing, no false positive
    noisy = np.array([[0, 3, 0]] * 4 + [[0, 2, 5]])  # finds nothing, marks every empty slice
    rows = [_row(1, noisy), _row(2, blind), _row(3, blind), _row(4, noisy)]
    assert [r[selection.METRIC] for r in rows] == [0.0] * 4
    assert selection.select(rows) == 2
    # a validation split with no nodule slice: the false-positive rate decides
    empty_only = [_row(1, np.array([[0, 1, 0], [0, 0, 0]])), _row(2, np.zeros((2, 3), int))]
    assert math.isnan(empty_only[0][selection.METRIC]) and selection.select(empty_only) == 2
    # without validation: the last epoch
    none = [dict(selection.no_validation_columns(), epoch=e) for e in (1, 2, 3)]
    assert selection.select(none, validated=False) == 3


def test_at_equal_scores_the_soft_dice_on_nodule_slices_comes_first():
    """Two epochs find no validation nodule pixel above 0.5 (a small split of small
    nodules): the one whose sigmoid moved towards them (higher soft Dice on the nodule
    slices) is kept over one that predicts nothing, though it marks more empty slices."""
    blind = np.array([[0, 0, 0]] * 4 + [[0, 0, 5]])  # nothing anywhere
    noisy = np.array([[0, 3, 0]] * 4 + [[0, 2, 5]])  # nothing on the nodule, marks empties
    soft_blind = np.array([0.9] * 4 + [1 / 6])  # p ~ 0 everywhere: (0 + 1) / (0 + 5 + 1)
    soft_noisy = np.array([0.1] * 4 + [0.35])  # some probability on the nodule
    rows = [{"epoch": 1, **selection.validation_columns(blind, 0.5, soft_blind)},
            {"epoch": 2, **selection.validation_columns(noisy, 0.5, soft_noisy)}]
    assert rows[0][selection.SOFT_TIE_BREAK] == pytest.approx(1 / 6)  # nodule slices only
    assert rows[1][selection.SOFT_TIE_BREAK] == pytest.approx(0.35)
    assert selection.select(rows) == 2
    # the score still comes first: an epoch that found pixels beats any soft Dice
    found = {"epoch": 3, **selection.validation_columns(FOUND, 0.5, np.zeros(len(FOUND)))}
    assert selection.select(rows + [found]) == 3
    # rows from before the soft column (NaN when read back): 0, as before
    old = dict(rows[1], **{selection.SOFT_TIE_BREAK: math.nan})
    assert selection.key(old)[1] == 0.0


def test_the_latest_epoch_that_finds_a_nodule_is_kept_not_the_highest_score():
    """The rule since 2026-12-05: among epochs that find a validation nodule the latest
    (the learning rate's last steps), whatever the scores; an epoch that finds nothing
    after it does not replace it, and never beats one that finds."""
    better = np.array([[0, 0, 0]] * 5 + [[0, 4, 0]] * 3 + [[8, 1, 1], [8, 1, 1]])
    rows = [_row(1, better), _row(2, FOUND)]
    assert rows[0][selection.METRIC] > rows[1][selection.METRIC] > 0
    assert selection.select(rows) == 2
    assert selection.select(rows + [_row(3, NOTHING)]) == 2
    assert selection.select([_row(1, NOTHING), _row(2, better), _row(3, NOTHING)]) == 2
    assert selection.found_score(rows[0]) == rows[0][selection.METRIC]
    assert selection.found_score({"epoch": 1}) == 0.0
    assert "latest" in selection.describe()["rule"]


def test_found_dice_counts_a_slice_only_where_it_overlaps_with_iou_at_least_0_1():
    counts = np.array([
        [0, 5, 0],  # empty slice: not in the mean
        [6, 2, 4],  # IoU 6/12 = 0.5: Dice 12/18 counts
        [1, 0, 9],  # IoU 1/10 = 0.1: exactly the threshold, Dice 2/11 counts
        [1, 1, 9],  # IoU 1/11 < 0.1: a touch, scores 0 (plain Dice 2/12)
        [0, 3, 7],  # a miss: 0 either way
    ])
    assert selection.found_dice(counts) == pytest.approx((12 / 18 + 2 / 11) / 4)
    row = selection.validation_columns(counts, 0.5)
    assert row[selection.NODULE_DICE] == pytest.approx((12 / 18 + 2 / 11 + 2 / 12) / 4)
    assert row[selection.METRIC] == pytest.approx(selection.found_dice(counts))
    assert math.isnan(selection.found_dice(np.array([[0, 1, 0], [0, 0, 0]])))


def test_an_epoch_that_floods_every_slice_is_not_kept_for_touching_nodules():
    """The second set's case (README, "Recipes"): an early epoch marks most of every slice
    and so touches a few nodule pixels (plain nodule-slice Dice > 0); later epochs find no
    nodule pixel and mark few empty slices. The plain score keeps the flood; the rule keeps
    the later epoch whose sigmoid moved more onto the nodules (soft Dice), and any epoch
    that really finds a nodule beats both."""
    flood = np.array([[0, 4000, 0]] * 6 + [[3, 3900, 20], [2, 4100, 30]])
    quiet = np.array([[0, 0, 0]] * 4 + [[0, 30, 0]] * 2 + [[0, 0, 23], [0, 0, 32]])
    rows = [{"epoch": 1, **selection.validation_columns(flood, 0.5, np.full(8, 0.002))},
            {"epoch": 2, **selection.validation_columns(quiet, 0.5, np.full(8, 0.05))}]
    assert rows[0][selection.NODULE_DICE] > 0 == rows[1][selection.NODULE_DICE]
    assert rows[0][selection.METRIC] == 0.0 == rows[1][selection.METRIC]
    assert selection.select(rows) == 2
    plain = [dict(r, **{selection.METRIC: r[selection.NODULE_DICE]}) for r in rows]
    assert selection.select(plain) == 1  # what the rule before this one kept
    finds = np.array([[0, 0, 0]] * 4 + [[0, 30, 0]] * 2 + [[10, 5, 13], [0, 0, 32]])
    rows.append({"epoch": 3, **selection.validation_columns(finds, 0.5, np.full(8, 0.01))})
    assert rows[2][selection.METRIC] > 0 and selection.select(rows) == 3


def test_rows_from_before_the_rule_have_no_key():
    old = {"epoch": 1, "val_loss": 0.5, "val_dice": 0.9, "val_iou": 0.81}
    assert selection.key(old) is None
    assert selection.improves((0.0, 0.0), None)
    assert not selection.improves((0.3, -0.5), (0.3, -0.2))
    assert selection.improves((0.3, -0.1), (0.3, -0.2))
    assert selection.best_row([old], 1) is old and selection.best_row([old], 2) is None
    assert selection.describe()["metric"] == selection.METRIC


def test_metrics_csv_reads_columns_an_older_run_lacks(tmp_path):
    rows = [{"epoch": 1, "step": 3, "train_loss": 0.5, "val_dice": 0.9, "best": True},
            {"epoch": 2, "step": 6, "train_loss": 0.4, "val_dice": 0.8,
             selection.METRIC: 0.25, selection.TIE_BREAK: 0.5, "best": True}]
    write_metrics_csv(tmp_path / "m.csv", rows)
    back = read_metrics_csv(tmp_path / "m.csv")
    assert math.isnan(back[0][selection.METRIC]) and back[1][selection.METRIC] == 0.25
    assert [r["best"] for r in back] == [1, 1]


def _train_with_validation(epoch_counts, tiny_data, tmp_path, monkeypatch):
    """A tiny run of one epoch per entry whose validation scores the given confusion counts
    (scripted, epoch by epoch); (its result, the lines it printed)."""
    script = iter(epoch_counts)
    real = selection.validation_columns
    monkeypatch.setattr(selection, "validation_columns",
                        lambda counts, loss, soft_dice=None: real(next(script), loss))
    _, cache = tiny_data
    lines = []
    result = tiny_train(cache, tmp_path / "run", epochs=len(epoch_counts), test=False,
                        echo=lines.append)
    return result, lines


def test_training_keeps_the_epoch_that_found_nodules(tiny_data, tmp_path, monkeypatch):
    """End to end: validation scripted so that epochs 1 and 3 predict nothing (the higher
    all-slice mean Dice and IoU) and epoch 2 finds nodules; checkpoint_best is epoch 2."""
    found = _row(2, FOUND)[selection.METRIC]
    result, lines = _train_with_validation([NOTHING, FOUND, NOTHING], tiny_data, tmp_path,
                                           monkeypatch)
    assert result.best_epoch == 2 and result.best_score == pytest.approx(found)
    best = load_checkpoint(tmp_path / "run" / "checkpoint_best.h5")
    assert best.epoch == 2 and best.best_epoch == 2
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [r["best"] for r in rows] == [1, 1, 0]
    assert rows[0]["val_iou"] > rows[1]["val_iou"]  # the old rule would have kept epoch 1
    assert rows[1][selection.METRIC] > 0 and rows[2][selection.TIE_BREAK] == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["selection"]["metric"] == selection.METRIC
    epoch_lines = [x for x in lines if x.startswith("epoch ")]
    assert "nodule Dice" in epoch_lines[1] and "* kept" in epoch_lines[1]
    se = rows[1][selection.SCORE_SE]  # beside the score: in metrics.csv and the line
    assert se > 0 and f"(found {found:.4f} +- {se:.4f})" in epoch_lines[1]
    assert "* kept" not in epoch_lines[2]
    # the time left: after every epoch but the last
    assert all("left)" in x for x in epoch_lines[:2]) and "left)" not in epoch_lines[2]


def test_training_keeps_the_last_finder_and_names_the_highest(tiny_data, tmp_path,
                                                            monkeypatch):
    """End to end under the rule since 2026-12-05: epoch 1 scores higher, epoch 2 also
    finds nodules and is kept; the end-of-run line names both."""
    better = np.array([[0, 0, 0]] * 5 + [[0, 4, 0]] * 3 + [[8, 1, 1], [8, 1, 1]])
    found, highest = _row(2, FOUND)[selection.METRIC], _row(1, better)[selection.METRIC]
    assert highest > found > 0
    result, lines = _train_with_validation([better, FOUND], tiny_data, tmp_path, monkeypatch)
    assert result.best_epoch == 2 and result.best_score == pytest.approx(found)
    assert load_checkpoint(tmp_path / "run" / "checkpoint_best.h5").epoch == 2
    end = next(x for x in lines if x.startswith("trained "))
    assert "kept epoch 2 (checkpoint_best.h5" in end
    assert f"the highest was epoch 1's {highest:.4f}" in end


def test_time_left_paces_by_the_epochs_after_the_first():
    from nodulekit.training.loop import _time_left

    assert _time_left([30.0], 0) == "" and _time_left([], 5) == ""
    assert _time_left([30.0], 2) == "  (about 1 min left)"  # one epoch: its own pace
    # the first epoch (compilation) left out of the pace
    assert _time_left([100.0, 5.0, 7.0], 10) == "  (about 1 min left)"
    assert _time_left([100.0, 5.0, 7.0], 5) == "  (about 30 s left)"
    assert _time_left([1.0, 3599.0], 1) == "  (about 60 min left)"
    assert _time_left([1.0, 3600.0 * 2 + 59 * 60 + 50], 1) == "  (about 3 h 00 min left)"
    assert _time_left([1.0, 600.0], 200) == "  (about 33 h 20 min left)"


@pytest.mark.parametrize("new_cols", [
    # an older nodulekit's (kept on mean IoU): no nodule-slice column at all
    (selection.METRIC, selection.NODULE_DICE, selection.SOFT_TIE_BREAK, selection.TIE_BREAK),
    # the rule before this one (kept on the plain nodule-slice Dice): no found column
    (selection.METRIC,),
], ids=["mean-iou-rule", "nodule-dice-rule"])
def test_resuming_a_run_from_before_the_rule_rescores_its_best(tiny_data, tmp_path, new_cols):
    """A checkpoint whose history lacks the found-nodule Dice (kept on an earlier rule)
    resumes: its checkpoint_best is scored on validation again, and says so."""
    _, cache = tiny_data
    run = tmp_path / "run"
    tiny_train(cache, run, epochs=1, test=False)
    original = load_checkpoint(run / "checkpoint_last.h5").history[0]
    for name in ("checkpoint_last.h5", "checkpoint_best.h5"):
        ck = load_checkpoint(run / name)
        ck.history = [{k: v for k, v in r.items() if k not in new_cols} for r in ck.history]
        ck.best_score = original["val_iou"]  # what the old rule stored
        save_checkpoint(run / name, ck)
    lines = []
    result = tiny_train(cache, run, epochs=2, resume=str(run), test=False, echo=lines.append)
    said = "\n".join(lines)
    assert "kept on an earlier nodulekit's rule" in said and "re-scored" in said
    last = load_checkpoint(run / "checkpoint_last.h5")
    first = last.history[0]
    for k in new_cols:  # the same model on the same slices: the same score
        assert first[k] == pytest.approx(original[k])
    expected = selection.select(last.history)
    assert result.best_epoch == expected and last.best_epoch == expected


def test_val_interval_validates_every_nth_epoch_and_the_last(tiny_data, tmp_path, monkeypatch):
    """--val-interval 2 over 5 epochs: epochs 2, 4 and 5 are validated, 1 and 3 are not
    (NaN columns, never kept as best, no validation pass run); the best is among the
    validated; the weights are those of a run validating every epoch; the plot is drawn."""
    script = iter([NOTHING, FOUND, NOTHING])
    real = selection.validation_columns
    calls = []

    def scripted(counts, loss, soft_dice=None):
        calls.append(1)
        return real(next(script), loss)

    monkeypatch.setattr(selection, "validation_columns", scripted)
    _, cache = tiny_data
    lines = []
    result = tiny_train(cache, tmp_path / "run", epochs=5, val_interval=2, test=False,
                        echo=lines.append)
    assert len(calls) == 3
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    validated = [r["epoch"] for r in rows if math.isfinite(r["val_loss"])]
    assert validated == [2, 4, 5]
    assert math.isnan(rows[0][selection.METRIC]) and math.isnan(rows[2]["val_peak_logit"])
    assert [r["best"] for r in rows] == [0, 1, 0, 1, 0]
    assert result.best_epoch == 4
    assert load_checkpoint(tmp_path / "run" / "checkpoint_best.h5").epoch == 4
    epoch_lines = [x for x in lines if x.startswith("epoch ")]
    assert "validated every 2 epochs" in epoch_lines[0] and "val loss" in epoch_lines[1]
    assert (tmp_path / "run" / "progress.png").stat().st_size > 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["config"]["val_interval"] == 2
    monkeypatch.setattr(selection, "validation_columns", real)
    every = tiny_train(cache, tmp_path / "every", epochs=5, test=False)
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "run" / "checkpoint_last.h5").params,
                                  load_checkpoint(tmp_path / "every" / "checkpoint_last.h5").params)
    assert every.config.val_interval == 1


def test_the_standard_error_is_the_per_slice_scores_spread_over_root_n():
    """Shown beside the score (metrics.csv, the epoch line), not selected on."""
    counts = np.array([[0, 5, 0], [6, 2, 4], [1, 0, 9], [0, 3, 7]])  # 3 nodule slices
    scores = np.array([12 / 18, 2 / 11, 0.0])
    row = selection.validation_columns(counts, 0.5)
    assert row[selection.METRIC] == pytest.approx(scores.mean())
    assert row[selection.SCORE_SE] == pytest.approx(scores.std(ddof=1) / math.sqrt(3))
    one_slice = selection.validation_columns(np.array([[0, 1, 0], [2, 0, 1]]), 0.5)
    assert math.isnan(one_slice[selection.SCORE_SE])  # one nodule slice: no spread
    assert selection.SCORE_SE in selection.VALIDATION_COLUMNS
