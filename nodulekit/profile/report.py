"""`nodulekit profile`'s result as text: the ceilings, every op of the step, the totals."""

from __future__ import annotations


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes else "?"


def format_peaks(peaks: dict) -> str:
    where = (f"cached in {peaks['path']}" if peaks.get("cached")
             else f"just measured; kept in {peaks['path']}") if peaks.get("path") else "given"
    lines = [f"ceilings of this device (measured {peaks.get('measured', '?')}, {where}):"]
    details = [", ".join(f"{f['lanes']} lanes {f['gflops']:.0f}" for f in peaks["fma"]
                         if "lanes" in f)]
    ideal = peaks.get("theoretical")
    if ideal and "fraction_reached" in ideal:
        details.append(f"{100 * ideal['fraction_reached']:.0f}% of {ideal['gflops']:.0f} = "
                       f"{ideal['basis'].split(' (')[0]}")
    elif ideal:
        details.append(f"theoretical {ideal['gflops']:.0f}: {ideal['basis']}")
    details = [d for d in details if d]
    lines.append(f"  FMA    {peaks['fma_gflops']:7.0f} GFLOP/s"
                 + (f"  ({'; '.join(details)})" if details else ""))
    memory = "device memory" if peaks.get("backend") == "cuda" else "DRAM"
    copy = f"  copy   {peaks['copy_gbps']:7.0f} GB/s {memory} ({_mib(peaks['copy'].get('bytes'))})"
    cache = peaks.get("cache") or {}
    if peaks.get("cache_copy_gbps"):
        copy += (f", {peaks['cache_copy_gbps']:.0f} GB/s {cache.get('level', 'cache')} "
                 f"({_mib((cache.get('copy') or {}).get('bytes'))} of its "
                 f"{_mib(cache.get('bytes'))})")
    lines.append(copy)
    gemm = peaks.get("gemm") or {}
    if peaks.get("gemm_gflops"):
        lines.append(f"  SGEMM  {peaks['gemm_gflops']:7.0f} GFLOP/s  ({gemm.get('library')}, "
                     f"n = {gemm.get('n')})")
    ridge = f"  ridge point {peaks['fma_gflops'] / peaks['copy_gbps']:.1f} FLOP/byte ({memory})"
    if peaks.get("cache_copy_gbps"):
        ridge += f", {peaks['fma_gflops'] / peaks['cache_copy_gbps']:.1f} ({cache.get('level')})"
    lines.append(ridge + ": left of it an op is memory-bound, right of it compute-bound")
    return "\n".join(lines)


def format_ops(ops: list[dict]) -> str:
    head = (f"{'#':>3s}  {'layer':<13s}{'op':<26s}{'ms':>8s}{'share':>7s}{'MFLOP':>9s}"
            f"{'MB':>7s}{'GFLOP/s':>9s}{'GB/s':>7s}{'FLOP/B':>8s}{'bound':>8s}{'%roof':>7s}"
            f"{'%L3':>6s}  kernel")
    lines = [head, "-" * len(head)]
    for o in ops:
        intensity = "-" if o["intensity"] is None else f"{o['intensity']:.1f}"
        lines.append(f"{o['index']:3d}  {o['layer']:<13s}{o['op']:<26s}{o['ms']:8.3f}"
                     f"{100 * o['share']:6.1f}%{o['flops'] / 1e6:9.1f}{o['bytes'] / 1e6:7.1f}"
                     f"{o['gflops']:9.1f}{o['gbps']:7.1f}{intensity:>8s}{o['bound']:>8s}"
                     f"{_pct(o['roofline_pct']):>7s}{_pct(o['cache_roofline_pct']):>6s}"
                     f"  {o.get('kernel') or ''}".rstrip())
    return "\n".join(lines)


