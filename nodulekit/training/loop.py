"""`nodulekit train`: the paper's protocol, from a cache to a run folder.

One epoch: the training loader's batches (nodule slices, plus `empty_fraction` of the empty
ones, shuffled and augmented from (seed, epoch)); each batch goes to the device as int16 HU,
is windowed and augmented there (`window_augment`), and takes one training step (forward,
sigmoid + Dice loss, backward, Adam). Then the whole validation split is run without
augmentation: validation loss, mean per-slice Dice and IoU, global Dice. The model with the
best validation mean IoU is kept (`checkpoint_best.h5`); `checkpoint_last.h5` is written after
every epoch. The run folder's files are described in `nodulekit.training.runfiles`.

Resuming (`resume=`) reloads checkpoint_last: parameters, Adam's moments and step, the epoch
and step counters, the best score, the metrics so far. The loader's plan for an epoch is a
function of (seed, epoch) alone and the model has no other randomness, so a run that is
killed and resumed ends with the same weights, bit for bit, as one that never stopped, as
long as the backend's arithmetic is itself deterministic. The tests check it on the CPU
with a tiny model; today the CPU backend adds a convolution's weight-gradient blocks in the
order its threads finish them, so with more blocks than threads two runs differ in the
last bits.

A NaN or Inf loss stops the run (`TrainingDiverged`) naming the epoch and step; nothing of
that epoch is saved, so checkpoint_last stays the last good one.

Data-parallel (`nodulekit.distributed`; `mpiexec -n N nodulekit train` or `--gpus N`):
rank 0 resolves the configuration (and reads a checkpoint to resume or fine-tune) and
sends it to the others; its weights (and Adam's moments) are broadcast. `batch_size` is the
global batch: rank r takes samples [r B/N, (r+1) B/N) of every global batch (the same
samples and augmentation as one process), the gradients are averaged in one all-reduce
per step and the step's losses in a second, tiny one, so every rank takes the same Adam
step and sees the same loss. Validation and the final test split are shared out by blocks
of batches and gathered. Only rank 0 prints and writes the run folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nodulekit.training.config import (
    DEMO_DEFAULTS,
    PAPER_DEFAULTS,
    TrainConfig,
    center_crop,
    lr_scale,
    resolve_size,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says where and which checkpoint is good."""


@dataclass
class TrainResult:
    out: Path
    config: TrainConfig
    history: list[dict]
    best_epoch: int
    best_score: float
    seconds: float
    test: dict | None = None
    test_path: Path | None = None
    messages: list[str] = field(default_factory=list)
    rank: int = 0  # this process's rank (data-parallel runs); only rank 0 writes the run
    ranks: int = 1


# Options that define what a run computes: they cannot change when it is resumed.
_FIXED_ON_RESUME = ("batch_size", "lr", "width", "depth", "size", "seed", "empty_fraction",
                    "finetune_from", "data", "precision", "smooth", "lr_scaling",
                    "bce_weight")


