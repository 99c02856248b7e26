"""Adam over the flat parameter buffer: one engine call per step for all parameters."""

from __future__ import annotations

import numpy as np

from nodulekit.engine.ops import Backend


class Adam:
    """PyTorch's Adam (bias-corrected moments, eps outside the square root)."""

    def __init__(self, backend: Backend, params, grads, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.backend = backend
        self.params, self.grads = params, grads
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.m = backend.zeros(params.shape)
        self.v = backend.zeros(params.shape)
        self.step_count = 0

    def step(self) -> None:
        self.step_count += 1
        self.backend.adam_step(self.params, self.grads, self.m, self.v, self.step_count,
                               self.lr, self.betas[0], self.betas[1], self.eps)

    def state(self) -> dict:
        """Host copies of everything needed to continue exactly (for checkpoints)."""
        return {"m": self.backend.to_host(self.m).copy(), "v": self.backend.to_host(self.v).copy(),
                "step": self.step_count, "lr": self.lr, "betas": self.betas, "eps": self.eps}

    def load_state(self, state: dict) -> None:
        for key in ("m", "v"):
            value = np.asarray(state[key])
            if value.shape != self.m.shape:
                raise ValueError(f"Adam state {key!r}: expected shape {self.m.shape}, "
                                 f"got {value.shape}")
            getattr(self, key)[...] = self.backend.asarray(value, dtype=self.backend.dtype)
        self.step_count = int(state["step"])


LR_SCALINGS = ("none", "fan_in")
LR_SCHEDULES = ("constant", "poly")
POLY_POWER = 0.9  # nnU-Net's


def scheduled_lr(lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of the step after `step` steps of `total_steps`: "constant" (the
    paper's) lr; "poly" (nnU-Net's) lr (1 - step / total)^0.9, falling to ~0 at the last
    step, so the last epochs' models differ little and the one kept is not one caught
    mid-swing."""
    if schedule == "constant":
        return float(lr)
    if schedule != "poly":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    left = max(0.0, 1.0 - step / max(int(total_steps), 1))
    return float(lr) * left ** POLY_POWER


def lr_scale(layout, mode: str, reference_fan_in: int = 9) -> np.ndarray | None:
    """Per-parameter learning-rate factors (float32 [P]) for ``lr_scaling``, or None.

    "fan_in": Adam moves every weight by about lr per step whatever its layer, so a layer
    summing over fan_in inputs changes its output about sqrt(fan_in) times faster, relative
    to its He-initialised scale, than a narrow one. Without normalisation layers the deep,
    wide layers of the U-Net then run away (the logits grow to -1e4 within a few hundred
    steps at lr 1e-3, measured on the demo set). Scaling each tensor's step by
    min(1, sqrt(reference_fan_in / fan_in)) (3x3 on one channel = 9: the first layer keeps
    lr) gives every layer the same relative speed. Biases follow their weights; a norm's
    gamma and beta (each scales or shifts one normalised channel) keep lr.
    """
    if mode == "none":
        return None
    if mode != "fan_in":
        raise ValueError(f"unknown lr scaling {mode!r}; choose one of {LR_SCALINGS}")
    scale = np.ones(layout.total, dtype=np.float32)
    for slot in layout.slots.values():
        name = slot.name
        if name.endswith((".gamma", ".beta")):
            continue  # factor 1
        weight = layout.slots[name[:-2] + ".w"] if name.endswith(".b") else slot
        k, r, s, c = weight.shape
        fan_in = c if ".up." in weight.name else r * s * c
        scale[slot.offset:slot.offset + slot.size] = min(1.0, (reference_fan_in / fan_in) ** 0.5)
    return scale
