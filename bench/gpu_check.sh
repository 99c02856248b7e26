#!/usr/bin/env bash
# The GPU check, in two short stages for a GPU machine lent for minutes, and a rehearsal of
# everything in them that needs no GPU. bench/README.md says how to run it with the device
# tool and what comes back.
#
#   bash bench/gpu_check.sh quick OUTDIR   does it work: the GPU tests, the sanitizers over
#                                          every kernel, NCCL, training (about 3 minutes)
#   bash bench/gpu_check.sh bench OUTDIR   how fast: ops, conv versions, steps, ranks, ncu
#                                          (within 9 minutes)
#   bash bench/gpu_check.sh rehearse [OUTDIR]  here, on the CPU: the quick stage in a fresh
#                                          virtual environment holding only the GPU image's
#                                          packages and the carried wheels (CI runs it)
#   bash bench/gpu_check.sh --fetch-wheels fill bench/wheels/ with what the image lacks
#                                          (pydicom, mpi4py, mpich; here, with PyPI)
#
# The GPU machine: Python 3.12 with numpy, numba, cupy-cuda13x, torch, h5py, click, pytest,
# pytest-timeout, mpi4py, NCCL, compute-sanitizer, ncu, cuobjdump; no pydicom, perhaps no
# mpiexec, no network. Every step has its own time limit (cut to what is left of the stage's
# budget, so the stage ends inside the device tool's 10-minute limit), writes what it
# measured under OUTDIR as soon as it ends (a stage cut short keeps what finished), and a
# failing step does not stop the later ones. The exit status is that of the checks: 0 when
# every check passed (a check that cannot run without a GPU is skipped, saying why, only in
# the rehearsal), 1 otherwise. Files (at most 8 a stage, the device tool's limit):
#   quick: quick.log, quick.json (each step: status, seconds; the planned time), kernels.txt,
#          pytest_gpu.xml, smoke.json, sanitizer.txt, train_check.json, profile.json
#   bench: bench.log, bench.json (steps, and the summary), ops.json, conv_variants.json,
#          step.json, step_paper.json, gpus.json, ncu.csv
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
CARRIED=("pydicom==3.0.2" "mpi4py==4.1.2" "mpich==5.0.2")
WHEELS=${GPU_CHECK_WHEELS:-bench/wheels}   # the carried wheels this run installs
REHEARSE=${GPU_CHECK_REHEARSE:-0}           # 1: the rehearsal's run of the quick stage
GPU_TEST_MODULES=(tests/test_ops.py tests/test_cuda_backend.py tests/test_unet.py)

# ------------------------------------------------------------------------------ helpers

fetch_carried() {  # DIR PYTHON_VERSION: the carried wheels, for that Python (needs PyPI)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$2" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
        -d "$1" "${CARRIED[@]}"
}

json_str() {  # a JSON string of $1
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}

STEPS_JSON=""
FAILED=()
write_json() {  # OUT/STAGE.json: the steps so far (rewritten after every step)
    {
        printf '{"stage": %s, "planned_s": %s, "budget_s": %s, "rehearsal": %s,\n' \
            "$(json_str "$STAGE")" "$PLANNED" "$BUDGET" "$([ "$REHEARSE" = 1 ] && echo true || echo false)"
        printf ' "elapsed_s": %s, "failed": [%s],\n' "$(( $(date +%s) - T0 ))" \
            "$(for f in "${FAILED[@]}"; do printf '%s, ' "$(json_str "$f")"; done | sed 's/, $//')"
        printf ' "steps": [%s],\n "summary": %s}\n' "$STEPS_JSON" "${SUMMARY_JSON:-null}"
    } > "$OUT/$STAGE.json.tmp" && mv "$OUT/$STAGE.json.tmp" "$OUT/$STAGE.json"
}

record() {  # NAME STATUS SECONDS NOTE
    local entry
    entry=$(printf '{"step": %s, "status": %s, "seconds": %s, "note": %s}' "$(json_str "$1")" \
        "$(json_str "$2")" "$3" "$(json_str "$4")")
    STEPS_JSON="${STEPS_JSON:+$STEPS_JSON,
  }$entry"
    write_json
}

cap() {  # the smaller of $1 and what is left of the budget (at least 5 s)
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    (( left < 5 )) && left=5
    echo $(( $1 < left ? $1 : left ))
}

