#!/usr/bin/env bash
# One-shot GPU check for the device machine (one H100/H200, Python 3.12, torch, timm; no Ray,
# Optuna, MLflow or pydantic): unpack the carried packages, then
#   (a) benchmarks/peer_benchmark.py on cuda (bf16 train/infer images/s + MFU, ours vs timm)
#   (b) a 2-trial --smoke-test search with --use-gpu (Ray Tune + Train worker group + Optuna +
#       MLflow in a local SQLite store),
# each under its own `timeout`, so one failing still leaves the other's results. About 4 minutes
# on an H200 (imports 35 s, peer 75 s: each model in fresh processes, search 125 s: Ray workers
# take 25-35 s to start there); everything is capped to finish in under 6.5.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repo root
#   PYTHON=.venv/bin/python GPU_CHECK_SITE=/path/to/site bash benchmarks/gpu_check.sh --cpu-dry-run
#
# Needs .whl/site.tar.xz (Ray 2.60.0 trimmed, Optuna 5.0.0, mlflow-skinny 3.17.2, pydantic
# 2.14.4 and their runtime dependencies that the image lacks, for CPython 3.12 x86_64) and
# .whl/fallback/*.whl (newer copies of small image packages, unpacked only when an image
# version is too old). Results go to $OUT (default ./gpu_check_out), at most 8 files:
# gpu_check.log summary.txt env.txt peer_gpu.md trials.md leaderboard.csv best_config.yaml
# search_debug.txt. Exit 0 when every step passed, 1 otherwise.
#
# Environment overrides: OUT, PYTHON (python3), GPU_CHECK_SITE (/tmp/site; an existing
# directory is used as it is, without unpacking), GPU_CHECK_WHL (./.whl), GPU_CHECK_WORK
# (/tmp/gpu_check_work), PEER_CASES (224:128), PEER_SECONDS (3), SEARCH_SPACE
# (search_spaces/coatnet_small.yaml), TOTAL_BUDGET_S (380), PEER_TIMEOUT_S (150).
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DRY=0
for arg in "$@"; do
    case $arg in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --cpu-dry-run or --help)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHL=${GPU_CHECK_WHL:-$REPO/.whl}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
