"""`nodulekit train`: the paper's protocol, from a cache to a run folder.

The loop, as `Training.run` reads:

    for each epoch:
        train_epoch   the training loader's batches (nodule slices, plus `empty_fraction` of
                      the empty ones, shuffled and augmented from (seed, epoch)); each goes to
                      the device as int16 HU, is windowed and augmented there
                      (`window_augment`) and takes one `nn.TrainStep`
        validate      the whole validation split, whole slices, no augmentation: validation
                      loss, mean per-slice Dice and IoU, global Dice, the nodule-slice mean
                      Dice and the empty-slice false-positive rate (after every
                      `val_interval`-th epoch and the last; of the weights' moving average
                      with `weight_ema`, `nn.ema`)
        save          checkpoint_best.h5 when the epoch finds a validation nodule
                      (`nodulekit.evaluation.selection`: the latest that does is kept),
                      checkpoint_last.h5, metrics.csv, progress.png
    test              the best model on the test split (`nodulekit.evaluation`)

The run folder's files are described in `nodulekit.training.runfiles`.

Resuming (`TrainOptions.resume`) reloads checkpoint_last: parameters, Adam's moments and
step, the epoch and step counters, the best score, the metrics so far. The loader's plan for
an epoch is a function of (seed, epoch) alone and the model has no other randomness, so a
run that is killed and resumed ends with the same weights, bit for bit, as one that never
stopped, as long as the backend's arithmetic is itself deterministic. The CPU backend's is,
for any thread count (`engine/cpu.py` splits every sum the same way whatever its threads
do); the tests check it with a real SIGKILL.

A NaN or Inf loss stops the run (`TrainingDiverged`) naming the epoch and step; nothing of
that epoch is saved, so checkpoint_last stays the last good one. So does a file of the run
folder that cannot be written (a full disk: `WriteFailed`, one line naming the file, the
cause and the epoch checkpoint_last.h5 still holds).

The run folder has one writer: rank 0 locks it (`nodulekit.training.runlock`) before it
reads or writes anything there, removes the temporary files a killed session left, and
releases it when the session ends; a new run that stops before its first checkpoint removes
what it wrote there (a failed start leaves no empty run folder).

Data-parallel (`nodulekit.distributed`; `mpiexec -n N nodulekit train` or `--gpus N`): rank 0
resolves the configuration (and reads a checkpoint to resume or fine-tune) and sends it to
the others; its weights (and Adam's moments) are broadcast. `batch_size` is the global batch:
rank r takes samples [r B/N, (r+1) B/N) of every global batch (the same samples and
augmentation as one process), the gradients are averaged in one all-reduce per step and the
step's losses in a second, tiny one, so every rank takes the same Adam step and sees the same
loss. Validation and the final test split are shared out by blocks of batches and gathered.
Only rank 0 prints and writes the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nodulekit import distributed
from nodulekit.nn.inputs import window_input
from nodulekit.nn.optim import scheduled_lr
from nodulekit.training import warmup
from nodulekit.training.config import TrainConfig, TrainOptions


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says where and which checkpoint is good."""


class WriteFailed(OSError):
    """A file of the run folder could not be written (a full disk, ...); the message names
    it, the cause, and the epoch that checkpoint_last.h5 still holds."""


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


def train(options: TrainOptions | None = None, *, echo=None, callback=None, comm=None,
          **fields) -> TrainResult:
    """Train a U-Net as `options` (or `TrainOptions(**fields)`) asks; see the module
    docstring and `TrainOptions`.

    echo: where printed lines go (default: stdout above the progress bar); every line also
        goes to the run's train.log.
    callback: called as callback(epoch, global_step) after every step (tests use it to
        interrupt a run).
    comm: the data-parallel communicator (`nodulekit.distributed`); None: found from the
        environment (one rank, unless an MPI launcher started this process).
    """
    if options is None:
        options = TrainOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    t_start = time.perf_counter()
    own_comm = comm is None
    if own_comm:
        comm, _ = distributed.init(options.device)
    early = _Buffered(echo)  # lines printed before the run folder (and its log) exists
    held = {}

    def claim(folder: Path) -> None:  # rank 0: lock the run folder for this session
        from nodulekit.training.runlock import RunLock

        held["lock"] = lock = RunLock.acquire(folder)
        removed = lock.clean_stale_partials()
        if removed:
            early(f"removed {len(removed)} temporary file(s) that a stopped session left in "
                  f"{folder}: {', '.join(sorted(removed))}")

    def setup():  # rank 0 only: may generate the demo set or preprocess a folder
        from nodulekit.training.setup import resolve

        config, ckpt = resolve(options, early, options.progress, claim=claim)
        if comm.size > 1:
            distributed.check_global_batch(config.batch_size, comm.size)
        held["ckpt"] = ckpt
        return config, _without_arrays(ckpt)

    with distributed.abort_on_error(comm):
        try:
            config, ckpt = comm.share(setup)
            if comm.is_root:  # the other ranks get the arrays by broadcast
                ckpt = held["ckpt"]
            report = _reporter(config, comm, early, echo)
            try:
                session = Training(config, ckpt, comm, report,
                                   progress=options.progress and comm.is_root,
                                   callback=callback)
                result = session.run(t_start)
            finally:
                report.close()
        finally:
            lock = held.pop("lock", None)
            if lock is not None:
                lock.release(new_run=options.resume is None)
            if own_comm:
                comm.close()
    return result


