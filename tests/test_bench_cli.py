"""`nodulekit bench ...` through the command line (click), where no GPU is needed."""

from __future__ import annotations

from click.testing import CliRunner

from nodulekit.cli import main


def test_bench_ops_variants_needs_a_gpu_and_says_so(monkeypatch):
    monkeypatch.setattr("nodulekit.engine.cuda_usable", lambda: (False, "no CUDA device"))
    result = CliRunner().invoke(main, ["bench", "ops", "--op", "conv", "--variants", "all"])
    assert result.exit_code != 0
    assert "needs a GPU: no CUDA device" in result.output


def test_bench_ops_variants_is_for_conv_only():
    result = CliRunner().invoke(main, ["bench", "ops", "--op", "adam", "--variants", "all"])
    assert result.exit_code == 2
    assert "--variants applies to --op conv only" in result.output
