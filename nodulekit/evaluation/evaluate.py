"""Running a model over a split of a cache, and `nodulekit evaluate`'s summary.

`infer_split` runs the network over every slice of a split (no augmentation) at the slice's
own size (or a centre crop the caller asks for), padded with air to a multiple of 2**depth
and tiled where memory demands it (`nodulekit.inference.tiling`: the same logits as one
pass), and returns the per-slice confusion counts of the thresholded prediction (p > 0.5,
computed on the device by `Backend.confusion_counts`) and each slice's soft Dice (for the
validation loss); asked (`predictions=True`: evaluate, and validation for its peak
filter), also each slice's predicted pixels, sparse: their flat indices, probabilities,
logits and truth (`SlicePrediction`).
`evaluate` loads a checkpoint, runs `infer_split`, applies the checkpoint's peak filter
(`nodulekit.inference.peak_filter`, `--min-peak`: every number below is of the filtered
prediction, as predict writes it), and writes ``summary.json``: per-slice
Dice and IoU (a slice with empty truth and empty prediction scores 1, the paper's
convention), their means, the Dice in two more conventions (over the nodule slices only,
MONAI's default; with smoothing 1 inside the metric, the paper's code), the empty-slice
false-positive rate, the global Dice, the counts, and the table by nodule diameter
(`nodulekit.evaluation.metrics`); and ``table.csv``, that table with every column. Its
"nodules" section scores whole scans: truth nodules detected by diameter bin, false
positives per scan, FROC and CPM (`nodulekit.evaluation.detection`), with ``nodules.csv``
(one row per scan) and ``froc.png`` beside it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nodulekit.evaluation import metrics
from nodulekit.inference import tiling, writers
from nodulekit.nn.inputs import center_crop


class SlicePrediction(NamedTuple):
    """One slice's predicted pixels (logit > 0, i.e. p > 0.5): few, so kept sparse."""

    pixels: np.ndarray  # int32 [P]: flat indices into the slice's H x W, ascending
    probability: np.ndarray  # float64 [P]: sigmoid(logit) of those pixels
    logit: np.ndarray | None = None  # float32 [P]: their logits (for the peak filter)
    truth: np.ndarray | None = None  # bool [P]: whether each is a nodule pixel of the truth


@dataclass
class SplitResult:
    counts: np.ndarray  # int64 [N, 3]: tp, fp, fn per slice, in cache row order
    soft_dice: np.ndarray  # float64 [N]: the loss's per-slice Dice (smoothing included)
    rows: np.ndarray  # int64 [N]: cache rows
    seconds: float  # wall time of the pass (reading included)
    predictions: list[SlicePrediction] | None = None  # [N], when infer_split was asked

    @property
    def loss(self) -> float:
        """Mean Dice loss over the slices (what training minimises), NaN for no slice."""
        return float(np.mean(1.0 - self.soft_dice)) if len(self.soft_dice) else float("nan")


@dataclass(frozen=True)
class InferSettings:
    """How a split is run through the model (the same for validation and `evaluate`)."""

    image_shape: tuple[int, int] | None = None  # centre-crop to this (None: whole slices)
    batch_size: int = 8
    workers: int = 2  # loader threads
    queue: int | None = None  # batches read ahead
    window: tuple[float, float] = (-500.0, 1600.0)  # HU window (center, width)
    smooth: float = 1.0  # the loss's smoothing, for the validation loss
    in_memory: bool | None = None  # read the split into RAM once (None: if it is small)
    tile: str | int = "auto"  # "auto" (tile over the memory budget), "off", or a tile size
    memory_budget: int | None = None  # bytes for one forward pass (None: tiling's default)




