"""From `TrainOptions` to a `TrainConfig`: a new run (its data made ready) or a resumed one.

A new run takes its defaults from the data (the paper's for a cache or a data-set folder,
the demo's for the embedded set), preprocesses a folder into the run folder (or reuses the
cache there when it still records that folder as it is: `nodulekit.data.fingerprint`), reads
the architecture from the checkpoint it fine-tunes, and checks the input shape. A resumed
run takes everything from its checkpoint_last; options given again must match, field by
field; it may be pointed at its cache at a new place (DATA: ``nodulekit train --resume RUN
NEW.h5``) when that holds the same slices (`cache_identity`).

Both first lock the run folder (`claim`, `nodulekit.training.runlock`): nothing is read or
written there before this process is its one writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from nodulekit.training.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from nodulekit.training.config import (
    TrainConfig,
    TrainOptions,
    recipe_defaults,
    resolve_patch,
    resolve_size,
)

Claim = Callable[[Path], None]  # locks a run folder (made if missing) for this process


def _no_claim(_folder: Path) -> None:
    pass


def resolve(options: TrainOptions, report, progress: bool,
            claim: Claim = _no_claim) -> tuple[TrainConfig, Checkpoint | None]:
    """(configuration, checkpoint to resume from or None). `report` takes printed lines;
    `claim` locks the run folder (called once, before anything there is read or written)."""
    if options.resume is not None:
        config, ckpt = resumed_config(options, claim=claim, report=report)
        config.test_after = options.test
        return config, ckpt
    return new_config(options, report=report, progress=progress, claim=claim), None


def new_config(options: TrainOptions, *, report, progress: bool,
               claim: Claim = _no_claim) -> TrainConfig:
    from nodulekit.data.fingerprint import cache_identity
    from nodulekit.engine import resolve_device

    kind, name = _data_kind(options.data)
    defaults = recipe_defaults(options.recipe, kind)
    out = _run_folder(options.out, name)
    claim(out)
    if any((out / f"checkpoint_{which}.h5").exists() for which in ("last", "best")):
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it, or "
                         "choose another --out")
    o = options.defaults_from(defaults)
    backend, _ = resolve_device(options.device)
    # a core for the warm-up where it runs, the others generate the data set
    warming = _warm_up_while_generating(options, kind, o, out, backend, report)
    cache = _ready_cache(options.data, kind, out, report=report, progress=progress,
                         spacing=options.spacing,
                         workers=max(1, (os.cpu_count() or 1) - 1) if warming else None)
    finetune = o.pop("finetune_from")
    if finetune is not None:
        finetune = _architecture_from(finetune, options, o)
    image_shape, cache_shape = _shapes(cache, o["size"], int(o["depth"]))
    patch = resolve_patch(o["patch"], image_shape, int(o["depth"]), backend)
    if o["patch"] is None and patch != image_shape:
        where = "a GPU" if backend == "cuda" else "the CPU"
        report(f"patches: {patch[0]}x{patch[1]} crops of the {image_shape[0]}x"
               f"{image_shape[1]} slices (--patch auto: at most {max(patch)} on {where}; "
               "--patch P to choose)")
    config = _config(options, kind, o, out=out, cache=cache, backend=backend,
                     shapes=(image_shape, cache_shape, patch), finetune=finetune,
                     spacing=cache_spacing(cache), identity=cache_identity(cache))
    config.validate()
    return config


def _config(options: TrainOptions, kind: str, o: dict, *, out: Path, cache: Path,  # noqa: PLR0913
            backend: str, shapes, finetune, spacing, identity: str) -> TrainConfig:
    """The run's configuration from the options with their defaults (``o``)."""
    image_shape, cache_shape, patch = shapes
    context = int(o["context_slices"])
    return TrainConfig(
        data="demo" if kind == "demo" else str(Path(options.data).absolute()), data_kind=kind,
        cache=str(cache), out=str(out), epochs=int(o["epochs"]),
        val_interval=int(o["val_interval"]), weight_ema=float(o["weight_ema"]),
        batch_size=int(o["batch_size"]), lr=float(o["lr"]), width=int(o["width"]),
        depth=int(o["depth"]), image_shape=image_shape, cache_shape=cache_shape,
        device=options.device, backend=backend, precision=o["precision"] or "fp32",
        seed=int(o["seed"] or 0), workers=int(options.workers), queue=options.queue,
        empty_fraction=float(o["empty_fraction"]), finetune_from=finetune,
        test_after=options.test, smooth=float(o["smooth"]),
        dice=str(o["dice"]), head_prior=float(o["head_prior"]),
        lr_schedule=str(o["lr_schedule"]), lr_scaling=str(o["lr_scaling"]),
        bce_weight=float(o["bce_weight"]), nodule_dice_weight=float(o["nodule_dice_weight"]),
        nodule_bce_weight=float(o["nodule_bce_weight"]),
        norm=str(o["norm"]), patch=patch,
        foreground_fraction=float(o["foreground_fraction"]),
        nodule_balance=float(o["nodule_balance"]), context_slices=context,
        in_channels=2 * context + 1, recipe=str(o["recipe"]), spacing_mm=spacing,
        cache_identity=identity)


