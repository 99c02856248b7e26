"""An exponential moving average of the weights (Polyak averaging), the model that is
validated, kept and used.

After each optimiser step n (1, 2, ...):

    d_n      = min(decay, (1 + n) / (10 + n))      # TensorFlow's warm-up: early steps count
    average  = d_n * average + (1 - d_n) * weights  # for the parameters and batch norm's
                                                    # running statistics alike

The training run keeps stepping the raw weights; validation, checkpoint_best and everything
that loads a checkpoint (`training.checkpoint.model_from_checkpoint`) use the average. Why: a
short run at a large learning rate ends each epoch at a point that swings with the last few
batches (on the demo the validation found-nodule Dice jumped between 0.07 and 0.31 from one
epoch to the next); the average of the last ~1 / (1 - decay) steps' weights swings less
(Polyak and Juditsky, 1992; the weight EMA of YOLO and timm). On the demo it did, but its
models scored lower on held-out data (README, "Twenty epochs"), so it is off by default.

Arithmetic is elementwise in the backend's array module (numpy or CuPy), the same on every
rank, so a data-parallel run's ranks hold the same average and a resumed run continues it
bit for bit (checkpoint_last stores it).
"""

from __future__ import annotations

from contextlib import contextmanager

WARMUP = 10  # d_n = (1 + n) / (WARMUP + n) until it reaches `decay`


class WeightEMA:
    """The average of `model`'s parameters and buffers; `update` after every step."""

    def __init__(self, backend, model, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight EMA decay must be in (0, 1), got {decay}")
        self.backend, self.decay = backend, float(decay)
        self.params = model.params.copy()
        self.buffers = model.buffers.copy()

    def rate(self, step: int) -> float:
        """d_n after optimiser step n (>= 1)."""
        return min(self.decay, (1.0 + step) / (WARMUP + step))

    def update(self, model, step: int) -> None:
        """Fold the weights after optimiser step `step` into the average."""
        d = self.rate(step)
        for average, now in ((self.params, model.params), (self.buffers, model.buffers)):
            if average.size:
                average *= d
                average += (1.0 - d) * now

    def load(self, params, buffers) -> None:
        """The average a checkpoint stored (host or device arrays)."""
        for average, stored, what in ((self.params, params, "parameters"),
                                      (self.buffers, buffers, "buffers")):
            if not average.size:
                continue
            value = self.backend.asarray(stored, dtype=self.backend.dtype)
            if value.shape != average.shape:
                raise ValueError(f"averaged {what}: expected shape {average.shape}, got "
                                 f"{value.shape}")
            average[...] = value

    @contextmanager
    def applied(self, model):
        """`model` holds the average inside the block, its own weights again after it."""
        saved = model.params.copy(), model.buffers.copy()
        model.params[...] = self.params
        if model.buffers.size:
            model.buffers[...] = self.buffers
        try:
            yield model
        finally:
            model.params[...] = saved[0]
            if model.buffers.size:
                model.buffers[...] = saved[1]
