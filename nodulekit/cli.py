"""The `nodulekit` command. Thin: parse options, call the library, print."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import click

from nodulekit import __version__

_DEBUG = "nodulekit.debug"


class _Group(click.Group):
    """The `nodulekit` group: an OSError that a command lets through (a read-only folder, a
    full disk, a file that is not there) is one line naming the path and the cause, exit
    status 1; under `nodulekit --debug` the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            if _debug(ctx):
                raise
            raise click.ClickException(describe_os_error(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodulekit")
@click.option("--debug", is_flag=True, envvar="NODULEKIT_DEBUG",
              help="Show an error's traceback instead of its one line (for a bug report).")
@click.pass_context
def main(ctx, debug):
    """Lung-nodule segmentation in CT on a hand-written engine."""
    ctx.meta[_DEBUG] = debug


def _debug(ctx=None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_DEBUG))


def _user_error(e: Exception, prefix: str = "") -> Exception:
    """What a command raises for a library error: one line (a ClickException), or under
    --debug the error itself, so that its traceback shows."""
    if _debug():
        return e
    return click.ClickException(prefix + (describe_os_error(e) if isinstance(e, OSError)
                                          else str(e)))


# h5py's OSErrors name the file inside their text: "... name = '/x/y.h5', errno = 28 ..."
_H5_FILE = re.compile(r"(?:file)?name = '([^']*)'")
# The random parts of our temporary names: .NAME.<pid>-<hex>.partial, .NAME.<pid>.<hex>.partial
_RANDOM_PART = re.compile(r"^(\d+|\d+-[0-9a-f]{8}|[0-9a-z_]{8})$")


def describe_os_error(e: OSError) -> str:
    """One line for the user, "PATH: cause": the path they named (a hidden temporary file's
    target, not the temporary file) and the cause in words."""
    if e.errno is None:  # a message of our own (FileExistsError("X exists; ..."), ...)
        return str(e)
    if e.filename is not None:
        text = f"{_user_path(e.filename)}: {e.strerror or e}"
        return text + (f" (and {_user_path(e.filename2)})" if e.filename2 else "")
    message = e.strerror or str(e)
    found = _H5_FILE.search(message)
    if found:  # h5py: "Unable to synchronously create file (unable to open file: name = ..."
        head = message.split(" (", 1)[0]
        return f"{_user_path(found.group(1))}: {os.strerror(e.errno)} ({head})"
    return message


def _user_path(name) -> str:
    """A temporary file's target (``.cache.h5.123-89abcdef.partial`` -> ``cache.h5``)."""
    path = Path(str(name))
    base = path.name
    if not (base.startswith(".") and ".partial" in base):
        return str(path)
    parts = base[1:].split(".partial", 1)[0].split(".")
    while len(parts) > 1 and _RANDOM_PART.match(parts[-1]):
        parts.pop()
    return str(path.with_name(".".join(parts)))


# ----------------------------------------------------------------------------- bench


@main.group()
def bench():
    """Time our kernels and training step against the PyTorch reference."""


@contextlib.contextmanager
def _one_line_errors():
    """A bench's or profile's bad request (a GPU asked for where none is usable, a shape
    the U-Net cannot take) as one line, as every other command says its errors (--debug:
    the traceback)."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        raise _user_error(e) from None


class _SpacingType(click.ParamType):
    """--spacing: a pixel size in mm above 0, or "median" (the scans' median)."""

    name = "spacing"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value is None:
            return value
        if str(value).strip().lower() == "median":
            return "median"
        try:
            mm = float(value)
        except ValueError:
            mm = math.nan
        if not (math.isfinite(mm) and mm > 0):
            self.fail(f"{value!r} is neither a pixel size in mm above 0 nor 'median'",
                      param, ctx)
        return mm


def _device_option(f):
    return click.option("--device", default="cpu", show_default=True,
                        type=click.Choice(["auto", "cpu", "cuda"]),
                        help="Backend to time ('auto' picks cuda when a GPU is usable).")(f)


@bench.command("ops")
@_device_option
@click.option("--op", "op_filter", default=None, help="Only ops whose name contains this.")
@click.option("--repeats", default=20, show_default=True, help="Timed runs per op (median).")
@click.option("--variants", default=None,
              help="With --op conv: time the convolution versions ('all' or names, "
                   "comma-separated) against PyTorch: on the CPU (patches_gemm, "
                   "register_blocked, packed, auto), every 3x3 layer of the bench step U-Net; with "
                   "--device cuda (direct, smem_tiled, register_blocked, mma_tf32, "
                   "mma_bf16), the 512x512 shapes vs cuDNN.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
def bench_ops(device, op_filter, repeats, variants, json_path):
    """Per-op timing: op, shape, our ms, torch ms, ratio (ours / torch)."""
    if variants is not None:
        from nodulekit.bench import ops
        from nodulekit.engine import resolve_device

        if op_filter not in (None, "conv"):
            raise click.UsageError("--variants applies to --op conv only")
        try:
            if resolve_device(device)[0] == "cpu":
                result = ops.run_cpu_conv_variants_bench(variants, repeats=min(repeats, 10))
                click.echo(ops.format_cpu_variants(result))
            else:
                result = ops.run_conv_variants_bench(variants, repeats=min(repeats, 5))
                click.echo(ops.format_variants(result))
        except ops.UnknownVariantError as exc:
            raise click.BadParameter(str(exc), param_hint="'--variants'") from exc
        except ops.BenchUnavailableError as exc:
            raise click.ClickException(str(exc)) from exc
        _write_json(result, json_path)
        return
    from nodulekit.bench.ops import format_table, run_ops_bench

    with _one_line_errors():
        result = run_ops_bench(device=device, op_filter=op_filter, repeats=repeats)
    click.echo(format_table(result))
    _write_json(result, json_path)


def _shape_options(f, norm: bool = True, size: int = 128):
    """The U-Net and batch that `bench step`, `bench infer`, `bench norm` and `profile`
    time: width, depth, size, batch, norm (unless `norm` is False: `bench norm` times all
    three), seed."""
    options = [click.option("--width", default=16, show_default=True),
               click.option("--depth", default=4, show_default=True),
               click.option("--size", default=size, show_default=True, help="Input H = W."),
               click.option("--batch", default=4, show_default=True)]
    if norm:
        options.append(click.option(
            "--norm", default="none", show_default=True,
            type=click.Choice(["none", "instance", "batch"]),
            help="Normalisation after each 3x3 convolution (as `train --norm`)."))
    options.append(click.option("--seed", default=0, show_default=True))
    for option in reversed(options):
        f = option(f)
    return f


def _shape_options_without_norm(f):
    return _shape_options(f, norm=False)


def _whole_slice_options(f):
    return _shape_options(f, size=512)


def _against_torch_options(f):
    """What `bench step` and `bench infer` share: torch alone (CPU), cudnn.benchmark (GPU),
    --json."""
    options = [
        click.option("--torch-alone/--no-torch-alone", default=True, show_default=True,
                     help="CPU: also time torch alone in a child process per OpenMP wait "
                          "policy (PASSIVE, ACTIVE) and malloc policy (nodulekit's, glibc's) "
                          "and give the ratio to its best."),
        click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=True,
                     show_default=True,
                     help="GPU: torch's cudnn.benchmark (its first step times every "
                          "algorithm of each convolution shape: over 2 minutes at the "
                          "paper's shape for a training step)."),
        click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
                     help="Also write the results as JSON here ('-' for stdout).")]
    for option in reversed(options):
        f = option(f)
    return f


@bench.command("step")
@_device_option
@_shape_options
@click.option("--repeats", default=10, show_default=True, help="Timed steps (median).")
@click.option("--warmup", default=3, show_default=True)
@_against_torch_options
def bench_step(json_path, torch_alone, **options):
    """One training step (forward, Dice loss, backward, Adam) against PyTorch."""
    from nodulekit.bench.step import format_step, run_step_bench

    with _one_line_errors():
        result = run_step_bench(**options, torch_alone=None if torch_alone else (),
                                log=lambda line: click.echo(line, err=True))
    click.echo(format_step(result))
    _write_json(result, json_path)


@bench.command("infer")
@_device_option
@_whole_slice_options
@click.option("--repeats", default=10, show_default=True, help="Timed batches (median).")
@click.option("--warmup", default=2, show_default=True)
@_against_torch_options
def bench_infer(json_path, torch_alone, **options):
    """Whole-slice inference (what predict, evaluate and validation run; batch norm on
    seeded running statistics) against PyTorch."""
    from nodulekit.bench.infer import format_infer, run_infer_bench

    with _one_line_errors():
        result = run_infer_bench(**options, torch_alone=None if torch_alone else (),
                                 log=lambda line: click.echo(line, err=True))
    click.echo(format_infer(result))
    _write_json(result, json_path)


@bench.command("norm")
@_device_option
@_shape_options_without_norm
@click.option("--repeats", default=20, show_default=True, help="Timed turns (median).")
@click.option("--warmup", default=3, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
def bench_norm(json_path, **options):
    """What the norm layers cost our training step: --norm none, instance and batch timed
    in turns."""
    from nodulekit.bench.norm_cost import format_norm, run_norm_bench

    with _one_line_errors():
        result = run_norm_bench(**options)
    click.echo(format_norm(result))
    _write_json(result, json_path)


@bench.command("gpus")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]),
              help="'auto': GPU ranks when there are GPUs, else CPU ranks.")