# step KIND NAME CAP COMMAND...: run it under its cap (SIGINT first: pytest still writes its
# report), record it; KIND check: a failure fails the stage; info: it is only reported
step() {
    local kind=$1 name=$2 limit; limit=$(cap "$3"); shift 3
    echo; echo "=== $(date -u +%H:%M:%S) $name (limit ${limit} s)"
    local t0 rc status
    t0=$(date +%s)
    if declare -F "$1" > /dev/null; then  # a function of this script: in a bash of its own
        timeout -s INT -k 10 "$limit" bash -c "$(declare -f); $(declare -p PY OUT WORK WHEELS \
            REHEARSE GPU_TEST_MODULES); set -o pipefail; \"\$@\"" _ "$@"
    else
        timeout -s INT -k 10 "$limit" "$@"
    fi
    rc=$?
    status=ok
    if (( rc == 124 || rc == 137 )); then status="timed out"; elif (( rc != 0 )); then status="failed ($rc)"; fi
    [ "$status" != ok ] && [ "$kind" = check ] && FAILED+=("$name")
    echo "--- $name: $status in $(( $(date +%s) - t0 )) s"
    record "$name" "$status" "$(( $(date +%s) - t0 ))" "$kind"
    return $rc
}

skip() {  # NAME WHY
    echo; echo "=== $1: skipped: $2"
    record "$1" skipped 0 "$2"
}

begin() {  # STAGE OUT BUDGET PLANNED
    STAGE=$1 OUT=$2 BUDGET=$3 PLANNED=$4
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/nodulekit-gpu-check.XXXXXX")  # scratch, not under OUT
    exec > >(tee "$OUT/$STAGE.log") 2>&1
    TEE_PID=$!
    export PYTHONUNBUFFERED=1
    T0=$(date +%s)
    write_json
}

