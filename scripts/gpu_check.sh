#!/usr/bin/env bash
# The one command to run on a GPU machine: measures the step (one process per provider, so a crash loses no other
# row), the real trainer end to end on WebDataset shards made on the spot (with a checkpoint saved and resumed),
# the profile, the block and update candidates, the kernels and the attention backends, and checks every GPU test,
# inside an internal deadline (default 9 minutes, GPU_CHECK_BUDGET_S), stages in order of importance: a stage's
# budget is its ceiling, and a stage that would start with less than 20 s left is skipped and marked so in the
# summary.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # OUT_DIR defaults to $OUT, else ./gpu_check_out
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   # every stage's command at tiny sizes, on the CPU (CI runs it)
#
# It runs from the source tree, without an install, and installs nothing from the network. Packages the GPU
# machine lacks (webdataset, braceexpand and torchao on the lent H200 image; torchao's float8 is Python, its
# compiled extras need not load) travel as wheels in .whl/ (ignored by git), fetched once on a networked machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl webdataset braceexpand torchao
# and installed here into /tmp/site when one of them is missing.
#
# What it writes to OUT_DIR (at most 8 files, as the device tool brings back): summary.md (the headline table and
# each stage's status, rewritten after every stage), gpu_check.log (every stage's output) and results.tar.gz (the
# stages' result files: train_step.{csv,md,png}, train_check.{md,csv,log}, profile.md, kernels and attention tables
# and charts, test logs),
# refreshed after every stage, so whatever finished before a timeout comes back.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
WORK="$(mktemp -d)"
mkdir -p "$OUT_DIR"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
declare -a STATUS=()

