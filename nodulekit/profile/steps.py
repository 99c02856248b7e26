"""Running the training step for a profile: timed op by op, and plain, in turns.

A :class:`StepProfiler` holds one U-Net, its Adam and the batch on one backend. Each
``turn()`` runs one step with the backend wrapped in ``timing.TimedBackend`` (the first turn
also counts the calls) and one without, each synchronised and timed on the host clock.
Several profilers (the convolution versions) take their turns one after the other
(:func:`take_turns`), so that a load coming and going on a shared machine falls on all of
them alike, as `bench step` times ours and PyTorch's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nodulekit.bench.step import synthetic_batch
from nodulekit.nn import Adam, TrainStep, UNet
from nodulekit.profile.timing import TimedBackend, clock_for


@dataclass
class StepTimes:
    """What the timed steps measured: the calls (counted once), each step's op times."""

    calls: list = field(default_factory=list)  # (op, OpCount, kind, shapes): TimedBackend
    kernels: list = field(default_factory=list)  # per call, the kernels it ran (or None)
    op_ms: list[list[float]] = field(default_factory=list)  # [step][call]
    wall_ms: list[float] = field(default_factory=list)  # the timed steps
    plain_ms: list[float] = field(default_factory=list)  # the steps without timers


class StepProfiler:
    """One training step's set-up (`bench step`'s: synthetic batch, lr 1e-4) on a backend."""

    def __init__(self, backend, backend_name: str, options):
        o = options
        image, mask = synthetic_batch(o.batch, o.size, o.seed)
        self.backend = backend
        self.model = UNet(backend, depth=o.depth, width=o.width, seed=o.seed, norm=o.norm)
        self.optimizer = Adam(backend, self.model.params, self.model.grads, lr=o.lr)
        self.step = TrainStep(self.model, self.optimizer)
        self.x, self.t = backend.asarray(image), backend.asarray(mask)
        self.timed = TimedBackend(backend, clock_for(backend_name))
        self.times = StepTimes()

    def _use(self, backend) -> None:
        # where the step looks for its backend: the network (the loss through it), Adam
        self.model.backend = self.optimizer.backend = backend

    def _run(self) -> float:
        t0 = time.perf_counter()
        self.step(self.x, self.t)
        self.backend.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def warm_up(self, steps: int) -> None:
        """Steps that compile (Numba) and load (CuPy modules) what the step needs."""
        for _ in range(steps):
            self.step(self.x, self.t)
        self.backend.synchronize()

    def turn(self) -> None:
        """One timed step and one plain step."""
        times, timed = self.times, self.timed
        self._use(timed)
        timed.begin_step(count=not times.op_ms)
        times.wall_ms.append(self._run())
        calls = timed.end_step()
        if times.op_ms and [op for op, _ in calls] != [c[0] for c in times.calls]:
            raise RuntimeError("the training step called different ops from one step to the "
                               "next; a profile needs the same calls each step")
        times.calls = times.calls or list(timed.calls)
        times.kernels = times.kernels or list(timed.kernels)
        times.op_ms.append([ms for _, ms in calls])
        self._use(self.backend)
        times.plain_ms.append(self._run())


def take_turns(profilers: list[StepProfiler], repeats: int, warmup: int) -> list[StepTimes]:
    """Warm each up, then ``repeats`` rounds of one turn each; their StepTimes."""
    for p in profilers:
        p.warm_up(warmup)
    for _ in range(repeats):
        for p in profilers:
            p.turn()
    return [p.times for p in profilers]