def build_step(config: TrainConfig, be, model, comm=None):
    """(Adam, TrainStep) of the run's configuration for `model` on backend `be`."""
    from nodulekit.nn import Adam, TrainStep, lr_scale

    optimizer = Adam(be, model.params, model.grads, lr=config.lr)
    scale = lr_scale(model.layout, config.lr_scaling)
    if scale is not None:
        scale = be.asarray(scale, dtype=be.dtype)
    step = TrainStep(model, optimizer, smooth=config.smooth, bce_weight=config.bce_weight,
                     nodule_dice_weight=config.nodule_dice_weight,
                     nodule_bce_weight=config.nodule_bce_weight,
                     lr_scale=scale, comm=comm, dice=config.dice)
    return optimizer, step


def _reporter(config: TrainConfig, comm, early: _Buffered, echo):
    from nodulekit.training.runfiles import Reporter

    if not comm.is_root:
        return Reporter(None, quiet=True)
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    report = Reporter(run / "train.log", echo=echo)
    for when, line in early.lines:
        report.log(line, when)
    return report


def _without_arrays(ckpt):
    """A checkpoint's metadata without its big arrays (sent to the other ranks, which get
    the parameters and Adam's moments by broadcast)."""
    if ckpt is None:
        return None
    adam = None if ckpt.adam is None else {k: v for k, v in ckpt.adam.items()
                                          if k not in ("m", "v")}
    return dataclasses.replace(ckpt, params=None, adam=adam, buffers=None, ema_params=None,
                               ema_buffers=None)


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