def train(data: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          width: int | None = None, depth: int | None = None, size: int | None = None,
          device: str = "auto", precision: str | None = None, seed: int | None = None,
          workers: int = 2, queue: int | None = None, empty_fraction: float | None = None,
          resume: str | os.PathLike | None = None,
          finetune_from: str | os.PathLike | None = None, smooth: float | None = None,
          lr_scaling: str | None = None, bce_weight: float | None = None,
          progress: bool = True, test: bool = True,
          echo=None, callback=None, comm=None) -> TrainResult:
    """Train a U-Net; see the module docstring. Options left None take the defaults of the
    data (the paper's for real data, `DEMO_DEFAULTS` for the embedded demo set).

    data: a cache (.h5), a data-set folder (preprocessed into the run folder first), or
        None for the embedded synthetic demo set.
    resume: a run folder (or its checkpoint_last.h5) to continue; only `epochs`, `device`,
        `workers`, `queue`, `progress` and `test` may be given anew.
    finetune_from: start from this checkpoint's weights (fresh Adam, epoch 0): the paper's
        second stage, with `empty_fraction=0.02`.
    echo: where printed lines go (default: stdout above the progress bar); every line
        also goes to the run's train.log.
    callback: called as callback(epoch, global_step) after every step (tests use it to
        interrupt a run).
    comm: the data-parallel communicator (`nodulekit.distributed`); None: found from
        the environment (one rank, unless an MPI launcher started this process). With N
        ranks the global batch `batch_size` is split evenly (B/N samples per rank), the
        gradients are averaged once per step, and only rank 0 writes the run folder.
    """
    from nodulekit import distributed

    t_start = time.perf_counter()
    own_comm = comm is None
    if own_comm:
        comm, _ = distributed.init(device)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "width": width,
             "depth": depth, "size": size, "seed": seed, "empty_fraction": empty_fraction,
             "finetune_from": finetune_from, "data": data, "precision": precision,
             "smooth": smooth, "lr_scaling": lr_scaling, "bce_weight": bce_weight}
    pre = _Buffered(echo)  # lines printed before the run folder (and its log) exists
    full_ckpt = None

    def setup():
        # rank 0 only (with several ranks): may generate the demo set or preprocess a folder
        nonlocal full_ckpt
        if resume is not None:
            config, ckpt = _resumed_config(resume, given, device=device, workers=workers,
                                           queue=queue)
            config.test_after = test
        else:
            config = _new_config(data, out=out, device=device, workers=workers, queue=queue,
                                 test=test, report=pre, progress=progress,
                                 **{k: v for k, v in given.items() if k != "data"})
            ckpt = None
        if comm.size > 1:
            distributed.check_global_batch(config.batch_size, comm.size)
        full_ckpt = ckpt
        return config, _without_arrays(ckpt)

    with distributed.abort_on_error(comm):
        return _run(comm, own_comm, setup, lambda: full_ckpt, pre, echo, progress, callback,
                    t_start)


def _run(comm, own_comm, setup, full_ckpt, pre, echo, progress, callback, t_start):
    from nodulekit import distributed
    from nodulekit.training.runfiles import Reporter

    root = comm.is_root
    config, ckpt = comm.share(setup)
    if root:
        ckpt = full_ckpt()  # the other ranks get the arrays by broadcast (_train)
    run = Path(config.out)
    if root:
        run.mkdir(parents=True, exist_ok=True)
        report = Reporter(run / "train.log", echo=echo)
        for when, line in pre.lines:
            report.log(line, when)
    else:
        report = Reporter(None, quiet=True)
        progress = False
    try:
        return _train(config, ckpt, report, progress, callback, t_start, comm)
    except TrainingDiverged as exc:
        if comm.size == 1:
            raise
        # every rank saw the same averaged loss: rank 0 says so, the others stop quietly
        if root:
            raise distributed.collective(exc) from None
        raise distributed.collective(distributed.PeerFailed(str(exc))) from None
    except KeyboardInterrupt:
        if not root:
            raise
        if (run / "checkpoint_last.h5").exists():
            report("interrupted; checkpoint_last.h5 holds the last finished epoch: continue "
                   f"with `nodulekit train --resume {run}`")
        else:
            report("interrupted before the first epoch finished; nothing to resume")
        raise
    finally:
        report.close()
        if own_comm:
            comm.close()


def _without_arrays(ckpt):
    """A checkpoint's metadata without its big arrays (sent to the other ranks, which get
    the parameters and Adam's moments by broadcast)."""
    if ckpt is None:
        return None
    import dataclasses

    adam = None if ckpt.adam is None else {k: v for k, v in ckpt.adam.items()
                                          if k not in ("m", "v")}
    return dataclasses.replace(ckpt, params=None, adam=adam)


class _Buffered:
    def __init__(self, echo):
        self.echo, self.lines = echo, []

    def __call__(self, message: str = "") -> None:
        self.lines.append((time.time(), message))
        if self.echo is not None:
            self.echo(message)
        else:
            from tqdm import tqdm

            tqdm.write(message)


