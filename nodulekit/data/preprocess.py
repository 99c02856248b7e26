"""Build the HDF5 cache from a data folder (`nodulekit preprocess DATA OUT.h5`).

DICOM decoding, mask reading and connected components run in worker processes started
by a fork server (spawn where there is none, see `nodulekit.data.procs`): they import only
`nodulekit.data.decode`. The parent decodes the first readable slice itself, which sets the
cache's slice size, and creates the datasets with every HU chunk (one per slice,
uncompressed) allocated in the file up front; each worker then writes a slice's HU straight
into its chunk, at the byte offset HDF5 reports for it, and sends back only the small rest
(metadata, the mask's bounding box, the components). The parent writes the masks and the
metadata. Results are handled in the layout's order whatever the worker count; a slice
written at its planned row is moved up when a file before it in its split was skipped, so
the cache is the same with 0 or N workers (only a skipped slice's chunk then stays as unused
space in the file). The layout of the file is in `nodulekit.data.cache`. As with any
multiprocessing code, a script that calls `preprocess` with workers must do so under
``if __name__ == "__main__":``.

Every file left out is reported with the reason (`PreprocessReport.skipped`, and the cache's
``/skipped`` group); ``strict=True`` makes the first one an error instead. The cache is
written to a temporary file beside `out` and renamed over it at the very end, so an
interrupted run leaves no half-written file under the final name; an existing `out` is
kept unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import math
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
from nodulekit.data.decode import Decoded, Task, decode, worker_main
from nodulekit.data.layout import SPLITS, DataIndex, Problem, SliceRecord, read_layout
from nodulekit.data.nodules import NoduleLinker
from nodulekit.data.procs import worker_context


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
    n_workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    # Beside the output (same file system, so the final rename is atomic); a random part
    # keeps two runs apart. Not mkstemp: its 0600 mode would stick to the finished cache.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    pool = writer = None
    try:
        if n_workers:
            pool = _Workers(n_workers, tmp)  # they start while the layout is read
        if index is None:
            index = read_layout(data, layout, seed=split_seed)
        skipped = [p for p in index.problems if p.skipped]
        notes = [p for p in index.problems if not p.skipped]
        if strict and skipped:
            raise PreprocessError(f"--strict: {len(skipped)} file(s) do not fit the layout, "
                                  f"first: {skipped[0]}")
        if not index.records:
            raise PreprocessError(f"{index.root}: no slices found ({index.layout} layout)"
                                  + (f"; first problem: {skipped[0]}" if skipped else ""))
        writer = _CacheWriter(tmp, index, strict, preallocate=pool is not None)
        tasks = [Task(i, r.image, r.mask, allow_non_ct) for i, r in enumerate(index.records)]
        worker_cpu: list[float] = []
        _decode_all(writer, tasks, pool, progress, worker_cpu)
        if pool is not None:
            pool.close()
            pool = None
        shape = writer.finish(data_root=index.root, skipped_layout=skipped)
        os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave a partial file behind
        if pool is not None:
            pool.close(wait=False)
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


# Slices per message to a worker, and messages in flight per worker: enough to keep every
# worker busy while the parent handles results, few enough to keep the results it holds
# (waiting for an earlier chunk) few.
_CHUNK = 8
_IN_FLIGHT_PER_WORKER = 3


def _decode_all(writer: _CacheWriter, tasks: list[Task], pool: _Workers | None,
                progress: bool, worker_cpu: list[float]) -> None:
    """Decode every task into the cache, in the tasks' order (so the cache is the same
    with 0 or N workers).

    The slices are decoded here until the first readable one has set the cache's slice
    size and so created its datasets; with workers, the rest then goes to them, and they
    write their HU straight into the file.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="slice", desc="preprocess", disable=not progress)
    try:
        hu_buffer = mask_buffer = None
        i = 0
        while i < len(tasks) and (pool is None or writer.shape is None):
            # Buffers reused for every slice: the writer writes them out before the next
            # decode (a fresh half megabyte per slice costs page faults).
            writer.add(decode(tasks[i], hu_out=hu_buffer, mask_out=mask_buffer))
            bar.update(1)
            i += 1
            if hu_buffer is None and writer.shape is not None:
                hu_buffer = np.empty(writer.shape, dtype=np.int16)
                mask_buffer = np.empty(writer.shape, dtype=np.uint8)
        if i < len(tasks):
            writer.lock = pool.lock  # the workers write into the file from now on
            pool.run(writer, tasks[i:], bar, worker_cpu)
    finally:
        bar.close()