class Training:
    """One session of a run: the backend, model, optimizer and step it trains with, the
    counters and history it continues, and the epoch loop (`run`)."""

    def __init__(self, config: TrainConfig, ckpt, comm, report, *, progress: bool,
                 callback=None):
        self.config, self.comm, self.report = config, comm, report
        self.progress, self.callback = progress, callback
        self.run_dir = Path(config.out)
        # the data-parallel path: averaging (and the collectives) even for one NCCL/MPI rank
        self.dist = comm if comm.kind != "single" else None
        self.threads = None
        self.backend = self._backend()
        self.model = self._model(ckpt)
        self.optimizer, self.step = self._optimizer_and_step()
        self.epoch, self.global_step, self.history = 0, 0, []
        self.best_epoch, self.best_score = 0, -math.inf
        self.best_key, self.rescore_best = None, False  # `nodulekit.evaluation.selection`
        if ckpt is not None:
            self._continue_from(ckpt)
        if self.dist is not None:  # every rank starts from rank 0's weights (and Adam state)
            self.dist.bcast(self.model.params)
            if self.model.buffers.size:  # batch norm's running statistics
                self.dist.bcast(self.model.buffers)
            if ckpt is not None:
                self.dist.bcast(self.optimizer.m)
                self.dist.bcast(self.optimizer.v)
        self.ema = self._weight_average(ckpt)
        self.resumed_from = ckpt.epoch if ckpt is not None else None
        self.session_seconds: list[float] = []  # each epoch of this session, validation in
        self.saved_epoch = self.epoch  # what checkpoint_last.h5 holds
        self.fault = distributed.fault_hook(comm)
        self.cache = self.loader = None

    # ------------------------------------------------------------------ setting up

    def _backend(self):
        from nodulekit.engine import get_backend, resolve_device
        from nodulekit.training.runfiles import device_description

        config, comm = self.config, self.comm
        _, sentence = resolve_device(config.device)
        if comm.size > 1 or os.environ.get("NODULEKIT_THREADS"):
            self.threads = distributed.cpu_threads_per_rank(comm.local_size)
            distributed.limit_numba_threads(self.threads)
        be = get_backend(config.backend, config.precision, threads=self.threads)
        self.report(f"nodulekit train: run folder {self.run_dir}")
        self.report(f"device: {sentence}; {device_description(be.name)}, {be.precision}")
        if self.dist is not None:
            self.report(f"data-parallel: {comm.describe()}; global batch {config.batch_size} = "
                        f"{config.batch_size // comm.size} per rank"
                        + (f"; {self.threads} CPU thread(s) per rank" if be.name == "cpu"
                           else ""))
        return be

    def _model(self, ckpt):
        from nodulekit.nn import UNet
        from nodulekit.training.checkpoint import load_checkpoint, model_from_checkpoint

        config = self.config
        if config.finetune_from and ckpt is None:
            self.report(f"fine-tuning from {config.finetune_from}")
            if self.comm.is_root:
                return model_from_checkpoint(load_checkpoint(config.finetune_from),
                                             self.backend)
            # the other ranks: rank 0's weights come by broadcast
        return UNet(self.backend, depth=config.depth, width=config.width,
                    in_channels=config.in_channels, seed=config.seed, norm=config.norm,
                    head_prior=config.head_prior)

    def _optimizer_and_step(self):
        return build_step(self.config, self.backend, self.model, self.dist)

    def _weight_average(self, ckpt):
        """The weight average (`nn.ema`) when the run keeps one: a copy of the (broadcast)
        weights, or on resume the checkpoint's (rank 0 reads it, the others get it)."""
        if not self.config.weight_ema:
            return None
        from nodulekit.nn.ema import WeightEMA

        ema = WeightEMA(self.backend, self.model, self.config.weight_ema)
        if ckpt is None:
            return ema
        if ckpt.params is not None:
            if ckpt.ema_params is None:
                raise ValueError(f"{ckpt.path}: the run keeps a weight average (weight_ema "
                                 f"{self.config.weight_ema}) but this checkpoint has none")
            ema.load(ckpt.ema_params, ckpt.ema_buffers)
        if self.dist is not None:
            self.dist.bcast(ema.params)
            if ema.buffers.size:
                self.dist.bcast(ema.buffers)
        return ema

    def _continue_from(self, ckpt) -> None:
        if ckpt.params is not None:
            from nodulekit.training.checkpoint import load_buffers

            self.model.load_flat(ckpt.params)
            load_buffers(self.model, ckpt)
            self.optimizer.load_state(ckpt.adam)
        else:  # another rank: the arrays come by broadcast
            self.optimizer.step_count = int(ckpt.adam["step"])
        self.epoch, self.global_step = ckpt.epoch, ckpt.global_step
        self.history = list(ckpt.history)
        self.best_epoch, self.best_score = ckpt.best_epoch, ckpt.best_score
        self._continue_selection()
        self.report(f"resuming from {ckpt.path}: {ckpt.epoch} epoch(s), {ckpt.global_step} "
                    f"steps done; " + (
                        f"kept epoch {self.best_epoch} (validation found-nodule Dice "
                        f"{self.best_score:.4f})" if not self.rescore_best else
                        f"best epoch {self.best_epoch}, kept on an earlier nodulekit's "
                        "rule: re-scored below"))

    def _continue_selection(self) -> None:
        """The best so far from the checkpoint's history (its best epoch's row); a run from
        before the nodule-slice rule has no score for it: `_rescore_best` then."""
        from nodulekit.evaluation import selection

        row = selection.best_row(self.history, self.best_epoch)
        if row is None:
            return
        validated = math.isfinite(float(row.get("val_loss", math.nan)))
        self.best_key = selection.key(row, validated)
        self.rescore_best = self.best_key is None

    def _open_data(self) -> None:
        from nodulekit.data.cache import open_cache
        from nodulekit.data.loader import CropOptions, fits_in_memory, train_loader

        config, comm = self.config, self.comm
        error = None
        try:
            self.cache = open_cache(config.cache)
        except Exception as exc:
            error = exc
        comm.agree(error)  # e.g. a rank on another host without the cache
        splits = self.cache.splits
        self.n_val = len(self.cache.split("val")) if "val" in splits else 0
        self.n_test = len(self.cache.split("test")) if "test" in splits else 0
        # the loader gives the network's input: the centre crop (--size), or patches in it
        crop = CropOptions(region=tuple(config.image_shape), patch=tuple(config.train_shape),
                           foreground_fraction=config.foreground_fraction,
                           nodule_balance=config.nodule_balance,
                           context_slices=config.context_slices, progress=self.progress)
        self.loader = train_loader(self.cache, batch_size=config.batch_size,
                                   empty_fraction=config.empty_fraction, seed=config.seed,
                                   num_workers=config.workers, queue_size=config.queue,
                                   in_memory=fits_in_memory(self.cache, "train"), crop=crop)
        # each rank reads its B/N samples of every global batch
        distributed.shard_global_batches(self.loader, comm.rank, comm.size)
        if len(self.loader) == 0:
            raise ValueError(f"{config.cache}: {self.loader.samples_per_epoch} training "
                             f"samples per epoch, fewer than one batch of "
                             f"{config.batch_size}; use a smaller --batch-size")

    def _describe(self) -> None:
        config, loader = self.config, self.loader
        crop = (", centre-cropped to " + "x".join(map(str, config.image_shape))
                if config.crop else "")
        if config.train_shape != list(config.image_shape):
            crop += (f"; {'x'.join(map(str, config.train_shape))} patches, "
                     f"{config.foreground_fraction:.0%} placed on a nodule")
        if config.nodule_balance:
            crop += (f"; {config.nodule_balance:.0%} of the nodule samples drawn nodule by "
                     "nodule")
        if config.context_slices:
            crop += (f"; {config.context_slices} slice(s) below and above as channels "
                     f"({config.in_channels} in all)")
        self.report(f"data: {config.cache} ({'x'.join(map(str, config.cache_shape))}{crop}): "
                    f"{loader.samples_per_epoch} training samples per epoch "
                    f"({len(loader)} batches of {config.batch_size}), {self.n_val} validation "
                    f"and {self.n_test} test slices")
        scaled = " scaled by fan-in" if self.step.lr_scale is not None else ""
        if config.lr_schedule != "constant":
            scaled += f", {config.lr_schedule} decay"
        bce = f" + {config.bce_weight:g} x BCE" if config.bce_weight else ""
        if config.nodule_dice_weight:
            bce += f" + {config.nodule_dice_weight:g} x Dice per nodule"
        if config.nodule_bce_weight:
            bce += f" + {config.nodule_bce_weight:g} x BCE per nodule"
        arch = f", {config.norm} norm" if config.norm != "none" else ""
        if config.head_prior != 0.5:
            arch += f", output prior {config.head_prior:g}"
        dice = "over the batch" if config.dice == "batch" else "per sample"
        self.report(f"model: U-Net depth {config.depth} width {config.width}{arch}, "
                    f"{self.model.num_parameters:,} parameters; Adam lr {config.lr:g}{scaled}; "
                    f"Dice loss ({dice}, smoothing {config.smooth:g}){bce}; "
                    f"{config.epochs} epochs; seed {config.seed}")
        if config.weight_ema or config.val_interval > 1:
            kept = (f"the weights' moving average (decay {config.weight_ema:g}) is validated and "
                    "kept" if config.weight_ema else "")
            every = (f"validation after every {config.val_interval} epochs and the last"
                     if config.val_interval > 1 else "")
            self.report("; ".join(x for x in (every, kept) if x))
        if self.n_val == 0:
            self.report("warning: no validation slices; the last epoch counts as the best")

    # ------------------------------------------------------------------ the loop

    def run(self, t_start: float) -> TrainResult:
        try:
            self._open_data()
            self._describe()
            warmup.wait(self.report)  # the kernels compiled meanwhile (demo set generated)
            if self.rescore_best:
                self._rescore_best()
            if self.comm.is_root:
                self._write_config()
            for epoch in range(self.epoch, self.config.epochs):
                self.run_epoch(epoch)
            seconds = time.perf_counter() - t_start
            self.report(f"{self._trained()} in {seconds:.1f} s; {self._best_words()}")
        except TrainingDiverged as exc:
            raise self._diverged(exc) from None
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if self.loader is not None:
                self.loader.close()
            if self.cache is not None:
                self.cache.close()
        result = TrainResult(out=self.run_dir, config=self.config, history=self.history,
                             best_epoch=self.best_epoch, best_score=self.best_score,
                             seconds=seconds, rank=self.comm.rank, ranks=self.comm.size)
        self.test(result, t_start)
        return result

    def _trained(self) -> str:
        """What this session trained: "trained 5 epochs", or for a resumed run "trained
        epochs 3-5 (3 this session; resumed after epoch 2)"."""
        first, last = self.resumed_from or 0, self.config.epochs
        if not first:
            return f"trained {last} epochs"
        return (f"trained epochs {first + 1}-{last} ({last - first} this session; resumed "
                f"after epoch {first})")

    def _best_words(self) -> str:
        """The end-of-run line's part on checkpoint_best (a warning when it finds nothing)."""
        if not self.n_val:
            return f"no validation split: checkpoint_best.h5 is the last epoch ({self.best_epoch})"
        words = (f"kept epoch {self.best_epoch} (checkpoint_best.h5: the latest that finds a "
                 f"validation nodule; found-nodule Dice {self.best_score:.4f}"
                 + self._highest_words() + ")")
        if self.best_score <= 0:
            words += ("\nwarning: no epoch found a validation nodule (a prediction overlapping "
                      "a nodule slice's truth with IoU >= 0.1); checkpoint_best.h5 finds none "
                      "either (see metrics.csv)")
        return words

    def _highest_words(self) -> str:
        """", the highest was epoch E's S" where that is another epoch (else "")."""
        from nodulekit.evaluation import selection

        scored = [(selection.found_score(r), int(r["epoch"])) for r in self.history
                  if math.isfinite(float(r.get(selection.METRIC, math.nan)))]
        if not scored:
            return ""
        score, epoch = max(scored, key=lambda se: (se[0], -se[1]))
        return f"; the highest was epoch {epoch}'s {score:.4f}" if epoch != self.best_epoch else ""

    def run_epoch(self, epoch: int) -> None:
        from nodulekit.evaluation import selection

        t0 = time.perf_counter()
        row, speed = self.train_epoch(epoch)
        skipped = self.n_val and not self.config.validates(epoch)  # --val-interval
        row.update(self.validate(epoch) if not skipped else self._not_validated())
        key = None if skipped else selection.key(row, validated=bool(self.n_val))
        row.update(seconds=time.perf_counter() - t0, **speed)
        improved = key is not None and selection.improves(key, self.best_key)
        row["best"] = bool(improved)
        if improved:
            self.best_epoch, self.best_key = epoch + 1, key
            self.best_score = selection.found_score(row)
        self.history.append(row)
        if self.comm.is_root:
            self.save(epoch, improved)
        self.session_seconds.append(row["seconds"])
        self.report(_epoch_line(row, self.config.epochs,
                                skipped=self.config.val_interval if skipped else 0)
                    + _time_left(self.session_seconds, self.config.epochs - epoch - 1))

    def train_epoch(self, epoch: int) -> tuple[dict, dict]:
        """One pass over the training loader: (the row's loss columns, its speed columns)."""
        from tqdm import tqdm

        config, be = self.config, self.backend
        t0 = time.perf_counter()
        losses, bces, nodules = [], [], []
        with tqdm(total=len(self.loader), desc=f"epoch {epoch + 1}/{config.epochs}",
                  unit="batch", leave=False, disable=not self.progress) as bar:
            for step_in_epoch, batch in enumerate(self.loader.epoch(epoch)):
                loss, bce, nodule = self.train_batch(batch)
                self._check_finite(loss, bce + nodule, epoch, step_in_epoch)
                losses.append(loss)
                bces.append(bce)
                nodules.append(nodule)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.callback is not None:
                    self.callback(epoch, self.global_step)
        be.synchronize()
        seconds = time.perf_counter() - t0
        if self.dist is not None and self.comm.size > 1:
            _check_same_weights(self.dist, be, self.model, self.optimizer, epoch, self.report)
        images = len(losses) * config.batch_size
        return ({"epoch": epoch + 1, "step": self.global_step,
                 "train_loss": float(np.mean(losses)), "train_bce": float(np.mean(bces)),
                 "train_nodule_dice": float(np.mean(nodules))},
                {"train_seconds": seconds,
                 "images_per_s": images / seconds if seconds > 0 else math.nan})

    def train_batch(self, batch) -> tuple[float, float, float]:
        """Window and augment one batch on the device, take one step; (Dice loss, BCE
        term, per-nodule Dice loss unweighted) of the global batch."""
        config, be = self.config, self.backend
        image, target = window_input(be, batch.hu, batch.mask, batch.aug,
                                     config.window_center, config.window_width)
        self.comm.step = self.global_step + 1
        self.optimizer.lr = scheduled_lr(config.lr, config.lr_schedule, self.global_step,
                                         config.epochs * len(self.loader))
        losses = self.step(image, target)
        if self.ema is not None:
            self.ema.update(self.model, self.optimizer.step_count)
        loss, bce, nodule = (float(be.to_host(v))
                             for v in (losses.dice, losses.bce, losses.nodule))
        if self.dist is not None:  # the global batch's mean: every rank the same
            loss, bce, nodule = (float(v) for v in
                                 self.dist.allreduce_mean_host([loss, bce, nodule]))
        self.global_step += 1
        if self.fault is not None:
            self.fault(self.global_step)
        return loss, bce, nodule

    def _check_finite(self, loss: float, bce: float, epoch: int, step_in_epoch: int) -> None:
        if math.isfinite(loss) and math.isfinite(bce):
            return
        what = (f"training loss became {loss}" if not math.isfinite(loss)
                else f"BCE or per-nodule term became {bce}")
        last = self.run_dir / "checkpoint_last.h5"
        kept = (f"{last} (after epoch {epoch})" if last.exists()
                else "none (no epoch had completed)")
        raise TrainingDiverged(
            f"the {what} at epoch {epoch + 1}, step {step_in_epoch + 1} of {len(self.loader)} "
            f"(global step {self.global_step}); stopping. Last good checkpoint: {kept}. "
            "Try a lower --lr.")

    def validate(self, epoch: int, model=None, desc: str = "") -> dict:
        """The row's validation columns (`selection.VALIDATION_COLUMNS`; NaN without a
        validation split) of `model` (default: the one training): whole slices (the
        --size centre crop, never the training patch), no augmentation."""
        from nodulekit.evaluation import selection
        from nodulekit.inference import peak_filter

        if not self.n_val:
            return self._not_validated()
        from nodulekit.evaluation.evaluate import InferSettings, component_stats, infer_split

        config = self.config
        settings = InferSettings(image_shape=tuple(config.image_shape),
                                 batch_size=config.eval_batch_size or config.batch_size,
                                 workers=config.workers, queue=config.queue,
                                 window=(config.window_center, config.window_width),
                                 smooth=config.smooth)
        averaged = self.ema is not None and model is None
        with self.ema.applied(self.model) if averaged else contextlib.nullcontext():
            val = infer_split(model or self.model, self.cache, "val", settings,
                              progress=self.progress, desc=desc or f"validate {epoch + 1}",
                              comm=self.dist, predictions=True)
        # the peak filter this epoch's model gets (`nodulekit.inference.peak_filter`)
        calibration = peak_filter.calibrate(component_stats(val, config.image_shape),
                                            val.counts[:, 0] + val.counts[:, 2])
        return {**selection.validation_columns(val.counts, val.loss, val.soft_dice),
                **calibration.columns()}

    @staticmethod
    def _not_validated() -> dict:
        """The validation columns of an epoch that was not validated (NaN)."""
        from nodulekit.evaluation import selection
        from nodulekit.inference import peak_filter

        return {**selection.no_validation_columns(),
                **dict.fromkeys(peak_filter.COLUMNS, math.nan)}

    def _rescore_best(self) -> None:
        """Resuming a run from before the found-nodule rule, whose checkpoint_best.h5 was
        kept on validation mean IoU or on the plain nodule-slice Dice: score it on validation
        the new way (every rank takes part),
        so this session replaces it only with a better epoch; its history row gets the
        score. Without it (or unreadable): the first epoch of this session becomes best."""
        from nodulekit.evaluation import selection

        self.rescore_best = False
        if not self.n_val:
            self.best_key = selection.key({"epoch": self.best_epoch}, validated=False)
            return
        path = self.run_dir / "checkpoint_best.h5"
        model, why = self._shared_model(path)
        if model is None:
            self.best_key = None
            self.report(f"checkpoint_best.h5 was kept on an earlier nodulekit's rule "
                        f"and cannot be re-scored ({why}); the first epoch of this "
                        "session becomes the best")
            return
        cols = self.validate(self.best_epoch - 1, model=model, desc="re-score best")
        row = selection.best_row(self.history, self.best_epoch)
        row.update({k: cols[k] for k in (selection.NODULE_DICE, selection.METRIC,
                                         selection.SOFT_TIE_BREAK, selection.TIE_BREAK)})
        self.best_key = selection.key(row)
        self.best_score = selection.found_score(row)
        self.report(f"checkpoint_best.h5 (epoch {self.best_epoch}) was kept on an earlier "
                    "nodulekit's rule; re-scored on validation: found-nodule Dice "
                    f"{cols[selection.METRIC]:.4f}, empty-slice false positives "
                    f"{cols[selection.TIE_BREAK]:.1%}; an epoch of this session that finds a "
                    "validation nodule replaces it")

    def _shared_model(self, path: Path):
        """(the checkpoint at `path` as a model on every rank, None) or (None, why not)."""
        from nodulekit.nn import UNet
        from nodulekit.training.checkpoint import (
            CheckpointError,
            load_checkpoint,
            model_from_checkpoint,
        )

        model, why = None, None
        if self.comm.is_root:
            try:
                model = model_from_checkpoint(load_checkpoint(path), self.backend)
            except (OSError, CheckpointError) as e:
                why = str(e)
        why = self.comm.bcast_object(why)
        if why is not None:
            return None, why
        if self.dist is not None and self.comm.size > 1:
            config = self.config
            if model is None:  # the other ranks: rank 0's weights by broadcast
                model = UNet(self.backend, depth=config.depth, width=config.width,
                             in_channels=config.in_channels, seed=config.seed,
                             norm=config.norm)
            self.dist.bcast(model.params)
            if model.buffers.size:
                self.dist.bcast(model.buffers)
        return model, None

    def save(self, epoch: int, improved: bool) -> None:
        """Checkpoints (best first: killed between the two, the run resumes from the older
        "last" and recomputes the same epoch, rewriting the same best), metrics, plot. A
        file that cannot be written stops the run with `WriteFailed`."""
        try:
            self._write_run_files(epoch, improved)
        except OSError as e:
            what = "checkpoint" if str(e.filename or "").endswith(".h5") else "file"
            kept = (f"checkpoint_last.h5 still holds epoch {self.saved_epoch}"
                    if self.saved_epoch else "no checkpoint_last.h5 yet: nothing to resume")
            raise WriteFailed(f"could not write {what} {e.filename}: {e.strerror or e}; "
                              f"{kept}") from None

    def _write_run_files(self, epoch: int, improved: bool) -> None:
        from nodulekit.training.checkpoint import Checkpoint, save_checkpoint
        from nodulekit.training.runfiles import plot_progress, write_metrics_csv

        config = self.config
        state = Checkpoint(params=self.backend.to_host(self.model.params),
                           layout=self.model.layout, config=config.to_dict(), epoch=epoch + 1,
                           buffers=self.backend.to_host(self.model.buffers),
                           buffer_layout=self.model.buffer_layout,
                           global_step=self.global_step, adam=self.optimizer.state(),
                           **self._average_arrays(),
                           history=self.history, best_epoch=self.best_epoch,
                           best_score=self.best_score,
                           rng={"model_seed": config.seed, "loader_seed": config.seed,
                                "next_epoch": epoch + 1})
        if improved:
            save_checkpoint(self.run_dir / "checkpoint_best.h5",
                            dataclasses.replace(state, kind="best"))
        save_checkpoint(self.run_dir / "checkpoint_last.h5",
                        dataclasses.replace(state, kind="last"))
        self.saved_epoch = epoch + 1
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        plot_progress(self.run_dir / "progress.png", self.history,
                      title=f"U-Net depth {config.depth} width {config.width}, "
                            f"{Path(config.cache).name}")

    def _average_arrays(self) -> dict:
        """The checkpoint's weight-average fields (host copies; none without one)."""
        if self.ema is None:
            return {}
        be = self.backend
        return {"ema_params": be.to_host(self.ema.params).copy(),
                "ema_buffers": be.to_host(self.ema.buffers).copy()}

    def test(self, result: TrainResult, t_start: float) -> None:
        """The best model on the test split, into result.test (every rank takes part)."""
        best = self.run_dir / "checkpoint_best.h5"
        have_best = self.comm.bcast_object(best.exists() if self.comm.is_root else None)
        if not (self.config.test_after and self.n_test and have_best):
            return
        from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate, format_summary

        config = self.config
        options = EvaluateOptions(best, config.cache, split="test", out=self.run_dir / "test",
                                  device=config.backend, precision=config.precision,
                                  workers=config.workers, progress=self.progress,
                                  threads=self.threads)
        summary, path = evaluate(options, report=self.report.log, comm=self.dist)
        result.test, result.test_path = summary, path
        self.report(format_summary(summary))
        self.report(f"wrote {path}")
        result.seconds = time.perf_counter() - t_start
        self.report(f"total {result.seconds:.1f} s")

    # ------------------------------------------------------------------ stopping early

    def _diverged(self, exc: TrainingDiverged) -> BaseException:
        if self.comm.size == 1:
            return exc
        # every rank saw the same averaged loss: rank 0 says so, the others stop quietly
        if self.comm.is_root:
            return distributed.collective(exc)
        return distributed.collective(distributed.PeerFailed(str(exc)))

    def _interrupted(self) -> None:
        if not self.comm.is_root:
            return
        if (self.run_dir / "checkpoint_last.h5").exists():
            self.report("interrupted; checkpoint_last.h5 holds the last finished epoch: "
                        f"continue with `nodulekit train --resume {self.run_dir}`")
        else:
            self.report("interrupted before the first epoch finished; nothing to resume")

    def _write_config(self) -> None:
        """config.json: the configuration, and one entry per session (device, versions)."""
        from nodulekit.training.runfiles import device_description, versions, write_json

        be, comm = self.backend, self.comm
        path = self.run_dir / "config.json"
        previous = {}
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = {}
        sessions = previous.get("sessions", [])
        session = {"started": datetime.now().isoformat(timespec="seconds"),
                   "resumed_from_epoch": self.resumed_from,
                   "device": device_description(be.name), "backend": be.name,
                   "precision": be.precision, "versions": versions(),
                   "ranks": comm.size,
                   "communicator": comm.describe()}
        if be.name == "cpu":  # the kernels it picked: another machine may sum otherwise
            from nodulekit.engine.cpu import kernel_choices

            session["cpu_kernels"] = kernel_choices()
        sessions.append(session)
        from nodulekit.evaluation import selection

        write_json(path, {"config": self.config.to_dict(),
                          "selection": selection.describe(),
                          "device": device_description(be.name), "backend": be.name,
                          "precision": be.precision, "versions": versions(),
                          "sessions": sessions})