def infer_split(model, cache, split: str, settings: InferSettings = InferSettings(), *,
                progress: bool = False, desc: str = "", comm=None,
                predictions: bool = False) -> SplitResult:
    """The model over every slice of `split`; see the module docstring.

    cache: a path or an open `nodulekit.data.cache.Cache`.
    predictions: also keep each slice's predicted pixels (`SplitResult.predictions`; only
    those pixels leave the device).
    comm: data-parallel ranks (`nodulekit.distributed`): each takes a contiguous
    block of the batches, and every rank gets the whole result back (the same batches as
    one process, so the same numbers). Every rank must call this.
    """
    from tqdm import tqdm

    from nodulekit.data.loader import eval_loader, fits_in_memory

    be = model.backend
    in_memory = settings.in_memory
    context = (int(model.in_channels) - 1) // 2  # slices below and above as channels
    loader = eval_loader(cache, split, batch_size=settings.batch_size,
                         num_workers=settings.workers, queue_size=settings.queue,
                         in_memory=fits_in_memory(cache, split) if in_memory is None
                         else in_memory, **({"context_slices": context} if context else {}))
    sharded = comm is not None and comm.size > 1
    batches = len(loader)
    if sharded:
        from nodulekit.distributed import shard_batches

        loader, batches = shard_batches(loader, comm.rank, comm.size)
    counts, soft, rows = [], [], []
    predicted: list[SlicePrediction] = []
    t0 = time.perf_counter()
    try:
        shape = (loader.split.image_shape if settings.image_shape is None
                 else tuple(settings.image_shape))
        with tqdm(total=batches, desc=desc or split, unit="batch", leave=False,
                  disable=not progress) as bar:
            for batch in loader.epoch(0):
                hu, mask = center_crop(batch.hu, batch.mask, shape)
                logits, target, _ = tiling.run_hu(model, hu, mask, settings.window,
                                                  settings.tile, settings.memory_budget)
                counts.append(be.to_host(be.confusion_counts(logits, target)))
                _, dice, _ = be.sigmoid_dice_loss(logits, target, settings.smooth)
                soft.append(be.to_host(dice))
                if predictions:
                    predicted.extend(sparse_predictions(be, logits, target))
                rows.append(batch.index)
                bar.update(1)
        be.synchronize()
    finally:
        loader.close()
    if sharded:  # rank order is cache order: each rank had a contiguous block
        parts = comm.allgather_object((counts, soft, rows, predicted))
        counts = [c for part in parts for c in part[0]]
        soft = [d for part in parts for d in part[1]]
        rows = [r for part in parts for r in part[2]]
        predicted = [p for part in parts for p in part[3]]
    kept = predicted if predictions else None
    if counts:
        return SplitResult(np.concatenate(counts).astype(np.int64),
                           np.concatenate(soft).astype(np.float64), np.concatenate(rows),
                           time.perf_counter() - t0, kept)
    return SplitResult(np.zeros((0, 3), np.int64), np.zeros(0), np.zeros(0, np.int64),
                       time.perf_counter() - t0, kept)


def sparse_predictions(be, logits, target=None) -> list[SlicePrediction]:
    """Each slice's pixels with logit > 0 (p > 0.5, as `confusion_counts` thresholds) from
    logits [N, H, W, 1] on the backend: found there, so only those pixels, their logits and
    (given the target [N, H, W, 1]) their truth come to the host."""
    n = int(logits.shape[0])
    flat = logits.reshape(n, -1)
    slice_of, pixel = be.xp.nonzero(flat > 0)  # row-major: by slice, pixels ascending
    values = be.to_host(flat[slice_of, pixel]).astype(np.float32, copy=False)
    truth = (None if target is None
             else be.to_host(target.reshape(n, -1)[slice_of, pixel]) > 0)
    slice_of, pixel = be.to_host(slice_of), be.to_host(pixel).astype(np.int32)
    # float64: in float32 confident candidates would tie at p = 1.0 in the FROC's ranking
    probability = writers.probability(values)
    bounds = np.searchsorted(slice_of, np.arange(1, n))
    truths = [None] * n if truth is None else np.split(truth, bounds)
    return [SlicePrediction(i, p, z, t) for i, p, z, t in zip(
        np.split(pixel, bounds), np.split(probability, bounds), np.split(values, bounds),
        truths, strict=True)]