@click.option("--ranks", "max_ranks", type=click.IntRange(min=1), default=None,
              help="Time 1..N ranks  [default: every GPU; on CPUs min(4, cores)]")
@click.option("--width", default=16, show_default=True, help="Paper: 64.")
@click.option("--depth", default=4, show_default=True)
@click.option("--size", default=128, show_default=True, help="Input H = W (paper: 512).")
@click.option("--batch", default=12, show_default=True, help="Global batch, split over the "
              "ranks (paper: 12).")
@click.option("--slices", default=18534, show_default=True,
              help="Training slices per epoch (the paper's UniToChest training set).")
@click.option("--repeats", default=5, show_default=True, help="Timed steps (median).")
@click.option("--warmup", default=2, show_default=True)
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Time every rank count this many times, interleaved (shared machines).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
def bench_gpus(json_path: str | None, **options) -> None:
    """The paper's Table 4: training s/epoch and inference s/image on 1..N data-parallel
    ranks (mpiexec; one GPU per rank, CPU ranks where there is no GPU), with scaling
    efficiency."""
    from nodulekit.bench.gpus import GpusBenchOptions, format_gpus, run_gpus_bench

    with _one_line_errors():
        result = run_gpus_bench(GpusBenchOptions(**options), echo=click.echo)
    click.echo(format_gpus(result))
    _write_json(result, json_path)


