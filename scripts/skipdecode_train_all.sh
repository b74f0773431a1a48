#!/usr/bin/env bash
# Reproduce the shipped SkipDecode LoRA artifacts for smollm2-135m (one run per layer budget).
# Each run took 35-45 minutes on this project's 2-core CPU machine shared with other jobs (docs/skipdecode.md).
# Usage: scripts/skipdecode_train_all.sh [2x 3x 4x]   (5x works too; its preset then needs `lora:` in the config)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/train
for budget in "${@:-2x 3x 4x}"; do
  for b in $budget; do
    nice -n 5 .venv/bin/eej train skipdecode --model smollm2-135m --budget "$b" \
      --data $DATA/gsm8k_train.jsonl $DATA/codegen-instruct.json $DATA/roleplay-simple-deduped-roleplay-instruct.json \
        $DATA/toolformer-dedupe-only-dataset.json \
      --out "runs/skipdecode-$b" --steps 150 --batch-size 4 --seq-len 256 --lr 2e-3 --warmup 10 \
      --max-examples 4000 --rank 8 --alpha 16 --artifact "artifacts/smollm2-135m/skipdecode-$b.npz"
  done
done
