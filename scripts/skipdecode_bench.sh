#!/usr/bin/env bash
# SkipDecode's committed Spec-Bench trade-off (docs/skipdecode.md "Results"): two `eej bench` runs
# (batch 1 and batch 8; plain runs in each, interleaved) and the table + plot built from them.
#   batch 1: the first 2 questions of each of the 6 Spec-Bench categories (14 answers: mt_bench has 2 turns)
#   batch 8: the first 8 questions of the 4 short-prompt categories (summarization and rag prompts are
#            ~700 tokens; 8 of them per prefill x 9 contestants did not fit this 2-core machine's time)
# Usage: scripts/skipdecode_bench.sh [NOTE]
set -euo pipefail
cd "$(dirname "$0")/.."
NOTE=${1:-"2-core CPU shared with other jobs: absolute tokens/s are noisy; contestants are interleaved per batch"}
Q=../shared/data/eval/spec_bench.jsonl
R=benchmarks/results
M=plain
for k in 2x 3x 4x 5x; do M="$M,skipdecode:$k-untuned"; [ -f "artifacts/smollm2-135m/skipdecode-$k.npz" ] && M="$M,skipdecode:$k"; done
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/eej_jax_cache}  # tuned and untuned presets share programs
.venv/bin/eej bench --model smollm2-135m --questions $Q --methods "$M" --limit 2 --max-new-tokens 128 --batch-size 1 \
  --out $R/skipdecode_b1.json --report $R/skipdecode_b1.md --note "$NOTE" --no-progress
.venv/bin/eej bench --model smollm2-135m --questions $Q --methods "$M" --categories mt_bench,translation,qa,math_reasoning \
  --limit 8 --max-new-tokens 128 --batch-size 8 --out $R/skipdecode_b8.json --report $R/skipdecode_b8.md --note "$NOTE" --no-progress
.venv/bin/python scripts/skipdecode_tradeoff.py $R/skipdecode_b1.json $R/skipdecode_b8.json --out $R/skipdecode_tradeoff
