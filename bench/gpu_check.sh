#!/usr/bin/env bash
# The one-shot GPU check: install what the GPU image lacks, run the GPU tests, time every
# op and a training step against PyTorch, measure the copy bandwidth; all into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Needs: an NVIDIA GPU with CUDA 13 (H100/H200), python3 with numpy, numba, cupy-cuda13x,
# torch, h5py, click, pytest (the device image has them), and bench/wheels/*.whl for the
# rest (pydicom, mpi4py, mpich; fill it with `bash bench/gpu_check.sh --fetch-wheels` where
# pip can reach PyPI). No network is used here. Writes at most 8 files:
#   OUTDIR/gpu_check.log     everything printed, nvidia-smi first, the summary last
#   OUTDIR/kernels.txt       registers / shared memory / spills per kernel (NVRTC -Xptxas -v)
#   OUTDIR/pytest_gpu.xml    pytest -m gpu, JUnit XML
#   OUTDIR/copy.json         device-to-device copy bandwidth (the memory-bound ceiling)
#   OUTDIR/ops.json          nodulekit bench ops --device cuda (paper shapes, CUDA events)
#   OUTDIR/step.json         nodulekit bench step --device cuda (width 16, 128x128, batch 4)
#   OUTDIR/step_paper.json   the same at the paper's shape (width 64, 512x512, batch 12)
#   OUTDIR/summary.json      pass/fail counts, ratios, % of copy bandwidth per memory-bound op
# Each stage has its own time limit, cut to what is left of a 520 s budget (GPU_CHECK_BUDGET),
# so the script ends inside the device tool's 10-minute limit (about 6 to 7 minutes expected
# on an H100); a failing stage does not stop the later ones; the exit status is that of
# the GPU tests. Run it with the device tool as bench/README.md says.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then  # here, with PyPI: what the GPU image lacks
    # mpi4py + mpich (~15 MB): the NCCL test's id goes over MPI (tests/test_train_distributed.py)
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
        -d bench/wheels "pydicom==3.0.2" "mpi4py==4.1.2" "mpich==5.0.2"
fi
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
T0=$(date +%s)
# every stage gets its own cap, cut to what is left of BUDGET seconds in all, so the whole
# script ends inside the device tool's 10-minute command limit even if stages run long
BUDGET=${GPU_CHECK_BUDGET:-520}
cap() {
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    (( left < 10 )) && left=10
    echo $(( $1 < left ? $1 : left ))
}

stage "machine"
nvidia-smi || echo "nvidia-smi failed"
"$PY" -c "import sys, numpy, cupy, torch; print('python', sys.version.split()[0], '| numpy', \
numpy.__version__, '| cupy', cupy.__version__, '| torch', torch.__version__, \
'| cuda available', torch.cuda.is_available())"

stage "install: carried wheels, then nodulekit (no network, no dependencies)"
if compgen -G "bench/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir bench/wheels/*.whl \
        || echo "installing the carried wheels failed"
else
    echo "no bench/wheels/*.whl: tests that import pydicom will fail to collect"
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "editable install failed: using PYTHONPATH"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
NK=("$PY" -m nodulekit.cli)

stage "kernels: NVRTC for this GPU's architecture, -Xptxas -v"
ARCH=$("$PY" -c "import cupy; print(cupy.cuda.Device().compute_capability)" 2>/dev/null || echo 90)
timeout "$(cap 60)" "$PY" -m nodulekit.engine.kernel_check --arch "$ARCH" | tee "$OUT/kernels.txt"

stage "pytest -m gpu"
timeout "$(cap 180)" "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml"
TESTS_RC=$?
echo "pytest -m gpu exit status: $TESTS_RC"

stage "device-to-device copy bandwidth"
timeout "$(cap 30)" "$PY" - "$OUT/copy.json" <<'EOF'
import json, sys
from nodulekit.bench.gpu_timing import copy_bandwidth_gbps
results = [copy_bandwidth_gbps(1 << 30), copy_bandwidth_gbps(1 << 28)]
for r in results:
    print(f"{r['bytes'] / 2**20:7.0f} MiB: {r['median_ms']:.3f} ms, {r['gbps']:.0f} GB/s")
json.dump(results, open(sys.argv[1], "w"), indent=2)
EOF

stage "bench step --device cuda (width 16, 128x128, batch 4)"
timeout "$(cap 40)" "${NK[@]}" bench step --device cuda --json "$OUT/step.json"

stage "bench step --device cuda (the paper: width 64, 512x512, batch 12)"
timeout "$(cap 80)" "${NK[@]}" bench step --device cuda --width 64 --size 512 --batch 12 \
    --repeats 3 --warmup 1 --json "$OUT/step_paper.json"

stage "bench ops --device cuda (paper shapes; the inputs are drawn on the host first)"
timeout "$(cap 200)" "${NK[@]}" bench ops --device cuda --repeats 10 --json "$OUT/ops.json"

stage "bench ops --op conv --variants all (every conv version vs cuDNN at its precision; log only)"
timeout "$(cap 130)" "$PY" -m nodulekit.bench.ops --op conv --variants all --repeats 3 --warmup 1 \
    --budget 90 --json -

stage "summary ($(( $(date +%s) - T0 )) s so far)"
"$PY" - "$OUT" "$TESTS_RC" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
summary = {"pytest_gpu_exit": rc}
try:
    suite = ET.parse(os.path.join(out, "pytest_gpu.xml")).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError):
    summary["tests"] = "no JUnit file"
print("GPU tests:", summary["tests"])
for name in summary.get("failed", [])[:30]:
    print("  FAILED", name)
ops = load("ops.json")
if ops:
    summary["device"] = ops["device"]
    summary["copy_gbps"] = ops.get("copy_bandwidth", {}).get("gbps")
    print(f"{ops['device']}; copy {summary['copy_gbps'] or 0:.0f} GB/s")
    print(f"{'op':<20} {'where':<26} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'% copy':>7}")
    summary["ops"] = []
    for r in ops["ops"]:
        pct = r.get("ours_pct_copy")
        flag = "" if pct is None else ("  ok" if pct >= 80 else "  < 80%")
        print(f"{r['op']:<20} {r['label']:<26} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} "
              f"{r['ratio']:6.2f} {'' if pct is None else f'{pct:6.0f}%'}{flag}")
        summary["ops"].append({k: r.get(k) for k in ("op", "label", "ours_ms", "torch_ms",
                                                     "ratio", "ours_pct_copy")})
for name in ("step.json", "step_paper.json"):
    s = load(name)
    if s:
        c = s["config"]
        print(f"step {c['width']}w {c['size']}px batch {c['batch']}: ours {s['ours_ms']:.1f} ms, "
              f"torch {s['torch_ms']:.1f} ms, ratio {s['ratio']:.2f}; first loss ours "
              f"{s['first_step_loss']['ours']:.5f} torch {s['first_step_loss']['torch']:.5f}")
        summary[name[:-5]] = {k: s[k] for k in ("ours_ms", "torch_ms", "ratio",
                                                 "first_step_loss")}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF
echo "total $(( $(date +%s) - T0 )) s; files in $OUT:"; ls -la "$OUT"
exec >&- 2>&-  # let tee finish the log before we exit
wait "$TEE_PID" 2>/dev/null
exit "$TESTS_RC"