def _write_json(result, json_path):
    if not json_path:
        return
    text = json.dumps(result, indent=2)
    if json_path == "-":
        click.echo(text)
    else:
        with open(json_path, "w") as f:
            f.write(text + "\n")
        click.echo(f"wrote {json_path}")


# ----------------------------------------------------------------------------- profile


@main.command()
@_device_option
@_shape_options
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed steps (each op: the median).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--variants", is_flag=True,
              help="Also profile the step with each convolution version, side by side.")
@click.option("--remeasure-peaks", is_flag=True,
              help="Measure the device's ceilings again instead of using the cached ones.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the roofline, every op a point, as a PNG here.")
@click.option("--markdown", "markdown_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the op table as Markdown here (docs/one-step.md's tables).")
def profile(json_path, plot_path, markdown_path, **options):
    """One training step op by op: each op's time, FLOPs, bytes, GFLOP/s, GB/s and % of
    the roofline of this device (its FMA peak and copy bandwidth, measured here, cached)."""
    from nodulekit.profile.report import format_profile, markdown_ops
    from nodulekit.profile.roofline import plot_roofline
    from nodulekit.profile.run import ProfileOptions, run_profile

    with _one_line_errors():
        result = run_profile(ProfileOptions(**options))
    click.echo(format_profile(result))
    if plot_path:
        plot_roofline(result, plot_path)
        click.echo(f"wrote {plot_path}")
    if markdown_path:
        Path(markdown_path).write_text(markdown_ops(result))
        click.echo(f"wrote {markdown_path}")
    _write_json(result, json_path)


# ----------------------------------------------------------------------------- train
# (train, evaluate, predict, inspect: nodulekit/train and nodulekit/nn/summary.py)

_PRECISIONS = ("fp32", "tf32", "bf16")


def _run_device_options(f):
    f = click.option("--precision", default=None, type=click.Choice(_PRECISIONS),
                     help="Arithmetic on the GPU (the CPU computes fp32)  [default: fp32]")(f)
    return click.option("--device", default="auto", show_default=True,
                        type=click.Choice(["auto", "cpu", "cuda"]),
                        help="'auto' picks cuda when a GPU is usable, else cpu, and says so.")(f)


def _library_errors():
    """The library's error types that mean 'bad input', shown without a traceback."""
    from nodulekit.data.cache import CacheError
    from nodulekit.data.layout import LayoutError
    from nodulekit.data.loader import LoaderError
    from nodulekit.data.preprocess import PreprocessError
    from nodulekit.training.checkpoint import CheckpointError
    from nodulekit.training.loop import TrainingDiverged

    return (ValueError, OSError, RuntimeError, CacheError, LayoutError, LoaderError,
            PreprocessError, CheckpointError, TrainingDiverged)