def component_stats(result: SplitResult, image_shape) -> list:
    """Each slice's predicted 2-D components (`peak_filter.ComponentStats`: peak logit,
    pixels on and off the truth), from a result inferred with its predictions."""
    from nodulekit.inference import peak_filter

    if result.predictions is None:
        raise ValueError("the split was inferred without its predictions")
    return [peak_filter.slice_stats(p.pixels, p.logit, p.truth, image_shape)
            for p in result.predictions]


def apply_peak_filter(result: SplitResult, image_shape, min_peak_logit: float | None):
    """(the result with the components below the peak threshold removed: its counts and
    predictions, number of components dropped); None leaves it as it is."""
    import dataclasses

    from nodulekit.inference import peak_filter

    if min_peak_logit is None or result.predictions is None:
        return result, 0
    kept_predictions, stats, dropped = [], [], 0
    for p in result.predictions:  # each slice's components labelled once
        label_of, s = peak_filter.slice_components(p.pixels, p.logit, p.truth, image_shape)
        kept = s.peak >= min_peak_logit
        dropped += int((~kept).sum())
        keep = kept[label_of]
        kept_predictions.append(SlicePrediction(*(None if v is None else v[keep] for v in p)))
        stats.append(s)
    truth = result.counts[:, 0] + result.counts[:, 2]
    counts = peak_filter.filtered_counts(stats, truth, min_peak_logit)
    return dataclasses.replace(result, counts=counts, predictions=kept_predictions), dropped


def split_summary(result: SplitResult, split_meta: dict) -> dict:
    """summary.json's numbers: overall, nodule slices, per diameter bin, and per slice."""
    rows = result.rows
    bins = metrics.slice_bins(split_meta["max_diameter_mm"][rows])
    out = metrics.summarize(result.counts, bins)
    dice, iou = metrics.slice_scores(result.counts)
    dice_s1 = metrics.slice_dice_s1(result.counts)
    per_slice = []
    for j, r in enumerate(rows.tolist()):
        tp, fp, fn = (int(v) for v in result.counts[j])
        per_slice.append({
            "row": r, "patient": str(split_meta["patient"][r]), "exam": str(split_meta["exam"][r]),
            "slice": int(split_meta["slice"][r]), "source": str(split_meta["source"][r]),
            "bin": bins[j], "max_diameter_mm": _num(split_meta["max_diameter_mm"][r]),
            "tp": tp, "fp": fp, "fn": fn, "dice": float(dice[j]), "iou": float(iou[j]),
            "dice_s1": float(dice_s1[j])})
    out["slices"] = per_slice
    out["loss"] = result.loss
    return out


def _num(v):
    v = float(v)
    return None if np.isnan(v) else v


@dataclass(frozen=True)
class EvaluateOptions:
    """What `nodulekit evaluate` is asked (the CLI builds one; training's test uses one)."""

    checkpoint: str | os.PathLike  # a checkpoint, or a run folder (its best checkpoint)
    data: str | os.PathLike | None = None  # a cache or a folder; None: the run's own data
    split: str = "test"
    out: str | os.PathLike | None = None  # summary.json's folder (default <run>/evaluate-<split>)
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None  # default: the run's
    size: int | None = None  # centre-crop to size x size (default: whole slices)
    tile: str | int = "auto"  # whole slices, or tiles where memory demands (see InferSettings)
    workers: int = 2
    progress: bool = True
    threads: int | None = None  # the CPU backend's threads (default: one per core)
    min_peak: str = "model"  # the peak filter: the checkpoint's, "off", or a probability


