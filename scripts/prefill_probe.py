"""Prefill seconds of plain decoding and each method, at batch 4 and 1, for prompts of 900 and 200 random tokens
(compiled first; median of 5). Shows how a long prompt's prefill grows with the batch, and that the methods'
prefills (which also fill their drafters' state) cost what plain's does. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/prefill_probe.py
"""

from __future__ import annotations

import os
import time

import numpy as np

import eej
import eej.api
from eej.config import SamplingConfig

METHODS = ("plain", "kangaroo", "m2r2-spec", "specee", "m2r2-exit")
SHAPES = ((4, 900), (1, 900), (4, 200))  # (batch, prompt tokens)
REPEATS, MAX_NEW = 5, 128


def prefill_seconds(engine, prompts: list[list[int]]) -> float:
    """Median seconds of the engine's compiled prefill over `prompts` (the first call, which compiles, not counted)."""
    engine._prefill(prompts, MAX_NEW, SamplingConfig(), 0, None)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        engine._prefill(prompts, MAX_NEW, SamplingConfig(), 0, None)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    model = eej.load_model("smollm2-135m", kernels="xla")
    rng = np.random.default_rng(0)
    for batch, length in SHAPES:
        prompts = [rng.integers(100, 20000, length).tolist() for _ in range(batch)]
        ms = {name: 1e3 * prefill_seconds(eej.api.engine(model, name), prompts) for name in METHODS}
        print(f"batch {batch}, {length} tokens: " + ", ".join(f"{n} {v:.0f} ms" for n, v in ms.items())
              + f"; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