SPACE=${SEARCH_SPACE:-search_spaces/coatnet_small.yaml}
[[ $SPACE == /* ]] || SPACE=$REPO/$SPACE
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-380}
PEER_TIMEOUT_S=${PEER_TIMEOUT_S:-150}
PEER_SECONDS=${PEER_SECONDS:-3}
if [[ $DRY == 1 ]]; then
    PEER_CASES=${PEER_CASES:-64:8}
    PEER_OUT=$OUT/peer_cpu.md
else
    PEER_CASES=${PEER_CASES:-224:128}
    PEER_OUT=$OUT/peer_gpu.md
fi
START=$SECONDS
NOT_RUN=99  # a step's "rc" when it was not started (no CUDA device)
declare -a RESULTS=()
FAILED=0

remaining() { echo $(( TOTAL_BUDGET_S - (SECONDS - START) )); }
record() {  # step status detail
    RESULTS+=("$(printf '%-8s %-5s %s' "$1" "$2" "$3")")
    [[ $2 == PASS ]] || FAILED=1
    echo "gpu_check: step $1: $2 $3"
}
banner() { echo; echo "=== [$(( SECONDS - START ))s] $*"; }

main() {
    banner "gpu_check$( [[ $DRY == 1 ]] && echo ' (CPU dry run)' ) in $REPO, results in $OUT"
    date -u
    mkdir -p "$WORK"

    # ---------------------------------------------------------------- packages
    banner "packages -> $SITE"
    local t0=$SECONDS
    if [[ -d $SITE && -n ${GPU_CHECK_SITE:-} ]]; then
        echo "using the existing $SITE as it is"
    elif [[ -f $WHL/site.tar.xz ]]; then
        rm -rf "$SITE" && mkdir -p "$SITE"
        tar -xJf "$WHL/site.tar.xz" -C "$SITE"
        echo "unpacked $WHL/site.tar.xz ($(du -sh "$SITE" | cut -f1)) in $(( SECONDS - t0 ))s"
    else
        echo "ERROR: $WHL/site.tar.xz is missing: carry .whl (see the header of this script)"
        record packages FAIL "no $WHL/site.tar.xz"
    fi
    # requirements of the carried packages vs the image's versions (fixes from .whl/fallback)
    "$PYTHON" benchmarks/gpu_check_env.py deps "$SITE" "$WHL/fallback" || true
    export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
    # no network there: nothing should try to phone home or download
    export RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
    export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true HF_HUB_OFFLINE=1

    # ---------------------------------------------------------------- environment
    banner "environment"
    {
        echo "## nvidia-smi"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi -L || true
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
                --format=csv || true
        else
            echo "(no nvidia-smi)"
        fi
        echo "## python"
        "$PYTHON" - <<'EOF' || true
import os, platform, sys
import torch
print(sys.version.replace("\n", " "), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
print("cpus", os.cpu_count(), "platform", platform.platform())
EOF
        echo "## imports"
    } 2>&1 | tee "$OUT/env.txt"
    local rc=0
    "$PYTHON" benchmarks/gpu_check_env.py imports 2>&1 | tee -a "$OUT/env.txt" || rc=$?
    if [[ $rc == 0 ]]; then record imports PASS "$(( SECONDS - t0 ))s"
    else record imports FAIL "rc=$rc: see env.txt (a MISSING line names what to carry)"; fi

    # ---------------------------------------------------------------- (a) peer benchmark
    local device=cuda
    [[ $DRY == 1 ]] && device=cpu
    local limit=$PEER_TIMEOUT_S
    (( limit > $(remaining) - 120 )) && limit=$(( $(remaining) - 120 ))
    (( limit < 30 )) && limit=30
    banner "(a) peer benchmark on $device, cases $PEER_CASES, timeout ${limit}s"
    t0=$SECONDS
    rc=0
    if [[ $device == cuda ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "ERROR: torch sees no CUDA device: not running the GPU benchmark (use --cpu-dry-run here)"
        rc=$NOT_RUN
    else
        timeout -k 10 "$limit" "$PYTHON" benchmarks/peer_benchmark.py --device "$device" \
            --cases "$PEER_CASES" --seconds "$PEER_SECONDS" --rounds 1 --setups channels_last \
            --out "$PEER_OUT" || rc=$?
    fi
    if [[ $rc == 0 && -s $PEER_OUT ]]; then record peer PASS "$(( SECONDS - t0 ))s -> $(basename "$PEER_OUT")"
    elif [[ $rc == 124 || $rc == 137 ]]; then record peer FAIL "timed out after ${limit}s"
    elif [[ $rc == "$NOT_RUN" ]]; then record peer FAIL "not started: no CUDA device"
    else record peer FAIL "rc=$rc after $(( SECONDS - t0 ))s"; fi

    # ---------------------------------------------------------------- (b) smoke search
    local gpu_flag=--use-gpu
    [[ $DRY == 1 ]] && gpu_flag=--no-gpu
    limit=$(( $(remaining) - 10 ))
    (( limit < 60 )) && limit=60
    local name
    name=gpu-check-$(date +%Y%m%d-%H%M%S)
    local storage=$WORK/runs experiment=$WORK/runs/$name
    local db=$WORK/mlflow/mlflow.db
    mkdir -p "$WORK/runs" "$WORK/mlflow"
    banner "(b) smoke search $gpu_flag, 2 trials, timeout ${limit}s, experiment $experiment"
    t0=$SECONDS
    rc=0
    if [[ $gpu_flag == --use-gpu ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "ERROR: torch sees no CUDA device: a --use-gpu search would wait for a GPU that never" \
             "comes; not starting it (use --cpu-dry-run on a machine without one)"
        rc=$NOT_RUN
    else
        # cwd $WORK: MLflow's default artifact root (./mlruns) lands there, not in the repo
        (cd "$WORK" && timeout -k 15 "$limit" "$PYTHON" "$REPO/experiments/search.py" \
            --space "$SPACE" --smoke-test $gpu_flag --num-samples 2 \
            --max-concurrent-trials 1 --name "$name" --storage-path "$storage" \
            --mlflow-uri "sqlite:///$db") || rc=$?
    fi
    [[ -f $experiment/leaderboard.csv ]] && cp "$experiment/leaderboard.csv" "$OUT/"
    [[ -f $experiment/best_config.yaml ]] && cp "$experiment/best_config.yaml" "$OUT/"
    if [[ -d $experiment ]]; then
        "$PYTHON" benchmarks/gpu_check_env.py trials "$experiment" 2>&1 | tee "$OUT/trials.md" || true
    fi
    local cuda_trials=0
    [[ -f $OUT/trials.md ]] && cuda_trials=$(grep -c '^| trial_.* | cuda' "$OUT/trials.md" || true)
    if [[ $rc == 0 && -f $OUT/leaderboard.csv ]]; then
        if [[ $gpu_flag == --use-gpu && $cuda_trials == 0 ]]; then
            record search FAIL "finished but no trial reported a cuda device (see trials.md)"
        else
            record search PASS "$(( SECONDS - t0 ))s, $cuda_trials trial(s) on cuda -> leaderboard.csv"
        fi
    else
        if [[ $rc == 124 || $rc == 137 ]]; then record search FAIL "timed out after ${limit}s"
        elif [[ $rc == 3 ]]; then record search FAIL "done, but MLflow data was not all written (exit 3)"
        elif [[ $rc == "$NOT_RUN" ]]; then record search FAIL "not started: no CUDA device"
        else record search FAIL "rc=$rc after $(( SECONDS - t0 ))s"; fi
        if [[ $rc != "$NOT_RUN" ]]; then  # it ran: keep its trial errors and Ray's logs
            "$PYTHON" benchmarks/gpu_check_env.py debug "$experiment" "$OUT/search_debug.txt" || true
        fi
    fi

    # ---------------------------------------------------------------- summary
    banner "summary"
    {
        echo "gpu_check $( [[ $DRY == 1 ]] && echo '(CPU dry run) ' )$(date -u +%FT%TZ), $(( SECONDS - START ))s"
        command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | head -1
        printf '%s\n' "${RESULTS[@]}"
        if [[ -s $PEER_OUT ]]; then echo; grep -E '^(Measured|\|)' "$PEER_OUT"; fi
        if [[ -f $OUT/trials.md ]]; then echo; cat "$OUT/trials.md"; fi
        if [[ -f $OUT/leaderboard.csv ]]; then echo; cut -d, -f1-6 "$OUT/leaderboard.csv"; fi
        echo
        [[ $FAILED == 0 ]] && echo "ALL PASSED" || echo "SOME STEPS FAILED"
    } 2>&1 | tee "$OUT/summary.txt"
    return $FAILED
}

set +e
main 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
exit "$status"