def _patch_value(ctx, param, value):
    """`--patch`: a positive int, or "auto" (None: chosen from the slices and the device)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        patch = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number of pixels nor 'auto'",
                                 ctx=ctx, param=param) from None
    if patch < 1:
        raise click.BadParameter(f"{patch} must be at least 1", ctx=ctx, param=param)
    return patch


@main.command()
@click.argument("data", required=False, type=click.Path(exists=True))
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs in all (paper: 200; demo: 20); with --resume, more than done.")
@click.option("--val-interval", type=click.IntRange(min=1), default=None, metavar="N",
              help="Validate after every N-th epoch and the last (MONAI's val_interval); the "
                   "best model is kept among the validated epochs  [default: 1; demo: 2]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per step (paper: 12).")
@click.option("--lr", type=float, default=None,
              help="Adam learning rate (nodulekit: 1e-3; paper: 1e-4).")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Channels of the first level (paper: 64).")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Poolings (paper: 4).")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Centre-crop the slices to SIZE x SIZE (default: the cache's slice size; "
                   "no resizing). Any size: whole slices are padded with air to a multiple "
                   "of 2**depth for the network.")
@_run_device_options
@click.option("--seed", type=int, default=None, help="Initialisation and data order  [default: 0]")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Loader threads.")
@click.option("--queue", type=click.IntRange(min=1), default=None,
              help="Batches read ahead (default 2 x workers).")
@click.option("--empty-fraction", type=float, default=None,
              help="Fraction of the empty slices added to each epoch (nodulekit: 0.3; paper: 0, "
                   "then 0.02 to fine-tune).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: runs/<data>-<date>-<time>).")
@click.option("--resume", type=click.Path(exists=True), default=None,
              help="Continue the run in this folder from its checkpoint_last.h5 (DATA may "
                   "then name the run's cache at a new place).")
@click.option("--finetune-from", type=click.Path(exists=True), default=None,
              help="Start from this checkpoint's (or run folder's best) weights.")
@click.option("--smooth", type=float, default=None,
              help="The Dice loss's smoothing s (both recipes: 1).")
@click.option("--dice", type=click.Choice(["sample", "batch"]), default=None,
              help="The Dice loss over each sample, averaged (the paper's), or one Dice over "
                   "the batch's pixels (nnU-Net's batch Dice; a faint false blob on an empty "
                   "crop then costs its pixels, not a whole sample)  [default: nodulekit: "
                   "batch; paper: sample]")
@click.option("--head-prior", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, metavar="P",
              help="The foreground probability the untrained net starts at: the head's bias "
                   "starts at log(P / (1 - P)) (RetinaNet's prior)  [default: nodulekit: 0.01; "
                   "paper: 0.5, a zero bias]")
@click.option("--lr-schedule", type=click.Choice(["constant", "poly"]), default=None,
              help="'poly': lr x (1 - step / all steps)^0.9, nnU-Net's decay to ~0 at the "
                   "run's end; 'constant': the paper's. With --resume to more epochs the "
                   "decay stretches to the new end  [default: nodulekit: poly; paper: constant]")
@click.option("--lr-scaling", type=click.Choice(["none", "fan_in"]), default=None,
              help="'fan_in': each layer's Adam step scaled by sqrt(9 / fan-in) (stabilises "
                   "the normalisation-free U-Net at high lr). Both recipes: none.")
@click.option("--bce-weight", type=float, default=None,
              help="Add this x the per-slice summed BCE to the Dice loss (nodulekit: 1e-4, about "
                   "the pixel mean of a 128 x 128 patch; paper: 0).")
@click.option("--nodule-dice-weight", type=click.FloatRange(min=0), default=None,
              help="Add this x a Dice per nodule of the truth (averaged over the batch's "
                   "nodules), so a 4 mm nodule weighs what a 30 mm one does  [default: "
                   "nodulekit: 1; paper: 0]")
@click.option("--nodule-bce-weight", type=click.FloatRange(min=0), default=None,
              help="Add this x a BCE per nodule of the truth (the mean -log p over its "
                   "pixels, averaged over the batch's nodules): a push towards each missed "
                   "nodule that does not fade as p -> 0  [default: 0]")
@click.option("--recipe", type=click.Choice(["nodulekit", "paper"]), default=None,
              help="The defaults of --lr --lr-schedule --smooth --dice --head-prior --bce-weight "
                   "--nodule-dice-weight --lr-scaling --empty-fraction --norm "
                   "--foreground-fraction --nodule-balance --context-slices: "
                   "'nodulekit' (learns on data nobody tuned for; README, 'Recipes') or "
                   "'paper' (Dice s=1 per sample, Adam 1e-4, no norm)  [default: nodulekit]")
@click.option("--norm", type=click.Choice(["none", "instance", "batch"]), default=None,
              help="Normalisation after each 3x3 convolution (conv -> norm -> ReLU; batch norm "
                   "over the global batch on several ranks)  [default: nodulekit: batch; "
                   "paper: none]")
@click.option("--patch", default=None, metavar="P|auto", callback=_patch_value,
              help="Train on P x P crops of the cache's native-resolution slices (P a multiple "
                   "of 2**depth, at most the slice size); validation, test and predict use "
                   "whole slices  [default: auto: min(slice, 128) on the CPU, min(slice, 256) "
                   "on a GPU, the slice rounded down to a multiple of 2**depth]")
@click.option("--foreground-fraction", type=click.FloatRange(0, 1), default=None,
              help="Of the patches, the fraction placed on a nodule (nnU-Net's foreground "
                   "oversampling); the rest are uniform over the slice  [default: nodulekit: "
                   "0.5; paper: 1/3]")
@click.option("--nodule-balance", type=click.FloatRange(0, 1), default=None, metavar="F",
              help="Of an epoch's nodule samples, the share F drawn nodule by nodule (a 3-D "
                   "nodule uniformly, then one of its slices; a patch placed on a nodule goes "
                   "on that one): a 4 mm nodule then comes as often as a 30 mm one; the rest "
                   "are nodule slices, each at most once  [default: 0: every nodule slice "
                   "once an epoch]")
@click.option("--context-slices", type=click.IntRange(min=0), default=None,
              help="Feed the K slices below and above as extra input channels (2.5D; at a "
                   "scan's edge the last slice repeats)  [default: 0]")
@click.option("--weight-ema", type=click.FloatRange(0, 1, max_open=True), default=None,
              metavar="D",
              help="Validate, keep and load an exponential moving average of the weights, "
                   "decay D per step (e.g. 0.99: about the last 100 steps); 0: the weights "
                   "themselves  [default: 0]")
@click.option("--spacing", type=_SpacingType(), default=None,
              metavar="MM|median", help="DATA a folder: resample its slices in-plane to MM x MM "
                                        "pixels (median: the scans' median) as it is "
                                        "preprocessed (`preprocess --spacing`); predict and "
                                        "evaluate then resample to them too  [default: native]")
@click.option("--no-test", is_flag=True, help="Skip evaluating the best model on the test split.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Data-parallel on this host: start N ranks (one per GPU; CPU ranks where "
                   "there is no GPU) with mpiexec. The global --batch-size is split evenly. "
                   "On several hosts: mpiexec -n N nodulekit train ...")
@click.pass_context
def train(ctx, gpus, no_test, no_progress, **options):
    """Train the U-Net on DATA: a cache (.h5) or a data-set folder (preprocessed into the run
    folder first). Without DATA: a small synthetic demo set, generated once into
    ~/.cache/nodulekit (or $NODULEKIT_CACHE), and a small model sized for a CPU."""
    from nodulekit import distributed
    from nodulekit.training.config import TrainOptions
    from nodulekit.training.loop import train as run_train

    if gpus is not None and not distributed.launched_by_mpi():
        _launch_ranks(ctx, gpus, options["device"])
        return
    if gpus is not None and distributed.launcher_world_size() not in (None, gpus):
        raise click.ClickException(f"--gpus {gpus}, but mpiexec started "
                                   f"{distributed.launcher_world_size()} ranks")
    rank = distributed.launcher_rank()
    try:
        result = run_train(TrainOptions(**options, test=not no_test, progress=not no_progress))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    except distributed.PeerFailed:
        raise click.exceptions.Exit(1) from None  # the failing rank has said why
    except _library_errors() as e:
        raise _user_error(e, prefix=f"rank {rank}: " if rank else "") from None
    if result.rank == 0:
        click.echo(f"run folder: {result.out}")


def _launch_ranks(ctx, ranks: int, device: str) -> None:
    """`train --gpus N`: the same command under `mpiexec -n N`, this Python's mpiexec."""
    from nodulekit import distributed
    from nodulekit.engine import cuda_usable

    if device in ("auto", "cuda"):
        ok, why = cuda_usable()
        if ok:
            import cupy

            have = cupy.cuda.runtime.getDeviceCount()
            if ranks > have:
                raise click.ClickException(f"--gpus {ranks}, but this host has {have} GPU(s) "
                                           f"({why})")
            what = f"{ranks} GPU rank(s)"
        elif device == "cuda":
            raise click.ClickException(f"--device cuda --gpus {ranks}: {why}")
        else:
            what = f"{ranks} CPU rank(s) (no usable GPU: {why})"
    else:
        what = f"{ranks} CPU rank(s)"
    args = _command_line(ctx, drop=("gpus",))
    if _debug():
        args = ["--debug", *args]
    try:
        cmd = distributed.launch_command(ranks, args)
    except distributed.DistributedError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"starting {what}: {' '.join(cmd)}")
    try:
        status = distributed.launch(ranks, args)
    except distributed.LaunchInterrupted as e:
        click.echo(f"nodulekit: {e}", err=True)
        raise click.exceptions.Exit(128 + e.signum) from None
    if status != 0:
        raise click.ClickException(
            f"the run stopped: mpiexec exited with status {status} (a rank failed or was "
            "killed; mpiexec then ends every rank. The failing rank's message is above)")


