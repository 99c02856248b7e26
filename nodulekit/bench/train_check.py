"""``nodulekit train --device cuda`` against ``--device cpu``: about 20 steps of the tiny model.

The GPU check's last quick step (``bench/gpu_check.sh quick``): a tiny synthetic data set
(``nodulekit synth``: 32x32 slices, 6 patients; ``nodulekit preprocess``: the HDF5 cache,
which reads the DICOM files with pydicom), then the real command line twice, the same
options and seed, ``--device cuda`` and ``--device cpu``: the tiny U-Net (width 4, depth 2,
batch 4, lr 1e-3), whole epochs until at least ``--steps`` steps (21 nodule slices: 5 steps
an epoch, so 4 epochs). Both compute in float32 with different summation orders, so they
drift apart by rounding only: every epoch's training loss within 1e-3 and every weight
within one step's movement (lr) is a pass, as in tests/test_unet.py's
``test_training_steps_match_the_cpu_backend`` (1e-4 and lr / 2 per Adam step, here with the
loader, the window / augmentation kernel and validation in the loop as well).

    python -m nodulekit.bench.train_check --out DIR [--steps 20] [--json FILE]

Without a usable GPU (``bench/gpu_check.sh rehearse``) the data set, the cache and the
``--device cpu`` run are made and the cuda run is skipped, saying why (exit status 0).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TINY_SET = {"size": 32, "patients": 6, "slices_per_patient": 12, "seed": 0}
TINY_MODEL = ["--width", "4", "--depth", "2", "--batch-size", "4", "--lr", "1e-3",
              "--seed", "0", "--workers", "0", "--no-progress", "--no-test"]
LOSS_ATOL = 1e-3  # per-epoch mean training loss, cuda vs cpu
WEIGHT_ATOL = 1e-3  # every parameter: one step's movement at lr 1e-3


def make_data(folder: Path) -> tuple[Path, int]:
    """The tiny set and its cache under ``folder``: (cache path, nodule slices in train)."""
    from nodulekit.data.cache import open_cache
    from nodulekit.data.preprocess import preprocess
    from nodulekit.data.synth import SynthConfig, synthesize

    data, cache = folder / "data", folder / "cache.h5"
    if not cache.exists():
        synthesize(data, SynthConfig(**TINY_SET), workers=0)
        preprocess(data, cache, workers=0, progress=False)
    with open_cache(cache) as c:
        nodules = int(c.split("train").meta["has_nodule"].astype(bool).sum())
    return cache, nodules


def run_train(cache: Path, out: Path, device: str, epochs: int) -> dict:
    """``python -m nodulekit.cli train`` on the cache; its checkpoint_last.h5, read back."""
    from nodulekit.training.checkpoint import load_checkpoint

    cmd = [sys.executable, "-m", "nodulekit.cli", "train", str(cache), "--out", str(out),
           "--device", device, "--epochs", str(epochs), *TINY_MODEL]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train --device {device} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    ck = load_checkpoint(out / "checkpoint_last.h5")
    return {"seconds": round(seconds, 1), "steps": int(ck.global_step),
            "losses": [float(h["train_loss"]) for h in ck.history], "params": ck.params}


def compare(cuda: dict, cpu: dict) -> dict:
    loss_diff = float(np.max(np.abs(np.subtract(cuda["losses"], cpu["losses"]))))
    weight_diff = float(np.max(np.abs(cuda["params"].astype(np.float64) - cpu["params"])))
    return {"max_loss_diff": loss_diff, "max_weight_diff": weight_diff,
            "loss_atol": LOSS_ATOL, "weight_atol": WEIGHT_ATOL,
            "ok": loss_diff <= LOSS_ATOL and weight_diff <= WEIGHT_ATOL
            and cuda["steps"] == cpu["steps"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from nodulekit.engine import cuda_usable

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a folder for the data and both runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"check": "train --device cuda vs --device cpu"}

    def finish(code: int) -> int:
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        return code

    cache, nodules = make_data(out)
    steps_per_epoch = max(1, nodules // 4)  # whole batches of 4
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    result["config"] = {"epochs": epochs, "steps": epochs * steps_per_epoch, **TINY_SET}
    gpu_ok, why = cuda_usable()
    cpu = run_train(cache, out / "cpu", "cpu", epochs)
    result["cpu"] = {k: cpu[k] for k in ("seconds", "steps", "losses")}
    print(f"cpu: {cpu['steps']} steps in {cpu['seconds']} s, losses "
          + " ".join(f"{v:.5f}" for v in cpu["losses"]))
    if not gpu_ok:
        result["cuda"] = f"skipped: needs a usable CUDA GPU: {why}"
        print("cuda:", result["cuda"])
        return finish(0)
    cuda = run_train(cache, out / "cuda", "cuda", epochs)
    result["cuda"] = {k: cuda[k] for k in ("seconds", "steps", "losses")}
    result["comparison"] = compare(cuda, cpu)
    print(f"cuda ({why}): {cuda['steps']} steps in {cuda['seconds']} s, losses "
          + " ".join(f"{v:.5f}" for v in cuda["losses"]))
    c = result["comparison"]
    print(f"cuda vs cpu: losses within {c['max_loss_diff']:.2e} (allowed {LOSS_ATOL:g}), "
          f"weights within {c['max_weight_diff']:.2e} (allowed {WEIGHT_ATOL:g}): "
          + ("ok" if c["ok"] else "FAILED"))
    return finish(0 if c["ok"] else 1)


if __name__ == "__main__":
    raise SystemExit(main())