# ----------------------------------------------------------------------------- configuration


def _new_config(data, *, out, device, workers, queue, test, report, progress, **opts):
    from nodulekit.data.cache import open_cache
    from nodulekit.engine import resolve_device

    if data is None:
        from nodulekit.training.demo import ensure_demo_cache

        kind, defaults = "demo", DEMO_DEFAULTS
        cache = ensure_demo_cache(report=report, progress=progress)
        name = "demo"
    else:
        path = Path(data)
        if path.is_dir():
            kind = "folder"
        elif path.is_file():
            kind = "cache"
        else:
            raise ValueError(f"{path}: no such cache file or data-set folder")
        defaults = PAPER_DEFAULTS
        cache = None
        name = path.stem if kind == "cache" else path.name
    if out is None:
        out = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out).absolute()
    if (out / "checkpoint_last.h5").exists():
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it, or "
                         "choose another --out")
    if kind == "folder":
        cache = out / "cache.h5"
        if not cache.is_file():
            from nodulekit.data.preprocess import preprocess

            out.mkdir(parents=True, exist_ok=True)
            report(f"preprocessing {data} into {cache}")
            report(preprocess(data, cache, progress=progress).format())
    elif kind == "cache":
        cache = Path(data)
    cache = Path(cache).absolute()

    o = {k: (defaults.get(k) if v is None else v) for k, v in opts.items()}
    finetune = o.pop("finetune_from")
    if finetune is not None:
        from nodulekit.training.checkpoint import load_checkpoint, resolve_checkpoint

        ft = load_checkpoint(resolve_checkpoint(finetune, prefer="best"))
        for key in ("width", "depth"):  # the architecture comes from the checkpoint
            stored = int(ft.config[key])
            if opts.get(key) is not None and int(opts[key]) != stored:
                raise ValueError(f"--{key} {opts[key]} differs from the fine-tuned "
                                 f"checkpoint's {stored} ({ft.path})")
            o[key] = stored
        finetune = str(ft.path.absolute())
    with open_cache(cache) as c:
        split = c.split("train")
        cache_shape = list(split.image_shape)
    image_shape = resolve_size(cache_shape, o.pop("size"), int(o["depth"]))
    backend, _ = resolve_device(device)
    config = TrainConfig(
        data="demo" if kind == "demo" else str(Path(data).absolute()), data_kind=kind,
        cache=str(cache), out=str(out), epochs=int(o["epochs"]),
        batch_size=int(o["batch_size"]), lr=float(o["lr"]), width=int(o["width"]),
        depth=int(o["depth"]), image_shape=image_shape, cache_shape=cache_shape,
        device=device, backend=backend, precision=o["precision"] or "fp32",
        seed=int(o["seed"] or 0), workers=int(workers), queue=queue,
        empty_fraction=float(o["empty_fraction"]), finetune_from=finetune, test_after=test,
        smooth=float(o["smooth"]), lr_scaling=str(o["lr_scaling"]),
        bce_weight=float(o["bce_weight"]))
    config.validate()
    return config


def _resumed_config(resume, given: dict, *, device, workers, queue):
    from nodulekit.training.checkpoint import load_checkpoint, resolve_checkpoint

    ckpt = load_checkpoint(resolve_checkpoint(resume, prefer="last"))
    config = TrainConfig.from_dict(ckpt.config)
    stored = config.to_dict()
    for key in _FIXED_ON_RESUME:
        value = given.get(key)
        if value is None:
            continue
        if key == "size":
            same = [int(value)] * 2 == config.image_shape
        elif key in ("data", "finetune_from"):
            same = stored[key] in (str(value), str(Path(value).absolute()))
        else:
            same = type(stored[key])(value) == stored[key] if stored[key] is not None else False
        if not same:
            raise ValueError(f"--resume continues the run as configured: {key} is "
                             f"{stored[key] if key != 'size' else config.image_shape}, "
                             f"cannot change it to {value}")
    if ckpt.adam is None:
        raise ValueError(f"{ckpt.path}: has no optimizer state, so it cannot be resumed "
                         "(use --finetune-from to start from its weights)")
    if given.get("epochs") is not None:
        config.epochs = int(given["epochs"])
    from nodulekit.engine import resolve_device

    config.device = device
    config.backend, _ = resolve_device(device)
    config.workers, config.queue = int(workers), queue
    config.out = str(ckpt.path.parent.absolute())
    return config, ckpt


