"""`nodulekit synth`, `nodulekit preprocess` and `nodulekit bench loader` end to end."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nodulekit.cli import main
from nodulekit.data.cache import Cache


def test_synth_then_preprocess(tmp_path):
    runner = CliRunner()
    data, out = tmp_path / "data", tmp_path / "cache.h5"
    r = runner.invoke(main, ["synth", str(data), "--size", "64", "--patients", "3",
                             "--slices-per-patient", "4", "--seed", "2", "--workers", "0",
                             "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "3 patients x 4 slices" in r.output
    assert (data / "train" / "train_dataset.csv").is_file()

    r = runner.invoke(main, ["synth", str(data), "--size", "64", "--no-progress"])
    assert r.exit_code != 0 and "overwrite" in r.output

    report = tmp_path / "report.json"
    r = runner.invoke(main, ["preprocess", str(data), str(out), "--workers", "0",
                             "--no-progress", "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "12 slices" in r.output
    assert json.loads(report.read_text())["total_slices"] == 12
    with Cache(out) as cache:
        assert sum(len(cache.split(s)) for s in cache.splits) == 12

    r = runner.invoke(main, ["preprocess", str(data), str(out), "--no-progress"])
    assert r.exit_code != 0 and "exists" in r.output and "--overwrite" in r.output


def test_preprocess_strict_names_the_bad_file(tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    runner.invoke(main, ["synth", str(data), "--size", "64", "--patients", "3",
                         "--slices-per-patient", "2", "--workers", "0", "--no-progress"])
    victim = sorted((data / "val" / "images").rglob("*.dcm"))[0]
    victim.write_bytes(b"garbage")
    r = runner.invoke(main, ["preprocess", str(data), str(tmp_path / "c.h5"), "--workers",
                             "0", "--strict", "--no-progress"])
    assert r.exit_code != 0
    assert victim.name in r.output and "not a DICOM file" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_bench_loader_small(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, [
        "bench", "loader", "--size", "64", "--patients", "3", "--slices-per-patient", "12",
        "--repeats", "1", "--batch", "2", "--batches", "5", "--workers", "0",
        "--step-seconds", "0.25", "--sweep", "--sweep-workers", "0,2", "--sweep-queue", "1,2",
        "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["preprocess"]["slices"] == 36
    assert result["preprocess"]["ratio"] > 0
    assert result["loader"]["batches_per_s"] > 0
    assert result["loader"]["times_step"] == result["loader"]["batches_per_s"] * 0.25
    assert {(row["num_workers"], row["queue_size"]) for row in result["sweep"]} == {
        (0, 1), (2, 1), (2, 2)}
    assert "workers \\ queue" in r.output
