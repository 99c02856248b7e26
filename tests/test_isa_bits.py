"""The CPU kernels compute the same bits whatever instruction set Numba compiles them for.

Each output of the packed and Winograd convolutions and of the up-convolution's version 3 is
one fixed chain of fused multiply-adds and additions per float (engine/cpu.py), so compiling
them for an AVX2 core (16 vector registers of 8 lanes: the 6 x 16 blocks, 16-lane vectors
split in two) must give what this machine's own compilation gives, to the bit. Both sides
run in child processes that differ only in Numba's target CPU (`NUMBA_CPU_NAME=haswell` with
AVX2's features, as `docs/cpu-benchmarks.md` measured an AVX2 core), with the
`NODULEKIT_FMA_WIDTH=256` choice on both so that `auto` picks the same kernels. Numba keeps
each target's machine code apart in its cache (the target CPU is part of the key).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,"
                    "+mmx,+movbe,+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")
PROBE = Path(__file__).with_name("isa_probe.py")


def probe(out: Path, **env) -> dict:
    child = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    child.update(NODULEKIT_FMA_WIDTH="256", **env)
    done = subprocess.run([sys.executable, str(PROBE), str(out)], env=child,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="an x86 test: it compiles for an AVX2 core")
def test_an_avx2_compilation_gives_the_host_compilations_bits(tmp_path):
    host = probe(tmp_path / "host.npz")
    avx2 = probe(tmp_path / "avx2.npz", NUMBA_CPU_NAME="haswell",
                 NUMBA_CPU_FEATURES=HASWELL_FEATURES)
    assert not avx2.pop("wide_blocks")  # the AVX2 child took the 16-register blocks
    host.pop("wide_blocks")  # this machine's choice (32-register ones under AVX-512)
    assert host.keys() == avx2.keys() and len(host) == 21
    for name in host:
        assert host[name].shape == avx2[name].shape, name
        assert np.all(np.isfinite(host[name])), name
        assert np.array_equal(host[name], avx2[name]), (
            f"{name}: max difference {np.max(np.abs(host[name] - avx2[name]))}")
