"""How far the rounds of the engine's step-time calibration disagree on this machine, undisturbed.

The engine keeps a calibration table on disk only if its rounds agree within `STEADY_SPREAD` (each round's costs
relative to its plain step; eej.decoding.calibration.spread), and measures again, up to `ATTEMPTS` sets of rounds,
while they do not. This times the same thing as the calibration — each method's decode loop forced to each of its
calibration points, `CALIBRATION_STEPS` steps from a prefilled state, `ROUNDS` interleaved rounds a set — many sets in
a row, and reports the spread of each set: how often a quiet machine would measure again, and what a table's ratios
look like. Run it alone (`flock /tmp/eej-benchmark.lock`).

    python scripts/calibration_spread.py [--methods kangaroo,specee] [--batches 1,4] [--sets 12] [--out PREFIX]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import eej
import eej.api
from eej.bench.loop_timer import decode_loop_timer
from eej.bench.machine import machine_info
from eej.config import SamplingConfig
from eej.decoding import calibration

MAX_NEW = 128  # as `eej bench` in scripts/adaptive_bench.sh: the cache size the calibration runs at


def _sets(model, method: str, batch: int, prompt_len: int, sampling: SamplingConfig, sets: int) -> list[list[list[float]]]:
    """`sets` calibrations' rounds [set][round][point], ms per step, of `method` at `batch`."""
    engine = eej.api.engine(model, method)
    prompts = [list(range(100 + b, 100 + b + prompt_len)) for b in range(batch)]
    runs = [decode_loop_timer(engine, prompts, MAX_NEW, calibration.CALIBRATION_STEPS, sampling, edit)[0]
            for edit in engine.strategy.calibration_points()]
    for run in runs:  # the first call of each program
        run()
    return [[[run() for run in runs] for _ in range(calibration.ROUNDS)] for _ in range(sets)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kangaroo,specee")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--sets", type=int, default=12)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", default="benchmarks/results/calibration_spread")
    args = parser.parse_args()
    sampling = SamplingConfig(temperature=args.temperature)
    model = eej.load_model("smollm2-135m", kernels="cpu")
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        for batch in [int(b) for b in args.batches.split(",")]:
            sets = _sets(model, method, batch, args.prompt_length, sampling, args.sets)
            spreads = [calibration.spread(s) for s in sets]
            relative = [np.median(np.asarray(s) / np.asarray(s)[:, :1], axis=0) for s in sets]
            unsteady = float(np.mean([x > calibration.STEADY_SPREAD for x in spreads]))
            rows.append({"method": method, "batch": batch, "spreads": spreads, "rounds": sets,
                         "median_spread": float(np.median(spreads)), "max_spread": float(np.max(spreads)),
                         "unsteady_share": unsteady,
                         "relative_costs_median": np.median(relative, axis=0).tolist(),
                         "relative_costs_range": (np.max(relative, axis=0) - np.min(relative, axis=0)).tolist()})
            print(method, batch, [round(x, 3) for x in spreads], flush=True)
    doc = {"model": "smollm2-135m", "kernels": "cpu", "temperature": args.temperature, "prompt_tokens": args.prompt_length,
           "steps_per_run": calibration.CALIBRATION_STEPS, "rounds_per_set": calibration.ROUNDS,
           "steady_spread": calibration.STEADY_SPREAD, "machine": {**machine_info(), "load_average": os.getloadavg()},
           "command": "python scripts/calibration_spread.py " + " ".join(sys.argv[1:]), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    m = doc["machine"]
    lines = ["# Calibration rounds on a quiet machine: how far they disagree", "",
             f"`{doc['command']}`; {m['cpu']}, {m['cpu_count']} CPUs, load average "
             f"{', '.join(f'{x:.2f}' for x in m['load_average'])}; eej's CPU kernels, "
             f"{'greedy' if sampling.greedy else f'temperature {args.temperature}'}, a prompt of {args.prompt_length} tokens, "
             f"cache of {args.prompt_length + MAX_NEW} tokens. A set is one calibration: {calibration.ROUNDS} interleaved rounds of "
             f"{calibration.CALIBRATION_STEPS} steps per point; its spread is the largest max / min - 1, over points, of a "
             f"round's cost relative to its first point (`eej.decoding.calibration.spread`); a set above "
             f"{calibration.STEADY_SPREAD:.2f} is measured again by the engine.", "",
             f"| method | batch | sets | median spread | largest | sets above {calibration.STEADY_SPREAD:.2f} | costs relative to c(0) "
             "(median of sets) | their range over sets |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch']} | {len(r['spreads'])} | {r['median_spread']:.3f} | {r['max_spread']:.3f} | "
                     f"{r['unsteady_share']:.0%} | {' / '.join(f'{x:.3f}' for x in r['relative_costs_median'])} | "
                     f"{' / '.join(f'{x:.3f}' for x in r['relative_costs_range'])} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
