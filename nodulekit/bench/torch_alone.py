"""PyTorch's training step (or inference) timed alone, in a process of its own, under chosen
OpenMP settings.

Why a process of its own: OpenMP reads its settings once, when its runtime loads, and
nodulekit sets ``OMP_WAIT_POLICY=PASSIVE`` at import (its Numba pool and OpenBLAS share
the cores: see ``nodulekit/__init__.py``), so the torch that `bench step` times in turns
with ours runs passive too. PyTorch's CPU kernels are fastest with their threads spinning
between parallel regions (``OMP_WAIT_POLICY=ACTIVE``), so the fair comparison is against
torch at its best setting, measured here: the same U-Net, weights and batch as `bench step`
(built from the same seed), one setting per child process; with ``"kind": "infer"`` the
inference of `bench infer` instead.

Run as ``python -m nodulekit.bench.torch_alone '<json arguments>'``; it prints one JSON
line: {"ms": median, "samples": [...], "env": {...}}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# What each setting is: the environment a child process starts with (besides the parent's).
# The child imports nodulekit (for the weights), so by default its malloc keeps freed memory
# as ours does (`nodulekit.host_memory`); the "system malloc" settings give torch glibc's
# defaults, in case its own allocation pattern does better with them.
SETTINGS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # as in `bench step`'s own process
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},  # threads spin between parallel regions
    "passive-system-malloc": {"OMP_WAIT_POLICY": "PASSIVE", "NODULEKIT_MALLOC": "system"},
    "active-system-malloc": {"OMP_WAIT_POLICY": "ACTIVE", "NODULEKIT_MALLOC": "system"},
}


def time_torch_alone(setting: str, step: dict, timeout: float = 600.0) -> dict:
    """{"setting", "env", "ms", "samples"} of torch's step in a child process with
    `SETTINGS[setting]`; {"setting", "env", "error"} when the child fails. step: the
    step's width, depth, size, batch, repeats, warmup, seed, lr and norm, and its kind
    ("step", the default, or "infer")."""
    env = dict(os.environ, **SETTINGS[setting])
    args = json.dumps({"kind": step.get("kind", "step"),
                       **{k: step[k] for k in ("width", "depth", "size", "batch", "repeats",
                                               "warmup", "seed", "lr", "norm")}})
    done = subprocess.run([sys.executable, "-m", "nodulekit.bench.torch_alone", args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    out = {"setting": setting, "env": SETTINGS[setting]}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**out, "error": f"exit {done.returncode}: {tail[0]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**out, "ms": result["ms"], "samples": result["samples"]}


def _main(argv: list[str]) -> None:
    import numpy as np

    a = json.loads(argv[0])
    from nodulekit.engine import get_backend

    if a.get("kind", "step") == "infer":
        from nodulekit.bench.infer import bench_model, synthetic_slices, torch_infer

        ours = bench_model(get_backend("cpu"), a["width"], a["depth"], a["norm"], a["seed"])
        step = torch_infer(ours, synthetic_slices(a["batch"], a["size"], a["seed"]))
    else:
        from nodulekit.bench.step import synthetic_batch, torch_train_step
        from nodulekit.nn import UNet

        image, mask = synthetic_batch(a["batch"], a["size"], a["seed"])
        ours = UNet(get_backend("cpu"), depth=a["depth"], width=a["width"], seed=a["seed"],
                    norm=a["norm"])
        step = torch_train_step(ours, image, mask, a["lr"])  # `bench step`'s first weights

    for _ in range(a["warmup"]):
        step()
    samples = []
    for _ in range(a["repeats"]):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"ms": float(np.median(samples)), "samples": samples}))


if __name__ == "__main__":
    _main(sys.argv[1:])
