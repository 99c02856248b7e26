"""`nodulekit bench ...` through the command line (click), where no GPU is needed."""

from __future__ import annotations

from click.testing import CliRunner

from nodulekit.cli import main


def test_bench_ops_variants_needs_a_gpu_and_says_so(monkeypatch):
    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (False, "no CUDA device"))
    result = CliRunner().invoke(main, ["bench", "ops", "--device", "cuda", "--op", "conv",
                                       "--variants", "all"])
    assert result.exit_code != 0
    assert "needs a GPU: no CUDA device" in result.output


def test_bench_commands_say_a_bad_request_in_one_line(monkeypatch):
    """A GPU asked for where none is usable, or a size the U-Net cannot take: one line
    ("Error: ..."), no traceback, a non-zero exit, as every other command."""
    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (False, "no CUDA device"))
    for command in (["step", "--no-torch-alone"], ["ops", "--op", "adam"], ["norm"]):
        result = CliRunner().invoke(main, ["bench", *command, "--device", "cuda"])
        assert result.exit_code == 1, result.output
        assert "--device cuda asked for, but no CUDA device" in result.output
        assert "Traceback" not in result.output and result.exception is not None
    result = CliRunner().invoke(main, ["bench", "step", "--width", "4", "--depth", "2",
                                       "--size", "30", "--batch", "1", "--repeats", "1",
                                       "--warmup", "0", "--no-torch-alone"])
    assert result.exit_code == 1, result.output
    assert "multiples of 2**depth = 4" in result.output and "Traceback" not in result.output