# ----------------------------------------------------------------------------- the loop


def _train(config: TrainConfig, ckpt, report, progress: bool, callback, t_start,
           comm) -> TrainResult:
    from tqdm import tqdm

    from nodulekit.data.cache import open_cache
    from nodulekit.data.loader import train_loader
    from nodulekit.engine import get_backend, resolve_device
    from nodulekit.nn import Adam, UNet
    from nodulekit import distributed
    from nodulekit.training.checkpoint import load_checkpoint, model_from_checkpoint
    from nodulekit.evaluation.evaluate import _small, infer_split
    from nodulekit.evaluation.metrics import global_scores, slice_scores
    from nodulekit.training.runfiles import (
        device_description,
        plot_progress,
        versions,
        write_json,
        write_metrics_csv,
    )

    run = Path(config.out)
    root = comm.is_root
    # the data-parallel path: averaging (and the collectives) even for one NCCL/MPI rank
    dist = comm if comm.kind != "single" else None
    _, sentence = resolve_device(config.device)
    threads = None
    if comm.size > 1 or os.environ.get("NODULEKIT_THREADS"):
        threads = distributed.cpu_threads_per_rank(comm.local_size)
        distributed.limit_numba_threads(threads)
    be = get_backend(config.backend, config.precision, threads=threads)
    report(f"nodulekit train: run folder {run}")
    report(f"device: {sentence}; {device_description(be.name)}, {be.precision}")
    if dist is not None:
        report(f"data-parallel: {comm.describe()}; global batch {config.batch_size} = "
               f"{config.batch_size // comm.size} per rank"
               + (f"; {threads} CPU thread(s) per rank" if be.name == "cpu" else ""))

    if config.finetune_from and ckpt is None:
        if root:
            model = model_from_checkpoint(load_checkpoint(config.finetune_from), be)
        else:  # rank 0's weights come by broadcast below
            model = UNet(be, depth=config.depth, width=config.width,
                         in_channels=config.in_channels, seed=config.seed)
        report(f"fine-tuning from {config.finetune_from}")
    else:
        model = UNet(be, depth=config.depth, width=config.width,
                     in_channels=config.in_channels, seed=config.seed)
    opt = Adam(be, model.params, model.grads, lr=config.lr)
    scale = lr_scale(model.layout, config.lr_scaling)
    if scale is not None:
        scale = be.asarray(scale, dtype=be.dtype)
    start_epoch, global_step, history = 0, 0, []
    best_epoch, best_score = 0, -math.inf
    if ckpt is not None:
        if ckpt.params is not None:
            model.load_flat(ckpt.params)
            opt.load_state(ckpt.adam)
        else:  # another rank: the arrays come by broadcast below
            opt.step_count = int(ckpt.adam["step"])
        start_epoch, global_step = ckpt.epoch, ckpt.global_step
        history, best_epoch, best_score = list(ckpt.history), ckpt.best_epoch, ckpt.best_score
        report(f"resuming from {ckpt.path}: {ckpt.epoch} epoch(s), {ckpt.global_step} steps "
               f"done; best validation mean IoU {best_score:.4f} (epoch {best_epoch})")
    if dist is not None:  # every rank starts from rank 0's weights (and Adam state)
        dist.bcast(model.params)
        if ckpt is not None:
            dist.bcast(opt.m)
            dist.bcast(opt.v)
    fault = distributed.fault_hook(comm)

    cache = None
    error = None
    try:
        cache = open_cache(config.cache)
    except Exception as exc:
        error = exc
    comm.agree(error)  # e.g. a rank on another host without the cache
    loader = None
    try:
        n_val = len(cache.split("val")) if "val" in cache.splits else 0
        n_test = len(cache.split("test")) if "test" in cache.splits else 0
        loader = train_loader(cache, batch_size=config.batch_size,
                              empty_fraction=config.empty_fraction, seed=config.seed,
                              num_workers=config.workers, queue_size=config.queue,
                              in_memory=_small(cache, "train"))
        # each rank reads its B/N samples of every global batch
        distributed.shard_global_batches(loader, comm.rank, comm.size)
        if len(loader) == 0:
            raise ValueError(f"{config.cache}: {loader.samples_per_epoch} training samples "
                             f"per epoch, fewer than one batch of {config.batch_size}; "
                             "use a smaller --batch-size")
        crop = (", centre-cropped to " + "x".join(map(str, config.image_shape))
                if config.crop else "")
        report(f"data: {config.cache} ({'x'.join(map(str, config.cache_shape))}{crop}): "
               f"{loader.samples_per_epoch} training samples per epoch "
               f"({len(loader)} batches of {config.batch_size}), {n_val} validation and "
               f"{n_test} test slices")
        report(f"model: U-Net depth {config.depth} width {config.width}, "
               f"{model.num_parameters:,} parameters; Adam lr {config.lr:g}"
               f"{' scaled by fan-in' if scale is not None else ''}; Dice loss (smoothing "
               f"{config.smooth:g}){f' + {config.bce_weight:g} x BCE' if config.bce_weight else ''}"
               f"; {config.epochs} epochs; seed {config.seed}")
        if n_val == 0:
            report("warning: no validation slices; the last epoch counts as the best")
        if root:
            _write_config(run, config, be, device_description, versions, write_json, ckpt,
                          comm)

        center, width = config.window_center, config.window_width
        eval_bs = config.eval_batch_size or config.batch_size
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            losses, bces = [], []
            with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}",
                      unit="batch", leave=False, disable=not progress) as bar:
                for step_in_epoch, batch in enumerate(loader.epoch(epoch)):
                    hu, mask = center_crop(batch.hu, batch.mask, config.image_shape)
                    image, target = be.window_augment(be.asarray(hu), be.asarray(mask),
                                                      be.asarray(batch.aug), center, width)
                    comm.step = global_step + 1
                    dice_loss, bce = _step(model, opt, image, target, config.smooth, scale,
                                           config.bce_weight, dist)
                    loss, bce = float(be.to_host(dice_loss)), float(be.to_host(bce))
                    if dist is not None:  # the global batch's mean: every rank the same
                        loss, bce = (float(v) for v in dist.allreduce_mean_host([loss, bce]))
                    global_step += 1
                    if fault is not None:
                        fault(global_step)
                    if not (math.isfinite(loss) and math.isfinite(bce)):
                        what = (f"training loss became {loss}" if not math.isfinite(loss)
                                else f"BCE term became {bce}")
                        last = run / "checkpoint_last.h5"
                        kept = (f"{last} (after epoch {epoch})" if last.exists()
                                else "none (no epoch had completed)")
                        raise TrainingDiverged(
                            f"the {what} at epoch {epoch + 1}, step "
                            f"{step_in_epoch + 1} of {len(loader)} (global step {global_step});"
                            f" stopping. Last good checkpoint: {kept}. Try a lower --lr.")
                    losses.append(loss)
                    bces.append(bce)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if callback is not None:
                        callback(epoch, global_step)
            be.synchronize()
            train_seconds = time.perf_counter() - t0
            images = len(losses) * config.batch_size
            if dist is not None and comm.size > 1:
                _check_same_weights(dist, be, model, opt, epoch, report)

            row = {"epoch": epoch + 1, "step": global_step,
                   "train_loss": float(np.mean(losses)), "train_bce": float(np.mean(bces))}
            if n_val:
                val = infer_split(model, cache, "val", image_shape=config.image_shape,
                                  batch_size=eval_bs, workers=config.workers,
                                  queue=config.queue, window=(center, width),
                                  smooth=config.smooth, progress=progress,
                                  desc=f"validate {epoch + 1}", comm=dist)
                dice, iou = slice_scores(val.counts)
                row.update(val_loss=val.loss, val_dice=float(dice.mean()),
                           val_iou=float(iou.mean()),
                           val_global_dice=global_scores(val.counts)[0])
                score = row["val_iou"]
            else:
                row.update(val_loss=math.nan, val_dice=math.nan, val_iou=math.nan,
                           val_global_dice=math.nan)
                score = float(epoch + 1)
            seconds = time.perf_counter() - t0
            row.update(seconds=seconds, train_seconds=train_seconds,
                       images_per_s=images / train_seconds if train_seconds > 0 else math.nan)
            improved = score > best_score
            row["best"] = bool(improved)
            if improved:
                best_epoch, best_score = epoch + 1, score
            history.append(row)
            state = dict(params=be.to_host(model.params), layout=model.layout,
                         config=config.to_dict(), epoch=epoch + 1, global_step=global_step,
                         adam=opt.state(), history=history, best_epoch=best_epoch,
                         best_score=best_score,
                         rng={"model_seed": config.seed, "loader_seed": config.seed,
                              "next_epoch": epoch + 1})
            # Best first: killed between the two, the run resumes from the older "last"
            # and recomputes the same epoch, rewriting the same best.
            if root:
                if improved:
                    _save(run / "checkpoint_best.h5", state, "best")
                _save(run / "checkpoint_last.h5", state, "last")
                write_metrics_csv(run / "metrics.csv", history)
                plot_progress(run / "progress.png", history,
                              title=f"U-Net depth {config.depth} width {config.width}, "
                                    f"{Path(config.cache).name}")
            report(_epoch_line(row, config.epochs))
        seconds = time.perf_counter() - t_start
        report(f"trained {config.epochs} epochs in {seconds:.1f} s; best validation mean IoU "
               f"{best_score:.4f} at epoch {best_epoch} (checkpoint_best.h5)")
    finally:
        if loader is not None:
            loader.close()
        if cache is not None:
            cache.close()

    result = TrainResult(out=run, config=config, history=history, best_epoch=best_epoch,
                         best_score=best_score, seconds=seconds, rank=comm.rank,
                         ranks=comm.size)
    have_best = comm.bcast_object((run / "checkpoint_best.h5").exists() if root else None)
    if config.test_after and n_test and have_best:
        from nodulekit.evaluation.evaluate import evaluate, format_summary

        summary, path = evaluate(run / "checkpoint_best.h5", config.cache, split="test",
                                 out=run / "test", device=config.backend,
                                 precision=config.precision, workers=config.workers,
                                 progress=progress, report=report.log, comm=dist,
                                 threads=threads)
        result.test, result.test_path = summary, path
        report(format_summary(summary))
        report(f"wrote {path}")
        result.seconds = time.perf_counter() - t_start
        report(f"total {result.seconds:.1f} s")
    return result


