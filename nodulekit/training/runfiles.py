"""The run folder's human-facing files: the log, metrics.csv, progress.png, config.json.

A run folder holds::

    config.json            the resolved configuration, versions, the device
    metrics.csv            one row per epoch (see METRIC_COLUMNS)
    progress.png           loss and Dice curves per epoch (like the paper's Fig. 3)
    checkpoint_last.h5     written after every epoch
    checkpoint_best.h5     the epoch kept so far: the latest that finds a validation nodule
                           (`nodulekit.evaluation.selection`; config.json's "selection")
    train.log              everything printed, with a time stamp per line
    test/summary.json      the kept model on the test split (when the cache has one)
    .lock                  who writes the folder now (`nodulekit.training.runlock`)

Every file but the log is written to a temporary file beside it (``.NAME.<pid>-<random>
.partial``, mode 0666 less the umask, like the log) and renamed over it; a failed write
(a full disk, a read-only folder) is an OSError naming the file, with the temporary file
removed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from nodulekit.training.checkpoint import write_file_atomic

# train_nodule_dice: the per-nodule Dice loss, unweighted (0 without the term);
# val_dice, val_iou: means over all validation slices (empty truth and prediction = 1);
# val_nodule_dice: over the slices whose truth has a nodule; val_nodule_found_dice: the same
# with a slice scoring 0 unless prediction and truth overlap with IoU >= 0.1 (what
# checkpoint_best is kept on, `evaluation.selection`);
# val_nodule_soft_dice: the sigmoid's soft Dice (smoothing 1) over those slices (breaks
# ties of val_nodule_found_dice, e.g. at 0); val_empty_fp: the fraction of empty-truth
# slices with any predicted pixel. A run resumed from before these has them empty in its
# earlier rows.
METRIC_COLUMNS = ("epoch", "step", "train_loss", "train_bce", "train_nodule_dice", "val_loss",
                  "val_dice", "val_iou", "val_global_dice", "val_nodule_dice",
                  "val_nodule_found_dice", "val_nodule_found_dice_se", "val_nodule_soft_dice",
                  "val_empty_fp", "val_peak_logit", "val_filtered_nodule_dice",
                  "val_filtered_empty_fp", "seconds", "train_seconds", "images_per_s", "best")
LOG_NAME = "train.log"


class Reporter:
    """Prints lines (above a tqdm bar when one is active) and appends them to a log file."""

    def __init__(self, log_path: str | os.PathLike | None = None, echo=None, quiet=False):
        self.log_path = Path(log_path) if log_path else None
        self._echo = echo
        self.quiet = quiet
        self._file = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, message: str = "") -> None:
        if not self.quiet:
            if self._echo is not None:
                self._echo(message)
            else:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stdout)
        self.log(message)

    def log(self, message: str, when: float | None = None) -> None:
        """Into the log file only (stamped with `when`, a time.time(), default now). A log
        that cannot be written (a full disk) is given up, once, with a warning: the run's
        own error, if any, is what the user must see."""
        if self._file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
            try:
                for line in str(message).splitlines() or [""]:
                    self._file.write(f"{stamp}  {line}\n")
                self._file.flush()
            except OSError as e:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
                if not self.quiet:
                    print(f"warning: cannot write {self.log_path} ({e.strerror or e}); "
                          "no longer logging to it", file=sys.stderr)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: the flush fails, still close
                self._file.close()
            self._file = None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` atomically (see the module docstring)."""
    write_file_atomic(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _jsonable(obj):
    """NaN and inf as null (strict JSON), NumPy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not hasattr(obj, "__len__"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import h5py
    import numpy

    from nodulekit import __version__

    out = {"nodulekit": __version__, "python": platform.python_version(),
           "numpy": numpy.__version__, "h5py": h5py.__version__}
    for name in ("click", "tqdm", "matplotlib", "pydicom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    try:
        import numba

        out["numba"] = numba.__version__
    except ImportError:
        pass
    if "cupy" in sys.modules:
        out["cupy"] = sys.modules["cupy"].__version__
    return out


def device_description(backend_name: str) -> str:
    """A sentence naming the hardware: the GPU's name, or the CPU's model and core count."""
    if backend_name == "cuda":
        from nodulekit.engine import cuda_usable

        ok, name = cuda_usable()
        return f"GPU {name}" if ok else "GPU (unknown)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"


def write_metrics_csv(path: str | os.PathLike, history: list[dict]) -> None:
    lines = [",".join(METRIC_COLUMNS)]
    for row in history:
        cells = []
        for col in METRIC_COLUMNS:
            v = row.get(col, "")
            if isinstance(v, float):
                v = "nan" if math.isnan(v) else f"{v:.6g}"
            elif isinstance(v, bool):
                v = int(v)
            cells.append(str(v))
        lines.append(",".join(cells))
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """metrics.csv's rows: numbers (an empty cell, a column an earlier version did not
    write, as NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (int(v) if k in ("epoch", "step", "best") else
                        float(v) if v not in ("", None) else math.nan)
                    for k, v in r.items()})
    return out


def plot_progress(path: str | os.PathLike, history: list[dict], title: str = "") -> None:
    """Loss (train, validation) per epoch, and the validation scores: mean Dice and IoU over
    all slices, the nodule-slice mean Dice (what checkpoint_best is kept on) and the
    empty-slice false-positive rate; two panels (Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_score = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    # validation's series over the validated epochs only (--val-interval), so lines join
    validated = [r for r in history if math.isfinite(float(r.get("val_loss", math.nan)))]
    val_epochs = [r["epoch"] for r in validated]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax_loss.plot(val_epochs, [r["val_loss"] for r in validated], "s-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("Dice loss")
    ax_loss.set_ylim(bottom=0)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    def col(name):
        return [r.get(name, math.nan) for r in validated]

    epochs = val_epochs
    ax_score.plot(epochs, col("val_dice"), "o-", label="Dice, all slices")
    ax_score.plot(epochs, col("val_iou"), "s-", label="IoU, all slices")
    ax_score.plot(epochs, col("val_nodule_dice"), "D-", lw=1, color="tab:purple",
                  label="Dice, nodule slices")
    ax_score.plot(epochs, col("val_nodule_found_dice"), "o-", lw=2, color="black",
                  label="Dice, nodule slices, found only (> 0: may be kept)")
    ax_score.plot(epochs, col("val_empty_fp"), "x:", color="tab:red",
                  label="empty slices with a false positive")
    ax_score.plot(epochs, col("val_filtered_nodule_dice"), "D--", color="tab:green",
                  label="Dice, nodule slices, peak filter")
    ax_score.plot(epochs, col("val_filtered_empty_fp"), "x--", color="tab:orange",
                  label="empty slices with a false positive, peak filter")
    best = [r for r in history if r.get("best")]
    if best:
        b = best[-1]
        ax_score.axvline(b["epoch"], color="grey", ls="--", lw=1,
                         label=f"kept (epoch {b['epoch']})")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("validation (mean per slice, or fraction)")
    ax_score.set_ylim(0, 1)
    ax_score.legend(loc="best", fontsize="small")
    ax_score.grid(alpha=0.3)
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    write_file_atomic(path, image.getbuffer())
