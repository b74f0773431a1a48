#!/usr/bin/env bash
# The adaptive controller on a GPU (docs/adaptive.md), as the last call of a lease prepared by
# scripts/gpu_lease_prepare.sh (carry .gpu/c .gpu/whl .gpu/data):
#   0. how the step's conditionals compile (eej.model.control), four ways: Kangaroo's fallback step against plain's;
#      what follows runs the fastest way; then a profile of the fallback step, kernel by kernel (gpu_step_profile.py);
#   1. adaptive and fixed speculation against plain decoding (`eej bench`, greedy, 128 new tokens): Spec-Bench at
#      batch 1 and 4, then MT-Bench at batch 1 and 4, while the budget lasts, with the cost tables (each method's
#      step modes against plain's, scripts/plain_mode_overhead.py) at batch 1 and 4 between;
#   2. the controller's own cost table c(k) per shape, as calibration measured it (step_times.json).
# Each part runs under a deadline BUDGET_S seconds from the start; what finished is packed into $OUT/gpu_adaptive.tgz
# (the device tool returns at most 8 files). What it costs (2026-12-04, H200, JAX 0.11.2): part 0 ~35-70 s a way;
# each cost table ~2.5 min, nearly all compilation; the Spec-Bench run at batch 1 with four contestants ~3.5 min. The
# lease setup needs rouge-score and nltk among the carried wheels (the bench's reference metrics): a run without them
# lost its Spec-Bench report. Locally, without a GPU (a check of the script itself, tiny settings):
#   GPU_ADAPTIVE_SMOKE=1 OUT=/tmp/ga bash scripts/gpu_adaptive.sh 300
set -uo pipefail
budget=${1:?usage: gpu_adaptive.sh BUDGET_SECONDS}
deadline=$((SECONDS + budget))
out=${OUT:-/tmp}; work=/tmp/gpu_adaptive; rm -rf "$work"; mkdir -p "$work"
if [ -n "${GPU_ADAPTIVE_SMOKE:-}" ]; then
  PY=${PYTHON:-.venv/bin/python}; data=../shared/data/eval; limit_b1=1; limit_b4=1; mt_limit=4; lengths=40
  methods=plain,kangaroo,kangaroo:fixed; cost_methods=kangaroo; conditional_methods=kangaroo; bench_extra=
else
  source scripts/gpu_lease_setup.sh
  PY=python3; data=.gpu/data; limit_b1=2; limit_b4=4; mt_limit=8; lengths=100
  methods=plain,kangaroo,kangaroo:fixed,m2r2-spec
  cost_methods=kangaroo,m2r2-spec,specee,m2r2-exit; conditional_methods=kangaroo
  bench_extra="--cache-size 1024"  # one compiled shape per batch size
fi
# PYTHONSAFEPATH: `python3 -m eej` imports the installed eej (with its kernels), not the checkout's folder
export EEJ_CACHE_DIR="$work/cache" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
"$PY" -c "import jax; print(jax.__version__, jax.devices())"

part() {  # part NAME MIN_SECONDS COMMAND...: runs COMMAND if MIN_SECONDS are left, stopped at the deadline
  local name=$1 need=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt "$need" ]; then echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name ($(date +%T), ${left}s left)"
  timeout --signal=INT --kill-after=10 "$left" "$@" 2>&1 | tail -40
  echo "== $name: exit ${PIPESTATUS[0]}, $((deadline - SECONDS))s left"
}
bench() {  # bench SET BATCH LIMIT CATEGORIES
  local name="$work/gpu_adaptive_$1_t0_b$2"
  "$PY" -m eej bench --model smollm2-135m --questions "$data/$1.jsonl" --methods "$methods" --limit "$3" \
    --mt-bench-categories "$4" --max-new-tokens 128 --batch-size "$2" --temperature 0 --seed 0 --no-progress \
    $bench_extra --no-agreement --no-perplexity --out "$name.json" --report "$name.md" --note "scripts/gpu_adaptive.sh; EEJ_CONDITIONALS=$EEJ_CONDITIONALS EEJ_BRANCH_STEP=$EEJ_BRANCH_STEP; nothing else ran"
}
export -f bench; export PY data methods work bench_extra  # `timeout` runs commands, not shell functions: bash -c runs this one
# 0. How eej.model.control's conditionals compile (EEJ_CONDITIONALS: in-place loops or lax.cond/switch) and whether
#    an adaptive step branches once between speculating and a step with nothing to draft (EEJ_BRANCH_STEP): Kangaroo's
#    fallback step against plain's, each way; the later parts run the way with the fastest fallback step. (Letting
#    XLA:GPU put while loops and conditionals into CUDA graphs, --xla_gpu_enable_command_buffer=...,WHILE,CONDITIONAL,
#    made every step 2-2.5x slower on the H200, plain decoding's too: benchmarks/results/gpu_nvidia_h200_conditionals.md.)
for way in loops_0 loops_1 lax_1 lax_0; do
  part "conditionals: $way" 60 env EEJ_CONDITIONALS="${way%_*}" EEJ_BRANCH_STEP="${way#*_}" "$PY" scripts/plain_mode_overhead.py \
    --batch 1 --prompt-lengths "$lengths" --methods "$conditional_methods" --modes 0 --out "$work/gpu_conditionals_$way"
done
best=$("$PY" - "$work" <<'EOF'
import glob, json, sys
ms = {}
for path in glob.glob(f"{sys.argv[1]}/gpu_conditionals_*.json"):
    doc = json.load(open(path))
    ms[(doc["conditionals"], doc["branch_whole_step"])] = max(r["ms_per_step"] for r in doc["rows"] if r["contestant"] != "plain")
way, whole = min(ms, key=ms.get) if ms else ("loops", True)
print(way, int(whole))
EOF
)
export EEJ_CONDITIONALS=${best% *} EEJ_BRANCH_STEP=${best#* }
echo "== fastest fallback step: EEJ_CONDITIONALS=$EEJ_CONDITIONALS EEJ_BRANCH_STEP=$EEJ_BRANCH_STEP"
part "profile" 60 "$PY" scripts/gpu_step_profile.py --methods "$conditional_methods" --out "$work/profile"
rm -rf "$work"/profile/*/ "$work"/profile/*.hlo.txt  # the traces and programs: megabytes; the summary stays
part "Spec-Bench, batch 1" 120 bash -c 'bench "$@"' _ spec_bench 1 "$limit_b1" auto
[ -n "${SKIP_COSTS:-}" ] || part "cost table, batch 1" 60 "$PY" scripts/plain_mode_overhead.py --batch 1 --prompt-lengths "$lengths" \
  --methods "$cost_methods" --out "$work/gpu_plain_mode_overhead_b1"
part "Spec-Bench, batch 4" 120 bash -c 'bench "$@"' _ spec_bench 4 "$limit_b4" auto
part "MT-Bench, batch 1" 120 bash -c 'bench "$@"' _ mt_bench 1 "$mt_limit" merge
[ -n "${SKIP_COSTS:-}" ] || part "cost table, batch 4" 60 "$PY" scripts/plain_mode_overhead.py --batch 4 --prompt-lengths "$lengths" \
  --methods "$cost_methods" --out "$work/gpu_plain_mode_overhead_b4"
part "MT-Bench, batch 4" 120 bash -c 'bench "$@"' _ mt_bench 4 "$mt_limit" merge
cp "$EEJ_CACHE_DIR/step_times.json" "$work/gpu_step_times.json" 2>/dev/null
rm -rf "$work/cache"
tar czf "$out/gpu_adaptive.tgz" -C "$work" . && ls -la "$work"