def evaluate(options: EvaluateOptions, *, report=print, comm=None) -> tuple[dict, Path]:
    """Evaluate a checkpoint (or a run folder's best one) on a split; write summary.json,
    table.csv, nodules.csv and froc.png.

    A data-set folder is preprocessed into the output folder first.
    comm: data-parallel ranks, all calling this: rank 0 reads the checkpoint and sends it
    to the others, each infers a share of the slices, rank 0 writes summary.json.
    Returns (summary, path of summary.json).
    """
    from nodulekit.data.cache import open_cache
    from nodulekit.engine import get_backend, resolve_device
    from nodulekit.evaluation import detection, exams
    from nodulekit.inference import peak_filter
    from nodulekit.training.checkpoint import model_from_checkpoint
    from nodulekit.training.runfiles import write_json

    o = options
    root = comm is None or comm.is_root
    progress = o.progress and root
    if not root:
        report = _silent
    prepare = functools.partial(_prepare, o, report, progress)  # rank 0's part
    ckpt_path, ckpt, out, cache = prepare() if comm is None else comm.share(prepare)
    backend_name, sentence = resolve_device(o.device)
    report(sentence)
    be = get_backend(backend_name, o.precision, threads=o.threads)
    model = model_from_checkpoint(ckpt, be)
    min_peak, words = peak_filter.resolve(o.min_peak, ckpt.history, ckpt.epoch)
    report(words)
    with open_cache(cache) as c:
        s = c.split(o.split)
        if len(s) == 0:
            raise ValueError(f"{cache}: split {o.split!r} has no slices")
        settings = _settings(o, ckpt.config, s.image_shape)
        _check_spacing(ckpt.config.get("spacing_mm"), c.attrs.get("spacing_mm"), cache, report)
        shape = settings.image_shape
        how = _describe_inference(model, shape, settings)
        report(f"evaluating {ckpt_path} (epoch {ckpt.epoch}) on {cache} [{o.split}]: "
               f"{len(s)} slices at {shape[0]}x{shape[1]}"
               + (f" ({how})" if how != "whole slices" else ""))
        result = infer_split(model, c, o.split, settings, progress=progress, comm=comm,
                             predictions=True)
        result, dropped = apply_peak_filter(result, shape, min_peak)
        summary = split_summary(result, s.meta)
        t0 = time.perf_counter()
        nodules = detection.summarize(exams.scan_results(s, result, shape))
        nodules["seconds"] = time.perf_counter() - t0
    summary = {
        "checkpoint": str(ckpt_path.resolve()), "checkpoint_epoch": ckpt.epoch,
        "data": str(Path(cache).resolve()), "split": o.split, "image_shape": list(shape),
        "device": be.name, "precision": be.precision,
        "threshold": "p > 0.5 (logit > 0)",
        "peak_filter": {"min_peak_logit": min_peak,
                        "min_peak_probability": (None if min_peak is None else
                                                 peak_filter.probability_of(min_peak)),
                        "components_dropped": dropped, "how": words},
        "convention": "per-slice Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN); a slice with "
                      "empty truth and empty prediction scores 1; global = on summed counts",
        "dice_conventions": DICE_CONVENTIONS,
        "inference": how,
        "seconds": result.seconds,
        "seconds_per_image": result.seconds / max(1, len(result.rows)),
        **summary,
        "nodules": nodules,
    }
    if comm is not None and comm.size > 1:
        summary["ranks"] = comm.size
    path = out / "summary.json"
    if root:
        write_json(path, summary)
        write_table_csv(out / "table.csv", summary)
        detection.write_csv(out / "nodules.csv", nodules)
        detection.write_froc_png(out / "froc.png", nodules)
    return summary, path


