#!/usr/bin/env bash
# Prepares a run of scripts/gpu_bench.sh on a lent GPU machine that has JAX with CUDA but no network
# and accepts at most 64 MiB per call (this workplace's `device` tool). Writes the git-ignored folder
# .gpu/ (added to .git/info/exclude):
#   .gpu/a .gpu/b .gpu/c  the real model's GGUF (98 MB) in three parts, one carried per call
#   .gpu/whl              wheels the machine lacks (gguf; jax-triton 0.3.1, the last for triton 3.6; rouge-score and
#                         nltk, which `eej bench` scores references with)
#   .gpu/data             the Spec-Bench and MT-Bench prompts
# Then, in three calls back to back (the machine stays warm ~30 s between calls):
#   1. carry .gpu/a:  mkdir -p /tmp/eejm && cp .gpu/a/part /tmp/eejm/part_a
#   2. carry .gpu/b:  cp .gpu/b/part /tmp/eejm/part_b
#   3. carry .gpu/c .gpu/whl .gpu/data:  bash scripts/gpu_lease_run.sh BUDGET_S [gpu_bench options]
#      (or: bash scripts/gpu_adaptive.sh BUDGET_S, the adaptive controller on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c .gpu/whl .gpu/data
gguf=$("$PY" -c "from eej.weights.registry import smollm2_path; print(smollm2_path())")
split -b 33000000 -d "$gguf" .gpu/part_
mv .gpu/part_00 .gpu/a/part && mv .gpu/part_01 .gpu/b/part && mv .gpu/part_02 .gpu/c/part
md5sum "$gguf" | cut -d' ' -f1 > .gpu/c/md5
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl gguf jax-triton==0.3.1 nltk
"$PY" -m pip wheel -q --no-deps -w .gpu/whl rouge-score==0.1.2  # an sdist only on PyPI; pure Python
cp "${EEJ_QUESTIONS:-../shared/data/eval/spec_bench.jsonl}" .gpu/data/spec_bench.jsonl
cp ../shared/data/eval/mt_bench.jsonl .gpu/data/mt_bench.jsonl
du -sh .gpu/*