def _epoch_line(row: dict, epochs: int, skipped: int = 0) -> str:
    """The epoch's line; `skipped` > 0: the --val-interval of an epoch not validated."""
    def f(v):
        return "  -   " if math.isnan(v) else f"{v:.4f}"

    def pct(v):
        return "  -  " if math.isnan(v) else f"{100 * v:4.0f}%"

    head = f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f}  "
    if skipped:
        return (head + f"(validated every {skipped} epochs and the last)  "
                f"{row['seconds']:6.1f} s  {row['images_per_s']:6.1f} img/s")
    return (head +
            f"val loss {f(row['val_loss'])}  Dice {f(row['val_dice'])}  "
            f"IoU {f(row['val_iou'])}  global Dice {f(row['val_global_dice'])}  "
            f"nodule Dice {f(row['val_nodule_dice'])} "
            f"(found {f(row['val_nodule_found_dice'])}{_se_words(row)})  "
            f"empty FP {pct(row['val_empty_fp'])}  "
            + _filter_words(row) +
            f"{row['seconds']:6.1f} s  {row['images_per_s']:6.1f} img/s"
            + ("  * kept" if row["best"] else ""))


def _time_left(seconds: list[float], epochs_left: int) -> str:
    """'  (about 2 h 41 min left)': the epochs left at the mean pace of this session's
    epochs after its first (whose time holds Numba's compilation and the first reads);
    empty after the last epoch."""
    if epochs_left <= 0 or not seconds:
        return ""
    pace = seconds[1:] or seconds
    left = epochs_left * sum(pace) / len(pace)
    if left < 60:
        words = f"{left:.0f} s"
    elif left < 3600:
        words = f"{left / 60:.0f} min"
    else:
        hours, minutes = divmod(round(left / 60), 60)
        words = f"{hours} h {minutes:02d} min"
    return f"  (about {words} left)"


