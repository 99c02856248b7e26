"""bench/gpu_check.sh and what it relies on, without a GPU.

- a test module whose import needs a package of the CPU-side stack that the GPU image lacks
  (pydicom, when its carried wheel is missing) is skipped, saying which, not a collection
  error that would fail `pytest -m gpu` there (tests/conftest.py's hook);
- the script's stages parse, name their files (at most 8 per stage: the device tool's
  limit), print the quick stage's planned time, and refuse an unknown stage;
- `bash bench/gpu_check.sh rehearse` (CI runs it from .ci/run) is not run here: it builds
  its own virtual environment (about a minute or two, see bench/README.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_a_module_needing_a_missing_optional_package_is_skipped(tmp_path):
    conftest = (Path(__file__).with_name("conftest.py")).read_text()
    # conftest.py imports tests/tiny.py (a plain module beside it): carry it along
    (tmp_path / "tiny.py").write_text(Path(__file__).with_name("tiny.py").read_text())
    (tmp_path / "conftest.py").write_text(conftest + "\n\nimport sys  # noqa: E402\n\n"
                                          "sys.modules['pydicom'] = None  # as if missing\n")
    (tmp_path / "test_needs_dicom.py").write_text("import pydicom\n\n\ndef test_x():\n"
                                                  "    pass\n")
    (tmp_path / "test_plain.py").write_text("def test_y():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                           "no:cacheprovider", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed, 1 skipped" in proc.stdout
    assert "pydicom is not installed here" in proc.stdout and "--fetch-wheels" in proc.stdout
    # a module that fails for another reason still fails collection
    (tmp_path / "test_broken.py").write_text("import no_such_module_anywhere\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "no_such_module_anywhere" in proc.stdout


def test_the_script_refuses_an_unknown_stage():
    proc = subprocess.run(["bash", str(SCRIPT), "all"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh quick OUTDIR" in proc.stderr


def test_quick_prints_its_plan_and_records_every_step(tmp_path):
    """With a Python that fails at once (`false`), every step fails fast: the stage still
    prints its planned time (4 minutes at most), writes quick.json after every step and
    exits 1, naming the failed checks. The planned time is the sum of the step limits."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "quick", str(out)], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": "false",
                                          "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 1
    log = (out / "quick.log").read_text()
    assert "quick stage: planned 245 s (4 min 5 s) at most" in log
    import json

    summary = json.loads((out / "quick.json").read_text())
    assert summary["planned_s"] == 245 and not summary["rehearsal"]
    names = [s["step"] for s in summary["steps"]]
    assert names[0] == "machine" and any(n.startswith("GPU tests") for n in names)
    assert any(n.startswith("train --device cuda") for n in names)
    assert any(n.startswith("profile --device cuda") for n in names)  # skipped: no GPU
    assert "install: carried wheels, nodulekit, imports" in summary["failed"]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back 8 files a call


def test_the_readmes_give_the_two_device_calls():
    calls = ['run(command="bash bench/gpu_check.sh quick $OUT", carry=["bench/wheels"], '
             'timeout_s=300)',
             'run(command="bash bench/gpu_check.sh bench $OUT", carry=["bench/wheels"], '
             'timeout_s=590)']
    for readme in (REPO / "README.md", REPO / "bench" / "README.md"):
        text = readme.read_text()
        assert all(call in text for call in calls), readme
