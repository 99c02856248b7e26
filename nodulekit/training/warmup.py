"""Compile a run's CPU kernels in a second process while this one generates the data set.

Why: Numba compiles each kernel at its first call, one at a time on one core: 26-40 s
for the demo's training step, validation and test on the 2-core machine, all of it before
the first step. The first run on a machine also generates the demo set first (12-20 s),
and nothing compiles meanwhile. Every kernel is compiled with ``cache=True``, so a
second process that calls them with the run's own shapes writes them to Numba's on-disk
cache, and the run then loads each in milliseconds instead of compiling it.

How: `start` launches ``python -m nodulekit.training.warmup`` with the run's draft
configuration (the shapes it will have once the data set exists): one training step of
the run's batch, patch, width and loss on made-up data, then the evaluation of one batch
of whole slices (`compile_run_kernels`), while the data set is generated on the other
cores. The run calls `wait` before its first step, so the two never compile the same
kernel at once. The warm-up computes nothing the run keeps: the kernels are the same
machine code whoever compiled them, so the run's numbers do not change. Any failure of the
warm-up only costs its time: the run compiles what is missing itself, after a note.

Measured on the 2-core Xeon (``nodulekit train --epochs 1 --no-test``, fresh caches, in
turns): 46.5 and 50.6 s without it, 37.7 and 37.9 s with it; the demo set then takes
22-24 s on one core instead of 12-13 s on two, and the first step starts with every
kernel compiled.

Which kernels a shape gets depends on the machine (``engine.fma_width``, measured once and
cached); `start` decides it in this process first, so that the second one reads the same
answer instead of measuring it on cores that the data generation keeps busy.

``NODULEKIT_WARMUP=0`` turns it off.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time

ENV = "NODULEKIT_WARMUP"
WAIT_SECONDS = 300.0  # at most this long; then the run compiles what is left itself

_pending: dict = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() not in ("0", "off", "no", "false")


def start(config) -> subprocess.Popen | None:
    """Start compiling `config`'s kernels (a `TrainConfig` with the shapes the run will
    have) in a second process; None where it could not start."""
    from nodulekit.engine import fma_width

    fma_width.decide()  # here, before the data generation loads the cores (module doc)
    # its errors go to a file, not a pipe: a pipe nobody reads until the end could fill
    errors = tempfile.TemporaryFile(mode="w+")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodulekit.training.warmup"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        proc.stdin.write(json.dumps(config.to_dict()))
        proc.stdin.close()
    except OSError:
        errors.close()
        return None
    _pending.update(process=proc, errors=errors)
    atexit.register(_stop, proc)  # a run stopped early (Ctrl-C) does not leave it behind
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait(report=None) -> float | None:
    """Wait for the warm-up started by `start` (if any); the seconds waited, or None."""
    proc = _pending.pop("process", None)
    if proc is None:
        return None
    errors = _pending.pop("errors")
    t0 = time.perf_counter()
    try:
        proc.wait(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        _stop(proc)
    waited = time.perf_counter() - t0
    errors.seek(0)
    text = errors.read().strip()
    errors.close()
    if proc.returncode != 0 and report is not None:
        last = text.splitlines()[-1] if text else f"exit {proc.returncode}"
        report(f"note: compiling the kernels ahead failed ({last}); they compile as the "
               "run first calls them")
    return waited


def compile_run_kernels(config) -> None:
    """One training step and one evaluation batch of `config`'s shapes on made-up data:
    every kernel the run will call is compiled (and cached) on the way."""
    import numpy as np

    from nodulekit.engine import get_backend
    from nodulekit.evaluation.evaluate import sparse_predictions
    from nodulekit.inference import tiling
    from nodulekit.nn import UNet
    from nodulekit.nn.inputs import window_input
    from nodulekit.training.loop import build_step

    be = get_backend(config.backend, config.precision)
    model = UNet(be, depth=config.depth, width=config.width, in_channels=config.in_channels,
                 seed=config.seed, norm=config.norm, head_prior=config.head_prior)
    _, step = build_step(config, be, model)
    rng = np.random.default_rng(0)
    ph, pw = config.patch
    b = config.batch_size
    channels = (config.in_channels,) if config.in_channels > 1 else ()
    hu = rng.integers(-1000, 400, (b, *channels, ph, pw)).astype(np.int16)
    mask = np.zeros((b, ph, pw), np.uint8)
    mask[:, ph // 2 - 3:ph // 2 + 3, pw // 2 - 3:pw // 2 + 3] = 1  # a nodule per crop
    aug = np.tile(np.array([[1.0, 0.0, 10.0]], np.float32), (b, 1))
    image, target = window_input(be, hu, mask, aug, config.window_center, config.window_width)
    step(image, target)
    h, w = config.image_shape
    n = config.eval_batch_size or b
    hu = rng.integers(-1000, 400, (n, *channels, h, w)).astype(np.int16)
    mask = np.zeros((n, h, w), np.uint8)
    logits, target, _ = tiling.run_hu(model, hu, mask,
                                      (config.window_center, config.window_width))
    be.confusion_counts(logits, target)
    be.sigmoid_dice_loss(logits, target, config.smooth)
    sparse_predictions(be, logits, target)


def main() -> None:
    from nodulekit.training.config import TrainConfig

    compile_run_kernels(TrainConfig.from_dict(json.loads(sys.stdin.read())))


if __name__ == "__main__":
    main()
