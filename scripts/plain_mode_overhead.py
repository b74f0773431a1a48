"""What each adaptive method's step costs when it decides to do nothing special, against plain decoding.

An adaptive method that finds speculation (or exiting) does not pay falls back to a plain step; that step
must cost what plain decoding's does, or the method can never break even. This times the compiled decode
loop of plain decoding and of each method forced to each of its calibration modes (mode 0 = the plain
step: no drafts / no attempt / no predictor), interleaved round by round so that drift hits all alike,
at a batch size (`--batch`, default 1) and the cache sizes of a short and a long prompt. Run it alone (`flock /tmp/eej-benchmark.lock`).

    python scripts/plain_mode_overhead.py [--batch 4] [--kernels cpu] [--out benchmarks/results/plain_mode_overhead_b4]

`--kernels cpu` runs eej's CPU matmul and attention kernels (what `eej generate` and `eej bench` pick on a CPU);
the default, `xla`, runs XLA's (the default of the library's `load_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import numpy as np

import eej
import eej.api
from eej.bench.loop_timer import decode_loop_timer
from eej.bench.machine import machine_info
from eej.config import SamplingConfig
from eej.model import control

METHODS = ("kangaroo", "m2r2-spec", "specee", "m2r2-exit")
STEPS, ROUNDS, MAX_NEW = 24, 9, 128


def _contestants(model, prompt_len: int, batch: int, sampling: SamplingConfig, methods: tuple[str, ...],
                 modes: set[int] | None) -> list[tuple[str, Callable[[], float], Any]]:
    """(name, run, compiled loop) per contestant: plain, then each method at each of its modes (or those in `modes`);
    run() times one run of STEPS decode steps and returns milliseconds per step."""
    runs = []
    prompts = [list(range(100 + b, 100 + b + prompt_len)) for b in range(batch)]
    for name in ("plain", *methods):
        engine = eej.api.engine(model, name)
        points = engine.strategy.calibration_points() or [None]
        for mode, edit in enumerate(points):
            if modes is not None and mode not in modes and name != "plain":
                continue
            run, loop = decode_loop_timer(engine, prompts, MAX_NEW, STEPS, sampling, edit)
            runs.append((name if name == "plain" else f"{name} mode {mode}", run, loop))
    return runs


def _device(machine: dict) -> str:
    """"NVIDIA H200 (JAX gpu) on " where the decoding ran on an accelerator; "" on a CPU."""
    if machine["jax_backend"] == "cpu":
        return ""
    return f"{', '.join(sorted({d.split(':', 1)[1] for d in machine['devices']}))} (JAX {machine['jax_backend']}) on "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plain_mode_overhead")
    parser.add_argument("--prompt-lengths", default="100,800")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kernels", choices=("xla", "cpu"), default="xla",
                        help="matmul and attention implementation (eej.load_model's kernels)")
    parser.add_argument("--modes", default="", help="comma-separated modes to time (default: every mode)")
    args = parser.parse_args()
    modes = {int(m) for m in args.modes.split(",") if m} or None
    sampling = SamplingConfig(temperature=args.temperature)
    methods = tuple(m for m in args.methods.split(",") if m)
    model = eej.load_model("smollm2-135m", kernels=args.kernels)
    rows = []
    for prompt_len in [int(n) for n in args.prompt_lengths.split(",")]:
        runs = _contestants(model, prompt_len, args.batch, sampling, methods, modes)
        for _, run, _ in runs:
            run()  # first call of each program
        times = {name: [] for name, _, _ in runs}
        for _ in range(ROUNDS):
            for name, run, _ in runs:
                times[name].append(run())
        plain = float(np.median(times["plain"]))
        for name, ms in times.items():
            rows.append({"prompt_tokens": prompt_len, "contestant": name, "ms_per_step": float(np.median(ms)),
                         "vs_plain": float(np.median(ms)) / plain})
    doc = {"model": "smollm2-135m", "kernels": args.kernels, "conditionals": control.implementation(),
           "branch_whole_step": control.branch_whole_step(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": args.batch, "temperature": args.temperature, "steps_per_run": STEPS, "rounds": ROUNDS,
           "machine": {**machine_info(), "load_average": os.getloadavg()},
           "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Each method's step modes against plain decoding (ms per decode step, batch {args.batch}, "
             f"{'greedy' if sampling.greedy else f'temperature {args.temperature}'}, {args.kernels} kernels, "
             f"conditionals as {doc['conditionals']}{', the adaptive step one branch' if doc['branch_whole_step'] else ''})", "",
             f"`python scripts/plain_mode_overhead.py {' '.join(sys.argv[1:])}`; {_device(doc['machine'])}{doc['machine']['cpu']}, {doc['machine']['cpu_count']} CPUs, "
             f"load average {', '.join(f'{x:.2f}' for x in doc['machine']['load_average'])}; median of {ROUNDS} interleaved "
             f"rounds of {STEPS} steps. Mode 0 is the step an adaptive method takes when it does nothing special."
             + (f" XLA_FLAGS={doc['xla_flags']}." if doc["xla_flags"] else ""), "",
             "| prompt tokens | contestant | ms/step | vs plain |", "|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['contestant']} | {r['ms_per_step']:.2f} | {r['vs_plain']:.3f}x |" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