finish() {
    echo
    echo "=== $STAGE: $(( $(date +%s) - T0 )) s (planned at most $PLANNED s); files in $OUT:"
    ls -la "$OUT"
    if (( ${#FAILED[@]} )); then echo "FAILED: ${FAILED[*]}"; else echo "every check passed"; fi
    write_json
    rm -rf "$WORK"
    exec >&- 2>&-  # let tee finish the log before we exit
    wait "$TEE_PID" 2>/dev/null
    (( ${#FAILED[@]} == 0 ))
    exit $?
}

gpu_usable() {  # prints the device, or why there is none; status 0 when usable
    "$PY" -c "from nodulekit.engine import cuda_usable as u; ok, why = u(); print(why); \
raise SystemExit(0 if ok else 1)" 2>/dev/null || return 1
}

machine() {
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" - <<'EOF'
import importlib, shutil, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("numpy", "numba", "cupy", "torch", "h5py", "pydicom", "mpi4py"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # missing, or broken
        print(f"  {name}: {type(exc).__name__}: {exc}")
print("tools:", {t: shutil.which(t) for t in ("compute-sanitizer", "ncu", "cuobjdump",
                                              "mpiexec", "nvcc")})
EOF
}

install() {  # the carried wheels, then nodulekit; then what the stages import
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl \
            || { echo "installing the carried wheels ($WHEELS) failed"; return 1; }
    else
        echo "no $WHEELS/*.whl: bash bench/gpu_check.sh --fetch-wheels (here, with PyPI) and"
        echo "carry bench/wheels; tests that need pydicom will skip, saying so"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    "$PY" -c "import nodulekit.cli, nodulekit.engine.cuda, nodulekit.engine.kernel_check, \
nodulekit.bench.kernel_smoke, nodulekit.bench.train_check, nodulekit.bench.ncu_target, cupy, \
torch, numba, h5py, pytest; print('imports: ok')" || return 1
    "$PY" -c "import pydicom; print('pydicom', pydicom.__version__)" \
        || echo "no pydicom: the tests and steps that read DICOM will skip, saying so"
}

# ------------------------------------------------------------------------------ quick

quick_pytest() {  # the GPU tests, JUnit XML; in the rehearsal every one must skip, saying why
    # --maxfail 25, not -x: a first GPU run must show every failure it can in one call
    local timeout_opt=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 120)
    "$PY" -m pytest --maxfail 25 --durations 15 -m gpu -q -ra -p no:cacheprovider "${timeout_opt[@]}" \
        --junitxml="$OUT/pytest_gpu.xml" "${GPU_TEST_MODULES[@]}"
    local rc=$?
    if (( rc == 5 )); then echo "pytest -m gpu collected no test"; return 1; fi
    (( rc != 0 )) && return $rc
    "$PY" - "$OUT/pytest_gpu.xml" "$REHEARSE" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root.find("testsuite") if root.tag == "testsuites" else root
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
print("GPU tests:", n)
if sys.argv[2] == "1":  # no GPU here: every GPU test skips, and says why
    reasons = {(s.get("message") or "").split(":")[0] for s in suite.iter("skipped")}
    print("skipped because:", sorted(reasons))
    ok = n["tests"] > 0 and n["skipped"] == n["tests"] and all(
        "needs a usable CUDA GPU" in r for r in reasons)
    raise SystemExit(0 if ok else 1)
raise SystemExit(0 if n["tests"] > n["skipped"] else 1)  # on a GPU: they ran
EOF
}

sanitize() {  # TOOL: compute-sanitizer over one small call of every kernel
    {
        echo "=== compute-sanitizer --tool $1"
        compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
            "$PY" -m nodulekit.bench.kernel_smoke --json "$OUT/smoke.json"
    } 2>&1 | tee -a "$OUT/sanitizer.txt"
}

quick() {
    # planned: the sum of the steps' limits (a step that ends early leaves time to the rest)
    # machine, install, kernels, GPU tests, memcheck, racecheck, synccheck, NCCL, training,
    # profile; GPU_CHECK_LIMIT_X=2 doubles every limit (a rerun after a step ran out of time)
    local limits=(10 15 15 80 20 20 15 15 25 30) x=${GPU_CHECK_LIMIT_X:-1}
    local planned=0 i
    for i in "${!limits[@]}"; do
        limits[i]=$(( limits[i] * x ))
        planned=$(( planned + limits[i] ))
    done
    begin quick "$1" "${GPU_CHECK_BUDGET:-$planned}" "$planned"
    echo "quick stage: planned $planned s ($(( planned / 60 )) min $(( planned % 60 )) s) at most," \
         "each step under its own limit"
    step info "machine" "${limits[0]}" machine
    step check "install: carried wheels, nodulekit, imports" "${limits[1]}" install
    step check "kernels: NVRTC for sm_90 (nodulekit inspect --kernels)" "${limits[2]}" \
        bash -o pipefail -c "\"$PY\" -m nodulekit.cli inspect --kernels | tee \"$OUT/kernels.txt\""
    step check "GPU tests: pytest --maxfail 25 -m gpu ${GPU_TEST_MODULES[*]}" "${limits[3]}" quick_pytest
    if command -v compute-sanitizer > /dev/null && gpu_usable > /dev/null; then
        step check "compute-sanitizer memcheck: every kernel" "${limits[4]}" sanitize memcheck
        step check "compute-sanitizer racecheck: every kernel" "${limits[5]}" sanitize racecheck
        step check "compute-sanitizer synccheck: every kernel" "${limits[6]}" sanitize synccheck
    else
        local why="no GPU or no compute-sanitizer here ($(gpu_usable))"
        skip "compute-sanitizer memcheck, racecheck, synccheck" "$why"
        if [ "$REHEARSE" = 1 ]; then  # the same smoke table, on the tests' CPU emulator
            step check "kernel smoke on the CPU emulator (every kernel once)" 40 \
                "$PY" -m nodulekit.bench.kernel_smoke --emulator --json "$OUT/smoke.json"
        fi
    fi
    step check "NCCL: one rank trains (pytest -m gpu -k nccl_one_rank)" "${limits[7]}" \
        "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider tests/test_train_distributed.py \
        -k nccl_one_rank
    step check "train --device cuda vs cpu: 20 steps" "${limits[8]}" \
        "$PY" -m nodulekit.bench.train_check --out "$WORK/train" --json "$OUT/train_check.json"
    if gpu_usable > /dev/null; then  # its numbers go into docs/one-step.md's GPU column
        step info "profile --device cuda: one step op by op, CUDA events, the GPU's peaks" \
            "${limits[9]}" "$PY" -m nodulekit.cli profile --device cuda --repeats 5 \
            --json "$OUT/profile.json"
    else
        skip "profile --device cuda" "no GPU here ($(gpu_usable))"
    fi
    finish
}

# ------------------------------------------------------------------------------ bench

bench_summary() {  # prints the table; the summary's JSON goes to $WORK/summary.json
    "$PY" - "$OUT" "$WORK/summary.json" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
summary = {}
ops = load("ops.json")
if ops:
    summary["device"] = ops.get("device")
    summary["copy_gbps"] = (ops.get("copy_bandwidth") or {}).get("gbps")
    print(f"{ops.get('device')}; copy {summary['copy_gbps'] or 0:.0f} GB/s")
    print(f"{'op':<24} {'where':<26} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'% copy':>7}")
    for r in ops["ops"]:
        pct = r.get("ours_pct_copy")
        print(f"{r['op']:<24} {r['label']:<26} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} "
              f"{r['ratio']:6.2f} {'' if pct is None else f'{pct:6.0f}%'}")
    summary["ops"] = [{k: r.get(k) for k in ("op", "label", "ours_ms", "torch_ms", "ratio",
                                              "ours_pct_copy")} for r in ops["ops"]]
variants = load("conv_variants.json")
if variants:
    best = {}
    for r in variants["rows"]:
        key = (r["label"], r["pass"], r["batch"])
        if key not in best or r["ours_ms"] < best[key]["ours_ms"]:
            best[key] = r
    summary["conv_fastest"] = [{"layer": k[0], "pass": k[1], "batch": k[2],
                                "variant": r["variant"], "ours_ms": r["ours_ms"],
                                "ratio": r["ratio"]} for k, r in best.items()]
    print(f"conv versions: {len(variants['rows'])} rows, {len(variants['skipped'])} skipped")
for name in ("step.json", "step_paper.json", "infer_paper.json"):
    s = load(name)
    if s:
        c = s["config"]
        print(f"{s['benchmark']} {c['width']}w {c['size']}px batch {c['batch']}: ours "
              f"{s['ours_ms']:.1f} ms, torch {s['torch_ms']:.1f} ms, ratio {s['ratio']:.2f}")
        summary[name[:-5]] = {k: s.get(k) for k in ("ours_ms", "torch_ms", "ratio",
                                                     "first_step_loss", "logits_max_abs_diff")}
json.dump(summary, open(sys.argv[2], "w"))
EOF
}

ncu_profile() {
    local regex
    regex=$("$PY" -m nodulekit.bench.ncu_target --regex) || return 1
    ncu --clock-control none --target-processes all --kernel-name "$regex" --launch-count 3 \
        --csv --page details --log-file "$OUT/ncu.csv" "$PY" -m nodulekit.bench.ncu_target
}

bench() {
    begin bench "$1" "${GPU_CHECK_BUDGET:-540}" 540
    local NK=("$PY" -m nodulekit.cli)
    step info "machine" 10 machine
    step check "install: carried wheels, nodulekit, imports" 20 install
    if ! gpu_usable; then
        FAILED+=("a usable GPU")
        finish
    fi
    step check "bench ops --device cuda (paper shapes, CUDA events)" 95 \
        "${NK[@]}" bench ops --device cuda --repeats 10 --json "$OUT/ops.json"
    step check "conv versions vs cuDNN (fastest first; direct at small shapes)" 100 \
        "$PY" -m nodulekit.bench.ops --op conv --variants all --repeats 3 --warmup 1 \
        --budget 80 --json "$OUT/conv_variants.json"
    step check "bench step --device cuda (width 16, 128x128, batch 4)" 35 \
        "${NK[@]}" bench step --device cuda --json "$OUT/step.json"
    # cuDNN's own heuristics here: on the first GPU run (2026-12-04) torch's first step with
    # cudnn.benchmark (timing every algorithm of each shape) outlasted 137 s at this shape
    step check "bench step --device cuda (the paper: width 64, 512x512, batch 12)" 150 \
        "${NK[@]}" bench step --device cuda --width 64 --size 512 --batch 12 --repeats 3 \
        --warmup 1 --no-cudnn-benchmark --json "$OUT/step_paper.json"
    step check "bench infer --device cuda (the paper's inference: width 64, 12 x 512x512)" 20 \
        "${NK[@]}" bench infer --device cuda --width 64 --size 512 --batch 12 --repeats 5 \
        --no-cudnn-benchmark --json "$OUT/infer_paper.json"
    step check "bench gpus --device cuda" 40 \
        "${NK[@]}" bench gpus --device cuda --json "$OUT/gpus.json"
    if command -v ncu > /dev/null; then
        step check "ncu: the three heaviest kernels (nodulekit.bench.ncu_target)" 60 ncu_profile
    else
        skip "ncu" "ncu is not on the PATH"
    fi
    echo; echo "=== summary"
    bench_summary && SUMMARY_JSON=$(cat "$WORK/summary.json")
    finish
}

# ------------------------------------------------------------------------------ rehearse

rehearse() {
    # Everything of the quick stage that needs no GPU, as the GPU machine runs it: a fresh
    # virtual environment with only the image's packages (bench/gpu_image.txt) installed with
    # --no-index from wheels downloaded once into bench/.rehearse/ (git-ignored), the carried
    # wheels installed by the same command, the same imports and pytest selection (every GPU
    # test must skip, saying why), the kernel smoke table on the CPU emulator instead of the
    # sanitizers, and the training check's CPU half.
    local out=${1:-bench/.rehearse/out} dir=bench/.rehearse local_py
    local_py=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    echo "rehearsal on the CPU with this machine's $PY (Python $local_py; the GPU image has" \
         "3.12): its own wheels of the same packages"
    mkdir -p "$dir"
    if ! compgen -G "bench/wheels/*.whl" > /dev/null; then
        echo "--- no bench/wheels: fetching the carried wheels (Python 3.12, as carried)"
        mkdir -p bench/wheels && fetch_carried bench/wheels 3.12 || return 1
    fi
    echo "--- the carried wheels (bench/wheels) install on Python 3.12, manylinux_2_28:"
    ls bench/wheels
    "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux1_x86_64 --target "$dir/dry-run" bench/wheels/*.whl \
        || { echo "they do not"; return 1; }
    local stamp
    stamp=$(cat bench/gpu_image.txt <(printf '%s\n' "${CARRIED[@]}" "$local_py") | sha256sum | cut -c1-16)
    if [ ! -f "$dir/wheels-$stamp" ]; then
        echo "--- downloading the image's packages and the carried ones for Python $local_py" \
             "into $dir (once)"
        rm -rf "$dir/image" "$dir/carried" "$dir"/wheels-*
        "$PY" -m pip download -q -d "$dir/image" -r bench/gpu_image.txt || return 1
        fetch_carried "$dir/carried" "$local_py" || return 1
        touch "$dir/wheels-$stamp"
    fi
    echo "--- a fresh virtual environment: the image's packages only (--no-index)"
    rm -rf "$dir/venv"
    "$PY" -m venv "$dir/venv" || return 1
    "$dir/venv/bin/python" -m pip install -q --no-index --find-links "$dir/image" \
        -r bench/gpu_image.txt || return 1
    echo "--- the quick stage, as on the GPU machine"
    rm -rf "$out"
    PYTHON="$REPO/$dir/venv/bin/python" GPU_CHECK_WHEELS="$dir/carried" GPU_CHECK_REHEARSE=1 \
        bash bench/gpu_check.sh quick "$out"
    local rc=$?
    # the environment is 1.6 GB and made afresh each time: kept only to look into a failure
    (( rc == 0 )) && rm -rf "$dir/venv" "$dir/dry-run"
    return $rc
}

# ------------------------------------------------------------------------------ main

case "${1:-}" in
    --fetch-wheels)  # here, with PyPI: what the GPU image lacks (~17 MB), for its Python 3.12
        mkdir -p bench/wheels && fetch_carried bench/wheels 3.12 && ls -la bench/wheels ;;
    quick) quick "${2:?usage: bash bench/gpu_check.sh quick OUTDIR}" ;;
    bench) bench "${2:?usage: bash bench/gpu_check.sh bench OUTDIR}" ;;
    rehearse) rehearse "${2:-}" ;;
    *) echo "usage: bash bench/gpu_check.sh quick OUTDIR | bench OUTDIR | rehearse [OUTDIR]" \
            "| --fetch-wheels" >&2
       exit 2 ;;
esac
