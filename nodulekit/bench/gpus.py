"""`nodulekit bench gpus`: the paper's Table 4 on 1..N data-parallel ranks.

The paper reports, for 1, 2 and 4 GPUs, the training seconds per epoch (UniToChest: 18,534
training slices at batch 12) and the inference seconds per image. Here each rank count n
is a real data-parallel run started with ``mpiexec -n n`` (one GPU per rank where there are
GPUs, CPU ranks elsewhere, each with its share of the cores): the global batch is split
into n equal parts, and one timed step is what training does per step, forward, sigmoid +
Dice loss, backward, the gradient all-reduce (NCCL or MPI; none for one rank) and Adam.

Measured, not modelled: the median over ``repeats`` steps (after ``warmup``) of the step
time of the slowest rank (every rank starts each step after a barrier). Then

- seconds per epoch = steps per epoch x step time, steps = floor(slices / batch) (the
  trainer drops the last incomplete batch); reading the data is not included (the loader
  reads ahead on other threads, `nodulekit bench loader` times it);
- inference seconds per image: a forward pass of one global batch split over the ranks,
  divided by the batch;
- scaling efficiency = t1 / (n x tn): throughput on n ranks over n times that on one
  (1.0 is perfect; the global batch is fixed, so each rank's share shrinks with n).

The model and batch are a CPU-sane default (width 16, depth 4, 128 x 128, global batch 12);
``--width 64 --size 512`` is the paper's network on GPUs. Inputs are synthetic (the same
generator as `bench step`); the arithmetic does not depend on the pixel values.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodulekit.bench.common import provenance

PAPER_SLICES = 18534
PAPER_TABLE4 = "Chaudhry et al. 2022, Table 4 (1, 2 and 4 GPUs)"


# ----------------------------------------------------------------------------- one rank count


def worker(opts: dict, out_path: str | None) -> dict | None:
    """Run on every rank (under mpiexec -n n): time the steps; rank 0 writes the result."""
    from nodulekit import distributed

    comm, backend_name = distributed.init(opts["device"])
    with distributed.abort_on_error(comm):
        return _work(comm, backend_name, opts, out_path)


def _work(comm, backend_name: str, opts: dict, out_path: str | None) -> dict | None:
    from nodulekit import distributed
    from nodulekit.bench.step import synthetic_batch
    from nodulekit.engine import get_backend
    from nodulekit.nn import Adam, TrainStep, UNet

    n = comm.size
    batch = int(opts["batch"])
    per_rank = distributed.check_global_batch(batch, n)
    threads = None
    if backend_name == "cpu":
        threads = distributed.cpu_threads_per_rank(comm.local_size)
        distributed.limit_numba_threads(threads)
    be = get_backend(backend_name, threads=threads)
    dist = comm if comm.kind != "single" else None

    model = UNet(be, depth=opts["depth"], width=opts["width"], seed=opts["seed"])
    opt = Adam(be, model.params, model.grads, lr=1e-4)
    comm.bcast(model.params)
    # rank r's share of one global batch (the same global batch for every n)
    image, mask = synthetic_batch(batch, opts["size"], opts["seed"])
    lo, hi = comm.rank * per_rank, (comm.rank + 1) * per_rank
    x, t = be.asarray(image[lo:hi]), be.asarray(mask[lo:hi])

    def timed(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
        """Median over repeats of the slowest rank's time of fn(), in seconds."""
        for _ in range(warmup):
            fn()
        be.synchronize()
        samples = []
        for _ in range(repeats):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            be.synchronize()
            mine = time.perf_counter() - t0
            samples.append(max(comm.allgather_object(mine)))
        return statistics.median(samples), samples

    train_step = TrainStep(model, opt, comm=dist)  # the paper's step, plus the all-reduce

    def infer():
        model.forward(x, keep_for_backward=False)

    step_s, step_all = timed(lambda: train_step(x, t), opts["repeats"], opts["warmup"])
    infer_s, infer_all = timed(infer, opts["repeats"], 1)
    allreduce_ms = None
    if dist is not None:
        reduce_s, _ = timed(lambda: dist.allreduce_mean(model.grads), opts["repeats"], 1)
        allreduce_ms = reduce_s * 1e3
    result = {
        "ranks": n, "per_rank_batch": per_rank, "communicator": comm.describe(),
        "backend": be.name, "threads_per_rank": threads,
        "step_s": step_s, "step_s_samples": step_all,
        "infer_batch_s": infer_s, "infer_batch_s_samples": infer_all,
        "allreduce_ms": allreduce_ms, "parameters": model.num_parameters,
        "precision": be.precision,
    }
    if comm.is_root and out_path:
        with open(out_path, "w") as f:
            json.dump(result, f)
    comm.close()
    return result if comm.is_root else None


# ----------------------------------------------------------------------------- all rank counts


