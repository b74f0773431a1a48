#!/usr/bin/env python
"""Prefill seconds of plain decoding by how many attention-score bytes the "xla" attention builds at once.

For each budget (`eej.model.attention.CPU_SCORE_BYTES`; "none" = the whole block at once, what eej did before) a
fresh plain engine prefills random prompts of each shape (compiled first; median of `--repeats`), and the logits of
one forward over the largest shape are compared with the unchunked ones. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/prefill_chunks.py [--out benchmarks/results/prefill_chunks]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import eej.model.attention as attention
from eej.bench.machine import load_average, machine_info
from eej.bench.report import write_result
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.model.cache import init_cache
from eej.model.transformer import forward
from eej.weights.registry import load_model

SHAPES = ((4, 900), (1, 900), (4, 200), (8, 400), (1, 200))  # (rows, prompt tokens)
MAX_NEW = 128


def parse_budget(text: str) -> int | None:
    return None if text == "none" else int(float(text) * 2**20)


def prefill_seconds(engine: Engine, prompts: list[list[int]], repeats: int) -> tuple[float, list[int]]:
    """Median seconds of the engine's compiled prefill over `prompts` (the compiling call not counted), and the
    first tokens it picked."""
    state = engine._prefill(prompts, MAX_NEW, SamplingConfig(), 0, None)[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(engine._prefill(prompts, MAX_NEW, SamplingConfig(), 0, None)[0])
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(state.pending).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="none,2,8,32", help="MiB of scores at once, comma-separated; none = no limit")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/prefill_chunks")
    args = ap.parse_args(argv)
    load_start = load_average()
    model = load_model("smollm2-135m", kernels="xla")
    rng = np.random.default_rng(0)
    prompts = {shape: [rng.integers(100, 20000, shape[1]).tolist() for _ in range(shape[0])] for shape in SHAPES}
    big = jnp.asarray(prompts[SHAPES[0]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(big.shape[1], dtype=jnp.int32), big.shape)
    reference_logits = None
    rows = []
    for text in args.budgets.split(","):
        attention.CPU_SCORE_BYTES = parse_budget(text)  # read when the engine's programs are traced
        engine = Engine(model)
        row = {"budget_mib": text}
        for shape in SHAPES:
            seconds, first = prefill_seconds(engine, prompts[shape], args.repeats)
            row[f"{shape[0]}x{shape[1]}"] = round(seconds, 3)
            row[f"first_{shape[0]}x{shape[1]}"] = first
        cache = init_cache(model.cfg, big.shape[0], big.shape[1])
        logits = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, model.cfg)[0])(model.params, big, positions, cache)
        if reference_logits is None:
            reference_logits = logits
        row["max_abs_logit_diff_vs_first"] = float(jnp.max(jnp.abs(logits - reference_logits)))
        rows.append(row)
        print(row, flush=True)
    firsts_equal = all(r[k] == rows[0][k] for r in rows for k in r if k.startswith("first_"))
    doc = {"machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
           "command": "python scripts/prefill_chunks.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": {**vars(args), "shapes": SHAPES, "max_new_tokens": MAX_NEW, "model": "smollm2-135m"},
           "first_tokens_identical": firsts_equal, "results": rows}
    m = doc["machine"]
    cols = [f"{b}x{t}" for b, t in SHAPES]
    lines = ["# Plain prefill by attention-score budget (SmolLM2-135M, rows x prompt tokens)", "",
             (f"`{doc['command']}`; {m.get('cpu')}, {m.get('cpu_count')} CPUs, JAX {m.get('jax')}, load average "
              f"{load_start} -> {doc['load_average']['end']}; median seconds of {args.repeats} prefills (compiled "
              f"first); first tokens identical across budgets: {firsts_equal}."), "",
             "| score MiB at once | " + " | ".join(cols) + " | max abs logit diff (4x900) |",
             "|---" * (len(cols) + 2) + "|"]
    lines += [f"| {r['budget_mib']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r['max_abs_logit_diff_vs_first']:.2e} |" for r in rows]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