def _command_line(ctx, drop=()) -> list[str]:
    """The arguments that give this command again: its name, then every option that
    differs from its default, and the positional arguments."""
    args = [ctx.info_name]
    positional = []
    for param in ctx.command.params:
        if param.name in drop:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            if value is not None:
                positional.append(str(value))
            continue
        if value is None or value == param.default or (param.is_flag and not value):
            continue
        name = max(param.opts, key=len)
        args += [name] if param.is_flag else [name, str(value)]
    return args + (["--", *positional] if positional else [])


# options `evaluate` and `predict` share (click makes a new Option each time one is applied)
_tile_option = click.option(
    "--tile", default="auto", show_default=True,
    help="Whole slices run at their own size (padded with air to a multiple of 2**depth). "
         "'auto': in tiles only where the forward pass would exceed the memory budget (a "
         "quarter of the free memory, or NODULEKIT_INFER_MEMORY_MB); 'off': never; N: tiles "
         "of N x N. Tiles overlap by the network's reach, so the result is the untiled one.")
_min_peak_option = click.option(
    "--min-peak", default="model", show_default=True,
    help="The peak filter: a predicted component (p > 0.5, 8-connected per slice) is kept "
         "only where p reaches this somewhere in it. 'model': the threshold chosen on "
         "validation when the checkpoint was saved; 'off': keep every component; or a "
         "probability in [0.5, 1).")