if ! "$PY" -c "import webdataset, torchao" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [[ $DRY == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

write_summary() {
    {
        echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        echo "commit $(git describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)$([[ $DRY == 1 ]] && echo ', dry run on the CPU: no claims')"
        echo
        [[ -f "$WORK/env.txt" ]] && { echo '```'; cat "$WORK/env.txt"; echo '```'; echo; }
        echo "| stage | status | seconds |"
        echo "|---|---|---|"
        printf '%s\n' "${STATUS[@]}"
        echo
        [[ -f "$WORK/step/train_step.md" ]] && sed -n '/^| model | fastjepa img/,/^$/p; /^| model | FP8 provider/,/^$/p' \
            "$WORK/step/train_step.md"
        [[ -f "$WORK/train/train_check.md" ]] && { echo; sed -n '/^| model/,/^$/p' "$WORK/train/train_check.md"; }
        [[ -f "$WORK/profile/profile.md" ]] && { echo; sed -n '1,/^| top kernels/p' "$WORK/profile/profile.md" | head -n -1;
            sed -n '/^# Roofline/,$p' "$WORK/profile/profile.md"; }
        [[ -f "$WORK/step/compile.txt" ]] && { echo; cat "$WORK/step/compile.txt"; }
    } >"$SUMMARY"
    tar czf "$OUT_DIR/results.tar.gz" -C "$WORK" . 2>/dev/null
}

# stage NAME SECONDS_WANTED COMMAND...: runs inside what is left of the budget; its output goes to the log and to
# $WORK/NAME.log; the summary and the results archive are refreshed afterwards.
stage() {
    local name=$1 want=$2; shift 2
    local budget; budget=$(left)
    if ((budget < 20)); then
        STATUS+=("| $name | skipped: deadline | 0 |"); write_summary; return
    fi
    ((want < budget)) || want=$budget
    echo "=== $name (up to ${want}s) ===" | tee -a "$LOG"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=10 "$want" "$@" 2>&1 | tee -a "$LOG" >"$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    local status="ok"; ((rc == 0)) || status="failed (exit $rc)"; ((rc == 124)) && status="timed out"
    STATUS+=("| $name | $status | $(($(date +%s) - t0)) |")
    write_summary
}

env_info() {
    "$PY" - <<'EOF'
import importlib, platform, subprocess, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
for name in ("triton", "flash_attn", "flash_attn_interface", "xformers", "torchao", "webdataset"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', 'installed')}")
    except Exception as e:
        print(f"{name}: not available ({type(e).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    q = "name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
    print(subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True).stdout)
else:
    print("no CUDA GPU (dry run)")
EOF
}

build_cuda_ext() {
    if [[ $DRY == 1 ]] || ! command -v nvcc >/dev/null; then
        echo "skipped: needs a CUDA toolkit (nvcc) and a CUDA build of torch"; return 0
    fi
    FASTJEPA_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build" &&
        "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_ema.py -k cuda &&
        "$PY" -m bench --suite kernels --ops ema --out "$WORK/cuda_ext"
}

# step_provider NAME BUDGET ARGS...: one provider in its own process (a crash loses no other row); rows append
# to $WORK/step/train_step.csv and the step_report stage writes the table with the ratios from all of them.
step_provider() {
    local name=$1 want=$2; shift 2
    stage "step_$name" "$want" env TORCH_LOGS=recompiles,graph_breaks "$PY" -m bench.bench_step --providers "$name" \
        --out "$WORK/step" "$@"
}

GLUE_OPS=masked_gather,target_norm_gather,predictor_tokens,ema  # the kernel suite's I-JEPA glue ops
export PY DRY WORK
export -f env_info build_cuda_ext
mkdir -p "$WORK/step" "$WORK/profile" "$WORK/attention" "$WORK/kernels" "$WORK/blocks" "$WORK/train"
stage env 30 bash -c 'env_info | tee "$WORK/env.txt"'
if [[ $DRY == 1 ]]; then
    for provider in fastjepa pytorch official; do step_provider "$provider" 60 --quick --compile eager; done
    stage step_report 20 "$PY" -m bench.bench_step --report --out "$WORK/step"
    stage train 90 "$PY" -m bench.train_check --quick --out "$WORK/train"
    stage profile 60 "$PY" -m bench.profile_step --quick --out "$WORK/profile"
    stage tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_masked_gather.py -k vit_like
    stage blocks 60 "$PY" -m bench --suite kernels --quick --ops block_ops,update --out "$WORK/blocks"
    stage kernels 120 "$PY" -m bench --suite kernels --quick --ops "$GLUE_OPS" --out "$WORK/kernels"
    stage attention 60 "$PY" -m bench --suite attention --quick --out "$WORK/attention"
    for provider in fastjepa_fp8 fastjepa_torchao_fp8 fastjepa_fp8_all; do
        step_provider "$provider" 60 --quick --compile eager
    done
else
    # In order of importance; each budget is a ceiling, what a stage leaves goes to the next ones.
    STEP=(--models vit_huge_14 --batch 128 --warmup 3 --steps 8)
    step_provider fastjepa 110 "${STEP[@]}"
    step_provider pytorch 80 "${STEP[@]}"
    step_provider official 50 "${STEP[@]}"
    stage step_report 10 "$PY" -m bench.bench_step --report --out "$WORK/step"
    stage train 110 "$PY" -m bench.train_check --out "$WORK/train"
    stage profile 60 "$PY" -m bench.profile_step --model vit_huge_14 --batch 128 --warmup 3 --out "$WORK/profile"
    # the candidates of block_impl and update_impl at ViT-H/14's call sites (the step stage logs what auto chose)
    stage blocks 90 "$PY" -m bench --suite kernels --ops block_ops,update --out "$WORK/blocks"
    XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
    stage tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${XDIST[@]}" --junitxml="$WORK/tests.xml" tests
    stage kernels 100 "$PY" -m bench --suite kernels --ops "$GLUE_OPS" --out "$WORK/kernels"
    stage attention 45 "$PY" -m bench --suite attention --out "$WORK/attention"
    # FP8: fastjepa's targets, the same through torchao's layers, and every GEMM (torchao's training layers)
    for provider in fastjepa_fp8 fastjepa_torchao_fp8 fastjepa_fp8_all; do step_provider "$provider" 70 "${STEP[@]}"; done
fi
stage step_report 10 "$PY" -m bench.bench_step --report --out "$WORK/step"  # again, with the late providers
# the compiled providers' recompiles and graph breaks, from the step stages' dynamo logs and rows
{
    for log in "$WORK"/step_*.log; do
        [[ $log == */step_report.log ]] && continue
        echo "$(basename "$log" .log): $(grep -c 'Recompiling function' "$log") recompiles," \
            "$(grep -c '__graph_breaks\]' "$log") graph breaks logged by dynamo," \
            "$(grep -c 'runs eager from now on' "$log") graphs left eager after a compile failure;" \
            "$(grep -o 'compiled graphs [0-9]*, graph breaks [0-9]*' "$log" | head -1)"
    done
} >"$WORK/step/compile.txt"
stage cuda_ext 120 bash -c build_cuda_ext
write_summary
echo "summary: $SUMMARY; results: $OUT_DIR/results.tar.gz ($(($(date +%s) - START)) s)" | tee -a "$LOG"
rm -rf "$WORK"
