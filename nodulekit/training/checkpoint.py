"""Checkpoints: one HDF5 file with everything needed to continue a run exactly.

Layout (format "nodulekit-checkpoint", version 2)::

    /                 attrs: format, format_version, nodulekit_version, created_at (UTC),
                             kind ("last" / "best" / ...), epoch (epochs completed),
                             global_step (optimizer steps taken), best_epoch, best_score,
                             config (JSON: the run's resolved configuration),
                             history (JSON: one dict per completed epoch, metrics.csv's rows),
                             layout (JSON: [[name, shape, offset], ...] of the flat buffer),
                             rng (JSON: seeds and positions of every random stream),
                             sha256_params, sha256_adam_m, sha256_adam_v,
                             sha256 (the whole file: see below)
    /params           float32 [P]  the flat parameter buffer (nn.layout order)
    /adam/m, /adam/v  float32 [P]  Adam's moments; attrs step, lr, beta1, beta2, eps
    /buffers          float32 [B]  only with batch norm: the running means and variances
                                   (not parameters: no Adam), attrs buffer_layout (JSON, as
                                   layout) and sha256_buffers on /; a checkpoint without it
                                   (every run without batch norm, and older files) has none
    /ema/params       float32 [P]  only with a weight average (`--weight-ema`, `nn.ema`): the
    /ema/buffers      float32 [B]  averaged parameters (and buffers, with batch norm), the
                                   model that was validated; sha256_ema_params (and
                                   sha256_ema_buffers) on /. Loading a model
                                   (`model_from_checkpoint`) takes these; /params stays the
                                   optimiser's weights, which a resumed run continues from

Randomness: the model's initialisation comes from ``config["seed"]`` and the loader's plan
for epoch e is a function of (loader seed, e) only (`nodulekit.data.loader`), so the
epoch counter and the seeds are all the RNG state a run has; they are stored under ``rng``.

Checksums. Each array has its SHA-256 (``sha256_<name>``), and ``sha256`` covers everything
else and those: every attribute of every object (the configuration, history, counters, Adam's
hyper-parameters, the array checksums) and every object's name, kind, dtype and shape, in a
canonical JSON form (`content_digest`). So an edited batch size, epoch counter or history is
refused like a flipped bit in the weights. Format 1 (before 2026-12) had the array checksums
only: such a file is still read, with `Checkpoint.warning` saying what is not covered; the
next checkpoint a resumed run writes is format 2.

Writing. The file is built in memory (HDF5 into a BytesIO), then written with plain
writes to a temporary file in the same folder (created with mode 0666 less the umask, like
the run's other files), flushed to disk and renamed over the target (`os.replace`). A crash
never leaves a half-written checkpoint under the final name, and a failed write (a full
disk) is one OSError naming the final path, with the temporary file removed: HDF5 never
writes to the disk, so no HDF5 file object is left half-closed by a failed flush.

Reading validates the format, every dataset's presence, shape and dtype, and the checksums,
and turns any failure into a `CheckpointError` that names the file and what is wrong. HDF5
only: no pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from nodulekit import __version__

FORMAT_NAME = "nodulekit-checkpoint"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
DIGEST_ATTR = "sha256"


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
    buffers: np.ndarray | None = None  # float32 [B] (host): batch norm's running statistics
    buffer_layout: list = field(default_factory=list)  # as layout (`layout_list`)
    # the weight average (`nn.ema`; None without one): the model validated and loaded
    ema_params: np.ndarray | None = None  # float32 [P] (host)
    ema_buffers: np.ndarray | None = None  # float32 [B] (host), with batch norm
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    rng: dict = field(default_factory=dict)
    kind: str = ""
    nodulekit_version: str = ""  # set when read
    created_at: str = ""  # set when read
    path: Path | None = None  # the file it was read from
    warning: str = ""  # set when read: what the reader should be told (an older format)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def layout_list(layout) -> list:
    """A ParameterLayout as JSON-able [[name, shape, offset], ...]."""
    return [[s.name, list(s.shape), s.offset] for s in layout.slots.values()]


def save_checkpoint(path: str | os.PathLike, state: Checkpoint) -> Path:
    """Write `state` to `path` atomically (see the module docstring: built in memory, written
    to a temporary file beside `path`, renamed over it). A failed write raises OSError naming
    `path` and leaves `path` as it was and no temporary file.

    state.params: host float32 [P]; state.layout: a ParameterLayout or its `layout_list`;
    state.adam: `Adam.state()` (host copies) or None.
    """
    path = Path(path)
    image = _image(state)
    write_file_atomic(path, image.getbuffer())
    return path


def write_file_atomic(path: str | os.PathLike, data) -> None:
    """`data` (bytes-like) into `path`: a temporary file beside it (mode 0666 less the umask),
    fsync, rename. An OSError names `path` (not the temporary file), which is removed."""
    path = Path(path)
    try:
        fd, tmp = create_temporary(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not land before the data does
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_temporary(path: Path) -> tuple[int, Path]:
    """(fd, name) of a new file ``.NAME.<pid>-<random>.partial`` beside `path`, opened for
    writing with mode 0666 less the umask (mkstemp's 0600 would stick to the renamed file)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o666), tmp
        except FileExistsError:
            continue


def _image(state: Checkpoint) -> io.BytesIO:
    """The checkpoint as an HDF5 file image in memory."""
    params = np.ascontiguousarray(state.params, dtype=np.float32)
    if params.ndim != 1:
        raise ValueError(f"params must be a flat vector, got shape {params.shape}")
    layout = state.layout
    slots = layout if isinstance(layout, list) else layout_list(layout)
    adam = state.adam
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
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
        _write_buffers(f, state)
        _write_average(f, state, params.shape)
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
        a[DIGEST_ATTR] = content_digest(f)
    return buf


def _write_buffers(f: h5py.File, state: Checkpoint) -> None:
    """/buffers, when the model has any (batch norm); nothing otherwise, so a checkpoint of
    a model without them is what it always was."""
    if state.buffers is None or np.size(state.buffers) == 0:
        return
    buffers = np.ascontiguousarray(state.buffers, dtype=np.float32)
    layout = state.buffer_layout
    slots = layout if isinstance(layout, list) else layout_list(layout)
    if buffers.shape != (sum(int(np.prod(s[1], dtype=np.int64)) for s in slots),):
        raise ValueError(f"buffers have shape {buffers.shape}, their layout says otherwise")
    f.create_dataset("buffers", data=buffers)
    f.attrs["buffer_layout"] = json.dumps(slots)
    f.attrs["sha256_buffers"] = _sha256(buffers)


def _write_average(f: h5py.File, state: Checkpoint, shape) -> None:
    """/ema/params (and /ema/buffers), when the run keeps a weight average."""
    if state.ema_params is None:
        return
    g = f.create_group("ema")
    arrays = [("params", state.ema_params, shape)]
    if state.buffers is not None and np.size(state.buffers):
        if state.ema_buffers is None:
            raise ValueError("a weight average of a model with buffers needs ema_buffers")
        arrays.append(("buffers", state.ema_buffers, np.shape(state.buffers)))
    for name, value, want in arrays:
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if arr.shape != tuple(want):
            raise ValueError(f"averaged {name} have shape {arr.shape}, expected {tuple(want)}")
        g.create_dataset(name, data=arr)
        f.attrs[f"sha256_ema_{name}"] = _sha256(arr)


def content_digest(f: h5py.File) -> str:
    """SHA-256 of every object's name, kind, dtype, shape and attributes (the digest
    attribute itself left out), in canonical JSON; the arrays enter through their own
    ``sha256_*`` attributes."""
    items = [["/", "group", _attrs(f.attrs, skip=DIGEST_ATTR)]]

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            items.append([name, "dataset", str(obj.dtype), list(obj.shape), _attrs(obj.attrs)])
        else:
            items.append([name, "group", _attrs(obj.attrs)])

    f.visititems(visit)
    items.sort(key=lambda item: item[0])
    text = json.dumps(items, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _attrs(attrs, skip: str = "") -> list:
    return [[k, _canonical(attrs[k])] for k in sorted(attrs) if k != skip]


def _canonical(v):
    """An attribute value as plain JSON-able Python (ints stay ints, floats floats)."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return [_canonical(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return v


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
    warning = _check_version(path, f)
    layout = _json_attr(path, a, "layout")
    config = _json_attr(path, a, "config")
    history = _json_attr(path, a, "history")
    rng = _json_attr(path, a, "rng")
    total = _layout_total(path, layout)
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
    buffers, buffer_layout = None, []
    if "buffers" in f:
        buffer_layout = _json_attr(path, a, "buffer_layout")
        buffers = _read_array(path, f, "buffers", _layout_total(path, buffer_layout),
                              "sha256_buffers")
    ema_params = ema_buffers = None
    if "ema" in f:
        ema_params = _read_array(path, f, "ema/params", total, "sha256_ema_params")
        if buffers is not None:
            ema_buffers = _read_array(path, f, "ema/buffers", buffers.size, "sha256_ema_buffers")
        if not np.isfinite(ema_params).all():
            raise CheckpointError(path, "averaged parameters contain NaN or Inf")
    _check_digest(path, f)
    return Checkpoint(
        path=path, params=params, layout=layout, config=config, epoch=int(a["epoch"]),
        global_step=int(a["global_step"]), adam=adam, history=history, buffers=buffers,
        buffer_layout=buffer_layout, ema_params=ema_params, ema_buffers=ema_buffers,
        best_epoch=int(a.get("best_epoch", 0)),
        best_score=float(a.get("best_score", float("-inf"))), rng=rng,
        kind=_text(a.get("kind", "")), nodulekit_version=_text(a.get("nodulekit_version", "")),
        created_at=_text(a.get("created_at", "")), warning=warning)


def _layout_total(path: Path, layout) -> int:
    """The number of values a [[name, shape, offset], ...] layout covers; each entry must
    start where the one before ended."""
    total = 0
    for entry in layout:
        if (not isinstance(entry, list) or len(entry) != 3 or entry[2] != total):
            raise CheckpointError(path, f"layout entry {entry!r} is malformed or out of "
                                        "order: corrupt checkpoint")
        total += int(np.prod(entry[1], dtype=np.int64))
    return total


def _check_version(path: Path, f: h5py.File) -> str:
    """Refuse an unknown format, or a format-2 file without its checksums; "" or, for a
    format-1 file, the warning that its checksums cover the arrays only."""
    a = f.attrs
    version = int(a.get("format_version", -1))
    if version not in READS_VERSIONS:
        raise CheckpointError(path, f"checkpoint format version {version}; this nodulekit "
                                    f"reads versions {', '.join(map(str, READS_VERSIONS))}")
    if version == 1:
        if DIGEST_ATTR in a:
            raise CheckpointError(path, "says format 1 but carries a format-2 checksum: its "
                                        "format_version was edited; refusing it")
        return (f"{path}: checkpoint format 1 (nodulekit "
                f"{_text(a.get('nodulekit_version', '?'))}): its checksums cover the arrays, "
                "not the configuration, history and counters; a resumed run writes format 2")
    for name in (DIGEST_ATTR, "sha256_params",
                 *(("sha256_adam_m", "sha256_adam_v") if "adam" in f else ()),
                 *(("sha256_buffers",) if "buffers" in f else ()),
                 *(("sha256_ema_params",) if "ema" in f else ()),
                 *(("sha256_ema_buffers",) if "ema" in f and "buffers" in f else ())):
        if name not in a:
            raise CheckpointError(path, f"attribute {name!r} is missing: incomplete checkpoint")
    return ""


def _check_digest(path: Path, f: h5py.File) -> None:
    """Format 2: the whole file's checksum (after the parts were checked one by one, which
    name what is wrong more precisely)."""
    if int(f.attrs["format_version"]) >= 2 and content_digest(f) != _text(f.attrs[DIGEST_ATTR]):
        raise CheckpointError(path, "its configuration, history, counters or structure do not "
                                    "match its SHA-256: the file was edited or is corrupt; "
                                    "refusing it")


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
    """A UNet on `backend` with the checkpoint's architecture, parameters and buffers (a
    checkpoint from before normalisation layers has no ``norm``: "none"); with a weight
    average (`nn.ema`), the averaged ones: the model that was validated."""
    from nodulekit.nn import UNet
    from nodulekit.nn.layout import NORMS, ParameterLayout

    cfg = ckpt.config
    try:
        depth, width = int(cfg["depth"]), int(cfg["width"])
        in_channels = int(cfg.get("in_channels", 1))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(ckpt.path, "config has no usable depth/width") from None
    norm = cfg.get("norm", "none")
    if norm not in NORMS:
        raise CheckpointError(ckpt.path, f"config has an unknown norm {norm!r} (this "
                                         f"nodulekit knows {', '.join(NORMS)})")
    model = UNet(backend, depth=depth, width=width, in_channels=in_channels,
                 seed=int(cfg.get("seed", 0)), norm=norm)
    if layout_list(model.layout) != ckpt.layout:
        stored = ParameterLayout([(n, tuple(s)) for n, s, _ in ckpt.layout])
        raise CheckpointError(ckpt.path, f"parameter layout ({stored.total} values) does not "
                                         f"match a depth-{depth} width-{width} U-Net with "
                                         f"norm {norm} ({model.layout.total} values)")
    if ckpt.ema_params is not None:
        ckpt = dataclasses.replace(ckpt, params=ckpt.ema_params, buffers=ckpt.ema_buffers)
    model.load_flat(ckpt.params)
    load_buffers(model, ckpt)
    return model


def load_buffers(model, ckpt: Checkpoint) -> None:
    """The checkpoint's buffers (batch norm's running statistics) into `model`; they must
    be exactly the ones its layout has."""
    if layout_list(model.buffer_layout) != (ckpt.buffer_layout or []):
        raise CheckpointError(ckpt.path, f"buffers ({len(ckpt.buffer_layout or [])} tensors) do "
                                         f"not match the model's "
                                         f"({len(model.buffer_layout.slots)}: norm "
                                         f"{model.norm})")
    if model.buffer_layout.total:
        model.load_buffers(ckpt.buffers)