def test_bench_ops_unknown_variant_is_a_bad_option_value(monkeypatch):
    """An unknown version name is a clean usage error naming the versions there are, on
    either device (the library raises UnknownVariantError, the command reports it)."""
    result = CliRunner().invoke(main, ["bench", "ops", "--op", "conv", "--variants", "v2"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--variants'" in result.output
    assert "unknown cpu convolution variant 'v2'" in result.output
    assert "patches_gemm, register_blocked, packed, winograd, auto" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (True, "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr("nodulekit.engine.resolve_device", lambda device: ("cuda", "test"))
    result = CliRunner().invoke(main, ["bench", "ops", "--device", "cuda", "--op", "conv",
                                       "--variants", "register_blocked,v4_mma_tf32"])
    assert result.exit_code == 2, result.output
    assert "unknown convolution variant 'v4_mma_tf32'" in result.output
    assert "direct, smem_tiled, register_blocked, mma_tf32, mma_bf16" in result.output


def test_bench_ops_variants_is_for_conv_only():
    result = CliRunner().invoke(main, ["bench", "ops", "--op", "adam", "--variants", "all"])
    assert result.exit_code == 2
    assert "--variants applies to --op conv only" in result.output


def test_bench_ops_cpu_variants_times_every_version_on_every_layer(monkeypatch):
    """On the CPU, `--variants all` times patches_gemm, register_blocked and auto against
    torch on every 3x3 layer (here a toy U-Net: depth 2, width 16, 16x16, batch 1) and adds
    them up per step.
    Timings mean nothing here; the coverage and the sums are checked."""
    import json

    from nodulekit.bench import ops
    from nodulekit.engine.cpu import CONV_VARIANTS

    real = ops.run_cpu_conv_variants_bench
    monkeypatch.setattr(ops, "run_cpu_conv_variants_bench", lambda v, repeats: real(
        v, batch=1, size=16, width=16, depth=2, repeats=1, warmup=0))
    result = CliRunner().invoke(main, ["bench", "ops", "--op", "conv", "--variants", "all",
                                       "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    shapes = ops.unet_conv3x3_shapes(16, 2, 16)
    names = [*CONV_VARIANTS, "auto"]
    assert len(data["rows"]) == len(names) * len(shapes) * 2
    for v in names:
        rows = [r for r in data["rows"] if r["variant"] == v]
        assert {(r["label"], r["pass"]) for r in rows} == {
            (s[0], p) for s in shapes for p in ("forward", "backward")}
        total = sum(r["ours_ms"] * r["layers"] for r in rows)
        assert abs(data["totals_ms"][v] - total) < 1e-9 * max(total, 1)
    assert [s[0] for s in shapes] == ["enc0.conv1", "enc0.conv2", "enc1.conv1", "enc1.conv2",
                                      "bottom.conv1", "bottom.conv2", "dec1.conv1",
                                      "dec0.conv1"]
    assert "auto/torch" in result.output


def _toy_bench(command: str, *more: str):
    """`nodulekit bench COMMAND` on a toy U-Net (width 8, depth 2, 2 x 16 x 16, 3 turns;
    ``more`` options after those, the last of an option winning): (the CLI result, its
    JSON)."""
    import json

    result = CliRunner().invoke(main, ["bench", command, "--width", "8", "--depth", "2",
                                       "--size", "16", "--batch", "2", "--repeats", "3",
                                       "--warmup", "1", "--json", "-", *more])
    assert result.exit_code == 0, result.output
    return result, json.loads(result.output[result.output.index("{"):])


def test_bench_step_times_ours_and_torch_in_turns():
    """`bench step` on a toy U-Net: both sides start from the same weights (same first
    loss), every turn is recorded, and the ratios are those of the samples."""
    import statistics

    result, data = _toy_bench("step")
    first = data["first_step_loss"]
    assert abs(first["ours"] - first["torch"]) < 1e-5
    ours, torch = data["ours_ms_samples"], data["torch_ms_samples"]
    assert len(ours) == len(torch) == 3
    assert data["ratio"] == statistics.median(ours) / statistics.median(torch)
    assert data["ratio_per_turn_median"] == statistics.median(
        o / t for o, t in zip(ours, torch, strict=True))
    assert "median of the per-turn ratios" in result.output
    # torch alone, one child process per OpenMP wait policy and malloc policy; ours
    # against the best
    runs = {r["setting"]: r for r in data["torch_alone"]}
    assert set(runs) == {"passive", "active", "passive-system-malloc",
                         "active-system-malloc"}, data["torch_alone"]
    assert runs["active"]["env"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runs["active-system-malloc"]["env"] == {"OMP_WAIT_POLICY": "ACTIVE",
                                                   "NODULEKIT_MALLOC": "system"}
    assert data["malloc"].startswith(("retain", "system"))
    assert all(len(r["samples"]) == 3 and r["ms"] > 0 for r in runs.values())
    best = min(runs.values(), key=lambda r: r["ms"])
    assert data["torch_best"]["setting"] == best["setting"]
    # ours timed again after each of torch's runs (half the repeats, at least 2 steps):
    # the ratio to torch's best uses those; the one with ours from the turns is kept too
    between = data["ours_between_torch_alone_samples"]
    assert len(between) == 4 * 2 and all(v > 0 for v in between)
    assert data["ours_between_torch_alone_ms"] == statistics.median(between)
    assert data["ratio_to_best_torch"] == data["ours_between_torch_alone_ms"] / best["ms"]
    assert data["ratio_to_best_torch_ours_in_turns"] == data["ours_ms"] / best["ms"]
    assert "ours, between those runs" in result.output
    assert "ratio ours / torch at its best" in result.output
    # then that setting again, each run followed by ours: the ratio from fresh pairs
    paired = data["torch_best_paired"]
    assert paired["setting"] == best["setting"] and len(paired["rounds"]) == 3
    assert all(p["torch_ms"] > 0 and p["ours_ms"] > 0 for p in paired["rounds"])
    assert paired["ratio_median"] == statistics.median(
        p["ours_ms"] / p["torch_ms"] for p in paired["rounds"])
    assert "each followed by ours: ratio" in result.output
    # the CPU's vector extensions recorded beside the numbers (machines of one name differ)
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert data["cpu"]["avx512f"] == ("avx512f" in flags)
    assert data["cpu"]["avx2"] == ("avx2" in flags) and data["cpu"]["cores"] >= 1
    # the phases are logged as they end (a run cut short still shows where its time went)
    for phase in ("torch's copy made", "ours: first step", "torch: first step",
                  "steps of each, in turns"):
        assert phase in result.output, phase
    assert data["config"]["cudnn_benchmark"] is None  # a GPU setting: none on the CPU
    assert data["worktree_differs_from_commit"] in (True, False, None)


def test_worktree_differs_says_whether_the_commit_is_what_ran(tmp_path):
    """Benchmark JSONs name the commit; the GPU machine's copy had a stale .git, so they
    also say whether the tracked files differ from it."""
    import subprocess

    from nodulekit.bench.common import worktree_differs

    assert worktree_differs(str(tmp_path)) is None  # not a git work tree
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    assert worktree_differs(str(tmp_path)) is False
    (tmp_path / "a.txt").write_text("two")
    assert worktree_differs(str(tmp_path)) is True


def test_torch_alone_reports_a_failing_child():
    from nodulekit.bench.torch_alone import time_torch_alone

    run = time_torch_alone("active", {"width": 8, "depth": 2, "size": 15, "batch": 1,
                                      "repeats": 1, "warmup": 0, "seed": 0, "lr": 1e-4,
                                      "norm": "none"})
    assert run["setting"] == "active" and run["error"].startswith("exit 1")


def test_bench_step_with_a_norm_starts_both_sides_alike():
    """`bench step --norm instance|batch`: the torch U-Net gets the same norm (and the same
    gamma, beta, running statistics): the first losses agree."""
    for norm in ("instance", "batch"):
        result, data = _toy_bench("step", "--repeats", "1", "--warmup", "0", "--norm", norm,
                                  "--no-torch-alone")
        assert data["config"]["norm"] == norm and f"{norm} norm" in result.output
        first = data["first_step_loss"]
        assert abs(first["ours"] - first["torch"]) < 1e-5


def test_bench_infer_times_whole_slice_inference_against_torch():
    """`bench infer`: the same logits on both sides (batch norm on seeded running
    statistics, which ours runs inside the convolutions), every turn recorded, and torch
    alone timed in a child process doing inference, not a training step."""
    import statistics

    for norm in ("batch", "none"):
        result, data = _toy_bench("infer", "--size", "24", "--norm", norm, "--no-torch-alone")
        assert data["config"]["size"] == 24
        assert data["benchmark"] == "infer" and data["config"]["norm"] == norm
        # float32 both sides: agreement to float32's digits, and logits that are not 0
        assert data["logits_max_abs"] > 0.1
        assert data["logits_max_abs_diff"] < 1e-4 * max(1.0, data["logits_max_abs"])
        ours, torch = data["ours_ms_samples"], data["torch_ms_samples"]
        assert len(ours) == len(torch) == 3
        assert data["ratio"] == statistics.median(ours) / statistics.median(torch)
        assert data["ms_per_slice"]["ours"] == data["ours_ms"] / 2
        assert "ms per slice" in result.output and "torch alone" not in result.output
    from nodulekit.bench.torch_alone import time_torch_alone

    run = time_torch_alone("passive", {"kind": "infer", "width": 8, "depth": 2, "size": 24,
                                       "batch": 2, "repeats": 2, "warmup": 0, "seed": 0,
                                       "lr": 0.0, "norm": "batch"})
    assert run["ms"] > 0 and len(run["samples"]) == 2, run


def test_bench_ops_times_the_norm_ops():
    import json

    from nodulekit.bench.ops import run_ops_bench

    result = run_ops_bench("cpu", op_filter="norm", repeats=1, warmup=0, batch=1, size=16,
                           width=8, depth=2)
    ops = {(r["op"], r["label"].split()[0]) for r in result["ops"]}
    assert ops == {(f"{kind}_norm_{d}", where) for kind in ("instance", "batch")
                   for d in ("forward", "backward") for where in ("enc0.norm1", "bottom.norm2")}
    assert all(r["ratio"] > 0 and r["ours_gbps"] > 0 for r in result["ops"])
    json.dumps(result)


def test_bench_norm_times_the_three_norms_in_turns():
    """`bench norm`: each norm's step against none's, in turns, with the per-turn ratios
    computed from the samples it reports."""
    import statistics

    result, data = _toy_bench("norm")
    steps = data["steps"]
    assert list(steps) == ["none", "instance", "batch"]
    none = steps["none"]
    assert none["ratio_to_none"] == 1.0 and len(none["samples"]) == 3
    for norm in ("instance", "batch"):
        s = steps[norm]
        assert s["ms"] == statistics.median(s["samples"])
        assert s["ratio_to_none"] == s["ms"] / none["ms"]
        assert s["ratio_per_turn_median"] == statistics.median(
            a / b for a, b in zip(s["samples"], none["samples"], strict=True))
    assert data["budget"] == 0.15 and data["malloc"]
    assert "instance norm costs" in result.output


def test_provenance_records_a_run_restricted_to_fewer_instruction_sets(monkeypatch):
    """A proxy run (an AVX2 core measured on an AVX-512 one) must say so in its JSON: the
    variables that restricted either side, and the ISA torch's kernels used."""
    from nodulekit.bench.common import ISA_ENV, provenance

    for name in ISA_ENV:
        monkeypatch.delenv(name, raising=False)
    assert "instruction_sets_restricted_by" not in provenance("cpu")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = provenance("cpu")
    assert info["instruction_sets_restricted_by"] == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert isinstance(info["torch_cpu_capability"], str)
