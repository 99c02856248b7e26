"""Build the HDF5 cache from a data folder (`nodulekit preprocess DATA OUT.h5`).

DICOM decoding, mask reading and connected components run in worker processes started
by a fork server (spawn where there is none): they import only `nodulekit.data.decode`,
put each slice's HU and mask into a slot of a shared buffer and send back the small rest;
the parent writes every slice as one raw HDF5 chunk. Rows come back in the layout's order
whatever the worker count, so the cache is the same with 0 or N workers. The layout of
the file is in `nodulekit.data.cache`. As with any multiprocessing code, a script that
calls `preprocess` with workers must do so under ``if __name__ == "__main__":``.

Every file left out is reported with the reason (`PreprocessReport.skipped`, and the cache's
``/skipped`` group); ``strict=True`` makes the first one an error instead. The cache is
written to a temporary file beside `out` and renamed over it at the very end, so an
interrupted run leaves no half-written file under the final name; an existing `out` is
kept unless ``overwrite=True``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from nodulekit import __version__
from nodulekit.data.cache import FORMAT_NAME, FORMAT_VERSION, WINDOW_CENTER, WINDOW_WIDTH
from nodulekit.data.decode import Decoded, Task, decode, slot_views, worker_main
from nodulekit.data.dicom import DicomError, read_header
from nodulekit.data.layout import SPLITS, DataIndex, Problem, SliceRecord, read_layout
from nodulekit.data.nodules import NoduleLinker


class PreprocessError(RuntimeError):
    """The cache was not written: the message says why (with --strict: which file)."""


@dataclass
class PreprocessReport:
    out: Path
    layout: str
    counts: dict[str, dict[str, int]]  # split -> {"slices": n, "nodule_slices": m}
    skipped: list[Problem]  # files left out, with the reason
    notes: list[Problem]  # how the layout was read where it did not fit exactly
    fixups: list[Problem]  # slices kept with a warning (default rescale, clipped HU)
    seconds: float
    workers: int
    image_shape: tuple[int, int]
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # "parent", "workers"
    total_slices: int = field(init=False)

    def __post_init__(self):
        self.total_slices = sum(c["slices"] for c in self.counts.values())

    @property
    def slices_per_s(self) -> float:
        return self.total_slices / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "out": str(self.out), "layout": self.layout, "image_shape": list(self.image_shape),
            "counts": self.counts, "total_slices": self.total_slices,
            "seconds": self.seconds, "slices_per_s": self.slices_per_s,
            "workers": self.workers, "cpu_seconds": self.cpu_seconds,
            "skipped": [{"path": p.path, "reason": p.reason} for p in self.skipped],
            "fixups": [{"path": p.path, "reason": p.reason} for p in self.fixups],
            "notes": [{"path": p.path, "reason": p.reason} for p in self.notes],
        }

    def format(self, max_listed: int = 50) -> str:
        h, w = self.image_shape
        lines = [f"wrote {self.out} ({self.layout} layout, {h}x{w}, {self.total_slices} slices "
                 f"in {self.seconds:.1f} s = {self.slices_per_s:.0f} slices/s, "
                 f"{self.workers} worker(s))"]
        for split in SPLITS:
            c = self.counts.get(split, {"slices": 0, "nodule_slices": 0})
            lines.append(f"  {split:5s} {c['slices']:7d} slices, {c['nodule_slices']:6d} with "
                         "a nodule")
        for title, items in (("skipped", self.skipped), ("kept with a fix-up", self.fixups),
                             ("notes", self.notes)):
            if not items:
                continue
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  {p}" for p in items[:max_listed])
            if len(items) > max_listed:
                lines.append(f"  ... and {len(items) - max_listed} more (all in the cache's "
                             "/skipped group)" if title == "skipped" else
                             f"  ... and {len(items) - max_listed} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parent side


def preprocess(data: str | os.PathLike, out: str | os.PathLike, *, layout: str = "auto",
               workers: int | None = None, strict: bool = False, overwrite: bool = False,
               progress: bool = True, allow_non_ct: bool = False, split_seed: int = 0,
               index: DataIndex | None = None) -> PreprocessReport:
    """Decode the data set under `data` into the HDF5 cache `out`.

    workers: decoding processes (None: one per CPU; 0: decode in this process).
    split_seed: seed of the patient-level split of a plain folder tree.
    index: an already-read layout (`layout.read_layout`), to skip reading it again.
    """
    start, cpu_start = time.perf_counter(), _own_cpu_seconds()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise PreprocessError(f"{out.parent}: output directory does not exist")
    if index is None:
        index = read_layout(data, layout, seed=split_seed)
    skipped = [p for p in index.problems if p.skipped]
    notes = [p for p in index.problems if not p.skipped]
    if strict and skipped:
        raise PreprocessError(f"--strict: {len(skipped)} file(s) do not fit the layout, first: "
                              f"{skipped[0]}")
    if not index.records:
        raise PreprocessError(f"{index.root}: no slices found ({index.layout} layout)"
                              + (f"; first problem: {skipped[0]}" if skipped else ""))
    n_workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))

    # Beside the output (same file system, so the final rename is atomic); a random part
    # keeps two runs apart. Not mkstemp: its 0600 mode would stick to the finished cache.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    writer = None
    try:
        writer = _CacheWriter(tmp, index, strict)
        tasks = [Task(i, r.image, r.mask, allow_non_ct) for i, r in enumerate(index.records)]
        worker_cpu: list[float] = []
        for result in _run(tasks, n_workers, progress, worker_cpu):
            writer.add(result)
        shape = writer.finish(data_root=index.root, skipped_layout=skipped)
        os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave a partial file behind
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return PreprocessReport(out=out, layout=index.layout, counts=writer.counts,
                            skipped=skipped + writer.skipped, notes=notes,
                            fixups=writer.fixups, seconds=time.perf_counter() - start,
                            workers=n_workers, image_shape=shape,
                            cpu_seconds={"parent": _own_cpu_seconds() - cpu_start,
                                         "workers": sum(worker_cpu)})


# Slices per task sent to a worker, and tasks in flight per worker: enough to keep every
# worker busy while the parent writes, few enough to keep the shared buffer small.
_CHUNK = 4
_IN_FLIGHT_PER_WORKER = 6


def _run(tasks: list[Task], n_workers: int, progress: bool, worker_cpu: list[float]):
    """Decoded results in task order, from worker processes (or inline for 0 workers).

    A result's pixels may live in a buffer (a shared slot) that is reused once the caller
    has handled the result and asks for the next one, so the caller must write them first.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="slice", desc="preprocess", disable=not progress)
    try:
        if n_workers == 0:
            # One HU buffer reused for every slice: the caller writes it out before asking
            # for the next (a fresh half megabyte per slice costs page faults).
            buffer = np.empty(_likely_shape(tasks), dtype=np.int16)
            for t in tasks:
                yield decode(t, hu_out=buffer)
                bar.update(1)
            return
        yield from _run_pool(tasks, n_workers, bar, worker_cpu)
    finally:
        bar.close()