def default_max_ranks(device: str) -> tuple[int, str]:
    """(N, backend): every GPU of this host, or min(4, cores) CPU ranks."""
    from nodulekit.engine import resolve_device

    backend, _ = resolve_device(device)
    if backend == "cuda":
        import cupy

        return cupy.cuda.runtime.getDeviceCount(), backend
    return max(1, min(4, os.cpu_count() or 1)), backend


@dataclass(frozen=True)
class GpusBenchOptions:
    """What `run_gpus_bench` times; the fields are `nodulekit bench gpus`'s options.

    device: "auto", "cpu" or "cuda"; max_ranks: time 1..max_ranks ranks (None: every GPU,
    or min(4, cores) CPU ranks). width, depth, size, batch (global), seed: the model and
    its input. slices: training slices per epoch. repeats, warmup: timed and untimed steps.
    rounds: run every rank count this many times, interleaved (1, 2, .., 1, 2, ..), and
    take the median of all their steps: on a shared machine a busy spell then does not
    land on one rank count only. timeout: seconds per `mpiexec` job.
    """

    device: str = "auto"
    max_ranks: int | None = None
    width: int = 16
    depth: int = 4
    size: int = 128
    batch: int = 12
    slices: int = PAPER_SLICES
    repeats: int = 5
    warmup: int = 2
    rounds: int = 1
    seed: int = 0
    timeout: float = 600.0


def run_gpus_bench(options: GpusBenchOptions | None = None,
                   echo: Callable[[str], object] = print) -> dict:
    """Time 1..max_ranks ranks, each in its own `mpiexec -n n` job; see the module doc and
    `GpusBenchOptions`. `echo` says which rank count is being timed."""
    o = GpusBenchOptions() if options is None else options
    default_n, backend = default_max_ranks(o.device)
    prov = provenance(backend)  # before the runs: the load average says how busy it was
    n_max = int(o.max_ranks or default_n)
    counts, skipped, have_mpi = _rank_counts(n_max, o.batch)
    rows = _time_rank_counts(counts, backend, o, have_mpi, echo)
    steps_per_epoch = o.slices // o.batch
    _add_scaling(rows, steps_per_epoch, o.batch)
    return {
        "benchmark": "gpus",
        **prov,
        "uncommitted_files": _dirty_files(),
        "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backend": backend,
        "config": {"width": o.width, "depth": o.depth, "size": o.size,
                   "global_batch": o.batch, "slices": o.slices,
                   "steps_per_epoch": steps_per_epoch, "repeats": o.repeats,
                   "warmup": o.warmup, "rounds": o.rounds, "seed": o.seed, "max_ranks": n_max,
                   "parameters": rows[0]["parameters"] if rows else None,
                   "precision": rows[0]["precision"] if rows else None,
                   "what_is_timed": "forward + Dice loss + backward + gradient all-reduce + "
                                    "Adam, slowest rank, median; data reading not included",
                   "inference": "forward of one global batch split over the ranks, / batch",
                   "compare_with": PAPER_TABLE4},
        "rows": rows,
        "skipped": skipped,
        "notes": _notes(backend, prov, n_max),
    }


def _rank_counts(n_max: int, batch: int) -> tuple[list[int], list[dict], bool]:
    """(the rank counts 1..n_max that can run, those skipped and why, whether MPI is
    there)."""
    from nodulekit import distributed

    have_mpi, why_not = distributed.mpi_status()
    counts, skipped = [], []
    for n in range(1, n_max + 1):
        if batch % n:
            skipped.append({"ranks": n, "why": f"the global batch {batch} does not divide "
                                               f"evenly over {n} ranks"})
        elif n > 1 and not have_mpi:
            skipped.append({"ranks": n, "why": why_not})
        else:
            counts.append(n)
    return counts, skipped, have_mpi


def _time_rank_counts(counts: list[int], backend: str, o: GpusBenchOptions, have_mpi: bool,
                      echo: Callable[[str], object]) -> list[dict]:
    """One row per rank count: its `rounds` runs, their step samples pooled (medians)."""
    opts = {"device": backend, "width": o.width, "depth": o.depth, "size": o.size,
            "batch": o.batch, "repeats": o.repeats, "warmup": o.warmup, "seed": o.seed}
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for round_ in range(o.rounds):  # interleaved, so a busy spell hits every rank count
        for n in counts:
            echo(f"timing {n} rank(s)" + (f", round {round_ + 1}/{o.rounds}" if o.rounds > 1
                                          else "") + " ...")
            runs[n].append(_run_ranks(n, opts, have_mpi, o.timeout))
    rows = []
    for n in counts:
        row = dict(runs[n][0])
        for key in ("step_s", "infer_batch_s"):
            row[f"{key}_samples"] = [x for r in runs[n] for x in r[f"{key}_samples"]]
            row[key] = statistics.median(row[f"{key}_samples"])
        if row["allreduce_ms"] is not None:
            row["allreduce_ms"] = statistics.median(r["allreduce_ms"] for r in runs[n])
        rows.append(row)
    return rows