class _Workers:
    """The decoding processes (`decode.worker_main`), and the work handed to them."""

    def __init__(self, n: int, out: Path):
        ctx = worker_context()
        self.lock = ctx.Lock()  # one writer at a time in the file: see decode.worker_main
        self.conns: list = []
        self.procs: list = []
        self.queued: dict = {}  # connection -> chunk numbers sent to it, oldest first
        for _ in range(n):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child_end, str(out), self.lock),
                               daemon=True)
            self.conns.append(parent_end)
            self.procs.append(proc)
            self.queued[parent_end] = []
            proc.start()
            child_end.close()

    def run(self, writer: _CacheWriter, tasks: list[Task], bar,
            worker_cpu: list[float]) -> None:
        writer.file.flush()
        _Dispatch(self, writer, tasks, bar).run()
        worker_cpu.extend(_cpu_seconds_of(proc.pid) for proc in self.procs)

    def close(self, wait: bool = True) -> None:
        """Ask the workers to stop (`wait`: and let them finish what they were given), or
        stop them now."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass  # it is gone already
        for proc in self.procs:
            if wait and proc.pid is not None:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


class _Dispatch:
    """One `_Workers.run`: chunks of tasks sent to the workers, their results added to the
    cache in the tasks' order."""

    def __init__(self, pool: _Workers, writer: _CacheWriter, tasks: list[Task], bar):
        self.pool, self.writer, self.bar = pool, writer, bar
        self.chunks = [tasks[i:i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
        self.worker_of = dict(zip(pool.conns, pool.procs, strict=True))
        self.next_chunk = 0
        self.done: dict[int, list[Decoded]] = {}
        self.added = 0

    def run(self) -> None:
        from multiprocessing.connection import wait

        for _ in range(_IN_FLIGHT_PER_WORKER):
            for conn in self.pool.conns:
                self.send_next(conn)
        # Results are taken from whichever worker has some (so that none waits on a full
        # pipe), each worker is given a new chunk as it returns one (so that a slow chunk
        # delays no one), and they are added to the cache in the tasks' order.
        queued = self.pool.queued
        while self.added < len(self.chunks):
            for conn in wait([c for c in self.pool.conns if queued[c]]):
                self.receive(conn)
                self.send_next(conn)
            self.add_ready()

    def stopped(self, conn) -> PreprocessError:
        proc = self.worker_of[conn]
        proc.join(timeout=1)
        chunk = self.chunks[self.pool.queued[conn][0]]
        return PreprocessError(
            f"a decoding process stopped (exit code {proc.exitcode}) while reading "
            f"{chunk[0].image} ... {chunk[-1].image}. If it could not even start, run "
            "the calling script under `if __name__ == \"__main__\":`, or use workers=0 "
            "(--workers 0)")

    def send_next(self, conn) -> None:
        """Give `conn`'s worker the next chunk, if any is left."""
        if self.next_chunk >= len(self.chunks):
            return
        k, self.next_chunk = self.next_chunk, self.next_chunk + 1
        self.pool.queued[conn].append(k)
        try:
            conn.send((k, self.writer.shape, [(t, self.writer.hu_offset(t.row))
                                              for t in self.chunks[k]]))
        except OSError:  # BrokenPipeError: it is gone
            raise self.stopped(conn) from None

    def receive(self, conn) -> None:
        try:
            k, results = conn.recv()
        except (EOFError, OSError):
            raise self.stopped(conn) from None
        self.pool.queued[conn].remove(k)
        self.done[k] = results

    def add_ready(self) -> None:
        """Add the results that are next in the tasks' order to the cache."""
        while self.added in self.done:
            for d in self.done.pop(self.added):
                self.writer.add(d)
            self.bar.update(len(self.chunks[self.added]))
            self.added += 1


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


class _CacheWriter:
    """Writes decoded slices into the per-split datasets, in record order."""

    def __init__(self, path: Path, index: DataIndex, strict: bool, preallocate: bool = False):
        self.path = path
        self.index = index
        self.strict = strict
        self.preallocate = preallocate
        self.file = h5py.File(path, "w")
        self.shape: tuple[int, int] | None = None
        self.shape_source = ""
        self.skipped: list[Problem] = []
        self.fixups: list[Problem] = []
        # Each record's row if nothing before it in its split is skipped: where a worker
        # writes its HU (the writer moves it up when something was skipped).
        self.capacity = {s: 0 for s in SPLITS}
        self.planned: list[int] = []
        for r in index.records:
            self.planned.append(self.capacity[r.split])
            self.capacity[r.split] += 1
        self.rows = {s: 0 for s in SPLITS}
        self.datasets: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self.offsets: dict[str, np.ndarray] = {}  # split -> byte offset of each HU chunk
        self.meta: dict[str, dict[str, list]] = {s: _empty_meta() for s in SPLITS}
        self.counts = {s: {"slices": 0, "nodule_slices": 0} for s in SPLITS}
        self._mask_buffer: np.ndarray | None = None
        self.lock = contextlib.nullcontext()  # held for writes while workers write too
        self._exam: tuple | None = None
        self._linker: NoduleLinker | None = None
        self._exam_split = ""
        self._exam_position = 0

    def _create(self, shape: tuple[int, int]) -> None:
        h, w = shape
        for split in SPLITS:
            g = self.file.create_group(split)
            n = self.capacity[split]
            dcpl = None
            if self.preallocate:
                # Every HU chunk gets its place in the file now, so that the workers can
                # write into it; nothing is written there until they do.
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            hu = g.create_dataset("hu", shape=(n, h, w), maxshape=(None, h, w), dtype="<i2",
                                  chunks=(1, h, w), dcpl=dcpl)
            mask = g.create_dataset("mask", shape=(n, h, w), maxshape=(None, h, w),
                                    dtype=np.uint8, chunks=(1, h, w), fillvalue=0)
            self.datasets[split] = (hu, mask)
            if self.preallocate:
                self.offsets[split] = _chunk_offsets(hu, n, f"{self.path}: {split}/hu")
        self._mask_buffer = np.empty(shape, dtype=np.uint8)

    def hu_offset(self, record: int) -> int:
        """Byte offset in the file where a worker writes record `record`'s HU."""
        return int(self.offsets[self.index.records[record].split][self.planned[record]])

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
        shape = tuple(d.shape if d.hu is None else d.hu.shape)
        if self.shape is None:
            if d.hu is None:
                raise PreprocessError("internal: the first slice must come with its pixels")
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
        if d.hu is not None:
            with self.lock:
                hu_ds.id.write_direct_chunk((row, 0, 0),
                                            np.ascontiguousarray(d.hu, dtype="<i2"))
        elif d.written:
            planned = self.planned[d.row]
            if planned != row:  # something before it was skipped: move it up
                with self.lock:
                    _, data = hu_ds.id.read_direct_chunk((planned, 0, 0))
                    hu_ds.id.write_direct_chunk((row, 0, 0), data)
        else:
            raise PreprocessError(f"internal: no pixels for {record.image}")
        mask = d.mask
        if mask is None and d.mask_box is not None:
            mask = d.mask_box.full(out=self._mask_buffer)
        if mask is not None:  # empty masks stay as the dataset's fill value, 0
            with self.lock:
                mask_ds.id.write_direct_chunk((row, 0, 0), np.ascontiguousarray(mask))
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


def _chunk_offsets(ds: h5py.Dataset, n: int, what: str) -> np.ndarray:
    """Byte offset in the file of each of the `n` allocated chunks (one per row) of `ds`."""
    offsets = np.full(n, -1, dtype=np.int64)

    def note(info) -> None:
        offsets[info.chunk_offset[0]] = info.byte_offset

    try:
        ds.id.chunk_iter(note)  # one pass (HDF5 1.14)
    except AttributeError:  # an older HDF5: one look-up per chunk
        for i in range(n):
            offsets[i] = ds.id.get_chunk_info_by_coord((i, 0, 0)).byte_offset
    if n and (offsets < 0).any():
        raise PreprocessError(f"{what}: HDF5 did not allocate every chunk")
    return offsets


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


def _relative_to(root: Path | str, path: str | None) -> str:
    """`path` relative to `root` with / separators, or `path` itself when outside it."""
    if not path:
        return ""
    prefix = os.path.join(os.path.abspath(root), "")
    full = os.path.abspath(path)
    if not full.startswith(prefix):
        return str(path)
    return full[len(prefix):].replace(os.sep, "/")