def _run_pool(tasks: list[Task], n_workers: int, bar, worker_cpu: list[float]):
    shape = _likely_shape(tasks)
    blocks = n_workers * _IN_FLIGHT_PER_WORKER  # chunk k uses slot block k % blocks
    ctx = _worker_context()
    buffer = ctx.RawArray("B", blocks * _CHUNK * shape[0] * shape[1] * 3)
    slots_view = np.frombuffer(buffer, dtype=np.uint8)
    chunks = [tasks[i:i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
    conns, procs = [], []
    try:
        for _ in range(n_workers):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child_end, buffer, shape),
                               daemon=True)
            proc.start()
            child_end.close()
            conns.append(parent_end)
            procs.append(proc)

        def send(k: int) -> None:
            # Chunk k always goes to worker k % n_workers, so each pipe returns its chunks
            # in order and reading them round-robin gives the tasks' order.
            first_slot = (k % blocks) * _CHUNK
            items = [(t, first_slot + j) for j, t in enumerate(chunks[k])]
            conns[k % n_workers].send(items)

        for k in range(min(blocks, len(chunks))):
            send(k)
        for k in range(len(chunks)):
            try:
                results = conns[k % n_workers].recv()
            except (EOFError, OSError):
                proc = procs[k % n_workers]
                proc.join(timeout=1)
                raise PreprocessError(
                    f"a decoding process stopped (exit code {proc.exitcode}) while reading "
                    f"{chunks[k][0].image} ... {chunks[k][-1].image}. If it could not even "
                    "start, run the calling script under `if __name__ == \"__main__\":`, "
                    "or use workers=0 (--workers 0)") from None
            for d in results:
                if d.slot is not None:
                    hu, mask = slot_views(slots_view, d.slot, shape)
                    d.hu, d.mask = hu, (mask if d.has_mask else None)
                yield d
                bar.update(1)
            if k + blocks < len(chunks):  # this chunk's slots are free again
                send(k + blocks)
        worker_cpu.extend(_cpu_seconds_of(proc.pid) for proc in procs)
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in conns:
            conn.close()