def _step(model, opt, image, target, smooth: float, scale, bce_weight: float = 0.0,
          comm=None):
    """One training step. Returns (Dice loss, weighted BCE term), backend scalars, of this
    process's samples.

    The paper's step is forward, sigmoid + Dice loss, backward, Adam (`nn.training_step`).
    Two options of the demo change it, both off for real data by default:

    - bce_weight w > 0 adds w * mean_i sum_pixels BCE(sigmoid(z), t) to the loss: its
      gradient w / N * (p - t) never vanishes on a missed nodule pixel, unlike the Dice
      loss's (which carries p (1 - p)), so the net cannot settle into predicting nothing;
    - scale (`config.lr_scale`): Adam's step is scaled per parameter afterwards.

    comm (data-parallel): the flat gradient buffer is averaged over the ranks, in one
    all-reduce, between the backward pass and Adam.
    """
    import nodulekit.nn

    if scale is None and not bce_weight and comm is None:
        return nodulekit.nn.training_step(model, opt, image, target, smooth), 0.0
    be = model.backend
    xp = be.xp
    logits = model.forward(image)
    loss, _, dlogits = be.sigmoid_dice_loss(logits, target, smooth)
    bce = add_bce(be, logits, target, dlogits, bce_weight) if bce_weight else 0.0
    model.backward(dlogits)
    if comm is not None:
        comm.allreduce_mean(model.grads)
    if scale is None:
        opt.step()
        return loss, bce
    before = model.params.copy()
    opt.step()
    # params = before + scale * (Adam's step): the same as Adam with lr * scale per entry
    xp.subtract(model.params, before, out=model.params)
    xp.multiply(model.params, scale, out=model.params)
    xp.add(model.params, before, out=model.params)
    return loss, bce