def _warm_up_while_generating(options: TrainOptions, kind: str, o: dict, out: Path,  # noqa: PLR0913
                              backend: str, report) -> bool:
    """Where the demo set is about to be generated (the first run on a machine), start
    compiling the CPU kernels of this run in a second process meanwhile
    (`nodulekit.training.warmup`); the run waits for it before its first step. Whether
    it started."""
    from nodulekit.training import warmup
    from nodulekit.training.demo import DEMO_SYNTH, demo_paths

    if kind != "demo" or backend != "cpu" or o["finetune_from"] is not None:
        return False
    if demo_paths()[1].is_file() or not warmup.enabled() or (os.cpu_count() or 1) < 2:
        return False
    side = int(DEMO_SYNTH["size"])
    image_shape = resolve_size([side, side], o["size"], int(o["depth"]))
    patch = resolve_patch(o["patch"], image_shape, int(o["depth"]), backend)
    draft = _config(options, kind, o, out=out, cache=demo_paths()[1], backend=backend,
                    shapes=(image_shape, [side, side], patch), finetune=None, spacing=None,
                    identity="")
    if warmup.start(draft) is None:
        return False
    report("compiling the run's kernels in a second process while the demo set is generated "
           f"(the first run on this machine; {warmup.ENV}=0 turns it off)")
    return True


def _data_kind(data) -> tuple[str, str]:
    """("demo" | "folder" | "cache", a short name for the run folder)."""
    if data is None:
        return "demo", "demo"
    path = Path(data)
    if path.is_dir():
        return "folder", path.name
    if path.is_file():
        return "cache", path.stem
    raise ValueError(f"{path}: no such cache file or data-set folder")


def _run_folder(out, name: str) -> Path:
    if out is None:
        out = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(out).absolute()


def _ready_cache(data, kind: str, out: Path, *, report, progress: bool,
                 spacing: float | None = None, workers: int | None = None) -> Path:
    """The cache the run reads: the demo's (generated once), a folder's (preprocessed into
    the run folder, resampled to `spacing` mm pixels if given), or the cache given."""
    if spacing is not None and kind != "folder":
        what = "the demo set" if kind == "demo" else f"the cache {data}"
        raise ValueError(f"--spacing resamples a data-set folder as it is preprocessed; "
                         f"{what} is preprocessed already (`nodulekit preprocess DATA OUT.h5 "
                         "--spacing MM` makes a resampled cache)")
    if kind == "demo":
        from nodulekit.training.demo import ensure_demo_cache

        return Path(ensure_demo_cache(report=report, progress=progress,
                                      workers=workers)).absolute()
    if kind == "cache":
        return Path(data).absolute()
    from nodulekit.data.fingerprint import cache_for_folder

    out.mkdir(parents=True, exist_ok=True)
    return cache_for_folder(data, out / "cache.h5", report=report, progress=progress,
                            exclude=out, spacing=spacing).absolute()


def _architecture_from(finetune, options: TrainOptions, resolved: dict) -> str:
    """Fine-tuning: width, depth, norm and context slices (the input channels) come from the
    checkpoint (an explicit other value is an error; a checkpoint from before norms has
    none, from before context slices 0). Returns its absolute path."""
    ft = load_checkpoint(resolve_checkpoint(finetune, prefer="best"))
    absent = {"norm": "none", "context_slices": 0}
    for key, kind in (("width", int), ("depth", int), ("norm", str), ("context_slices", int)):
        stored = kind(ft.config.get(key, absent[key]) if key in absent else ft.config[key])
        asked = getattr(options, key)
        if asked is not None and kind(asked) != stored:
            raise ValueError(f"--{key.replace('_', '-')} {asked} differs from the fine-tuned "
                             f"checkpoint's {stored} ({ft.path})")
        resolved[key] = stored
    return str(ft.path.absolute())


def cache_spacing(cache: Path) -> float | None:
    """The pixel size (mm) `preprocess --spacing` resampled the cache to; None: native."""
    import math

    from nodulekit.data.cache import open_cache

    with open_cache(cache) as c:
        value = c.attrs.get("spacing_mm")
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _shapes(cache: Path, size, depth: int) -> tuple[list[int], list[int]]:
    """(the network's input H, W; the cache's slice H, W)."""
    from nodulekit.data.cache import open_cache

    with open_cache(cache) as c:
        cache_shape = list(c.split("train").image_shape)
    return resolve_size(cache_shape, size, depth), cache_shape