def _own_cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds_of(pid: int) -> float:
    """CPU time of a worker, read before it exits (a fork server's child is not ours to
    wait for, so RUSAGE_CHILDREN does not see it); NaN where /proc does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def _worker_context():
    """forkserver where there is one, else spawn; never a bare fork of this process.

    A fork would copy the parent's open HDF5 file and threads (progress bar, a caller's
    loader) into the workers. The fork server starts clean, imports the decoding module
    once, and forks each worker from that: about as quick as fork, as safe as spawn.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["nodulekit.data.decode"])
        return ctx
    return mp.get_context("spawn")


def _likely_shape(tasks: list[Task]) -> tuple[int, int]:
    """Rows x columns of the first readable header: the slot size (others travel by pipe)."""
    for t in tasks[:50]:
        try:
            ds = read_header(t.image)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        except (DicomError, TypeError, ValueError):
            continue
        if rows > 0 and cols > 0:
            return rows, cols
    return 512, 512


class _CacheWriter:
    """Writes decoded slices into the per-split datasets, in record order."""

    def __init__(self, path: Path, index: DataIndex, strict: bool):
        self.path = path
        self.index = index
        self.strict = strict
        self.file = h5py.File(path, "w")
        self.shape: tuple[int, int] | None = None
        self.shape_source = ""
        self.skipped: list[Problem] = []
        self.fixups: list[Problem] = []
        self.capacity = {s: sum(r.split == s for r in index.records) for s in SPLITS}
        self.rows = {s: 0 for s in SPLITS}
        self.datasets: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self.meta: dict[str, dict[str, list]] = {s: _empty_meta() for s in SPLITS}
        self.counts = {s: {"slices": 0, "nodule_slices": 0} for s in SPLITS}
        self._exam: tuple | None = None
        self._linker: NoduleLinker | None = None
        self._exam_split = ""
        self._exam_position = 0

    def _create(self, shape: tuple[int, int]) -> None:
        h, w = shape
        for split in SPLITS:
            g = self.file.create_group(split)
            n = self.capacity[split]
            hu = g.create_dataset("hu", shape=(n, h, w), maxshape=(None, h, w), dtype="<i2",
                                  chunks=(1, h, w))
            mask = g.create_dataset("mask", shape=(n, h, w), maxshape=(None, h, w),
                                    dtype=np.uint8, chunks=(1, h, w), fillvalue=0)
            self.datasets[split] = (hu, mask)

    def _skip(self, record: SliceRecord, reason: str) -> None:
        problem = Problem(record.image, reason)
        if self.strict:
            raise PreprocessError(f"--strict: {problem}")
        self.skipped.append(problem)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def add(self, d: Decoded) -> None:
        record = self.index.records[d.row]
        if d.error is not None:
            self._skip(record, d.error)
            return
        shape = tuple(d.hu.shape)
        if self.shape is None:
            self.shape, self.shape_source = shape, record.image
            self._create(shape)
        elif shape != self.shape:
            self._skip(record, f"size {shape[0]}x{shape[1]} differs from the cache's "
                               f"{self.shape[0]}x{self.shape[1]} (set by {self.shape_source})")
            return
        for note in d.fixups:
            self.fixups.append(Problem(record.image, note, skipped=False))
        split = record.split
        row = self.rows[split]
        self.rows[split] += 1
        hu_ds, mask_ds = self.datasets[split]
        # Whole-chunk writes: one chunk per slice, no conversion, no selection machinery.
        hu_ds.id.write_direct_chunk((row, 0, 0), np.ascontiguousarray(d.hu, dtype="<i2"))
        if d.mask is not None:  # empty masks stay as the dataset's fill value, 0
            mask_ds.id.write_direct_chunk((row, 0, 0), np.ascontiguousarray(d.mask))
        self._add_meta(split, row, record, d)

    def _add_meta(self, split: str, row: int, record: SliceRecord, d: Decoded) -> None:
        m = self.meta[split]
        m["patient"].append(record.patient)
        m["exam"].append(record.exam)
        m["slice"].append(-1 if record.slice is None else record.slice)
        m["instance_number"].append(d.instance_number)
        m["slice_position"].append(d.slice_position)
        m["pixel_spacing"].append(d.pixel_spacing)
        m["slice_thickness"].append(d.slice_thickness)
        m["has_nodule"].append(bool(d.parts))
        m["section_diameter_mm"].append(d.section_mm)
        m["nodule_diameter_mm"].append([])  # filled when the exam is complete
        m["source"].append(record.source)
        m["mask_source"].append(_relative_to(self.index.root, record.mask))
        self.counts[split]["slices"] += 1
        self.counts[split]["nodule_slices"] += bool(d.parts)

        exam = (split, record.patient, record.exam)
        if exam != self._exam:
            self._close_exam()
            self._exam, self._exam_split = exam, split
            self._linker, self._exam_position = NoduleLinker(), 0
        self._exam_position += 1
        if d.parts:
            key = record.slice if record.slice is not None else self._exam_position
            self._linker.add(row, key, d.parts, d.section_mm)

    def _close_exam(self) -> None:
        if self._linker is None:
            return
        rows = self.meta[self._exam_split]["nodule_diameter_mm"]
        for row, diameters in self._linker.finish().items():
            rows[row] = diameters
        self._linker = None

    def finish(self, data_root: Path, skipped_layout: list[Problem]) -> tuple[int, int]:
        self._close_exam()
        if self.shape is None:
            first = self.skipped[0] if self.skipped else None
            raise PreprocessError(f"{data_root}: no slice could be read"
                                  + (f"; first: {first}" if first else ""))
        f = self.file
        f.attrs.update({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "created_by": f"nodulekit {__version__}",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "window_center": WINDOW_CENTER, "window_width": WINDOW_WIDTH,
            "height": self.shape[0], "width": self.shape[1],
            "layout": self.index.layout, "source_root": str(data_root),
        })
        for split in SPLITS:
            g = f[split]
            n = self.rows[split]
            g["hu"].resize(n, axis=0)
            g["mask"].resize(n, axis=0)
            _write_meta(g.create_group("meta"), self.meta[split])
        everything = skipped_layout + self.skipped
        g = f.create_group("skipped")
        text = h5py.string_dtype()
        g.create_dataset("path", data=np.array([p.path for p in everything], dtype=object),
                         dtype=text)
        g.create_dataset("reason", data=np.array([p.reason for p in everything], dtype=object),
                         dtype=text)
        f.close()
        return self.shape


