"""Facts about the host that every layer may need, the engine included: where nodulekit
keeps what it generates and measures, and which CPU this is.

Below the engine in the import order (docs/design.md, "Layout"): it imports nothing of
nodulekit's.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    """Where nodulekit keeps generated data: NODULEKIT_CACHE, else the XDG cache dir."""
    env = os.environ.get("NODULEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nodulekit"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_identity() -> dict:
    """vendor, family, model, physical cores and the widest x86 vector extensions, from
    /proc/cpuinfo (Linux); cores are the distinct (physical id, core id) pairs: SMT siblings
    share their core's FMA pipes. Recorded with every benchmark: CPUs of one name differ
    (an AVX2 EPYC and an AVX-512 one gave step ratios 0.81 and 1.30 at one commit)."""
    first: dict = {"vendor_id": None, "cpu family": None, "model": None, "flags": None}
    cores, processors, package = set(), 0, None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processors += 1
        elif key in first and first[key] is None:
            first[key] = value
        elif key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))

    def number(text):
        return int(text) if text is not None and text.isdigit() else None

    flags = set((first["flags"] or "").split())
    return {"vendor": first["vendor_id"], "family": number(first["cpu family"]),
            "model": number(first["model"]),
            "cores": len(cores) or processors or os.cpu_count() or 1,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}