@main.command()
@click.argument("run", type=click.Path(exists=True))
@click.argument("data", required=False, type=click.Path(exists=True))
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "val", "test"]))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for summary.json, table.csv, nodules.csv and froc.png (default: "
                   "<run>/evaluate-<split>).")
@_run_device_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per forward pass.")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Centre-crop the slices to SIZE x SIZE (default: whole slices).")
@_tile_option
@_min_peak_option
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Loader threads.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate(run, precision, no_progress, **options):
    """Dice and IoU of RUN (a run folder: its best checkpoint; or a checkpoint file) on a split
    of DATA (default: the data it trained on): per slice, global, and by nodule diameter; and
    per nodule in whole scans: nodules detected, false positives per scan, FROC and CPM."""
    from nodulekit.evaluation.evaluate import EvaluateOptions, format_summary
    from nodulekit.evaluation.evaluate import evaluate as run_evaluate

    try:
        summary, path = run_evaluate(
            EvaluateOptions(run, precision=precision or "fp32", progress=not no_progress,
                            **options), report=click.echo)
    except _library_errors() as e:
        raise _user_error(e) from None
    click.echo(format_summary(summary))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for masks/, overlays/, probabilities/ and predictions.csv (scans: "
                   "masks/, seg/, scans.csv, nodules.csv).")
@click.option("--scans", is_flag=True,
              help="Read DICOM folders as whole series (each series in them and below them "
                   "a scan: NIfTI mask, DICOM SEG, nodules.csv) instead of slice by slice. "
                   "NIfTI and MetaImage inputs are always scans.")
@click.option("--truth", default="auto", show_default=True,
              help="Truth masks for the overlays: 'auto' (UniToChest's masks/ beside "
                   "images/), 'none', or a folder mirroring the inputs.")
@click.option("--probabilities", is_flag=True, help="Also write p = sigmoid(logit) as PNG.")
@click.option("--overwrite", is_flag=True,
              help="OUT holds an earlier prediction: replace it (only the files that it "
                   "lists in predictions.csv are removed).")
@_run_device_options
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Slices per forward pass.")
@_tile_option
@_min_peak_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def predict(checkpoint, inputs, out, precision, no_progress, **options):
    """Nodule masks for INPUTS with CHECKPOINT (or a run folder).

    DICOM files or folders: 0/255 PNG masks named like UniToChest's, and overlays in the
    paper's Fig. 4 colours (yellow agreement, green false positive, red false negative).
    Scans (.nii, .nii.gz, .mhd, .mha, also those found in folders; with --scans each DICOM
    series in the folders): the mask in the scan's geometry as NIfTI (and DICOM SEG for a
    series), and nodules.csv with each 3-D nodule's centre (LPS mm), diameter, volume and
    probability."""
    from nodulekit.inference.predict import PredictOptions
    from nodulekit.inference.predict import predict as run_predict

    try:
        result = run_predict(checkpoint, inputs, out,
                             PredictOptions(precision=precision or "fp32",
                                            progress=not no_progress, **options),
                             report=click.echo)
    except _library_errors() as e:
        raise _user_error(e) from None
    if result.scans:
        click.echo(f"wrote {len(result.scans)} scan mask(s) with {len(result.nodules)} "
                   f"nodule(s) (nodules.csv) under {result.out}")
    if result.written > len(result.scans):
        click.echo(f"wrote {result.written - len(result.scans)} mask(s) and overlay(s) under "
                   f"{result.out}")
    if result.summary:
        a, nod = result.summary["all"], result.summary["nodule_slices"]
        from nodulekit.evaluation.metrics import format_conventions

        click.echo(f"against the truth masks: {a['slices']} slices, mean IoU "
                   f"{a['mean_iou']:.4f}, global Dice {a['global_dice']:.4f}; "
                   f"{nod['slices']} with a nodule")
        click.echo(format_conventions(a))
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} input(s) could not be read "
                                   f"(listed above)")


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("--width", type=int, default=None, help="[default: 64, or the checkpoint's]")
@click.option("--depth", type=int, default=None, help="[default: 4, or the checkpoint's]")
@click.option("--size", type=int, default=None,
              help="Input H = W  [default: 512, or the checkpoint's input size]")