def _empty_meta() -> dict[str, list]:
    return {name: [] for name in ("patient", "exam", "slice", "instance_number",
                                  "slice_position", "pixel_spacing", "slice_thickness",
                                  "has_nodule", "section_diameter_mm", "nodule_diameter_mm",
                                  "source", "mask_source")}


def _padded(rows: list[list[float]]) -> np.ndarray:
    k = max([1] + [len(r) for r in rows])
    out = np.full((len(rows), k), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _write_meta(g: h5py.Group, m: dict[str, list]) -> None:
    text = h5py.string_dtype()
    n = len(m["patient"])
    for name in ("patient", "exam", "source", "mask_source"):
        g.create_dataset(name, data=np.array(m[name], dtype=object).reshape(n), dtype=text)
    g.create_dataset("slice", data=np.array(m["slice"], dtype=np.int32).reshape(n))
    g.create_dataset("instance_number",
                     data=np.array(m["instance_number"], dtype=np.int32).reshape(n))
    g.create_dataset("slice_position",
                     data=np.array(m["slice_position"], dtype=np.float32).reshape(n))
    g.create_dataset("pixel_spacing",
                     data=np.array(m["pixel_spacing"], dtype=np.float32).reshape(n, 2))
    g.create_dataset("slice_thickness",
                     data=np.array(m["slice_thickness"], dtype=np.float32).reshape(n))
    g.create_dataset("has_nodule", data=np.array(m["has_nodule"], dtype=bool).reshape(n))
    g.create_dataset("n_nodules", data=np.array([len(d) for d in m["section_diameter_mm"]],
                                                dtype=np.int16).reshape(n))
    section = _padded(m["section_diameter_mm"])
    nodule = _padded(m["nodule_diameter_mm"])
    g.create_dataset("section_diameter_mm", data=section)
    g.create_dataset("nodule_diameter_mm", data=nodule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: slices without nodule
        g.create_dataset("max_diameter_mm", data=np.nanmax(nodule, axis=1).astype(np.float32))


def _relative_to(root: Path, path: str | None) -> str:
    if not path:
        return ""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return str(path) if rel.startswith("..") else Path(rel).as_posix()
