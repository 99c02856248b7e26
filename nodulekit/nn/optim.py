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
