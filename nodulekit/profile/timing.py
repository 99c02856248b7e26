"""A backend that times every op call: the engine untouched, the network none the wiser.

:class:`TimedBackend` wraps a backend object and hands the network the same attributes,
except that each op of the contract (``counts.TIMED_OPS``) comes back wrapped in a timer. The
U-Net, the loss and Adam call ``backend.<op>(...)`` and nothing else, so putting the wrapper
where they look for their backend (``model.backend``, ``optimizer.backend``) times the whole
step op by op. What runs between the ops (the network's Python, the gradients' copies into
the flat buffer, the skip gradients' additions) is not an op and is not timed: it shows as
the step's wall time less the ops' sum.

Clocks:

- :class:`HostClock` (CPU): ``time.perf_counter`` around the call. The CPU backend's ops
  return when their work is done (their threads have joined), so the host clock is the op's
  own time.
- :class:`CudaEventClock` (GPU): a CUDA event recorded on the current stream before and after
  the call; the host does not wait, so the queue stays as full as it is without the
  profiler. The times are read once the step has been synchronised: GPU time between the
  events, which includes any gap where the GPU waited for the host to launch the next kernel.
"""

from __future__ import annotations

import time

from nodulekit.profile import counts


class HostClock:
    """Wall time around the call, in ms (the CPU backend's ops are synchronous)."""

    name = "host clock around each op call"

    @staticmethod
    def start():
        return time.perf_counter()

    @staticmethod
    def stop(started):
        return (time.perf_counter() - started) * 1e3

    @staticmethod
    def read(pending: list) -> list[float]:
        return list(pending)


class CudaEventClock:
    """CUDA events before and after the call, read after the step (untested on a GPU here)."""

    name = "CUDA events around each op call"

    def __init__(self):
        import cupy

        self._cupy = cupy

    def start(self):
        event = self._cupy.cuda.Event()
        event.record()
        return event

    def stop(self, started):
        event = self._cupy.cuda.Event()
        event.record()
        return started, event

    def read(self, pending: list) -> list[float]:
        if not pending:
            return []
        pending[-1][1].synchronize()
        return [float(self._cupy.cuda.get_elapsed_time(a, b)) for a, b in pending]


def clock_for(backend_name: str):
    return CudaEventClock() if backend_name == "cuda" else HostClock()


class TimedBackend:
    """``backend``'s attributes, its ops timed by ``clock``: see the module docstring.

    Per step: ``begin_step(count=...)``, the step, then ``end_step()`` -> [(op, ms)] in call
    order. With ``count`` the step's calls are also counted (``counts``: FLOPs, bytes, kind),
    into ``calls`` as (op, OpCount, kind, shapes): once is enough, a step repeats the same
    calls.
    """

    def __init__(self, backend, clock):
        self._backend, self._clock = backend, clock
        self._ops: list[str] = []
        self._pending: list = []
        self._counting = False
        self.calls: list[tuple] = []
        # per counted call, the kernels the backend says it ran (its ``kernel_log``; None
        # for a backend that keeps none, as the CUDA one)
        self.kernels: list[str | None] = []

    def __getattr__(self, name):
        if name.startswith("__"):  # copy, pickle: not the backend's to answer
            raise AttributeError(name)
        attr = getattr(self._backend, name)
        if name not in counts.TIMED_OPS:
            return attr
        clock = self._clock

        backend = self._backend
        logs = self._counting and hasattr(backend, "kernel_log")

        def timed(*args, **kwargs):
            if logs:  # the counted step only (a few list appends inside its clock)
                backend.kernel_log = []
            started = clock.start()
            result = attr(*args, **kwargs)
            self._pending.append(clock.stop(started))
            self._ops.append(name)
            if self._counting:  # after the clock stopped: the count costs the op nothing
                self._count(name, args, kwargs, result)
                self.kernels.append(", ".join(backend.kernel_log) if logs else None)
                if logs:
                    backend.kernel_log = None
            return result

        return timed

    def _count(self, op, args, kwargs, result) -> None:
        named = counts.bind(op, args, kwargs)
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in named.items()
                  if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0}
        self.calls.append((op, counts.count(op, named, result), counts.kind(op, named), shapes))

    def begin_step(self, count: bool = False) -> None:
        self._ops, self._pending, self._counting = [], [], count
        if count:
            self.calls, self.kernels = [], []

    def end_step(self) -> list[tuple[str, float]]:
        """[(op, ms)] of the step's calls, in order (waits for the GPU's events)."""
        times = self._clock.read(self._pending)
        self._counting = False
        return list(zip(self._ops, times, strict=True))

    def __repr__(self) -> str:
        return f"<TimedBackend of {self._backend!r}>"
