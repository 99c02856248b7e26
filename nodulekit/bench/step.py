"""`nodulekit bench step`: one training step of our U-Net against the PyTorch reference.

A step is forward, sigmoid + Dice loss, backward and Adam, on the same architecture, the
same weights and the same batch on both sides. PyTorch runs channels_last (NHWC, as ours)
in float32 with TF32 off on a GPU, so both sides compute the same thing. Reported: the
median of ``repeats`` steps after ``warmup``, and the ratio ours / torch (< 1: we are
faster). Both run in this one process on the same device, in turns (ours, torch, ours,
...), so that a load coming and going on a shared machine falls on both alike.

On the CPU, torch is also timed alone at each OpenMP wait policy (`nodulekit.bench
.torch_alone`: in this process it runs with nodulekit's PASSIVE, which slows its kernels),
ours again after each of those runs, and the ratio to torch's best is reported beside the
one in turns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from nodulekit.bench.common import (
    network_lines,
    phase_logger,
    provenance,
    require_torch,
    shape_config,
    time_in_turns,
    torch_alone_settings,
    torch_copy,
)
from nodulekit.engine import get_backend, resolve_device
from nodulekit.nn import Adam, TrainStep, UNet


def synthetic_batch(batch: int, size: int, seed: int):
    """A windowed-CT-like image in [0, 1] and a mask with one disk per sample."""
    rng = np.random.default_rng(seed)
    image = rng.random((batch, size, size, 1), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((batch, size, size, 1), dtype=np.uint8)
    for n in range(batch):
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        r = rng.uniform(size * 0.03, size * 0.12)
        mask[n, ..., 0] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return image, mask


def run_step_bench(device: str = "cpu", width: int = 16, depth: int = 4, size: int = 128,  # noqa: PLR0913
                   batch: int = 4, repeats: int = 10, warmup: int = 3, seed: int = 0,
                   lr: float = 1e-4, norm: str = "none",
                   torch_alone: tuple[str, ...] | None = None,
                   log: Callable[[str], None] | None = None,
                   cudnn_benchmark: bool = True) -> dict:
    """The step of both sides in turns (module doc); on the CPU also torch alone in a child
    process per setting in `torch_alone` (`nodulekit.bench.torch_alone.SETTINGS`' names;
    None: all of them), and the ratio to the best of them. ``log``, if given, gets a line
    as each phase ends, with the seconds since the start (a run cut short by a time limit
    still shows where its time went). ``cudnn_benchmark``: torch's cudnn.benchmark on a GPU
    (it times every algorithm of each new convolution shape in torch's first step; at the
    paper's shape on an H200 that first step outlasted 137 s, 2026-12-04)."""
    phase = phase_logger(log)
    torch_alone = torch_alone_settings(torch_alone)
    backend_name, why = resolve_device(device)
    backend = get_backend(backend_name)
    image, mask = synthetic_batch(batch, size, seed)
    model = UNet(backend, depth=depth, width=width, seed=seed, norm=norm)
    # torch's copy first: both sides start from the same weights
    tdev = "cuda" if backend_name == "cuda" else "cpu"
    torch_step = torch_train_step(model, image, mask, lr, tdev, cudnn_benchmark)
    phase(f"batch, U-Net ({model.num_parameters:,} parameters) and torch's copy made")

    # ---- ours
    optimizer = Adam(backend, model.params, model.grads, lr=lr)
    x, t = backend.asarray(image), backend.asarray(mask)
    step = TrainStep(model, optimizer)  # the paper's step: Dice loss (s = 1), Adam
    first_loss_ours = float(step(x, t).dice)
    phase("ours: first step (kernels compiled or loaded)")

    # ---- torch
    first_loss_torch = torch_step().item()
    phase("torch: first step" + (" (cudnn.benchmark picks its algorithms)"
                                 if tdev == "cuda" else ""))
    timing = time_in_turns(lambda: step(x, t), torch_step, backend, tdev, repeats, warmup)
    phase(f"{warmup} + {repeats} steps of each, in turns")

    result = {
        "benchmark": "step",
        **provenance(backend_name),
        "backend": backend_name,
        "device_choice": why,
        "config": shape_config(model, backend, tdev, cudnn_benchmark, width=width,
                               depth=depth, norm=norm, size=size, batch=batch,
                               repeats=repeats, warmup=warmup, seed=seed, lr=lr),
        "first_step_loss": {"ours": first_loss_ours, "torch": first_loss_torch},
        **timing,
        "images_per_s": {"ours": batch / timing["ours_ms"] * 1e3,
                         "torch": batch / timing["torch_ms"] * 1e3},
    }
    if backend_name == "cpu" and torch_alone:
        add_torch_alone(result, torch_alone, dict(width=width, depth=depth, size=size,
                                                   batch=batch, repeats=repeats,
                                                   warmup=warmup, seed=seed, lr=lr, norm=norm),
                        lambda: step(x, t))
        phase("torch alone, ours between its runs")
    return result


# torch's best setting, timed again in turns with ours (see add_torch_alone)
PAIRED_ROUNDS = 3


def add_torch_alone(result: dict, settings, shape: dict, ours_step=None) -> None:
    """torch's step alone per OpenMP setting, the best of them, and our ratio to it.

    torch alone runs in child processes, so it cannot take turns with ours step by step.
    Instead ours is timed again after each child (half the repeats, at least 2 steps), and
    the ratio to torch's best uses those samples: a shared machine's speed moved by a
    quarter within minutes on 2026-12-05, and ours timed only before the children (the
    run in turns) gave ratios of 1.09 to 1.39 in four runs of one commit. Both ratios are
    kept (``ratio_to_best_torch``, ``ratio_to_best_torch_ours_in_turns``).

    The best of four noisy settings is also the luckiest: taking the minimum of several
    draws favours torch (on 2026-12-05 the best setting flipped between passive and active
    from one run to the next, and the ratio moved from 0.76 to 1.03 at one commit). So the
    setting found best runs PAIRED_ROUNDS more times, each followed by ours, and
    ``torch_best_paired`` keeps those pairs and the median of their ratios: fresh samples,
    the choice made on others."""
    from nodulekit.bench.torch_alone import time_torch_alone

    def ours_ms() -> list[float]:
        samples = []
        for _ in range(max(2, shape["repeats"] // 2) if ours_step is not None else 0):
            t0 = time.perf_counter()
            ours_step()
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples

    runs, between = [], []
    for name in settings:
        runs.append(time_torch_alone(name, shape))
        between += ours_ms()
    result["torch_alone"] = runs
    if between:
        result["ours_between_torch_alone_ms"] = statistics.median(between)
        result["ours_between_torch_alone_samples"] = between
    timed = [r for r in runs if "ms" in r]
    if timed:
        best = min(timed, key=lambda r: r["ms"])
        result["torch_best"] = {"setting": best["setting"], "env": best["env"],
                                "ms": best["ms"]}
        ours = result.get("ours_between_torch_alone_ms", result["ours_ms"])
        result["ratio_to_best_torch"] = ours / best["ms"]
        result["ratio_to_best_torch_ours_in_turns"] = result["ours_ms"] / best["ms"]
        if ours_step is not None:
            pairs = []
            for _ in range(PAIRED_ROUNDS):
                again = time_torch_alone(best["setting"], shape)
                if "ms" in again:
                    pairs.append({"torch_ms": again["ms"],
                                  "ours_ms": statistics.median(ours_ms())})
            if pairs:
                result["torch_best_paired"] = {
                    "setting": best["setting"], "rounds": pairs,
                    "ratio_median": statistics.median(p["ours_ms"] / p["torch_ms"]
                                                      for p in pairs)}


def torch_train_step(ours, image, mask, lr: float, device: str = "cpu",
                     cudnn_benchmark: bool = True):
    """PyTorch's training step on the U-Net `ours` (its architecture, weights and buffers)
    and the batch (NHWC image, mask): channels_last, float32 (TF32 off on a GPU), the same
    Dice loss and Adam. Returns step(), which runs one step and gives its loss tensor."""
    torch = require_torch()
    from nodulekit.reference.torch_unet import torch_dice_loss

    model, x = torch_copy(ours, image, device, cudnn_benchmark)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t = torch.from_numpy(mask.transpose(0, 3, 1, 2).copy()).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_dice_loss(model(x), t)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def format_step(r: dict) -> str:
    c = r["config"]
    return "\n".join([
        *network_lines(r, f"batch {c['batch']} x {c['size']}x{c['size']}, {c['precision']}"),
        f"first-step loss: ours {r['first_step_loss']['ours']:.6f}  "
        f"torch {r['first_step_loss']['torch']:.6f}",
        f"training step (median of {c['repeats']} after {c['warmup']} warm-up, in turns):",
        f"  ours  {r['ours_ms']:9.1f} ms   {r['images_per_s']['ours']:7.1f} images/s",
        f"  torch {r['torch_ms']:9.1f} ms   {r['images_per_s']['torch']:7.1f} images/s",
        f"  ratio ours/torch {r['ratio']:.2f}  ({'faster' if r['ratio'] < 1 else 'slower'}"
        f" than torch); median of the per-turn ratios {r['ratio_per_turn_median']:.2f}",
        *torch_alone_lines(r),
    ])


def torch_alone_lines(r: dict) -> list[str]:
    if "torch_alone" not in r:
        return []
    lines = ["torch alone, one process per OpenMP and malloc setting (ours timed again after "
             "each):"]
    for run in r["torch_alone"]:
        env = " ".join(f"{k}={v}" for k, v in run["env"].items())
        lines.append(f"  {env:52s} " + (f"{run['ms']:9.1f} ms" if "ms" in run
                                          else f"failed: {run['error']}"))
    if "ours_between_torch_alone_ms" in r:
        lines.append(f"  {'ours, between those runs':52s} "
                     f"{r['ours_between_torch_alone_ms']:9.1f} ms")
    if "torch_best" in r:
        lines.append(f"  ratio ours / torch at its best ({r['torch_best']['setting']}) "
                     f"{r['ratio_to_best_torch']:.2f}  (ours from the run in turns: "
                     f"{r['ratio_to_best_torch_ours_in_turns']:.2f})")
    if "torch_best_paired" in r:
        paired = r["torch_best_paired"]
        per_round = ", ".join(f"{p['ours_ms'] / p['torch_ms']:.2f}" for p in paired["rounds"])
        lines.append(f"  that setting alone {len(paired['rounds'])} more times, each followed "
                     f"by ours: ratio {paired['ratio_median']:.2f} (median; rounds {per_round})")
    return lines
