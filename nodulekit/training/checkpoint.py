"""Checkpoints: one HDF5 file with everything needed to continue a run exactly.

Layout (format "nodulekit-checkpoint", version 1)::

    /                 attrs: format, format_version, nodulekit_version, created_at (UTC),
                             kind ("last" / "best" / ...), epoch (epochs completed),
                             global_step (optimizer steps taken), best_epoch, best_score,
                             config (JSON: the run's resolved configuration),
                             history (JSON: one dict per completed epoch, metrics.csv's rows),
                             layout (JSON: [[name, shape, offset], ...] of the flat buffer),
                             rng (JSON: seeds and positions of every random stream),
                             sha256_params, sha256_adam_m, sha256_adam_v
    /params           float32 [P]  the flat parameter buffer (nn.layout order)
    /adam/m, /adam/v  float32 [P]  Adam's moments; attrs step, lr, beta1, beta2, eps

Randomness: the model's initialisation comes from ``config["seed"]`` and the loader's plan
for epoch e is a function of (loader seed, e) only (`nodulekit.data.loader`), so the
epoch counter and the seeds are all the RNG state a run has; they are stored under ``rng``.

Files are written to a temporary file in the same folder, flushed to disk and renamed over
the target (`os.replace`), so a crash never leaves a half-written checkpoint under the final
name. Reading validates the format, every dataset's presence, shape and dtype, and the
SHA-256 of the arrays, and turns any failure into a `CheckpointError` that names the file
and what is wrong. HDF5 only: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from nodulekit import __version__

FORMAT_NAME = "nodulekit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names file and reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Checkpoint:
    """A checkpoint's contents: what `save_checkpoint` writes and `load_checkpoint` reads."""

    params: np.ndarray  # float32 [P] (host)
    layout: list  # [[name, shape, offset], ...] (`layout_list`; saving takes a layout too)
    config: dict
    epoch: int = 0
    global_step: int = 0
    adam: dict | None = None  # m, v, step, lr, betas, eps
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    rng: dict = field(default_factory=dict)
    kind: str = ""
    nodulekit_version: str = ""  # set when read
    created_at: str = ""  # set when read
    path: Path | None = None  # the file it was read from


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def layout_list(layout) -> list:
    """A ParameterLayout as JSON-able [[name, shape, offset], ...]."""
    return [[s.name, list(s.shape), s.offset] for s in layout.slots.values()]


def save_checkpoint(path: str | os.PathLike, state: Checkpoint) -> Path:
    """Write `state` to `path` atomically (temporary file in the same folder, then
    os.replace).

    state.params: host float32 [P]; state.layout: a ParameterLayout or its `layout_list`;
    state.adam: `Adam.state()` (host copies) or None.
    """
    path = Path(path)
    params = np.ascontiguousarray(state.params, dtype=np.float32)
    if params.ndim != 1:
        raise ValueError(f"params must be a flat vector, got shape {params.shape}")
    layout = state.layout
    slots = layout if isinstance(layout, list) else layout_list(layout)
    adam = state.adam
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            a = f.attrs
            a["format"] = FORMAT_NAME
            a["format_version"] = FORMAT_VERSION
            a["nodulekit_version"] = __version__
            a["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            a["kind"] = state.kind
            a["epoch"] = int(state.epoch)
            a["global_step"] = int(state.global_step)
            a["best_epoch"] = int(state.best_epoch)
            a["best_score"] = float(state.best_score)
            a["config"] = json.dumps(state.config, sort_keys=True)
            a["history"] = json.dumps(list(state.history))
            a["layout"] = json.dumps(slots)
            a["rng"] = json.dumps(state.rng or {}, sort_keys=True)
            f.create_dataset("params", data=params)
            a["sha256_params"] = _sha256(params)
            if adam is not None:
                g = f.create_group("adam")
                for key in ("m", "v"):
                    arr = np.ascontiguousarray(adam[key], dtype=np.float32)
                    if arr.shape != params.shape:
                        raise ValueError(f"Adam {key} has shape {arr.shape}, params "
                                         f"{params.shape}")
                    g.create_dataset(key, data=arr)
                    a[f"sha256_adam_{key}"] = _sha256(arr)
                g.attrs["step"] = int(adam["step"])
                g.attrs["lr"] = float(adam["lr"])
                g.attrs["beta1"], g.attrs["beta2"] = (float(b) for b in adam["betas"])
                g.attrs["eps"] = float(adam["eps"])
        with open(tmp, "rb+") as fh:  # the rename must not land before the data does
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _json_attr(path, attrs, name):
    if name not in attrs:
        raise CheckpointError(path, f"attribute {name!r} is missing: incomplete checkpoint")
    try:
        return json.loads(_text(attrs[name]))
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"attribute {name!r} is not valid JSON ({e}): "
                                    "corrupt checkpoint") from None


