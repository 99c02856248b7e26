"""`nodulekit bench loader`: the data pipeline's speed, each number against a baseline.

1. Preprocessing (DICOM + masks -> HDF5 cache, `workers` processes) against a plain loop of
   ``pydicom.dcmread(f).pixel_array`` over the same files, in slices/s. The two alternate
   `repeats` times after an untimed warm-up pass (so both read from the page cache); the
   ratio is the median of the per-round ratios. The first preprocessing round starts the
   fork server (about half a second) unless writing the synthetic set did already, so it
   is reported apart as "cold". Before each round, untimed, the previous round's cache is
   deleted and the file systems are synced, so that neither side is timed while the
   kernel writes back the synthetic set or an earlier cache (a 512 x 512 cache of 2,400
   slices is 1.3 GB: two of them left dirty would have the kernel throttle whoever writes
   next).
2. The training loader (shuffle, augmentation parameters, `num_workers` threads, read-ahead
   `queue_size`) in batches/s, against what a CPU training step consumes: one step of our
   U-Net on the CPU at the same size and batch (or `step_seconds` when given).
3. With `sweep`, batches/s over num_workers x queue_size, like the paper's Fig. 2 (its
   sweep tuned ECVL's num_workers and queue_ratio_size); `consumer_ms` simulates a training
   step that releases the GIL (a GPU step), 0 measures the loader alone.

The data set is a synthetic one (`nodulekit.data.synth`) unless `data` names a folder.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nodulekit.data.layout import read_layout
from nodulekit.data.loader import Loader, ReadOptions, SampleOptions
from nodulekit.data.preprocess import preprocess
from nodulekit.data.synth import SynthConfig, synthesize


@dataclass(frozen=True)
class LoaderBenchOptions:
    """What `run_loader_bench` times; the fields are `nodulekit bench loader`'s options.

    data: a data-set folder to read (None: synthesize `patients` x `slices_per_patient`
    slices of `size` x `size`). workers: preprocessing processes; repeats: alternating
    rounds of the plain loop and preprocessing. batch, batches, num_workers, queue_size: the
    timed loader. step_seconds, step_width, step_depth: the training step compared with.
    sweep, sweep_workers, sweep_queue, consumer_ms: the num_workers x queue_size sweep.
    """

    data: str | None = None
    size: int = 512
    patients: int = 12
    slices_per_patient: int = 200
    workers: int = 2
    repeats: int = 3
    batch: int = 12
    batches: int = 200
    num_workers: int = 2
    queue_size: int = 4
    step_seconds: float | None = None
    step_width: int = 16
    step_depth: int = 4
    sweep: bool = False
    sweep_workers: Sequence[int] = (0, 1, 2, 4)
    sweep_queue: Sequence[int] = (1, 2, 4, 8, 16)
    consumer_ms: float = 0.0
    seed: int = 0
    progress: bool = False


def run_loader_bench(options: LoaderBenchOptions | None = None) -> dict:
    """Preprocessing against a plain pydicom loop, the loader against a training step, and
    the optional sweep (see the module doc); the results as a JSON-ready dict."""
    o = LoaderBenchOptions() if options is None else options
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="nodulekit-bench-loader-") as tmp:
        tmp = Path(tmp)
        data, synth_info = o.data, None
        if data is None:
            data, synth_info = _synthesize(tmp, o)
        pre, cache, image_shape = _time_preprocess(data, tmp, o)
        load = _time_loader(cache, o.batch, o.batches, o.num_workers, o.queue_size, 0.0,
                            o.seed)
        step = _step(o.step_seconds, image_shape[0], o.batch, o.step_width, o.step_depth,
                     o.seed)
        if step.get("seconds"):
            step["batches_per_s"] = 1.0 / step["seconds"]
            load["times_step"] = load["batches_per_s"] * step["seconds"]
        table = _sweep(cache, o) if o.sweep else []

    result = {"benchmark": "loader", **_provenance(),
              # Other processes share the cores: the load average says how much.
              "loadavg_1min": {"before": load_before, "after": _loadavg()},
              "config": {"size": o.size, "batch": o.batch, "batches": o.batches,
                         "num_workers": o.num_workers, "queue_size": o.queue_size,
                         "consumer_ms": o.consumer_ms, "seed": o.seed},
              "synthetic": synth_info, "data": None if synth_info else data,
              "preprocess": pre, "loader": load, "step": step}
    if o.sweep:
        result["sweep"] = table
    return result


def _synthesize(tmp: Path, o: LoaderBenchOptions) -> tuple[str, dict]:
    """The synthetic data set under `tmp`: (its folder, what it is)."""
    cfg = SynthConfig(size=o.size, patients=o.patients,
                      slices_per_patient=o.slices_per_patient, seed=o.seed)
    t = time.perf_counter()
    # Processes pay off only beyond a few hundred slices (their start-up is ~1 s).
    small = o.patients * o.slices_per_patient * o.size * o.size < 200 * 512 * 512
    synthesize(tmp / "data", cfg, workers=0 if small else None, progress=o.progress)
    info = {"size": o.size, "patients": o.patients,
            "slices_per_patient": o.slices_per_patient, "seed": o.seed,
            "seconds": time.perf_counter() - t}
    return str(tmp / "data"), info


def _time_preprocess(data: str, tmp: Path,
                     o: LoaderBenchOptions) -> tuple[dict, Path, tuple[int, int]]:
    """Preprocessing against the plain loop, `o.repeats` alternating rounds: (the results,
    the last round's cache, its slice shape)."""
    index = read_layout(data)
    files = [r.image for r in index.records]
    n = len(files)

    _plain_loop(files)  # warm-up: both sides then read from the page cache
    plain, ours, plain_cpu, ours_cpu = [], [], [], []
    cache = None
    for r in range(o.repeats):
        if cache is not None:  # keep one cache (the last, for the loader)
            cache.unlink()
        _settle()
        wall, cpu = _plain_loop(files)
        plain.append(n / wall)
        plain_cpu.append(cpu / n)
        cache = tmp / f"cache{r}.h5"
        report = preprocess(data, cache, workers=o.workers, progress=False)
        ours.append(report.total_slices / report.seconds)
        ours_cpu.append((report.cpu_seconds["parent"] + report.cpu_seconds["workers"])
                        / report.total_slices)
    ratios = [a / b for a, b in zip(ours, plain, strict=True)]
    warm = ours[1:] or ours
    pre = {
        "slices": n, "workers": o.workers, "repeats": o.repeats,
        "plain_slices_per_s": statistics.median(plain),
        "ours_slices_per_s": statistics.median(ours),
        "ratio": statistics.median(ratios),
        "ours_warm_slices_per_s": statistics.median(warm),
        "ratio_warm": statistics.median(ratios[1:] or ratios),
        "cold_slices_per_s": ours[0],
        "samples": {"plain": plain, "ours": ours},
        # CPU time per slice (user + system, all processes): what the work costs, less
        # sensitive than wall time to other processes on the same cores.
        "plain_cpu_ms_per_slice": 1e3 * statistics.median(plain_cpu),
        "ours_cpu_ms_per_slice": 1e3 * statistics.median(ours_cpu),
        "cpu_seconds_last_run": report.cpu_seconds,
        # What the wall-time ratio would be with the cores to ourselves: our CPU time
        # spread over min(cores, processes), against the plain loop's on one core.
        "ratio_projected_idle_cores": statistics.median(plain_cpu) * min(
            os.cpu_count() or 1, o.workers + 1) / statistics.median(ours_cpu),
        "nodule_slice_fraction": report.counts["train"]["nodule_slices"]
        / max(1, report.counts["train"]["slices"]),
        "image_shape": list(report.image_shape),
        "skipped": len(report.skipped),
    }
    return pre, cache, report.image_shape


def _sweep(cache: Path, o: LoaderBenchOptions) -> list[dict]:
    """Batches/s over num_workers x queue_size (one queue size for the inline loader)."""
    table = []
    for w in o.sweep_workers:
        for q in ([1] if w == 0 else o.sweep_queue):
            r = _time_loader(cache, o.batch, o.batches, w, q, o.consumer_ms, o.seed)
            table.append({"num_workers": w, "queue_size": q,
                          "batches_per_s": r["batches_per_s"]})
    return table


def _settle() -> None:
    """Write back whatever is dirty (the synthetic set, a deleted cache's leftovers), so
    that the kernel's writeback does not run during the next timed pass."""
    if hasattr(os, "sync"):
        os.sync()


def _plain_loop(files: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of decoding every file with pydicom, one by one."""
    import pydicom

    t, c = time.perf_counter(), time.process_time()
    for f in files:
        _ = pydicom.dcmread(f).pixel_array  # the decode is what is timed
    return time.perf_counter() - t, time.process_time() - c


def _time_loader(cache, batch, batches, num_workers, queue_size, consumer_ms, seed) -> dict:
    """Batches/s over `batches` training batches (epochs repeat as needed)."""
    with Loader(cache, "train", batch_size=batch,
                sample=SampleOptions(sampling="all", shuffle=True, augment=True,
                                     drop_last=True, seed=seed),
                read=ReadOptions(num_workers=num_workers, queue_size=queue_size)) as loader:
        if len(loader) == 0:
            raise ValueError(f"the train split has fewer than {batch} slices")
        got, epoch = 0, 0
        first = next(iter(loader.epoch(1000)))  # warm-up: threads, file handles
        t = time.perf_counter()
        while got < batches:
            for _ in loader.epoch(epoch):
                if consumer_ms:
                    time.sleep(consumer_ms / 1e3)
                got += 1
                if got >= batches:
                    break
            epoch += 1
        seconds = time.perf_counter() - t
    mb = (first.hu.nbytes + first.mask.nbytes) / 1e6
    return {"num_workers": num_workers, "queue_size": queue_size, "batches": got,
            "seconds": seconds, "batches_per_s": got / seconds,
            "slices_per_s": got * batch / seconds, "mb_per_s": got * mb / seconds}


def _step(step_seconds, size, batch, width, depth, seed) -> dict:
    if step_seconds is not None:
        return {"seconds": float(step_seconds), "source": "given (--step-seconds)"}
    try:
        from nodulekit.bench.step import synthetic_batch
        from nodulekit.engine import get_backend
        from nodulekit.nn import Adam, TrainStep, UNet

        backend = get_backend("cpu")
        image, mask = synthetic_batch(batch, size, seed)
        model = UNet(backend, depth=depth, width=width, seed=seed)
        optimizer = Adam(backend, model.params, model.grads, lr=1e-4)
        x, t = backend.asarray(image), backend.asarray(mask)
        step = TrainStep(model, optimizer)
        step(x, t)  # warm-up: compiles the kernels
        start = time.perf_counter()
        step(x, t)
        seconds = time.perf_counter() - start
    except Exception as e:  # the engine is optional here: say why there is no number
        return {"seconds": None, "source": f"not measured ({type(e).__name__}: {e})"}
    return {"seconds": seconds, "source": f"our U-Net on the CPU (width {width}, depth "
                                          f"{depth}, {size}x{size}, batch {batch}), one step "
                                          "after one warm-up step"}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _provenance() -> dict:
    try:
        from nodulekit.bench.common import provenance

        return provenance("cpu")
    except Exception:  # provenance is a nicety; the numbers stand without it
        import platform

        return {"device": f"CPU {platform.processor()}, {os.cpu_count()} cores"}


def format_loader(r: dict) -> str:
    p, lo, st = r["preprocess"], r["loader"], r["step"]
    h, w = p["image_shape"]
    load = r.get("loadavg_1min") or {}
    lines = [
        f"device: {r.get('device', '?')} (load average {load.get('before')} before, "
        f"{load.get('after')} after)",
        f"preprocess {p['slices']} slices {h}x{w} ({p['nodule_slice_fraction']:.0%} with a "
        f"nodule), {p['workers']} workers, median of {p['repeats']}:",
        f"  plain pydicom loop  {p['plain_slices_per_s']:8.0f} slices/s",
        f"  nodulekit preprocess{p['ours_slices_per_s']:8.0f} slices/s   ratio "
        f"{p['ratio']:.2f}x (warm fork server {p['ratio_warm']:.2f}x, cold run "
        f"{p['cold_slices_per_s']:.0f} slices/s)",
        f"  CPU per slice: plain {p['plain_cpu_ms_per_slice']:.2f} ms, ours "
        f"{p['ours_cpu_ms_per_slice']:.2f} ms over all processes; with idle cores that "
        f"would be {p['ratio_projected_idle_cores']:.2f}x",
        f"loader (batch {r['config']['batch']}, {lo['num_workers']} threads, queue "
        f"{lo['queue_size']}): {lo['batches_per_s']:.1f} batches/s, "
        f"{lo['slices_per_s']:.0f} slices/s, {lo['mb_per_s']:.0f} MB/s",
    ]
    if st.get("seconds"):
        lines.append(f"CPU training step: {st['seconds']:.2f} s ({st['source']}): the loader "
                     f"delivers {lo['times_step']:.0f}x what it consumes")
    else:
        lines.append(f"CPU training step: {st['source']}")
    if r.get("sweep"):
        lines.append(f"sweep (consumer {r['config']['consumer_ms']} ms/batch), batches/s:")
        queues = sorted({row["queue_size"] for row in r["sweep"] if row["num_workers"]})
        lines.append("  workers \\ queue " + "".join(f"{q:>8d}" for q in queues))
        for wk in sorted({row["num_workers"] for row in r["sweep"]}):
            cells = {row["queue_size"]: row["batches_per_s"] for row in r["sweep"]
                     if row["num_workers"] == wk}
            if wk == 0:
                lines.append(f"  {wk:7d} (inline) {cells[1]:8.1f}")
            else:
                lines.append(f"  {wk:16d}" + "".join(
                    f"{cells[q]:8.1f}" if q in cells else f"{'':8s}" for q in queues))
    return "\n".join(lines)