def _add_scaling(rows: list[dict], steps_per_epoch: int, batch: int) -> None:
    """Per epoch and per image times, and speed-up and efficiency against one rank."""
    base = rows[0] if rows and rows[0]["ranks"] == 1 else None
    for r in rows:
        r["train_s_per_epoch"] = steps_per_epoch * r["step_s"]
        r["infer_s_per_image"] = r["infer_batch_s"] / batch
        r["images_per_s"] = batch / r["step_s"]
        if base is not None:
            n = r["ranks"]
            r["train_speedup"] = base["step_s"] / r["step_s"]
            r["train_efficiency"] = base["step_s"] / (n * r["step_s"])
            r["infer_speedup"] = base["infer_batch_s"] / r["infer_batch_s"]
            r["infer_efficiency"] = base["infer_batch_s"] / (n * r["infer_batch_s"])


def _notes(backend: str, prov: dict, n_max: int) -> list[str]:
    """What to keep in mind when reading the rows (CPU ranks, a busy machine)."""
    cores = os.cpu_count() or 1
    notes = []
    load = prov.get("loadavg_1min_at_start") or 0.0
    if backend == "cpu" and load > 0.5 * cores:
        notes.append(f"the machine was busy before the runs (1-minute load average {load:.1f} "
                     f"on {cores} cores): other work shared the cores, so the step times are "
                     "noisy; compare rows of one run (interleave them with --rounds)")
    if backend == "cpu":
        notes.append(f"CPU ranks on one host of {cores} cores: each of n ranks gets "
                     f"max(1, {cores} // n) worker threads, so every row uses the same cores; "
                     "more ranks cannot add compute here, only split it (and pay for the "
                     "all-reduce). On GPUs each rank adds a GPU.")
        if n_max > cores:
            notes.append(f"{n_max} ranks on {cores} cores: the rows above {cores} ranks are "
                         "oversubscribed")
    return notes


def _dirty_files() -> list[str] | None:
    """Files that differ from the recorded commit (the timings are of the working tree)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def _run_ranks(n: int, opts: dict, have_mpi: bool, timeout: float) -> dict:
    """One `mpiexec -n n` job of `worker`; its rank 0's result."""
    from nodulekit import distributed

    with tempfile.TemporaryDirectory(prefix="nodulekit-bench-gpus-") as tmp:
        out = os.path.join(tmp, "result.json")
        args = ["--out", out, "--opts", json.dumps(opts)]
        if have_mpi:
            cmd = distributed.launch_command(n, args, module="nodulekit.bench.gpus")
        else:  # one rank without MPI: this Python alone
            cmd = [sys.executable, "-m", "nodulekit.bench.gpus", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{n} rank(s) failed (exit status {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def format_gpus(r: dict) -> str:
    c = r["config"]
    lines = [
        f"device: {r['device']}",
        f"U-Net depth {c['depth']} width {c['width']} ({c['parameters'] or 0:,} parameters), "
        f"{c['size']}x{c['size']}, global batch {c['global_batch']}, {c['precision']}; "
        f"median of {c['repeats']} steps after {c['warmup']} warm-up"
        + (f", {c['rounds']} interleaved rounds" if c.get("rounds", 1) > 1 else ""),
        f"seconds per epoch for {c['slices']:,} training slices ({c['steps_per_epoch']:,} "
        f"steps of {c['global_batch']}; the paper's UniToChest training set is 18,534), "
        "like the paper's Table 4:",
        "",
        f"{'ranks':>5} {'per rank':>8} {'step s':>8} {'all-reduce ms':>13} "
        f"{'train s/epoch':>13} {'speed-up':>8} {'effic.':>6} {'infer s/image':>13} "
        f"{'speed-up':>8} {'effic.':>6}",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for row in r["rows"]:
        lines.append(
            f"{row['ranks']:>5} {row['per_rank_batch']:>8} {row['step_s']:>8.3f} "
            f"{f(row['allreduce_ms'], '.2f'):>13} {row['train_s_per_epoch']:>13.1f} "
            f"{f(row.get('train_speedup'), '.2f'):>8} {f(row.get('train_efficiency'), '.2f'):>6} "
            f"{row['infer_s_per_image']:>13.4f} {f(row.get('infer_speedup'), '.2f'):>8} "
            f"{f(row.get('infer_efficiency'), '.2f'):>6}")
    for s in r["skipped"]:
        lines.append(f"{s['ranks']:>5}  skipped: {s['why']}")
    if r["rows"]:
        lines.append("")
        lines.append("communicators: " + "; ".join(f"{row['ranks']}: {row['communicator']}"
                                                   for row in r["rows"]))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    """The worker's entry point: python -m nodulekit.bench.gpus --out F --opts JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="nodulekit.bench.gpus")
    parser.add_argument("--out", required=True)
    parser.add_argument("--opts", required=True)
    a = parser.parse_args(argv)
    opts = json.loads(a.opts)
    worker(opts, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
