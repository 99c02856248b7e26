"""Build the HDF5 cache from a data folder (`nodulekit preprocess DATA OUT.h5`).

DICOM decoding, mask reading and connected components run in worker processes started by a
fork server (spawn where there is none, see `nodulekit.data.procs`): they import only
`nodulekit.data.decode`. The parent decodes the first readable slice itself, which sets the
cache's slice size, and creates the datasets with every HU chunk (one per slice,
uncompressed) allocated in the file up front; each worker then writes a slice's HU straight
into its chunk, followed by the chunk's Fletcher-32 checksum, at the byte offset HDF5
reports for it, and sends back only the small rest (metadata, the mask's bounding box, the
components); the parent writes the masks and the metadata. (With a filter on the dataset,
HDF5 writes every chunk it allocates: zeros, whose checksum is 0. That costs one sequential
write of the HU's size up front, about a tenth of a millisecond per 512 x 512 slice, and
finds a full disk before any decoding.) Results are handled in the layout's order whatever
the worker count; a slice written at its planned row is moved up when a file before it in
its split was skipped, so the cache is the same with 0 or N workers (only a skipped slice's
chunk then stays as unused space in the file). The layout of the file is in
`nodulekit.data.cache`. As with any multiprocessing code, a script that calls `preprocess`
with workers must do so under ``if __name__ == "__main__":``.

The scan layouts (series, msd, luna16: whole scans, `nodulekit.data.scans`) are decoded in
this process instead, a scan at a time (`nodulekit.data.scan_decode`), into the same writer.
With ``spacing`` (``--spacing MM``) every slice is resampled in-plane, in the workers or
here, and padded or cropped to the cache's one size, the most common among the scans
(`nodulekit.data.resample`, which has the rules); without, slices stay as they are, and a
slice (or scan) of another size than the first is skipped, as ever.

Every file left out is reported with the reason (`PreprocessReport.skipped`, and the cache's
``/skipped`` group); ``strict=True`` makes the first one an error instead. The cache is
written to a temporary file beside `out` and renamed over it at the very end, so an
interrupted or failed run (a full disk included) leaves no half-written file, under the
final name or the temporary one; a failed write is a `PreprocessError` that names `out` and
the cause. An existing `out` is kept unless ``overwrite=True``, and even then replaced only
when it is a cache (a file `preprocess` wrote, damaged or not) or empty.

Every chunk the cache holds carries HDF5's Fletcher-32 checksum (`nodulekit.data.cache`);
the chunks written past HDF5 (the workers' HU, the parent's whole-chunk writes) get theirs
from `nodulekit.data.checksum`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from nodulekit import __version__
from nodulekit.data.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LIBVER,
    WINDOW_CENTER,
    WINDOW_WIDTH,
    is_cache_file,
)
from nodulekit.data.decode import Decoded, Task, decode, worker_main
from nodulekit.data.layout import (
    SCAN_LAYOUTS,
    SPLITS,
    DataIndex,
    Problem,
    SliceRecord,
    read_layout,
    resolve_layout,
)
from nodulekit.data.nodules import NoduleLinker
from nodulekit.data.procs import worker_context
from nodulekit.data.resample import common_size, resampled_shape


class PreprocessError(RuntimeError):
    """The cache was not written: the message says why (with --strict: which file)."""


@dataclass(frozen=True)
class PreprocessOptions:
    """How `preprocess` reads the data folder and writes the cache (`nodulekit preprocess`'s
    options).

    layout: "auto", "unitochest", "folder", "series", "msd" or "luna16"
    (`layout.read_layout`).
    workers: decoding processes (None: one per CPU; 0: decode in this process). The scan
    layouts (series, msd, luna16) decode in this process, a scan at a time.
    strict: the first file that would be skipped is an error instead.
    overwrite: replace an existing cache at `out`.
    allow_non_ct: also read slices whose Modality is not CT.
    split_seed: seed of the patient-level split (every layout but UniToChest).
    allow_outside_paths: read files that a UniToChest CSV names outside the data folder.
    spacing: resample every slice in-plane to this many mm per pixel, and pad / crop them
    to one size (`nodulekit.data.resample`); "median": to the median pixel spacing of the
    scans (one vote a scan, from the headers; nnU-Net's default); None: as they are.
    """

    layout: str = "auto"
    workers: int | None = None
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    allow_non_ct: bool = False
    split_seed: int = 0
    allow_outside_paths: bool = False
    spacing: float | str | None = None


MEDIAN = "median"  # --spacing median


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
    spacing_mm: float | None = None  # resampled to this; None: native
    # (smallest, median, largest) pixel spacing of the slices written, mm; None: none known
    pixel_spacing_mm: tuple[float, float, float] | None = None
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
            "spacing_mm": self.spacing_mm,
            "pixel_spacing_mm": (None if self.pixel_spacing_mm is None
                                 else dict(zip(("min", "median", "max"),
                                               self.pixel_spacing_mm, strict=True))),
            "skipped": [{"path": p.path, "reason": p.reason} for p in self.skipped],
            "fixups": [{"path": p.path, "reason": p.reason} for p in self.fixups],
            "notes": [{"path": p.path, "reason": p.reason} for p in self.notes],
        }

    def spacing_hint(self) -> str:
        """A line where the slices kept pixel sizes that differ by more than 10%: the
        network then sees one nodule at several scales. nnU-Net resamples every case to
        the data set's median spacing by default; here that is `--spacing`."""
        if self.spacing_mm is not None or self.pixel_spacing_mm is None:
            return ""
        low, median, high = self.pixel_spacing_mm
        if not high > 1.1 * low:
            return ""
        return (f"  pixel spacing {low:.2f}-{high:.2f} mm across the slices (median "
                f"{median:.2f}): each keeps its own; --spacing median resamples them all to "
                "the scans' median (nnU-Net's default)")

    def format(self, max_listed: int = 50) -> str:
        h, w = self.image_shape
        pixels = "" if self.spacing_mm is None else f" at {self.spacing_mm:g} mm"
        lines = [f"wrote {self.out} ({self.layout} layout, {h}x{w}{pixels}, "
                 f"{self.total_slices} slices in {self.seconds:.1f} s = "
                 f"{self.slices_per_s:.0f} slices/s, {self.workers} worker(s))"]
        for split in SPLITS:
            c = self.counts.get(split, {"slices": 0, "nodule_slices": 0})
            lines.append(f"  {split:5s} {c['slices']:7d} slices, {c['nodule_slices']:6d} with "
                         "a nodule")
        hint = self.spacing_hint()
        if hint:
            lines.append(hint)
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


def preprocess(data: str | os.PathLike, out: str | os.PathLike,
               options: PreprocessOptions | None = None, *, index: DataIndex | None = None,
               **settings) -> PreprocessReport:
    """Decode the data set under `data` into the HDF5 cache `out`.

    options: a `PreprocessOptions`; `settings` (its field names: ``workers=0``, ...) set or
    override single fields.
    index: an already-read layout (`layout.read_layout`), to skip reading it again.
    """
    o = dataclasses.replace(options or PreprocessOptions(), **settings)
    start, cpu_start = time.perf_counter(), _own_cpu_seconds()
    out = Path(out)
    _check_spacing(o.spacing)
    _check_output(out, o.overwrite)
    layout = index.layout if index is not None else resolve_layout(data, o.layout)
    scans = layout in SCAN_LAYOUTS  # decoded here, a scan at a time (`scan_decode`)
    n_workers = (0 if scans else (os.cpu_count() or 1) if o.workers is None
                 else max(0, int(o.workers)))
    # Beside the output (same file system, so the final rename is atomic); a random part
    # keeps two runs apart. Not mkstemp: its 0600 mode would stick to the finished cache.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    pool = writer = None
    try:
        if n_workers:
            pool = _Workers(n_workers, tmp)  # they start while the layout is read
        if index is None:
            index = read_layout(data, layout, seed=o.split_seed,
                                allow_outside_paths=o.allow_outside_paths)
        skipped = [p for p in index.problems if p.skipped]
        notes = [p for p in index.problems if not p.skipped]
        _check_index(index, skipped, o.strict)
        # the headers' (shape, spacing) per scan, read once for both uses
        geometry = _scan_geometry(index) if o.spacing is not None else []
        if o.spacing == MEDIAN:
            o = dataclasses.replace(o, spacing=median_spacing(geometry, index.root))
        size = None if o.spacing is None else _planned_size(geometry, o.spacing)
        writer = _CacheWriter(tmp, index, o.strict, preallocate=pool is not None, name=out,
                              spacing_mm=o.spacing)
        worker_cpu: list[float] = []
        if scans:
            _decode_scans(writer, index, o, size)
        else:
            tasks = [Task(i, r.image, r.mask, o.allow_non_ct, o.spacing, size)
                     for i, r in enumerate(index.records)]
            _decode_all(writer, tasks, pool, o.progress, worker_cpu)
        if pool is not None:
            pool.close()
            pool = None
        shape = writer.finish(data_root=index.root, skipped_layout=skipped)
        os.replace(tmp, out)
    except BaseException as e:  # KeyboardInterrupt too: never leave a partial file behind
        _discard(pool, writer, tmp)
        if isinstance(e, OSError):
            raise PreprocessError(_os_error_message(e, out, tmp)) from None
        raise
    return PreprocessReport(out=out, layout=index.layout, counts=writer.counts,
                            skipped=skipped + writer.skipped, notes=notes,
                            fixups=writer.fixups, seconds=time.perf_counter() - start,
                            workers=n_workers, image_shape=shape,
                            cpu_seconds={"parent": _own_cpu_seconds() - cpu_start,
                                         "workers": sum(worker_cpu)},
                            spacing_mm=o.spacing, pixel_spacing_mm=writer.pixel_spacing_range())


def _check_spacing(spacing: float | str | None) -> None:
    if spacing is None or spacing == MEDIAN:
        return
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise PreprocessError(f"--spacing {spacing}: a pixel size in mm above 0, or "
                              f"'{MEDIAN}', is needed")


def median_spacing(geometry, root) -> float:
    """The median in-plane pixel spacing (mm; each scan's the mean of its row and column
    spacing, one vote a scan) of `_scan_geometry`'s list for the data set at `root`, for
    `--spacing median`."""
    values = [float(np.mean(spacing)) for _, spacing in geometry]
    if not values:
        raise PreprocessError(f"--spacing {MEDIAN}: no slice header of {root} gives "
                              "a pixel spacing; give one in mm")
    return round(float(np.median(values)), 4)


def _planned_size(geometry, spacing_mm: float) -> tuple[int, int] | None:
    """The cache's slice size with `spacing_mm` pixels: the most common resampled size, one
    vote per scan (`resample.common_size`), from `_scan_geometry`'s list; None when no
    header says (the first slice decides)."""
    return common_size(resampled_shape(shape, spacing, spacing_mm)
                       for shape, spacing in geometry)


def _scan_geometry(index: DataIndex) -> list[tuple[tuple[int, int], tuple[float, float]]]:
    """(slice shape, pixel spacing) of every scan, from the headers: a scan layout's, or
    each exam's first readable DICOM slice's (one with a positive spacing)."""
    from nodulekit.data.dicom import DicomError, read_header

    if index.scans:
        return [(s.slice_shape, s.pixel_spacing) for s in index.scans.values()]
    out = []
    seen = set()
    for r in index.records:
        if (r.split, r.patient, r.exam) in seen:
            continue
        try:
            ds = read_header(r.image)
            shape = (int(ds.Rows), int(ds.Columns))
            spacing = tuple(float(v) for v in ds.PixelSpacing)
        except (DicomError, AttributeError, TypeError, ValueError):
            continue  # decoding says what is wrong with it; the next slice may tell
        seen.add((r.split, r.patient, r.exam))
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            out.append((shape, spacing))
    return out


def _decode_scans(writer: _CacheWriter, index: DataIndex, o: PreprocessOptions,
                  size: tuple[int, int] | None) -> None:
    """A scan layout's slices into the cache, a scan at a time (`scan_decode`)."""
    from tqdm import tqdm

    from nodulekit.data.scan_decode import decode_scans

    bar = tqdm(total=len(index.records), unit="slice", desc="preprocess",
               disable=not o.progress)
    try:
        for scan in decode_scans(index, allow_non_ct=o.allow_non_ct, spacing_mm=o.spacing,
                                 shape=size):
            writer.add_scan(scan)
            bar.update(scan.spec.slices)
    finally:
        bar.close()


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that is not ours to write: an existing file without `overwrite`, and
    with it any file but a cache (or an empty file)."""
    if out.is_dir():
        raise PreprocessError(f"{out} is a folder: name the cache file to write (such as "
                              f"{out / 'cache.h5'})")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to "
                                  "replace it")
        if out.stat().st_size and not is_cache_file(out):
            raise PreprocessError(f"{out} exists and is not a nodulekit cache: --overwrite "
                                  "replaces only a cache that `nodulekit preprocess` wrote "
                                  "(or an empty file); remove it yourself, or choose another "
                                  "name")
    if not out.parent.is_dir():
        raise PreprocessError(f"{out.parent}: output directory does not exist")


def _check_index(index: DataIndex, skipped: list[Problem], strict: bool) -> None:
    if strict and skipped:
        raise PreprocessError(f"--strict: {len(skipped)} file(s) do not fit the layout, "
                              f"first: {skipped[0]}")
    if not index.records:
        raise PreprocessError(f"{index.root}: no slices found ({index.layout} layout)"
                              + (f"; first problem: {skipped[0]}" if skipped else ""))


def _discard(pool: _Workers | None, writer: _CacheWriter | None, tmp: Path) -> None:
    """Stop the workers, close the half-written cache and delete it, whatever fails."""
    try:
        if pool is not None:
            pool.close(wait=False)
    finally:
        try:
            if writer is not None:
                writer.close()
        except (OSError, RuntimeError, ValueError):
            pass  # a full disk fails the close's flush too: the file is deleted below
        finally:
            tmp.unlink(missing_ok=True)


def _os_error_message(e: OSError, out: Path, tmp: Path) -> str:
    """One line for an OSError met while preprocessing: the user's path, not the hidden
    temporary file, and the cause."""
    if e.filename and os.fspath(e.filename) != os.fspath(tmp):  # an input file
        return f"{e.filename}: {e.strerror or e}"
    return f"{out}: cannot write the cache: {_cause(e, tmp, out)} (nothing was kept)"


def _cause(e: BaseException, tmp: Path, out: Path) -> str:
    """The reason of a failed write: the system's words for its errno where there is one
    (h5py's messages carry it inside: "errno = 28"), else the message, with the temporary
    file's name replaced by the output's."""
    number = getattr(e, "errno", None)
    if not number:
        found = re.search(r"errno = (\d+)", str(e))
        number = int(found.group(1)) if found else None
    if number:
        return f"{os.strerror(number)} (errno {number})"
    return " ".join(str(e).replace(str(tmp), str(out)).split()) or type(e).__name__


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
        self.answered = False  # a worker has sent results back

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
        what = (f"a decoding process stopped (exit code {proc.exitcode}) while reading "
                f"{chunk[0].image} ... {chunk[-1].image}")
        if self.answered:
            # It did run: a signal (-9: killed, by the kernel too when memory runs out)
            # or a crash, not how it was started.
            return PreprocessError(f"{what}; the cache {self.writer.name} was not written "
                                   "(--workers 0 decodes in the main process, which shows "
                                   "the failure)")
        return PreprocessError(
            f"{what}, before any worker had answered. A process that cannot even start is "
            "often a script that calls preprocess outside `if __name__ == \"__main__\":`; "
            "else use workers=0 (--workers 0) to see the failure")

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
        self.answered = True
        self.pool.queued[conn].remove(k)
        for d in results:
            if d.write_error is not None:  # its file system said no: no point going on
                raise PreprocessError(f"{self.writer.name}: cannot write the cache: "
                                      f"{d.write_error} (nothing was kept)")
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
    """Writes decoded slices into the per-split datasets, in record order.

    path: the file written (the temporary one); name: the cache's final path, for messages.
    Every failed write raises `PreprocessError` naming `name` and the cause.
    """

    def __init__(self, path: Path, index: DataIndex, strict: bool, preallocate: bool = False,
                 name: Path | None = None, spacing_mm: float | None = None):
        self.path = path
        self.spacing_mm = spacing_mm
        self.name = path if name is None else name
        self.index = index
        self.strict = strict
        self.preallocate = preallocate
        with self.writing():
            self.file = _new_file(path)
            # First, so that they sit at the start of the file: what marks it as a cache
            # (`cache.is_cache_file`), for `--overwrite`, even when it is damaged.
            _set_attrs(self.file, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION})
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
        self._chunk_buffer: np.ndarray | None = None  # a chunk with its checksum
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
                                  chunks=(1, h, w), dcpl=dcpl, fletcher32=True)
            mask = g.create_dataset("mask", shape=(n, h, w), maxshape=(None, h, w),
                                    dtype=np.uint8, chunks=(1, h, w), fillvalue=0,
                                    fletcher32=True)
            self.datasets[split] = (hu, mask)
            if self.preallocate:
                self.offsets[split] = _chunk_offsets(hu, n, f"{self.path}: {split}/hu")
        self._mask_buffer = np.empty(shape, dtype=np.uint8)

    def hu_offset(self, record: int) -> int:
        """Byte offset in the file where a worker writes record `record`'s HU."""
        return int(self.offsets[self.index.records[record].split][self.planned[record]])

    def _skip(self, record: SliceRecord, reason: str) -> None:
        where = record.image  # a DICOM file, or a scan and which of its slices
        if record.volume_slice is not None:
            where += f" slice {record.volume_slice}"
        self.skip(where, reason)

    def skip(self, path: str, reason: str) -> None:
        """Leave out `path` (a file, a scan) for `reason`; with strict, stop instead."""
        problem = Problem(path, reason)
        if self.strict:
            raise PreprocessError(f"--strict: {problem}")
        self.skipped.append(problem)

    def add_scan(self, scan) -> None:
        """A scan's slices (`scan_decode.DecodedScan`), or the scan skipped once, with its
        reason, when it cannot be read or its slices are not the cache's size."""
        if scan.error is not None:
            self.skip(scan.spec.path, scan.error)
            return
        if self.shape is not None and scan.slice_shape not in (None, self.shape):
            h, w = scan.slice_shape
            self.skip(scan.spec.path, f"slices of {h}x{w} differ from the cache's "
                                      f"{self.shape[0]}x{self.shape[1]} (set by "
                                      f"{self.shape_source}); --spacing MM resamples all "
                                      "scans to one size")
            return
        for note in scan.notes:
            self.fixups.append(Problem(scan.spec.path, note, skipped=False))
        for d in scan.rows:
            self.add(d)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    @contextlib.contextmanager
    def writing(self):
        """h5py's errors for a failed write (a full disk, a file system that refuses: an
        OSError, or a RuntimeError or ValueError on some of h5py's paths) as a
        `PreprocessError` naming the cache and the cause."""
        try:
            yield
        except PreprocessError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise PreprocessError(f"{self.name}: cannot write the cache: "
                                  f"{_cause(e, self.path, self.name)} (nothing was kept)"
                                  ) from None

    def _write_chunk(self, ds: h5py.Dataset, row: int, data: np.ndarray) -> None:
        """One whole chunk (one slice), with its Fletcher-32 checksum, past HDF5's filters."""
        from nodulekit.data.checksum import with_checksum  # Numba: only when writing

        chunk = self._chunk_buffer = with_checksum(data, out=self._chunk_buffer)
        with self.lock, self.writing():
            ds.id.write_direct_chunk((row, 0, 0), chunk)

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
            with self.writing():
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
            self._write_chunk(hu_ds, row, np.ascontiguousarray(d.hu, dtype="<i2"))
        elif d.written:
            planned = self.planned[d.row]
            if planned != row:  # something before it was skipped: move it up
                with self.lock, self.writing():  # the chunk as stored: checksum included
                    _, data = hu_ds.id.read_direct_chunk((planned, 0, 0))
                    hu_ds.id.write_direct_chunk((row, 0, 0), data)
        else:
            raise PreprocessError(f"internal: no pixels for {record.image}")
        mask = d.mask
        if mask is None and d.mask_box is not None:
            mask = d.mask_box.full(out=self._mask_buffer)
        if mask is not None:  # empty masks stay as the dataset's fill value, 0
            self._write_chunk(mask_ds, row, np.ascontiguousarray(mask))
        self._add_meta(split, row, record, d)

    def pixel_spacing_range(self) -> tuple[float, float, float] | None:
        """(smallest, median, largest) pixel spacing of the slices written (mm; each the
        mean of its row and column spacing), None where no slice has one."""
        pairs = [v for m in self.meta.values() for v in m["pixel_spacing"]]
        values = np.asarray(pairs, dtype=np.float64).reshape(-1, 2).mean(axis=1)
        values = values[np.isfinite(values) & (values > 0)]
        if not values.size:
            return None
        return float(values.min()), float(np.median(values)), float(values.max())

    def _add_meta(self, split: str, row: int, record: SliceRecord, d: Decoded) -> None:
        m = self.meta[split]
        m["patient"].append(record.patient)
        m["exam"].append(record.exam)
        m["slice"].append(-1 if record.slice is None else record.slice)
        m["instance_number"].append(d.instance_number)
        m["slice_position"].append(d.slice_position)
        m["pixel_spacing"].append(d.pixel_spacing)
        m["slice_thickness"].append(d.slice_thickness)
        m["image_position"].append(d.image_position)
        m["image_orientation"].append(d.image_orientation)
        m["source_pixel_spacing"].append(d.source_pixel_spacing)
        m["has_nodule"].append(bool(d.parts))
        m["section_diameter_mm"].append(d.section_mm)
        m["nodule_diameter_mm"].append([])  # filled when the exam is complete
        m["source"].append(d.source or record.source)
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
        with self.writing():
            self._write_rest(data_root, skipped_layout + self.skipped)
        return self.shape

    def _write_rest(self, data_root: Path, everything: list[Problem]) -> None:
        """The attributes, the final row counts, the metadata and the skipped files; then
        the file is closed (which flushes it: where a full disk shows at the latest)."""
        f = self.file
        attrs = {
            "created_by": f"nodulekit {__version__}",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "window_center": WINDOW_CENTER, "window_width": WINDOW_WIDTH,
            "height": self.shape[0], "width": self.shape[1],
            "layout": self.index.layout, "source_root": str(data_root),
        }
        if self.spacing_mm is not None:  # absent: native pixels, as in older caches
            attrs["spacing_mm"] = float(self.spacing_mm)
        _set_attrs(f, attrs)
        for split in SPLITS:
            g = f[split]
            n = self.rows[split]
            g["hu"].resize(n, axis=0)
            g["mask"].resize(n, axis=0)
            _write_meta(g.create_group("meta"), self.meta[split])
        g = f.create_group("skipped")
        _column(g, "path", [p.path for p in everything])
        _column(g, "reason", [p.reason for p in everything])
        f.close()


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
                                  "image_position", "image_orientation",
                                  "source_pixel_spacing", "has_nodule", "section_diameter_mm",
                                  "nodule_diameter_mm", "source", "mask_source")}


