"""From `TrainOptions` to a `TrainConfig`: a new run (its data made ready) or a resumed one.

A new run takes its defaults from the data (the paper's for a cache or a data-set folder,
the demo's for the embedded set), preprocesses a folder into the run folder, reads the
architecture from the checkpoint it fine-tunes, and checks the input shape. A resumed run
takes everything from its checkpoint_last; options given again must match, field by field.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from nodulekit.training.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from nodulekit.training.config import (
    DEMO_DEFAULTS,
    PAPER_DEFAULTS,
    TrainConfig,
    TrainOptions,
    resolve_size,
)


def resolve(options: TrainOptions, report, progress: bool) -> tuple[TrainConfig, Checkpoint | None]:
    """(configuration, checkpoint to resume from or None). `report` takes printed lines."""
    if options.resume is not None:
        config, ckpt = resumed_config(options)
        config.test_after = options.test
        return config, ckpt
    return new_config(options, report=report, progress=progress), None


def new_config(options: TrainOptions, *, report, progress: bool) -> TrainConfig:
    from nodulekit.engine import resolve_device

    kind, name = _data_kind(options.data)
    defaults = DEMO_DEFAULTS if kind == "demo" else PAPER_DEFAULTS
    out = _run_folder(options.out, name)
    cache = _ready_cache(options.data, kind, out, report=report, progress=progress)
    o = options.defaults_from(defaults)
    finetune = o.pop("finetune_from")
    if finetune is not None:
        finetune = _architecture_from(finetune, options, o)
    image_shape, cache_shape = _shapes(cache, o.pop("size"), int(o["depth"]))
    backend, _ = resolve_device(options.device)
    config = TrainConfig(
        data="demo" if kind == "demo" else str(Path(options.data).absolute()), data_kind=kind,
        cache=str(cache), out=str(out), epochs=int(o["epochs"]),
        batch_size=int(o["batch_size"]), lr=float(o["lr"]), width=int(o["width"]),
        depth=int(o["depth"]), image_shape=image_shape, cache_shape=cache_shape,
        device=options.device, backend=backend, precision=o["precision"] or "fp32",
        seed=int(o["seed"] or 0), workers=int(options.workers), queue=options.queue,
        empty_fraction=float(o["empty_fraction"]), finetune_from=finetune,
        test_after=options.test, smooth=float(o["smooth"]), lr_scaling=str(o["lr_scaling"]),
        bce_weight=float(o["bce_weight"]))
    config.validate()
    return config


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
    out = Path(out).absolute()
    if (out / "checkpoint_last.h5").exists():
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it, or "
                         "choose another --out")
    return out


def _ready_cache(data, kind: str, out: Path, *, report, progress: bool) -> Path:
    """The cache the run reads: the demo's (generated once), a folder's (preprocessed into
    the run folder), or the cache given."""
    if kind == "demo":
        from nodulekit.training.demo import ensure_demo_cache

        return Path(ensure_demo_cache(report=report, progress=progress)).absolute()
    if kind == "cache":
        return Path(data).absolute()
    cache = out / "cache.h5"
    if not cache.is_file():
        from nodulekit.data.preprocess import preprocess

        out.mkdir(parents=True, exist_ok=True)
        report(f"preprocessing {data} into {cache}")
        report(preprocess(data, cache, progress=progress).format())
    return cache.absolute()


def _architecture_from(finetune, options: TrainOptions, resolved: dict) -> str:
    """Fine-tuning: width and depth come from the checkpoint (an explicit other value is an
    error). Returns the checkpoint's absolute path."""
    ft = load_checkpoint(resolve_checkpoint(finetune, prefer="best"))
    for key in ("width", "depth"):
        stored = int(ft.config[key])
        asked = getattr(options, key)
        if asked is not None and int(asked) != stored:
            raise ValueError(f"--{key} {asked} differs from the fine-tuned checkpoint's "
                             f"{stored} ({ft.path})")
        resolved[key] = stored
    return str(ft.path.absolute())


def _shapes(cache: Path, size, depth: int) -> tuple[list[int], list[int]]:
    """(the network's input H, W; the cache's slice H, W)."""
    from nodulekit.data.cache import open_cache

    with open_cache(cache) as c:
        cache_shape = list(c.split("train").image_shape)
    return resolve_size(cache_shape, size, depth), cache_shape


def resumed_config(options: TrainOptions) -> tuple[TrainConfig, Checkpoint]:
    from nodulekit.engine import resolve_device

    ckpt = load_checkpoint(resolve_checkpoint(options.resume, prefer="last"))
    config = TrainConfig.from_dict(ckpt.config)
    conflicts = options.conflicts_on_resume(config)
    if conflicts:
        raise ValueError("--resume continues the run as configured: " + "; ".join(conflicts))
    if ckpt.adam is None:
        raise ValueError(f"{ckpt.path}: has no optimizer state, so it cannot be resumed "
                         "(use --finetune-from to start from its weights)")
    if options.epochs is not None:
        config.epochs = int(options.epochs)
    config.device = options.device
    config.backend, _ = resolve_device(options.device)
    config.workers, config.queue = int(options.workers), options.queue
    config.out = str(ckpt.path.parent.absolute())
    return config, ckpt
