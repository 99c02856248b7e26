"""Whether this CPU's 16-lane FMAs run at full width: measured once per machine, cached.

Why it matters: an AVX-512 instruction does 16 float32 FMAs, but not every core that
decodes it has 512-bit pipes. AMD's Zen 4 (and Intel cores with one 512-bit FMA unit:
client Ice Lake, Tiger Lake, Xeon Bronze and Silver) run it as two 256-bit halves, so
16 lanes do no more work per cycle than 8. Intel's server cores with two units, and Zen 5,
do twice the work. The CPU's name and flags do not tell the two apart (a Xeon Silver and
a Gold of one generation report the same features), so this module asks the core itself:
one core runs 12 independent FMA chains of 8 lanes, then of 16 (``fma_loop``: no loads or
stores), and the 16-lane kind counts as full width when it does at least
1.3x the 8-lane kind's work. Measured on a 2-core Xeon (family 6 model 207): 1.9-2.1 on a
quiet machine, 1.55 once while a neighbour slowed both kinds (16 lanes 125 GFLOP/s
instead of 217); about 1.0 on Zen 4, where the profile's peaks gave 16 and 8 lanes the
same GFLOP/s. The threshold sits between, nearer the side that noise does not reach.

What it decides: ``engine.cpu`` then gives the packed convolutions (``cpu_conv_packed``,
16-lane blocks) the shallow layers too, where ``register_blocked``'s 8-lane blocks were as
fast on Zen 4 but 1.2-1.35x slower on the Xeon (``auto`` in ``engine/cpu.py``).

The answer is kept in ``<cache>/cpu/<vendor>-<family>-<model>-<cores>.json`` (the cache
of the demo data set and the profile's peaks; a name like "Xeon Processor" can cover
several models, the CPUID's numbers do not), so every run on one machine makes the same
choice and computes the same bits; the two versions sum in different orders, so a machine
with full-width FMAs computes different bits from one without. ``NODULEKIT_FMA_WIDTH=256``
or ``512`` says it instead of measuring (e.g. to get one machine's numbers on another).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nodulekit.engine.fma_loop import FMA_CHAINS, START, C, M, fma_kernels
from nodulekit.host import cache_dir, cpu_identity

ENV = "NODULEKIT_FMA_WIDTH"
THRESHOLD = 1.3  # 16-lane over 8-lane FMA throughput at which 16 lanes count as full width
VERSION = 2  # bump when the measurement changes: cached answers are measured again
_FLOPS = 1.5e8  # per kind and try: ~1 ms at 8 lanes on a 3.8 GHz core with two FMA pipes
_TRIES = 15

_decided: dict | None = None


def measure() -> dict:
    """FMA GFLOP/s of one core with 8 and with 16 lanes (best of a few tries each,
    alternating, so a neighbour's burst hits both kinds alike)."""
    loops = {lanes: fma_kernels(lanes, FMA_CHAINS)[1] for lanes in (8, 16)}
    iterations = {lanes: max(1, int(_FLOPS // (2 * lanes * FMA_CHAINS))) for lanes in loops}
    best = {lanes: float("inf") for lanes in loops}
    for loop in loops.values():
        loop(16, START, M, C)  # compile
    for _ in range(_TRIES):
        for lanes, loop in loops.items():
            t0 = time.perf_counter()
            loop(iterations[lanes], START, M, C)
            best[lanes] = min(best[lanes], time.perf_counter() - t0)
    gflops = {lanes: 2 * lanes * FMA_CHAINS * iterations[lanes] / best[lanes] / 1e9
              for lanes in loops}
    ratio = gflops[16] / gflops[8]
    return {"gflops_8_lanes": gflops[8], "gflops_16_lanes": gflops[16],
            "ratio": ratio, "full_width": ratio >= THRESHOLD}


def _cache_path(identity: dict) -> Path:
    name = "-".join(str(identity[k]) for k in ("vendor", "family", "model", "cores"))
    return cache_dir() / "cpu" / f"{name}.json"


def decide() -> dict:
    """{"full_width": bool, "source": how it was decided, ...}: from NODULEKIT_FMA_WIDTH,
    else this machine's cached measurement, else a new one (cached)."""
    global _decided
    if _decided is not None:
        return _decided
    asked = os.environ.get(ENV, "").strip()
    if asked:
        if asked not in ("256", "512"):
            raise ValueError(f"{ENV}={asked!r}: give 256 (16-lane FMAs in two halves) or 512 "
                             "(full width), or unset it to measure")
        _decided = {"full_width": asked == "512", "source": f"{ENV}={asked}"}
        return _decided
    identity = cpu_identity()
    path = _cache_path(identity)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = None
    if cached and cached.get("version") == VERSION and cached.get("cpu") == identity:
        _decided = {**cached, "source": f"measured, cached in {path}"}
        return _decided
    try:
        measured = {"version": VERSION, "cpu": identity, **measure()}
    except Exception as exc:  # noqa: BLE001 - a probe that fails must not stop a run
        # the choice made without the probe (Zen 4's): slower on a full-width core, never wrong
        _decided = {"full_width": False,
                    "source": f"not measured ({type(exc).__name__}: {exc}); not cached"}
        return _decided
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(measured, indent=2) + "\n")
        os.replace(partial, path)  # whole or not at all: another process may read it
        source = f"measured, cached in {path}"
    except OSError:
        source = "measured (not cached: the cache folder is not writable)"
    _decided = {**measured, "source": source}
    return _decided


def full_width() -> bool:
    """Whether 16-lane FMAs do twice the 8-lane work here (see the module doc)."""
    return bool(decide()["full_width"])


def forget() -> None:
    """Decide again at the next call (tests)."""
    global _decided
    _decided = None