def _se_words(row: dict) -> str:
    """' +- SE' of the found-nodule Dice (empty for rows without it)."""
    from nodulekit.evaluation.selection import SCORE_SE

    se = float(row.get(SCORE_SE, math.nan))
    return f" +- {se:.4f}" if math.isfinite(se) else ""


def _filter_words(row: dict) -> str:
    """The epoch line's part on the peak filter chosen on validation."""
    from nodulekit.inference.peak_filter import from_row, probability_of

    logit = from_row(row)
    if logit is None:
        return "(no filter)  "
    return (f"(filter p>={probability_of(logit):.3f}: nodule Dice "
            f"{row['val_filtered_nodule_dice']:.4f}, empty FP "
            f"{100 * row['val_filtered_empty_fp']:.0f}%)  ")


def _check_same_weights(comm, be, model, opt, epoch: int, report) -> None:
    """After each epoch: do all ranks still hold the same weights? They should, bit for bit
    (every rank adds the same averaged gradient); if an all-reduce ever gave the ranks
    different sums, say so and give every rank rank 0's weights and Adam state."""
    xp = be.xp
    arrays = (model.params, opt.m, opt.v) + ((model.buffers,) if model.buffers.size else ())
    mine = tuple(float(be.to_host(xp.sum(a, dtype=xp.float64))) for a in arrays)
    every = comm.allgather_object(mine)
    if all(f == every[0] for f in every):
        return
    report(f"warning: after epoch {epoch + 1} the ranks' weights differ (sums {every}); "
           "continuing from rank 0's")
    for a in arrays:
        comm.bcast(a)