def _read_array(path, f, name, size, checksum_attr):
    if name not in f:
        raise CheckpointError(path, f"dataset {name!r} is missing: incomplete checkpoint")
    ds = f[name]
    if ds.dtype != np.float32 or ds.shape != (size,):
        raise CheckpointError(path, f"dataset {name!r} is {ds.dtype} {ds.shape}; expected "
                                    f"float32 ({size},) for the stored layout")
    arr = ds[()]
    want = _text(f.attrs.get(checksum_attr, ""))
    if want and _sha256(arr) != want:
        raise CheckpointError(path, f"dataset {name!r} does not match its SHA-256: the file "
                                    "is corrupt (bytes changed since it was written)")
    return arr


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint; any problem is a CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file (for a run folder, "
                                    "use its checkpoint_best.h5 or checkpoint_last.h5)")
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        size = path.stat().st_size
        why = "empty file" if size == 0 else f"not a readable HDF5 file ({e})"
        raise CheckpointError(path, f"{why}: truncated or corrupt checkpoint?") from None
    try:
        with f:
            return _read(path, f)
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ... on damaged metadata
        raise CheckpointError(path, f"cannot read the checkpoint ({type(e).__name__}: {e}): "
                                    "truncated or corrupt file?") from None


def _read(path: Path, f: h5py.File) -> Checkpoint:
    a = f.attrs
    name = _text(a.get("format", ""))
    if name != FORMAT_NAME:
        raise CheckpointError(path, f"not a nodulekit checkpoint (format attribute {name!r})")
    version = int(a.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {version}; this nodulekit "
                                    f"reads version {FORMAT_VERSION}")
    layout = _json_attr(path, a, "layout")
    config = _json_attr(path, a, "config")
    history = _json_attr(path, a, "history")
    rng = _json_attr(path, a, "rng")
    total = 0
    for entry in layout:
        if (not isinstance(entry, list) or len(entry) != 3 or entry[2] != total):
            raise CheckpointError(path, f"layout entry {entry!r} is malformed or out of "
                                        "order: corrupt checkpoint")
        total += int(np.prod(entry[1], dtype=np.int64))
    for key in ("epoch", "global_step"):
        if key not in a:
            raise CheckpointError(path, f"attribute {key!r} is missing: incomplete checkpoint")
    params = _read_array(path, f, "params", total, "sha256_params")
    adam = None
    if "adam" in f:
        g = f["adam"]
        adam = {"m": _read_array(path, f, "adam/m", total, "sha256_adam_m"),
                "v": _read_array(path, f, "adam/v", total, "sha256_adam_v"),
                "step": int(g.attrs["step"]), "lr": float(g.attrs["lr"]),
                "betas": (float(g.attrs["beta1"]), float(g.attrs["beta2"])),
                "eps": float(g.attrs["eps"])}
    if not np.isfinite(params).all():
        raise CheckpointError(path, "parameters contain NaN or Inf")
    return Checkpoint(
        path=path, params=params, layout=layout, config=config, epoch=int(a["epoch"]),
        global_step=int(a["global_step"]), adam=adam, history=history,
        best_epoch=int(a.get("best_epoch", 0)),
        best_score=float(a.get("best_score", float("-inf"))), rng=rng,
        kind=_text(a.get("kind", "")), nodulekit_version=_text(a.get("nodulekit_version", "")),
        created_at=_text(a.get("created_at", "")))


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder -> its checkpoint_<prefer>.h5 (else the other)."""
    path = Path(path)
    if path.is_dir():
        order = ("best", "last") if prefer == "best" else ("last", "best")
        for kind in order:
            candidate = path / f"checkpoint_{kind}.h5"
            if candidate.is_file():
                return candidate
        raise CheckpointError(path, "run folder without checkpoint_best.h5 or "
                                    "checkpoint_last.h5")
    return path


def model_from_checkpoint(ckpt: Checkpoint, backend):
    """A UNet on `backend` with the checkpoint's architecture and parameters."""
    from nodulekit.nn import UNet
    from nodulekit.nn.layout import ParameterLayout

    cfg = ckpt.config
    try:
        depth, width = int(cfg["depth"]), int(cfg["width"])
        in_channels = int(cfg.get("in_channels", 1))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(ckpt.path, "config has no usable depth/width") from None
    model = UNet(backend, depth=depth, width=width, in_channels=in_channels,
                 seed=int(cfg.get("seed", 0)))
    if layout_list(model.layout) != ckpt.layout:
        stored = ParameterLayout([(n, tuple(s)) for n, s, _ in ckpt.layout])
        raise CheckpointError(ckpt.path, f"parameter layout ({stored.total} values) does not "
                                         f"match a depth-{depth} width-{width} U-Net "
                                         f"({model.layout.total} values)")
    model.load_flat(ckpt.params)
    return model