def _padded(rows: list[list[float]]) -> np.ndarray:
    k = max([1] + [len(r) for r in rows])
    out = np.full((len(rows), k), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _new_file(path: Path) -> h5py.File:
    """An empty cache file: HDF5 1.10's format (`cache.LIBVER`: its metadata carries
    checksums), and the root's attributes kept in its object header (HDF5 moves more than 8
    into a heap written later, elsewhere in the file), so the first ones stay at the start."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(*(getattr(h5py.h5f, f"LIBVER_{v.upper()}") for v in LIBVER))
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_attr_phase_change(64, 48)
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fcpl=fcpl,
                                     fapl=fapl))


def _set_attrs(f: h5py.File, attrs: dict) -> None:
    """Attributes; strings fixed-length UTF-8, stored in the object header (checksummed)
    rather than in HDF5's global heap (not checksummed), where h5py puts a str."""
    for key, value in attrs.items():
        if isinstance(value, str):
            raw = value.encode()
            value = np.array(raw, dtype=h5py.string_dtype("utf-8", max(1, len(raw))))
        f.attrs.create(key, value)


def _column(g: h5py.Group, name: str, values) -> None:
    """A metadata column: chunked, with HDF5's Fletcher-32 checksum on every chunk; strings
    fixed-length UTF-8 (variable-length ones would live in HDF5's global heap, which has no
    checksum)."""
    if isinstance(values, list):  # of str
        encoded = [v.encode() for v in values]
        length = max([1] + [len(v) for v in encoded])
        values = np.array(encoded, dtype=h5py.string_dtype("utf-8", length))
    rows = values.shape[0]
    # ~64 KiB chunks: one checksum per chunk; a split of 250k slices has a few per column
    per_row = max(1, values.dtype.itemsize * int(np.prod(values.shape[1:], dtype=np.int64)))
    chunk_rows = max(1, min(rows, (64 << 10) // per_row))
    g.create_dataset(name, data=values, chunks=(chunk_rows, *values.shape[1:]),
                     maxshape=(None, *values.shape[1:]), fletcher32=True)


def _write_meta(g: h5py.Group, m: dict[str, list]) -> None:
    n = len(m["patient"])
    for name in ("patient", "exam", "source", "mask_source"):
        _column(g, name, m[name])
    _column(g, "slice", np.array(m["slice"], dtype=np.int32).reshape(n))
    _column(g, "instance_number", np.array(m["instance_number"], dtype=np.int32).reshape(n))
    _column(g, "slice_position", np.array(m["slice_position"], dtype=np.float32).reshape(n))
    _column(g, "pixel_spacing", np.array(m["pixel_spacing"], dtype=np.float32).reshape(n, 2))
    _column(g, "slice_thickness", np.array(m["slice_thickness"], dtype=np.float32).reshape(n))
    _column(g, "image_position", np.array(m["image_position"], dtype=np.float64).reshape(n, 3))
    _column(g, "image_orientation",
            np.array(m["image_orientation"], dtype=np.float64).reshape(n, 6))
    _column(g, "source_pixel_spacing",
            np.array(m["source_pixel_spacing"], dtype=np.float32).reshape(n, 2))
    _column(g, "has_nodule", np.array(m["has_nodule"], dtype=bool).reshape(n))
    _column(g, "n_nodules", np.array([len(d) for d in m["section_diameter_mm"]],
                                     dtype=np.int16).reshape(n))
    section = _padded(m["section_diameter_mm"])
    nodule = _padded(m["nodule_diameter_mm"])
    _column(g, "section_diameter_mm", section)
    _column(g, "nodule_diameter_mm", nodule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: slices without nodule
        _column(g, "max_diameter_mm", np.nanmax(nodule, axis=1).astype(np.float32))


def _relative_to(root: Path | str, path: str | None) -> str:
    """`path` relative to `root` with / separators, or `path` itself when outside it."""
    if not path:
        return ""
    prefix = os.path.join(os.path.abspath(root), "")
    full = os.path.abspath(path)
    if not full.startswith(prefix):
        return str(path)
    return full[len(prefix):].replace(os.sep, "/")