DICE_CONVENTIONS = {
    "mean_dice": "per slice 2TP/(2TP+FP+FN), empty truth and empty prediction = 1, mean over "
                 "the slices (nodulekit's; MONAI DiceMetric ignore_empty=False)",
    "mean_dice_nodule": "the same Dice, mean over the slices whose truth has a nodule pixel "
                        "only (MONAI DiceMetric's default, ignore_empty=True); predicting "
                        "nothing scores 0",
    "mean_dice_s1": "per slice (2TP+1)/(2TP+FP+FN+1), smoothing 1 inside the metric, mean "
                    "over the slices (the paper's code: UC4_pipeline Evaluator."
                    "DiceCoefficient); one stray pixel on an empty slice scores 0.5",
    "empty_fp_rate": "fraction of the slices with empty truth that have a predicted pixel",
}
TABLE_COLUMNS = ("group", "slices", "mean_dice", "mean_dice_nodule", "mean_dice_s1",
                 "mean_iou", "global_dice", "global_iou", "tp", "fp", "fn", "nonempty_slices",
                 "empty_slices", "empty_fp_slices", "empty_fp_rate")


def table_rows(summary: dict) -> list[dict]:
    """The per-diameter table's rows (each bin, empty, with nodule, all) with every column."""
    groups = [(label if label == metrics.EMPTY_LABEL else f"nodule {label}",
               summary["by_diameter"][label]) for label in metrics.TABLE_ROWS]
    groups += [("with nodule", summary["nodule_slices"]), ("all", summary["all"])]
    return [{"group": name, **{k: g.get(k, "") for k in TABLE_COLUMNS[1:]}}
            for name, g in groups]


