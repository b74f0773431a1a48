"""Prefill seconds of plain decoding and each method, at batch 4 and 1, for prompts of 900 and 200 random tokens
(compiled first; each engine's prefill timed once per round, the engines in turn, the median of the rounds). Shows
how a long prompt's prefill grows with the batch, and what the methods' prefills (which also fill their drafters'
state) cost against plain's. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/prefill_probe.py [--kernels cpu] [--rounds 5]

`--kernels cpu` runs eej's CPU kernels (what `eej generate` and `eej bench` pick on a CPU); the default, `xla`, XLA's.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import eej
import eej.api
from eej.config import SamplingConfig

METHODS = ("plain", "kangaroo", "m2r2-spec", "specee", "m2r2-exit")
SHAPES = ((4, 900), (1, 900), (4, 200), (1, 200))  # (batch, prompt tokens)
MAX_NEW = 128


def prefill_seconds(engine, prompts: list[list[int]]) -> float:
    """Seconds of one run of the engine's compiled prefill over `prompts`."""
    start = time.perf_counter()
    engine._prefill(prompts, MAX_NEW, SamplingConfig(), 0, None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=("xla", "cpu"), default="xla")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = eej.load_model("smollm2-135m", kernels=args.kernels)
    rng = np.random.default_rng(0)
    for batch, length in SHAPES:
        prompts = [rng.integers(100, 20000, length).tolist() for _ in range(batch)]
        engines = {name: eej.api.engine(model, name) for name in METHODS}
        for engine in engines.values():
            prefill_seconds(engine, prompts)  # compiles
        times = {name: [] for name in METHODS}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                times[name].append(prefill_seconds(engine, prompts))
        plain = np.median(times["plain"])
        print(f"batch {batch}, {length} tokens: " + ", ".join(
            f"{n} {1e3 * np.median(t):.0f} ms ({np.median(t) / plain:.3f}x)" for n, t in times.items())
            + f"; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