def add_bce(be, logits, target, dlogits, weight: float):
    """Add the gradient of weight * mean_i sum_pixels BCE(sigmoid(z), t) to `dlogits` (in
    place) and return that term's value (a backend float64 scalar).

    BCE = softplus(z) - t z per pixel (stable for any z); its gradient is sigmoid(z) - t.
    """
    xp = be.xp
    n = logits.shape[0]
    t = target.astype(logits.dtype)
    p = 0.5 * (1.0 + xp.tanh(0.5 * logits))  # sigmoid without overflow
    dlogits += (p - t) * logits.dtype.type(weight / n)
    return (weight / n) * (xp.logaddexp(0.0, logits, dtype=xp.float64).sum()
                           - (t * logits).sum(dtype=xp.float64))


def _save(path: Path, state: dict, kind: str) -> None:
    from nodulekit.training.checkpoint import save_checkpoint

    save_checkpoint(path, kind=kind, **state)


def _epoch_line(row: dict, epochs: int) -> str:
    def f(v):
        return "  -   " if math.isnan(v) else f"{v:.4f}"

    return (f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f}  "
            f"val loss {f(row['val_loss'])}  Dice {f(row['val_dice'])}  "
            f"IoU {f(row['val_iou'])}  global Dice {f(row['val_global_dice'])}  "
            f"{row['seconds']:6.1f} s  {row['images_per_s']:6.1f} img/s"
            + ("  * best" if row["best"] else ""))


