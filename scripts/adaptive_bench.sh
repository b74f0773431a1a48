#!/usr/bin/env bash
# Adaptive vs fixed speculation and exits against plain decoding (docs/adaptive.md), every method, in one
# `eej bench` run per (question set, temperature, batch size):
#   Spec-Bench (4 questions per category at batch 4, 2 at batch 1) and MT-Bench (8 questions, one category),
#   greedy and temperature 0.7, batch 1 and 4, up to 128 new tokens.
# Runs one benchmark at a time (a lock file: nothing else may measure meanwhile) and records the load average.
#
#   scripts/adaptive_bench.sh [OUT_PREFIX]      (default benchmarks/results/adaptive)
#   SETS=spec_bench TEMPS=0 BATCHES="1 4" scripts/adaptive_bench.sh     (a subset)
#   METHODS=plain,kangaroo,specee scripts/adaptive_bench.sh             (some contestants; again=plain, in the
#                                                 default list, is a second plain decoding: an A/A control)
#   MT_LIMIT=16 scripts/adaptive_bench.sh        (MT-Bench questions: 16 gives batch 4 the 8 generate calls that
#                                                 a speedup interval needs, eej.bench.metrics.MIN_CI_UNITS)
#   EXTRA="--no-perplexity" scripts/adaptive_bench.sh                   (more `eej bench` options)
#   TEMPS=0.7 EXTRA="--draws 2" scripts/adaptive_bench.sh               (sampling: each question answered twice,
#                                                 two draws of every answer's length: docs/bench.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/adaptive}"
EEJ="${EEJ:-.venv/bin/eej}"
DEFAULT_METHODS=plain,again=plain,kangaroo,kangaroo:fixed,m2r2-spec,m2r2-spec:fixed,specee,specee:fixed
DEFAULT_METHODS+=,m2r2-exit,m2r2-exit:fixed,skipdecode
METHODS="${METHODS:-$DEFAULT_METHODS}"
exec 9>/tmp/eej-benchmark.lock
flock 9
for set in ${SETS:-spec_bench mt_bench}; do
  for temp in ${TEMPS:-0 0.7}; do
    for batch in ${BATCHES:-1 4}; do
      if [ "$set" = spec_bench ]; then limit=$((batch == 1 ? 2 : 4)); cats=auto; else limit="${MT_LIMIT:-8}"; cats=merge; fi
      name="${OUT}_${set}_t${temp}_b${batch}"
      [ -f "$name.json" ] && continue   # finished before: rerun by deleting it
      "$EEJ" bench --model smollm2-135m --questions "../shared/data/eval/$set.jsonl" --methods "$METHODS" \
        --limit "$limit" --mt-bench-categories "$cats" --max-new-tokens 128 --batch-size "$batch" \
        --temperature "$temp" --seed 0 --no-progress --checkpoint "$name.checkpoint.jsonl" \
        --out "$name.json" --report "$name.md" --note "scripts/adaptive_bench.sh; nothing else ran" ${EXTRA:-}
      rm -f "$name.checkpoint.jsonl"
    done
  done
done
