"""`nodulekit predict`: DICOM slices -> nodule masks, overlays and probabilities as PNG;
whole scans (NIfTI, MetaImage, and with ``scans`` DICOM series folders) -> NIfTI masks, DICOM
SEG and nodules.csv (`nodulekit.inference.scans`).

`predict` runs these steps, in order:

1. gather the inputs: DICOM files or folders, each slice with a UniToChest-style output name
   and where its truth mask would be (`nodulekit.inference.inputs.find_inputs`);
2. load the network: a checkpoint (or a run folder's best one) on a backend, with the HU
   window it was trained with (`Network.load`);
3. read each slice to HU (`nodulekit.data.dicom.read_slice`) and its truth mask
   (`read_slices`; an unreadable slice is reported, listed in `PredictResult.failed` and
   skipped); for a model trained with context slices (`--context-slices K`: 2K+1 input
   channels), series by series with each slice's K neighbours below and above, as in
   training (`read_series`: series and order from the headers, whatever the input order);
4. run the model in batches of one slice size, windowed like in training and thresholded at
   p > 0.5 (logit > 0), one `SlicePrediction` per slice (`run_batches`): each slice whole at
   its own size, padded with air to a multiple of 2**depth and tiled where memory demands
   it (`nodulekit.inference.tiling`: the same logits as one pass), cropped back;
5. write each slice's mask, overlay in the paper's Fig. 4 colours, probabilities, and at the
   end predictions.csv, its rows in the input order (`nodulekit.inference.writers`, which
   shows the files under OUT).

OUT must be new or empty, so old and new outputs never mix; one that holds an earlier
prediction (its predictions.csv or scans.csv) is replaced with ``overwrite``, which removes
the files that those tables list (and them) once the network has loaded, and nothing else.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.inference.inputs import SliceInput, find_inputs, read_truth
from nodulekit.inference.writers import COLOURS, overlay, write_csv, write_slice

__all__ = ["COLOURS", "Network", "PredictOptions", "PredictResult", "SliceInput",
           "SlicePrediction", "earlier_outputs", "find_inputs", "overlay", "predict", "read_series",
           "read_slices", "remove_outputs", "run_batches", "summarise"]

Report = Callable[[str], Any]


@dataclass
class PredictOptions:
    """How `predict` runs (the `nodulekit predict` options)."""

    truth: str | os.PathLike | None = "auto"  # "auto", "none" or a folder (see inputs.py)
    probabilities: bool = False  # also write probabilities/<rel>.png
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8  # slices per forward pass
    tile: str | int = "auto"  # "auto" (tile over the memory budget), "off", or a tile size
    progress: bool = True
    overwrite: bool = False  # OUT holds an earlier prediction: replace it
    scans: bool = False  # DICOM folders are whole series (scan outputs), not slices
    min_peak: str = "model"  # the peak filter: the checkpoint's, "off", or a probability


@dataclass
class PredictResult:
    out: Path
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None  # metrics over slices with truth, when there were any
    scans: list[dict] = field(default_factory=list)  # scans.csv's rows
    nodules: list[dict] = field(default_factory=list)  # nodules.csv's rows


@dataclass
class LoadedSlice:
    """A slice read to HU, with its truth mask (None: none)."""

    item: SliceInput
    hu: np.ndarray  # [H, W], C-contiguous
    truth: np.ndarray | None
    meta: Any = None  # `nodulekit.data.dicom.SliceMeta`: the series and position
    context: np.ndarray | None = None  # [2K+1, H, W] with --context-slices K (`read_series`)


@dataclass
class SlicePrediction:
    """One slice through the network: what the writers and the summary need."""

    item: SliceInput
    logits: np.ndarray  # [H, W]
    grey: np.ndarray  # the windowed slice in [0, 1], [H, W]
    truth: np.ndarray | None
    counts: np.ndarray | None  # (tp, fp, fn) of `mask` against the truth, when there is one
    mask: np.ndarray  # bool [H, W]: logit > 0, the peak filter applied

    @property
    def has_nodule(self) -> bool:
        return self.truth is not None and bool(self.truth.any())


@dataclass
class Network:
    """A checkpoint's model on a backend, with the HU window it was trained with."""

    backend: Any
    model: Any
    center: float
    width: float
    path: Path  # the checkpoint file
    epoch: int
    tile: str | int = "auto"  # see `nodulekit.inference.tiling.plan`
    memory_budget: int | None = None  # bytes (None: tiling's default)
    # the pixel size (mm) the model trained at (`preprocess --spacing`); None: native
    spacing_mm: float | None = None
    unknown_spacing: int = 0  # slices run at their own pixels: their spacing is unknown
    min_peak_logit: float | None = None  # the peak filter (`nodulekit.inference.peak_filter`)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str = "auto",
             precision: str = "fp32", report: Report = print,
             min_peak: str = "model") -> Network:
        """`checkpoint` (or a run folder's best one) on `device`; says which device, and
        which peak filter (`min_peak`: "model", "off" or a probability) its masks get."""
        from nodulekit.engine import get_backend, resolve_device
        from nodulekit.inference import peak_filter
        from nodulekit.training.checkpoint import (
            load_checkpoint,
            model_from_checkpoint,
            resolve_checkpoint,
        )

        ckpt = load_checkpoint(resolve_checkpoint(checkpoint, prefer="best"))
        min_peak_logit, words = peak_filter.resolve(min_peak, ckpt.history, ckpt.epoch)
        name, sentence = resolve_device(device)
        report(sentence)
        backend = get_backend(name, precision)
        model = model_from_checkpoint(ckpt, backend)
        cfg = ckpt.config
        spacing = cfg.get("spacing_mm")
        net = cls(backend, model, float(cfg.get("window_center", -500.0)),
                  float(cfg.get("window_width", 1600.0)), ckpt.path, ckpt.epoch,
                  spacing_mm=None if spacing is None else float(spacing),
                  min_peak_logit=min_peak_logit)
        report(words)
        if net.spacing_mm is not None:
            report(f"the model trained at {net.spacing_mm:g} mm pixels: inputs are resampled "
                   "to them, and its masks mapped back onto the inputs' own pixels")
        return net

    def run(self, batch: list[LoadedSlice]) -> list[SlicePrediction]:
        """Slices of one size through the network (whole, or tiled where memory demands);
        resampled to the model's pixel size first where it has one
        (`nodulekit.inference.resampling`), slices of one spacing together."""
        if self.spacing_mm is None:
            return self._run(batch, None)
        out: list[SlicePrediction] = []
        group: list[LoadedSlice] = []
        grid = None
        for s in batch:
            g = self._grid(s)
            if group and g != grid:
                out += self._run(group, grid)
                group = []
            group.append(s)
            grid = g
        return out + self._run(group, grid)

    def _grid(self, s: LoadedSlice):
        from nodulekit.inference.resampling import model_grid

        spacing = getattr(s.meta, "pixel_spacing", None)
        if spacing is None or not np.isfinite(spacing).all() or min(spacing) <= 0:
            self.unknown_spacing += 1
            return None
        return model_grid(s.hu.shape, tuple(spacing), self.spacing_mm)

    def _run(self, batch: list[LoadedSlice], grid) -> list[SlicePrediction]:
        from nodulekit.inference.peak_filter import keep_masks
        from nodulekit.inference.resampling import to_model, to_source
        from nodulekit.inference.tiling import run_hu

        be = self.backend
        hu = np.stack([s.hu if s.context is None else s.context for s in batch])
        mask = np.stack([s.truth if s.truth is not None else np.zeros(s.hu.shape, np.uint8)
                         for s in batch])
        if grid is not None and not grid.identity:
            logits, _, image = run_hu(self.model, to_model(hu, grid),
                                      np.zeros((len(batch), *grid.shape), np.uint8),
                                      (self.center, self.width), self.tile, self.memory_budget)
            z = to_source(be.to_host(logits)[..., 0], grid)
            grey = to_source(be.to_host(image)[..., image.shape[-1] // 2], grid)
        else:
            logits, _, image = run_hu(self.model, hu, mask, (self.center, self.width),
                                      self.tile, self.memory_budget)
            z = be.to_host(logits)[..., 0]
            grey = be.to_host(image)[..., image.shape[-1] // 2]
        kept = keep_masks(z, self.min_peak_logit)
        counts = _host_counts(kept, mask)
        return [SlicePrediction(s.item, z[j], grey[j], s.truth,
                                counts[j] if s.truth is not None else None, kept[j])
                for j, s in enumerate(batch)]


def _host_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(tp, fp, fn) per slice of boolean predictions against 0/1 masks [N, H, W]."""
    t = truth > 0
    return np.stack([(pred & t).sum(axis=(1, 2)), (pred & ~t).sum(axis=(1, 2)),
                     (~pred & t).sum(axis=(1, 2))], axis=1).astype(np.int64)


def predict(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike],
            out: str | os.PathLike, options: PredictOptions | None = None, *,
            report: Report = print) -> PredictResult:
    """Run a checkpoint (or a run folder's best one) over DICOM inputs; see the module doc."""
    from tqdm import tqdm

    from nodulekit.inference.scans import find_scans, is_scan_path, scan_files_in_folders

    opts = options if options is not None else PredictOptions()
    out = Path(out)
    earlier = earlier_outputs(out, opts.overwrite)
    inputs = scan_files_in_folders([Path(p) for p in inputs])
    scans, scan_notes, no_series = find_scans([p for p in inputs
                                               if is_scan_path(p, opts.scans)])
    slice_paths = [p for p in inputs if not is_scan_path(p, opts.scans)]
    items = find_inputs(slice_paths, opts.truth) if slice_paths else []
    from nodulekit.inference.tiling import parse_tile

    tile = parse_tile(opts.tile)
    net = Network.load(checkpoint, opts.device, opts.precision, report, opts.min_peak)
    net.tile = tile
    if earlier:
        outputs = sum(p.name not in _TABLES for p in earlier)
        report(f"removing the earlier prediction in {out} ({outputs} file(s))")
        remove_outputs(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out=out)
    for note in scan_notes:
        report(f"note: {note}")
    for folder in no_series:
        result.failed.append((folder, "no DICOM series in it or below it"))
        report(f"skipped {folder}: no DICOM series in it or below it")
    if scans:
        _predict_scans(net, scans, out, opts, result, report)
    if not items:
        return result
    report(f"predicting {len(items)} slice(s) with {net.path} (epoch {net.epoch}) into {out}")
    scored: list[tuple[np.ndarray, bool]] = []  # (tp, fp, fn), has a nodule
    with tqdm(total=len(items), desc="predict", unit="slice", disable=not opts.progress) as bar:
        k = (net.model.in_channels - 1) // 2  # context slices: series by series
        slices = (read_series(items, k, result.failed, report, tick=bar.update) if k else
                  read_slices(items, net.model.depth, result.failed, report, tick=bar.update))
        rank = {item.rel: i for i, item in enumerate(items)}
        ranked = []
        for p in run_batches(net, slices, opts.batch_size):
            ranked.append((rank[p.item.rel], write_slice(out, p, opts.probabilities)))
            result.written += 1
            if p.counts is not None:
                scored.append((p.counts, p.has_nodule))
    result.rows = [row for _, row in sorted(ranked, key=lambda r: r[0])]  # the input order
    write_csv(out / "predictions.csv", result.rows)
    result.summary = summarise(scored)
    return result


def _predict_scans(net: Network, scans: list, out: Path, opts: PredictOptions,
                   result: PredictResult, report: Report) -> None:
    """Each scan through the network, its outputs written (`nodulekit.inference.scans`); a
    scan that cannot be read is reported, listed in `result.failed` and skipped."""
    from tqdm import tqdm

    from nodulekit.data.dicom import DicomError
    from nodulekit.data.scans import ScanError
    from nodulekit.data.seg import SegError
    from nodulekit.data.volumes import GeometryError
    from nodulekit.inference.scans import predict_scan, write_scan, write_tables

    report(f"predicting {len(scans)} scan(s) with {net.path} (epoch {net.epoch}) into {out}")
    for scan in scans:
        try:
            with tqdm(desc=scan.name, unit="slice", disable=not opts.progress,
                      leave=False) as bar:
                p = predict_scan(net, scan, opts.batch_size, tick=bar.update)
            row, nodules = write_scan(out, p, opts.probabilities)
        except (GeometryError, DicomError, SegError, ScanError) as e:
            result.failed.append((str(scan.path), str(e)))
            report(f"skipped {e}")
            continue
        for note in p.volume.notes:
            report(f"note: {note}")
        report(f"{scan.path}: {p.volume.shape[0]} slices, {len(nodules)} nodule(s) -> "
               f"{row['mask']}" + (f", {row['seg']}" if row.get("seg") else ""))
        result.scans.append(row)
        result.nodules.extend(nodules)
        result.written += 1
    write_tables(out, result.scans, result.nodules)


_OUTPUT_COLUMNS = ("mask", "overlay", "probabilities", "seg")
_OUTPUT_FOLDERS = ("masks", "overlays", "probabilities", "seg")
_OUTPUT_SUFFIXES = (".png", ".nii.gz", ".dcm")
_TABLES = ("predictions.csv", "scans.csv", "nodules.csv")


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier prediction in `out` (its tables last) that `overwrite`
    replaces; [] for a new or empty folder. Refuses (ValueError) a folder that holds other
    things, or an earlier prediction without `overwrite`."""
    import csv

    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return []
    tables = [out / name for name in _TABLES if (out / name).is_file()]
    if not any(t.name in ("predictions.csv", "scans.csv") for t in tables):
        raise ValueError(f"{out} is not empty and holds no earlier prediction "
                         "(predictions.csv or scans.csv): choose a new or empty --out")
    if not overwrite:
        raise ValueError(f"{out} holds an earlier prediction: pass --overwrite to replace it, "
                         "or choose another --out")
    root = out.resolve()
    files = []
    for table in tables:
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                for column in _OUTPUT_COLUMNS:
                    rel = row.get(column) or ""
                    path = (out / rel).resolve()
                    if rel and path.name.endswith(_OUTPUT_SUFFIXES) and \
                            path.is_relative_to(root) and \
                            path.relative_to(root).parts[0] in _OUTPUT_FOLDERS:
                        files.append(out / rel)
    return [*files, *tables]


def remove_outputs(out: Path, files: list[Path]) -> None:
    """Remove `files` and the output folders they leave empty (nothing else)."""
    for path in files:
        path.unlink(missing_ok=True)
    for name in _OUTPUT_FOLDERS:
        top = out / name
        if not top.is_dir():
            continue
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()),
                             key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if not any(top.iterdir()):
            top.rmdir()


def read_slices(items: Iterable[SliceInput], depth: int, failed: list[tuple[str, str]],
                report: Report = print,
                tick: Callable[[int], Any] | None = None) -> Iterator[LoadedSlice]:
    """Each item read to HU with its truth mask; an item that cannot be read is reported,
    appended to `failed` and skipped. `tick(1)` is called per item, before reading it.
    depth: the model's; any slice size is taken (`Network.run` pads it), so it no longer
    decides anything."""
    from nodulekit.data.dicom import DicomError, NotCTError, read_slice

    for item in items:
        if tick is not None:
            tick(1)
        try:
            ct = read_slice(item.path)
        except NotCTError as e:  # the model knows CT's HU only: no option to read others
            why = f"{e.path}: {e.what}, not CT; predict reads CT slices only"
            failed.append((str(item.path), why))
            report(f"skipped {why}")
            continue
        except (DicomError, ValueError) as e:
            failed.append((str(item.path), str(e)))
            report(f"skipped {item.path}: {e}")
            continue
        truth = read_truth(item, ct.hu.shape, report)
        yield LoadedSlice(item, np.ascontiguousarray(ct.hu), truth, ct.meta)


def read_series(items: list[SliceInput], k: int, failed: list[tuple[str, str]],
                report: Report = print,
                tick: Callable[[int], Any] | None = None) -> Iterator[LoadedSlice]:
    """`read_slices` for a model trained with `k` context slices: each slice with its
    `context` [2k+1, H, W], the k slices below it in its series, itself (channel k) and the
    k above, as in training (`nodulekit.data.loader.context_table`), whatever the order of
    `items`.

    Series and their order come from the slices' headers (`inputs.plan_series`: patient,
    study and series UID; position along the slice normal, else z, SliceLocation,
    InstanceNumber, the input order); series by series, each slice is read once and kept
    only while a neighbour needs it. At a series' first and last slice the edge slice
    repeats, as in training; a slice that cannot be read is reported and skipped (its
    neighbours close up, as in a cache without it); where the slice size or pixel spacing
    changes within a series, each part is a series of its own. Notes say, once each, where
    a fallback was taken and how many slices had no neighbour at all.
    """
    from nodulekit.inference.inputs import plan_series, read_header

    plan = plan_series(items, [read_header(item.path) for item in items])
    for note in plan.notes:
        report(note)
    seen = _ContextNotes()
    for members in plan.series:
        slices = read_slices([items[i] for i in members], 0, failed, report, tick)
        yield from _with_neighbours(slices, k, seen)
    seen.report(k, report)


@dataclass
class _ContextNotes:
    alone: int = 0  # slices with no neighbour
    split: int = 0  # series cut by a change of size or spacing

    def report(self, k: int, report: Report) -> None:
        if self.split:
            report(f"note: {self.split} series change slice size or pixel spacing "
                   "partway: neighbours are taken only from the part of a slice's own size "
                   "and spacing (its edge slice repeats at the change)")
        if self.alone:
            report(f"note: {self.alone} slice(s) had no neighbour in their series among the "
                   f"inputs; the model takes {k} slice(s) below and above as context "
                   "(trained with real neighbours), so each got itself repeated: give whole "
                   "series for its results")


def _with_neighbours(slices: Iterable[LoadedSlice], k: int,
                     seen: _ContextNotes) -> Iterator[LoadedSlice]:
    """One series' slices, in order, each given its `context` once its k successors (or
    the series' end) are read; a change of size or spacing ends the run of neighbours."""
    below: deque[LoadedSlice] = deque(maxlen=k)
    ahead: deque[LoadedSlice] = deque()
    cut = False
    for s in slices:
        if ahead and not _same_grid(ahead[-1], s):
            cut = True
            while ahead:
                yield _centre(below, ahead, k, seen)
            below.clear()
        ahead.append(s)
        if len(ahead) > k:
            yield _centre(below, ahead, k, seen)
    while ahead:
        yield _centre(below, ahead, k, seen)
    seen.split += cut


def _centre(below: deque, ahead: deque, k: int, seen: _ContextNotes) -> LoadedSlice:
    """The first slice of `ahead` with its context (the edge slice repeated where fewer than
    k neighbours are there), moved to `below`."""
    s = ahead.popleft()
    lower, upper = list(below), list(ahead)[:k]
    seen.alone += not lower and not upper
    lower = [lower[0] if lower else s] * (k - len(lower)) + lower
    upper += [upper[-1] if upper else s] * (k - len(upper))
    s.context = np.stack([t.hu for t in (*lower, s, *upper)])
    below.append(s)
    return s


def _same_grid(a: LoadedSlice, b: LoadedSlice) -> bool:
    """Whether two slices of a series have one size and pixel spacing (to 0.1%)."""
    if a.hu.shape != b.hu.shape:
        return False
    sa = getattr(a.meta, "pixel_spacing", None)
    sb = getattr(b.meta, "pixel_spacing", None)
    if sa is None or sb is None:
        return sa is sb
    return bool(np.allclose(sa, sb, rtol=1e-3, atol=0))


def run_batches(net: Network, slices: Iterable[LoadedSlice],
                batch_size: int) -> Iterator[SlicePrediction]:
    """`net` over `slices` in order, `batch_size` at a time; a batch ends early where the slice
    size changes."""
    pending: list[LoadedSlice] = []
    for s in slices:
        if pending and s.hu.shape != pending[0].hu.shape:
            yield from net.run(pending)
            pending = []
        pending.append(s)
        if len(pending) >= batch_size:
            yield from net.run(pending)
            pending = []
    if pending:
        yield from net.run(pending)


def summarise(scored: list[tuple[np.ndarray, bool]]) -> dict | None:
    """{"all", "nodule_slices"}: `group_summary` of the slices' (tp, fp, fn) (with a nodule:
    those whose truth mask is not empty); None without any slice."""
    from nodulekit.evaluation.metrics import group_summary

    if not scored:
        return None
    counts = np.asarray([c for c, _ in scored], dtype=np.int64)
    nodule = np.asarray([n for _, n in scored], dtype=bool)
    return {"all": group_summary(counts), "nodule_slices": group_summary(counts[nodule])}
