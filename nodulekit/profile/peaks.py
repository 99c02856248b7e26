"""The device's own ceilings, measured on it once and cached: what the roofline is drawn with.

    fma_gflops       fp32 FMA throughput, every core / SM busy (peaks_cpu.py, peaks_gpu.py)
    copy_gbps        a streaming copy far larger than the caches: DRAM / HBM
    cache_copy_gbps  the same copy held in the last-level cache (CPU: the L3), or None
    gemm_gflops      the vendor library's SGEMM (OpenBLAS via numpy; cuBLAS via CuPy), for
                     reference: what a tuned GEMM reaches of the FMA peak
    theoretical      cores x clock x FLOP per cycle where known, and the share reached

Measured in a few seconds and kept in ``<cache>/peaks/<device>.json`` (``<cache>``:
``$NODULEKIT_CACHE``, else ``$XDG_CACHE_HOME/nodulekit``, else ``~/.cache/nodulekit``,
as the demo data set), so a profile does not pay for them again; ``remeasure=True`` (the
command's ``--remeasure-peaks``) measures again, e.g. after a driver update or when the
first measurement ran on a busy machine.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from nodulekit.bench.common import device_description, device_slug
from nodulekit.host import cache_dir

# bump when the way a peak is measured changes: older cached files are then measured again
PEAKS_VERSION = 1


def peaks_path(backend_name: str, root: Path | None = None) -> Path:
    root = cache_dir() if root is None else Path(root)
    return root / "peaks" / f"{device_slug(backend_name)}.json"


def measure_peaks(backend_name: str) -> dict:
    """Measure the ceilings of the device behind ``backend_name`` ('cpu' or 'cuda')."""
    if backend_name == "cuda":
        from nodulekit.profile import peaks_gpu

        measured = peaks_gpu.measure()
    else:
        from nodulekit.profile import peaks_cpu

        measured = peaks_cpu.measure()
    return {"version": PEAKS_VERSION, "device": device_description(backend_name),
            "backend": backend_name,
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **measured}


def device_peaks(backend_name: str, remeasure: bool = False, root: Path | None = None) -> dict:
    """The cached ceilings of this device, measured first when there are none (or when
    asked); the dict says where it is kept (``path``) and whether it was just measured."""
    path = peaks_path(backend_name, root)
    if not remeasure and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = None  # unreadable: measure again and replace it
        if cached and cached.get("version") == PEAKS_VERSION \
                and cached.get("device") == device_description(backend_name):
            return {**cached, "path": str(path), "cached": True}
    peaks = measure_peaks(backend_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(peaks, indent=2) + "\n")
    os.replace(partial, path)  # whole or not at all: another process may read it
    return {**peaks, "path": str(path), "cached": False}