def _check_same_weights(comm, be, model, opt, epoch: int, report) -> None:
    """After each epoch: do all ranks still hold the same weights? They should, bit for bit
    (every rank adds the same averaged gradient); if an all-reduce ever gave the ranks
    different sums, say so and give every rank rank 0's weights and Adam state."""
    xp = be.xp
    mine = tuple(float(be.to_host(xp.sum(a, dtype=xp.float64)))
                 for a in (model.params, opt.m, opt.v))
    every = comm.allgather_object(mine)
    if all(f == every[0] for f in every):
        return
    report(f"warning: after epoch {epoch + 1} the ranks' weights differ (sums {every}); "
           "continuing from rank 0's")
    for a in (model.params, opt.m, opt.v):
        comm.bcast(a)


def _write_config(run: Path, config: TrainConfig, be, device_description, versions,
                  write_json, ckpt, comm=None) -> None:
    import json

    path = run / "config.json"
    previous = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    sessions = previous.get("sessions", [])
    sessions.append({"started": datetime.now().isoformat(timespec="seconds"),
                     "resumed_from_epoch": ckpt.epoch if ckpt is not None else None,
                     "device": device_description(be.name), "backend": be.name,
                     "precision": be.precision, "versions": versions(),
                     "ranks": comm.size if comm is not None else 1,
                     "communicator": comm.describe() if comm is not None else "one process"})
    write_json(path, {"config": config.to_dict(), "device": device_description(be.name),
                      "backend": be.name, "precision": be.precision, "versions": versions(),
                      "sessions": sessions})
