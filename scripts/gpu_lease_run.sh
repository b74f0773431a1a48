#!/usr/bin/env bash
# Third call of a GPU lease (see scripts/gpu_lease_prepare.sh): joins the model, installs eej and the
# carried wheels into /tmp/site, and runs scripts/gpu_bench.sh with a time budget, results in $OUT.
#   bash scripts/gpu_lease_run.sh 390 --phases checks,identity,decoding --decode-impls xla
set -uo pipefail
budget=${1:?usage: gpu_lease_run.sh BUDGET_SECONDS [gpu_bench options]}; shift
source scripts/gpu_lease_setup.sh
PYTHON=python3 EEJ_QUESTIONS=.gpu/data/spec_bench.jsonl bash scripts/gpu_bench.sh --out "${OUT:-/tmp}/gpu" \
  --time-budget "$budget" "$@" 2>&1 | tee "${OUT:-/tmp}/log.txt"