def markdown_ops(result: dict) -> str:
    """Every op of the step as a Markdown table (its kernels, time, rate and % of the
    roofline), headed by the device, the shape and the step's totals."""
    c, s = result["config"], result["step"]
    lines = [f"{result['device']}, commit {str(result.get('commit'))[:7]}: width {c['width']}, "
             f"depth {c['depth']}, batch {c['batch']} x {c['size']} x {c['size']}, norm "
             f"{c['norm']}; the step {s['wall_ms']:.1f} ms ({s['gflops']:.0f} GFLOP/s), the "
             f"ops {100 * s['ops_over_wall']:.1f}% of it.", "",
             "| # | layer | op | kernel | MFLOP | MB | ms | share | GFLOP/s | % roof |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for o in result["ops"]:
        lines.append(f"| {o['index']} | {o['layer']} | `{o['op']}` | {o.get('kernel') or '-'} "
                     f"| {o['flops'] / 1e6:.1f} | {o['bytes'] / 1e6:.1f} | {o['ms']:.2f} "
                     f"| {100 * o['share']:.1f}% | {o['gflops']:.0f} "
                     f"| {_pct(o['roofline_pct'])} |")
    return "\n".join(lines) + "\n"


def format_kinds(kinds: list[dict]) -> str:
    lines = [f"{'by kind':<22s}{'calls':>6s}{'ms':>9s}{'share':>8s}{'GFLOP/s':>9s}{'GB/s':>7s}"
             f"{'%roof':>7s}"]
    for k in kinds:
        name = k["kind"] if k["phase"] in ("loss", "optimizer") else f"{k['kind']} {k['phase']}"
        lines.append(f"  {name:<20s}{k['calls']:6d}{k['ms']:9.2f}"
                     f"{100 * k['share']:7.1f}%{k['gflops']:9.1f}{k['gbps']:7.1f}"
                     f"{_pct(k['roofline_pct']):>7s}")
    return "\n".join(lines)


def format_step(result: dict) -> str:
    s, c, peaks = result["step"], result["config"], result["peaks"]
    medians = sum(o["ms"] for o in result["ops"])
    return "\n".join([
        f"step: wall {s['wall_ms']:.1f} ms ({s['gflops']:.0f} GFLOP/s, "
        f"{100 * s['gflops'] / peaks['fma_gflops']:.0f}% of the FMA peak); the ops add up to "
        f"{s['ops_ms']:.1f} ms ({100 * s['ops_over_wall']:.1f}% of the wall, median per step)",
        f"  outside the ops {s['outside_ops_ms']:.1f} ms ({100 * s['outside_ops_share']:.1f}%: "
        "the network's Python, gradient copies into the flat buffer, skip-gradient adds)",
        f"  the same step without the profiler's timers: {s['uninstrumented_ms']:.1f} ms "
        f"(median of {c['repeats']}, in turns with the timed ones)",
        f"  the table's ops (each its own median) add up to {medians:.1f} ms, "
        f"{100 * medians / s['wall_ms']:.1f}% of the wall: less where the host's hiccups "
        "fell into some op of some steps",
    ])


def format_profile(result: dict) -> str:
    c = result["config"]
    norm = "no norm" if c["norm"] == "none" else f"{c['norm']} norm"
    threads = f", {c['threads']} threads" if c.get("threads") else ""
    lines = [
        f"device: {result['device']}  ({result['device_choice']}; convolutions "
        f"{c['conv_variant']!r}{threads}, {c['precision']})",
        format_peaks(result["peaks"]),
        "",
        f"U-Net depth {c['depth']} width {c['width']} ({c['parameters']:,} parameters), "
        f"batch {c['batch']} x {c['size']}x{c['size']}, {norm}: "
        f"{result['step']['flops'] / 1e9:.2f} GFLOP a step; every op the median of "
        f"{c['repeats']} timed steps ({c['timer']})",
        format_ops(result["ops"]),
        "",
        format_step(result),
        "",
        format_kinds(result["kinds"]),
        "%roof: achieved GFLOP/s over the roofline at the op's intensity (DRAM copy ceiling);"
        " %L3: the same against the L3 copy",
        "FLOPs are the direct convolution's: a layer the CPU runs with Winograd's algorithm"
        " (cpu_conv_winograd) does 4x fewer, so its GFLOP/s are direct-equivalent and may"
        " pass the peak",
    ]
    if "variants" in result:
        lines += ["", format_variants(result["variants"])]
    return "\n".join(lines)


def format_variants(v: dict) -> str:
    names = v["names"]
    col = max(16, *(len(n) + 2 for n in names))
    head = f"{'layer':<13s}{'op':<26s}" + "".join(f"{n:>{col}s}" for n in names)
    lines = ["convolution versions: ms per call (% of roofline)", head, "-" * len(head)]
    for row in v["ops"]:
        cells = "".join(f"{row['ms'][n]:>{col - 6}.3f} ({_pct(row['roofline_pct'][n]):>4s})"
                        for n in names)
        lines.append(f"{row['layer']:<13s}{row['op']:<26s}{cells}")
    lines.append("-" * len(head))
    for label, key in (("convolutions", "conv_ms"), ("all ops", "ops_ms"),
                       ("step (wall)", "wall_ms")):
        lines.append(f"{label:<39s}" + "".join(f"{v['steps'][n][key]:>{col}.1f}"
                                               for n in names))
    lines.append(f"(ms, median of {v['repeats']} steps each, the versions in turns)")
    return "\n".join(lines)
