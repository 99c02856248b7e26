"""`nodulekit.host_memory`: memory a step frees is kept for the next one (no page faults the
second time), and the opt-outs leave glibc's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# a step's pattern: allocate 16 activations of 4 MiB, touch them, free them all; the minor
# page faults of the third such round (glibc's default gives the freed top of its heap back
# to the kernel, so every round faults its 16,384 pages in again)
PROBE = """
import json, resource
import numpy as np
import nodulekit
from nodulekit import host_memory
def round_():
    arrays = [np.ones(1 << 20, np.float32) for _ in range(16)]
    del arrays
round_(); round_()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0,
                  "policy": host_memory.policy()}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc and /proc's fault counts: Linux only")


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "NODULEKIT_MALLOC")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = _probe()
    if not kept["policy"].startswith("retain"):
        pytest.skip(f"this C library is not glibc's: {kept['policy']}")
    system = _probe(NODULEKIT_MALLOC="system")
    assert system["policy"] == "system (NODULEKIT_MALLOC=system)"
    pages = (64 << 20) // 4096
    assert system["faults"] > pages // 4, system  # faulted in again (8,176 here)
    assert kept["faults"] < pages // 20, kept  # reused as it was


def test_the_users_own_malloc_settings_win():
    out = _probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert out["policy"].startswith("system (the user's own")
    out = _probe(NODULEKIT_MALLOC="nonsense")
    assert out["policy"].startswith("system (NODULEKIT_MALLOC='nonsense'")
