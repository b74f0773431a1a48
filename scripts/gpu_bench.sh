#!/usr/bin/env bash
# One command on a GPU machine: checks every attention kernel against its reference, then times the kernels
# and end-to-end decoding (plain and every method; batch 1/8/32) and writes
# benchmarks/results/gpu_<device>.{json,md} with the device name. Exit status 1 if a kernel check fails.
#
#   scripts/gpu_bench.sh                      # uses .venv/bin/python (or $PYTHON, else python3)
#   scripts/gpu_bench.sh --install            # first: pip install -e '.[gpu]' (CUDA jaxlib + jax-triton)
#   scripts/gpu_bench.sh --methods plain --batch-sizes 1,8   # any scripts/gpu_bench.py option
#   scripts/gpu_bench.sh --cpu-smoke --out /tmp/gpu_smoke     # check the script itself without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "${1:-}" = "--install" ]; then
  shift
  "$PY" -m pip install -q -e ".[gpu]"
fi
for arg in "$@"; do
  if [ "$arg" = "--cpu-smoke" ]; then export JAX_PLATFORMS=cpu; fi
done
# Allocate GPU memory as needed rather than 75% up front (the benchmark builds many differently sized engines).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
"$PY" -c "import eej" 2>/dev/null || { echo "gpu_bench: eej is not importable by $PY (run make test, or pass --install)" >&2; exit 2; }
exec "$PY" scripts/gpu_bench.py "$@"