@click.option("--batch", type=int, default=None,
              help="Batch size  [default: 1, or the checkpoint's batch size]")
@click.option("--norm", type=click.Choice(["none", "instance", "batch"]), default=None,
              help="Normalisation layers  [default: none, or the checkpoint's]")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the layers and totals as JSON here ('-' for stdout).")
@click.option("--kernels", is_flag=True, help="Instead: compile every CUDA kernel for sm_90 "
              "with NVRTC (as CuPy does) and show registers, shared memory and spills.")
def inspect(checkpoint, width, depth, size, batch, norm, json_path, kernels):
    """The U-Net layer by layer: output shape, parameters, FLOPs, activation memory, for an
    input size and batch; from CHECKPOINT's configuration or from the options."""
    if kernels:
        from nodulekit.engine.kernel_check import compile_all, format_kernel_report

        reports = compile_all()
        click.echo(format_kernel_report(reports))
        if not all(r.ok for r in reports):
            raise click.ClickException("some kernels do not compile cleanly (listed above)")
        return
    from dataclasses import asdict

    from nodulekit.nn.summary import format_layers, totals, unet_layers

    shape, channels = None, 1
    if checkpoint:
        from nodulekit.training.checkpoint import load_checkpoint, resolve_checkpoint

        try:
            cfg = load_checkpoint(resolve_checkpoint(checkpoint, prefer="best")).config
        except _library_errors() as e:
            raise _user_error(e) from None
        width = cfg["width"] if width is None else width
        depth = cfg["depth"] if depth is None else depth
        shape = cfg.get("image_shape") if size is None else None
        batch = cfg.get("batch_size", 1) if batch is None else batch
        norm = cfg.get("norm", "none") if norm is None else norm
        channels = int(cfg.get("in_channels", 1))  # 2K + 1 with --context-slices K
    width, depth, batch, norm = width or 64, depth or 4, batch or 1, norm or "none"
    shape = shape or (size or 512, size or 512)
    from nodulekit.inference.tiling import padded_size

    padded = padded_size(shape, 2 ** int(depth)) if min(shape) > 0 else tuple(shape)
    if tuple(padded) != tuple(shape):
        click.echo(f"{shape[0]}x{shape[1]} slices run padded with air to {padded[0]}x"
                   f"{padded[1]}, a multiple of 2**depth (as validation, evaluate and "
                   "predict run them)")
        shape = padded
    try:
        layers = unet_layers(depth=depth, width=width, size=tuple(shape), batch=batch,
                             in_channels=channels, norm=norm)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    normed = f", {norm} norm" if norm != "none" else ""
    click.echo(format_layers(layers, title=f"U-Net depth {depth} width {width}{normed}, input "
                                           f"{batch} x {shape[0]} x {shape[1]} x {channels}, "
                                           "fp32"))
    _write_json({"depth": depth, "width": width, "norm": norm,
                 "input": [batch, *shape, channels],
                 "layers": [asdict(x) for x in layers], "totals": totals(layers)}, json_path)


# ----------------------------------------------------------------------------- data
# (synth, preprocess, bench loader: nodulekit/data, added below this line)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--size", default=512, show_default=True, help="Slice height = width (pixels).")
@click.option("--patients", default=10, show_default=True)
@click.option("--slices-per-patient", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=None, type=int,
              help="Processes writing patients (default: one per CPU; 0: none).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds a data set that synth wrote (its .nodulekit-synth "
                   "marker), and nothing else.")
@click.option("--format", "data_format", default="unitochest", show_default=True,
              type=click.Choice(["unitochest", "msd", "luna16", "series"]),
              help="UniToChest's DICOM slices and PNG masks, or the same patients as whole "
                   "scans: MSD NIfTI, LUNA16 MetaImage + annotations.csv, DICOM series + "
                   "NIfTI labels.")
