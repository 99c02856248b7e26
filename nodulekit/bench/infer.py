"""`nodulekit bench infer`: whole-slice inference of our U-Net against the PyTorch reference.

What `predict`, `evaluate` and every validation run: the U-Net's forward pass on a batch of
whole slices, nothing kept for a backward pass, batch norm on its running statistics (ours
runs each norm inside the convolution before it: `conv2d_bn_eval_forward`). The same
architecture, weights, running statistics and batch on both sides; PyTorch in eval mode
under ``torch.inference_mode``, channels_last, float32 (TF32 off on a GPU). Reported: the
median of ``repeats`` batches after ``warmup``, ms per slice, the ratio ours / torch (< 1:
we are faster), and how far the two sides' logits are apart.

Timed in turns in this one process, as `bench step`; on the CPU torch is also timed alone
in a child process per OpenMP setting (`nodulekit.bench.torch_alone`) and the ratio to its
best is given beside the one in turns.
"""

from __future__ import annotations

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
from nodulekit.nn import UNet


def bench_model(backend, width: int, depth: int, norm: str, seed: int) -> UNet:
    """The benchmark's U-Net: seeded weights and, with batch norm, seeded running
    statistics away from their initial 0 and 1 (a trained model's are)."""
    model = UNet(backend, depth=depth, width=width, seed=seed, norm=norm)
    if model.buffers.size:
        rng = np.random.default_rng(seed + 1)
        stats = {name: (0.5 + rng.random(view.shape) if name.endswith("running_var")
                        else rng.normal(0.0, 0.2, view.shape))
                 for name, view in model.b.items()}
        model.load_buffers(np.concatenate([stats[name].ravel() for name in model.b]))
    return model


def synthetic_slices(batch: int, size: int, seed: int) -> np.ndarray:
    """Windowed-CT-like whole slices in [0, 1], NHWC float32."""
    return np.random.default_rng(seed).random((batch, size, size, 1), dtype=np.float32)


def torch_infer(ours: UNet, image: np.ndarray, device: str = "cpu",
                cudnn_benchmark: bool = True) -> Callable[[], object]:
    """PyTorch's inference on the U-Net `ours` (architecture, weights, running statistics)
    and the NHWC batch `image`: eval mode, inference_mode, channels_last, float32 (TF32
    off on a GPU). Returns run(), which gives the logits tensor (NCHW)."""
    torch = require_torch()
    model, x = torch_copy(ours, image, device, cudnn_benchmark)
    model = model.eval()

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def run_infer_bench(device: str = "cpu", width: int = 16, depth: int = 4,  # noqa: PLR0913
                    size: int = 512, batch: int = 4, norm: str = "none", repeats: int = 10,
                    warmup: int = 2, seed: int = 0,
                    torch_alone: tuple[str, ...] | None = None,
                    log: Callable[[str], None] | None = None,
                    cudnn_benchmark: bool = True) -> dict:
    """Both sides' inference in turns (module doc); on the CPU also torch alone per setting
    in `torch_alone` (None: all of `torch_alone.SETTINGS`; () none)."""
    phase = phase_logger(log)
    torch_alone = torch_alone_settings(torch_alone)
    backend_name, why = resolve_device(device)
    backend = get_backend(backend_name)
    image = synthetic_slices(batch, size, seed)
    model = bench_model(backend, width, depth, norm, seed)
    tdev = "cuda" if backend_name == "cuda" else "cpu"
    theirs = torch_infer(model, image, tdev, cudnn_benchmark)
    x = backend.asarray(image)

    def ours():
        return model.forward(x, keep_for_backward=False)

    ours_logits = backend.to_host(ours())[..., 0]
    torch_logits = theirs().float().cpu().numpy()[:, 0]
    phase(f"U-Net ({model.num_parameters:,} parameters), torch's copy, a first batch of each")
    timing = time_in_turns(ours, theirs, backend, tdev, repeats, warmup)
    phase(f"{warmup} + {repeats} batches of each, in turns")
    result = {
        "benchmark": "infer",
        **provenance(backend_name),
        "backend": backend_name,
        "device_choice": why,
        "config": shape_config(model, backend, tdev, cudnn_benchmark, width=width,
                               depth=depth, norm=norm, size=size, batch=batch,
                               repeats=repeats, warmup=warmup, seed=seed),
        # float32 on both sides, different orders of summation: a few units in the last
        # places of logits that reach tens
        "logits_max_abs_diff": float(np.abs(ours_logits - torch_logits).max()),
        "logits_max_abs": float(np.abs(torch_logits).max()),
        **timing,
        "ms_per_slice": {"ours": timing["ours_ms"] / batch,
                         "torch": timing["torch_ms"] / batch},
    }
    if backend_name == "cpu" and torch_alone:
        from nodulekit.bench.step import add_torch_alone

        add_torch_alone(result, torch_alone,
                        dict(kind="infer", width=width, depth=depth, size=size, batch=batch,
                             repeats=repeats, warmup=warmup, seed=seed, lr=0.0, norm=norm),
                        ours)
        phase("torch alone, ours between its runs")
    return result


def format_infer(r: dict) -> str:
    from nodulekit.bench.step import torch_alone_lines

    c = r["config"]
    return "\n".join([
        *network_lines(r, f"batch {c['batch']} x {c['size']}x{c['size']} whole slices, "
                          f"{c['precision']}, nothing kept for a backward pass"),
        f"logits: ours and torch at most {r['logits_max_abs_diff']:.2g} apart "
        f"(largest {r['logits_max_abs']:.3g})",
        f"inference (median of {c['repeats']} batches after {c['warmup']} warm-up, in turns):",
        f"  ours  {r['ours_ms']:9.1f} ms   {r['ms_per_slice']['ours']:7.1f} ms per slice",
        f"  torch {r['torch_ms']:9.1f} ms   {r['ms_per_slice']['torch']:7.1f} ms per slice",
        f"  ratio ours/torch {r['ratio']:.2f}  ({'faster' if r['ratio'] < 1 else 'slower'}"
        f" than torch); median of the per-turn ratios {r['ratio_per_turn_median']:.2f}",
        *torch_alone_lines(r),
    ])
