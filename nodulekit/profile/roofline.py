"""The roofline: how fast an op could run at its arithmetic intensity, and the plot.

An op that does F FLOPs and must move B bytes has arithmetic intensity I = F / B. It can
run no faster than the FMA units allow (``fma_gflops``) nor than memory can feed it
(I x ``copy_gbps``): its roofline is the smaller, ``min(fma, I x copy)`` GFLOP/s, and its
"% of roofline" is its achieved GFLOP/s over that (Nsight Compute's "speed of light" asks
the same question). Left of the ridge point I = fma / copy an op is memory-bound, right of
it compute-bound.

The memory ceiling is the DRAM copy's (the classic roofline). Many of a small step's
tensors fit in the CPU's L3, though, and an op whose data come from there can pass the
DRAM ceiling; ``cache_roofline_pct`` is the same share against the L3 copy's bandwidth, the
ceiling if every byte came from the L3. An op with no FLOPs (a copy) is placed by its
bandwidth alone: its % is its GB/s over the copy's.
"""

from __future__ import annotations

import math

KIND_COLOURS = {
    "conv3x3": "#1f77b4", "conv1x1": "#17becf", "upconv2x2": "#9467bd", "maxpool": "#2ca02c",
    "concat": "#8c564b", "norm": "#e377c2", "loss": "#d62728", "adam": "#ff7f0e",
    "input": "#7f7f7f", "metrics": "#bcbd22",
}
PHASE_MARKERS = {"forward": "o", "backward": "v", "loss": "s", "optimizer": "D", "step": "o"}


def roofline_gflops(intensity: float, fma_gflops: float, gbps: float) -> float:
    return min(fma_gflops, intensity * gbps)


def place(flops: int, nbytes: int, ms: float, peaks: dict) -> dict:
    """An op's point on the roofline: achieved GFLOP/s and GB/s, intensity, its ceiling
    there and the share of it reached (see the module docstring)."""
    seconds = max(ms, 1e-9) / 1e3
    gflops, gbps = flops / seconds / 1e9, nbytes / seconds / 1e9
    fma, dram, cache = peaks["fma_gflops"], peaks["copy_gbps"], peaks.get("cache_copy_gbps")
    intensity = flops / nbytes if nbytes else math.inf

    def share(bandwidth):
        if bandwidth is None:
            return None
        if flops == 0:
            return 100.0 * gbps / bandwidth
        return 100.0 * gflops / roofline_gflops(intensity, fma, bandwidth)

    return {"gflops": gflops, "gbps": gbps,
            "intensity": intensity if nbytes else None,
            "roofline_gflops": roofline_gflops(intensity, fma, dram) if flops else None,
            "bound": "compute" if intensity * dram >= fma else "memory",
            "roofline_pct": share(dram), "cache_roofline_pct": share(cache)}


# --------------------------------------------------------------------------- the plot


def _ceilings(ax, peaks: dict, x_min: float, x_max: float) -> None:
    fma, dram = peaks["fma_gflops"], peaks["copy_gbps"]
    xs = [x_min, fma / dram, x_max]
    ax.plot(xs, [roofline_gflops(x, fma, dram) for x in xs], color="black", lw=2,
            label=f"roofline: FMA {fma:.0f} GFLOP/s, copy {dram:.0f} GB/s", zorder=1)
    cache = peaks.get("cache_copy_gbps")
    if cache:
        level = (peaks.get("cache") or {}).get("level", "cache")
        ridge = fma / cache
        ax.plot([x_min, ridge], [x_min * cache, fma], color="grey", lw=1.2, ls="--",
                label=f"{level} copy {cache:.0f} GB/s", zorder=1)
    gemm = peaks.get("gemm_gflops")
    if gemm:
        library = (peaks.get("gemm") or {}).get("library", "vendor").split()[0]
        ax.axhline(gemm, color="grey", lw=1, ls=":", zorder=1,
                   label=f"{library} SGEMM {gemm:.0f} GFLOP/s")


def _legend_handles(kinds: list[str], phases: list[str]):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=KIND_COLOURS.get(k, "black"),
                      markeredgecolor="black", markeredgewidth=0.4, label=k) for k in kinds]
    handles += [Line2D([], [], ls="", marker=PHASE_MARKERS.get(p, "o"), color="white",
                       markeredgecolor="black", label=p) for p in phases]
    return handles


def plot_roofline(result: dict, path: str) -> None:
    """The step's ops on the device's roofline, coloured by kind, marker by phase, size by
    share of the step; the whole step as a star. Written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks, ops = result["peaks"], [o for o in result["ops"] if o["flops"] > 0]
    intensities = [o["intensity"] for o in ops] or [1.0]
    x_min = min(intensities + [1.0]) / 2
    x_max = max(intensities + [peaks["fma_gflops"] / peaks["copy_gbps"]]) * 4
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=100)
    _ceilings(ax, peaks, x_min, x_max)
    for o in ops:
        ax.scatter(o["intensity"], o["gflops"], s=15 + 2000 * o["share"],
                   c=KIND_COLOURS.get(o["kind"], "black"),
                   marker=PHASE_MARKERS.get(o["phase"], "o"), alpha=0.75,
                   edgecolors="black", linewidths=0.4, zorder=3)
    step = result["step"]
    handles, _ = ax.get_legend_handles_labels()
    if step["bytes"]:
        handles.append(ax.scatter(step["flops"] / step["bytes"],
                                  step["flops"] / step["wall_ms"] / 1e6, marker="*", s=220,
                                  c="gold", edgecolors="black", zorder=4,
                                  label=f"whole step, {step['wall_ms']:.0f} ms"))
    kinds = list(dict.fromkeys(o["kind"] for o in ops))
    phases = list(dict.fromkeys(o["phase"] for o in ops if o["phase"] in ("forward",
                                                                           "backward")))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_min, x_max)
    ax.set_xlabel("arithmetic intensity (FLOP per byte it must move)")
    ax.set_ylabel("GFLOP/s")
    c = result["config"]
    core = (peaks.get("theoretical") or {}).get("core")
    norm = "" if c["norm"] == "none" else f", {c['norm']} norm"
    ax.set_title(f"{result['device']}{f' ({core})' if core else ''}\none training step of "
                 f"a U-Net, width {c['width']} depth {c['depth']}{norm}, batch {c['batch']} x "
                 f"{c['size']}x{c['size']}; point size: share of the step", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles + _legend_handles(kinds, phases), fontsize=7,
              loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