@click.option("--orientation", default="axial", show_default=True,
              type=click.Choice(["axial", "flipped", "oblique"]),
              help="How whole scans lie in their files (not for unitochest).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def synth(out, size, patients, slices_per_patient, seed, workers, overwrite, data_format,
          orientation, progress):
    """Write a synthetic chest CT data set to OUT (UniToChest layout, or --format)."""
    from nodulekit.data.synth import SynthConfig, synthesize

    try:
        cfg = SynthConfig(size=size, patients=patients, slices_per_patient=slices_per_patient,
                          seed=seed)
        result = synthesize(out, cfg, overwrite=overwrite, progress=progress, workers=workers,
                            format=data_format, orientation=orientation)
    except (ValueError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.summary())


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--layout", default="auto", show_default=True,
              type=click.Choice(["auto", "unitochest", "folder", "series", "msd", "luna16"]),
              help="auto: from what DATA holds (train/ val/ test/: unitochest; dataset.json "
                   "+ imagesTr/: msd; annotations.csv + *.mhd: luna16; NIfTI labels beside "
                   "DICOM folders: series; else folder).")
@click.option("--workers", default=None, type=int,
              help="Decoding processes (default: one per CPU; 0: decode in this process).")
@click.option("--strict", is_flag=True, help="Any file that would be skipped is an error.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a cache (a file preprocess wrote) or empty.")
@click.option("--allow-non-ct", is_flag=True, help="Also read slices whose Modality is not CT.")
@click.option("--split-seed", default=0, show_default=True,
              help="Seed of the 80/10/10 patient split (all layouts but unitochest).")
@click.option("--spacing", type=_SpacingType(), default=None, metavar="MM|median",
              help="Resample every slice in-plane to MM x MM pixels (image linear, mask "
                   "nearest) and pad / crop to one size; median: to the scans' median "
                   "pixel spacing (nnU-Net's default)  [default: native pixels].")
@click.option("--allow-outside-paths", is_flag=True,
              help="Read files that a UniToChest CSV names outside DATA (absolute paths, "
                   "paths with ..); by default such rows are skipped and reported.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the report (every skipped file and why) as JSON here.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def preprocess(data, out, report_path, **options):
    """Decode the CT slices and masks under DATA into the HDF5 cache OUT."""
    from nodulekit.data.cache import CacheError
    from nodulekit.data.layout import LayoutError
    from nodulekit.data.preprocess import PreprocessError, PreprocessOptions
    from nodulekit.data.preprocess import preprocess as run_preprocess

    try:
        report = run_preprocess(data, out, PreprocessOptions(**options))
    except (FileExistsError, PreprocessError, LayoutError, CacheError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.format())
    if report_path:
        _write_json(report.to_dict(), report_path)


@bench.command("loader")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="A data set to read (default: synthesize one in a temporary folder).")
@click.option("--size", default=512, show_default=True, help="Synthetic slice size.")
@click.option("--patients", default=12, show_default=True, help="Synthetic patients.")
@click.option("--slices-per-patient", default=200, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Preprocessing processes.")
@click.option("--repeats", default=3, show_default=True,
              help="Alternating runs of the plain loop and preprocessing (medians).")
@click.option("--batch", default=12, show_default=True, help="Loader batch size.")
@click.option("--batches", default=200, show_default=True, help="Timed loader batches.")
@click.option("--num-workers", default=2, show_default=True, help="Loader threads.")
@click.option("--queue-size", default=4, show_default=True, help="Batches read ahead.")
@click.option("--step-seconds", default=None, type=float,
              help="A training step's time to compare with (default: time one CPU step "
                   "of our U-Net with `bench step`'s width and depth at --size and --batch).")
@click.option("--sweep", is_flag=True, help="Also time the loader over workers x queue size.")
@click.option("--sweep-workers", default="0,1,2,4", show_default=True, callback=lambda c, p, v:
              _int_list(v))
@click.option("--sweep-queue", default="1,2,4,8,16", show_default=True, callback=lambda c, p, v:
              _int_list(v))
@click.option("--consumer-ms", default=0.0, show_default=True,
              help="Simulated work per batch in the sweep (0: raw loader speed).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for stdout).")
def bench_loader(json_path: str | None, **options) -> None:
    """Preprocessing against a plain pydicom loop, loader batches/s, and a sweep."""
    from nodulekit.bench.loader import LoaderBenchOptions, format_loader, run_loader_bench

    result = run_loader_bench(LoaderBenchOptions(**options, progress=True))
    click.echo(format_loader(result))
    _write_json(result, json_path)


if __name__ == "__main__":
    main()