def resumed_config(options: TrainOptions, *, claim: Claim = _no_claim,
                   report=print) -> tuple[TrainConfig, Checkpoint]:
    from nodulekit.engine import resolve_device

    path = resolve_checkpoint(options.resume, prefer="last")
    run = path.parent.absolute()
    if options.out is not None and Path(options.out).resolve() != run.resolve():
        raise ValueError(f"--out {options.out}: --resume continues the run in {run}, in "
                         "place; drop --out (a new run takes --out without --resume)")
    claim(run)
    ckpt = load_checkpoint(path)
    if ckpt.warning:
        report(f"warning: {ckpt.warning}")
    config = TrainConfig.from_dict(ckpt.config)
    conflicts = options.conflicts_on_resume(config)
    if conflicts:
        raise ValueError("--resume continues the run as configured: " + "; ".join(conflicts))
    if ckpt.adam is None:
        raise ValueError(f"{ckpt.path}: has no optimizer state, so it cannot be resumed "
                         "(use --finetune-from to start from its weights)")
    _check_epochs(options.epochs if options.epochs is not None else config.epochs, ckpt, run)
    if options.epochs is not None:
        config.epochs = int(options.epochs)
    config.device = options.device
    config.backend, _ = resolve_device(options.device)
    config.workers, config.queue = int(options.workers), options.queue
    config.validate_session()
    old_run, config.out = config.out, str(run)
    _resumed_data(config, options.data, Path(old_run), report)
    return config, ckpt


def _check_epochs(epochs: int, ckpt: Checkpoint, run: Path) -> None:
    """A resumed run goes on: to more epochs than its checkpoint has done."""
    done = ckpt.epoch
    if epochs < done:
        raise ValueError(f"{run} has trained {done} epochs; --epochs {epochs} would not "
                         f"continue it (a run is not shortened: pass --epochs > {done}, or "
                         f"start a new run)")
    if epochs == done:
        raise ValueError(f"{run} has finished its {done} epochs: pass --epochs > {done} to "
                         f"train on (`nodulekit evaluate {run}` scores its best model)")


def _resumed_data(config: TrainConfig, data, old_run: Path, report) -> None:
    """Point `config.cache` at the run's cache: where it was, where `data` (the cache at a new
    place) says, or inside the run folder when the folder was moved; it must hold the slices
    the run trained on."""
    from nodulekit.data.fingerprint import cache_identity

    cache = Path(config.cache)
    if data is not None and not _same_path(data, config.data):
        given = Path(data).absolute()
        if given.is_dir():
            raise ValueError(f"{data}: with --resume, DATA names the run's cache (.h5) at a "
                             f"new place; the run trained on {config.data}")
        _check_same_cache(given, config, report)
        report(f"reading the run's cache from {given} (recorded: {cache})")
        config.cache = str(given)
        if config.data_kind == "cache":
            config.data = str(given)
        return
    if not cache.is_file():
        inside = _moved_with_run(cache, old_run, Path(config.out))
        if inside is not None:
            config.cache = str(inside)
        elif config.data_kind == "demo":
            config.cache = str(_ready_cache(None, "demo", Path(config.out), report=report,
                                            progress=False))
        else:
            raise ValueError(f"the run's cache {cache} is not there (moved or deleted?); "
                             f"name it where it is now: nodulekit train --resume {config.out} "
                             "PATH.h5")
    if config.cache_identity:
        if cache_identity(config.cache) != config.cache_identity:
            raise ValueError(f"{config.cache} holds other slices than when the run started "
                             "(rebuilt from other data?); resume with the cache it trained on "
                             f"(nodulekit train --resume {config.out} PATH.h5)")
    else:  # a run from before caches were identified: identify it from now on
        config.cache_identity = cache_identity(config.cache)


def _check_same_cache(given: Path, config: TrainConfig, report) -> None:
    from nodulekit.data.cache import open_cache
    from nodulekit.data.fingerprint import cache_identity

    if config.cache_identity:
        if cache_identity(given) != config.cache_identity:
            raise ValueError(f"{given}: it holds other slices than the cache the run "
                             f"trained on ({config.cache}); with --resume, DATA names that "
                             "cache at a new place")
        return
    with open_cache(given) as c:
        shape = list(c.split("train").image_shape)
    if shape != list(config.cache_shape):
        raise ValueError(f"{given}: its slices are {shape[0]}x{shape[1]}, the run's "
                         f"cache's were {config.cache_shape[0]}x{config.cache_shape[1]}")
    report(f"warning: the run recorded no identity of its cache; {given} was checked by its "
           "slice size only")
    config.cache_identity = cache_identity(given)


def _same_path(a, b) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _moved_with_run(cache: Path, old_run: Path, run: Path) -> Path | None:
    """The cache at its place inside the run folder, when the folder moved with it."""
    try:
        inside = run / cache.relative_to(old_run)
    except ValueError:
        return None
    return inside if inside.is_file() else None