def write_table_csv(path: Path, summary: dict) -> None:
    """table.csv: `table_rows`, floats with 6 significant digits, NaN as "nan"."""
    from nodulekit.training.runfiles import write_text_atomic

    def cell(v):
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.6g}"
        return str(v)

    lines = [",".join(TABLE_COLUMNS)]
    lines += [",".join(cell(r[k]) for k in TABLE_COLUMNS) for r in table_rows(summary)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _describe_inference(model, shape, settings: InferSettings) -> str:
    """How the slices go through the network: "whole slices", or what padding and tiling
    they take."""
    padded = tiling.padded_shape(shape, model.depth)
    what = []
    if tuple(padded) != tuple(shape):
        what.append(f"padded with air to {padded[0]}x{padded[1]}")
    how = tiling.plan(model, (settings.batch_size, *padded), settings.tile,
                      settings.memory_budget)
    if how.tile is not None:
        what.append(how.describe())
    elif how.slices_per_pass < settings.batch_size:
        what.append(f"{how.slices_per_pass} slice(s) per pass (memory)")
    return "; ".join(what) if what else "whole slices"


def _check_spacing(trained, cache_mm, cache, report) -> None:
    """Say so where the cache's pixels are not the ones the model trained at (`preprocess
    --spacing`): the numbers are then of a model run off its scale."""
    def mm(v):
        return None if v is None or not np.isfinite(float(v)) else float(v)

    trained, cache_mm = mm(trained), mm(cache_mm)
    if trained == cache_mm or (trained and cache_mm and abs(trained - cache_mm) < 1e-6):
        return
    def pixels(v):
        return "native pixels" if v is None else f"{v:g} mm pixels"

    report(f"warning: the model trained at {pixels(trained)}, {cache} holds "
           f"{pixels(cache_mm)}: preprocess the data as the training cache was "
           "(`preprocess --spacing`) for comparable numbers")


def _silent(*_args, **_kwargs) -> None:
    pass


def _prepare(o: EvaluateOptions, report, progress: bool):
    """(checkpoint path, checkpoint without optimizer state, output folder, cache path)."""
    import dataclasses

    from nodulekit.training.checkpoint import load_checkpoint, resolve_checkpoint

    _check_options(o)
    ckpt_path = resolve_checkpoint(o.checkpoint, prefer="best")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.warning:
        report(f"warning: {ckpt.warning}")
    where = Path(o.out) if o.out is not None else ckpt_path.parent / f"evaluate-{o.split}"
    where.mkdir(parents=True, exist_ok=True)
    cache = resolve_eval_data(o.data, ckpt.config, where, report=report, progress=progress)
    return ckpt_path, dataclasses.replace(ckpt, adam=None), where, cache


def _check_options(o: EvaluateOptions) -> None:
    problems = []
    if o.batch_size is not None and o.batch_size < 1:
        problems.append(f"batch size must be >= 1, got {o.batch_size}")
    if o.size is not None and o.size < 1:
        problems.append(f"size must be >= 1, got {o.size}")
    try:
        tiling.parse_tile(o.tile)
    except ValueError as e:
        problems.append(str(e))
    try:
        from nodulekit.inference import peak_filter

        peak_filter.parse_option(o.min_peak)
    except ValueError as e:
        problems.append(str(e))
    if o.workers < 0:
        problems.append(f"workers must be >= 0, got {o.workers}")
    if problems:
        raise ValueError("; ".join(problems))


def _settings(o: EvaluateOptions, cfg: dict, slice_shape) -> InferSettings:
    """The run's window, smoothing and batch size, unless the options say otherwise."""
    return InferSettings(
        image_shape=crop_shape(slice_shape, o.size),
        batch_size=o.batch_size or int(cfg.get("eval_batch_size") or cfg.get("batch_size")
                                       or 8),
        workers=o.workers,
        window=(float(cfg.get("window_center", -500.0)), float(cfg.get("window_width", 1600.0))),
        smooth=float(cfg.get("smooth", 1.0)), tile=tiling.parse_tile(o.tile))


def crop_shape(slice_shape, size: int | None) -> tuple[int, int]:
    """The slices' own (H, W), or a centre crop of them to size x size (any size: the
    network's input is padded to a multiple of 2**depth). Resizing is not done."""
    h, w = (int(v) for v in slice_shape)
    if size is None:
        return h, w
    if size > h or size > w:
        raise ValueError(f"--size {size} is larger than the {h}x{w} slices; evaluate crops "
                         "but does not resize")
    return int(size), int(size)


def resolve_eval_data(data, config: dict, out: Path, report=print, progress=True) -> Path:
    """A cache path for evaluation: DATA as given (a folder is preprocessed into `out`, at
    the run's pixel size where it trained on a resampled one), or the cache the run
    trained on."""
    if data is None:
        cache = config.get("cache")
        if not cache or not Path(cache).is_file():
            raise ValueError(f"no DATA given and the run's cache {cache!r} is not there; name "
                             "a cache (.h5) or a data-set folder")
        return Path(cache)
    data = Path(data)
    if data.is_dir():  # the cache there is reused only while it records this folder as it is
        from nodulekit.data.fingerprint import cache_for_folder

        # at the pixel size the model trained at (`preprocess --spacing`), if it had one
        return cache_for_folder(data, out / "cache.h5", report=report, progress=progress,
                                exclude=out, spacing=config.get("spacing_mm"))
    if not data.is_file():
        raise ValueError(f"{data}: no such file or folder")
    return data


def format_summary(summary: dict) -> str:
    a = summary["all"]
    head = (f"{summary['split']} split of {summary['data']}: {a['slices']} slices, "
            f"checkpoint epoch {summary['checkpoint_epoch']}, "
            f"{summary['seconds_per_image'] * 1e3:.1f} ms per image on {summary['device']}")
    table = metrics.format_table(summary)
    tail = (f"mean IoU {a['mean_iou']:.4f} (per slice, empty-empty = 1)   global Dice "
            f"{a['global_dice']:.4f} (summed counts)")
    lines = [head, table, metrics.format_conventions(a), tail]
    if summary.get("nodules"):  # a summary.json from before the nodule-level results has none
        from nodulekit.evaluation.detection import format_nodules

        lines.append(format_nodules(summary["nodules"]))
    return "\n".join(lines)
