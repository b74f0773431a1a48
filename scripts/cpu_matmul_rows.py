"""SmolLM2-135M's matrix products alone, by rows of x: eej's CPU matmul kernel against XLA's product.

The 211 products of a decode step (30 layers x q, k, v, o, gate, up, down, and the LM head) on random weights of
the model's shapes, chained in one compiled function, for each count of rows (a verification of w tokens at batch
b is b * w rows); the minimum of --rounds calls. One implementation per process: run it once per `--matmul` and
alone (docs/engine.md, "The CPU matmul on AVX2", quotes it):

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/cpu_matmul_rows.py --matmul cpu
    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/cpu_matmul_rows.py --matmul xla
"""

from __future__ import annotations

import argparse
import json
import os
import time

HIDDEN, KV, INTERMEDIATE, VOCAB, LAYERS = 576, 192, 1536, 49152, 30  # SmolLM2-135M


def measure(matmul: str, rows: list[int], rounds: int) -> dict[int, float]:
    """{rows: ms}: the minimum over `rounds` calls of all the products for that many rows of x."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eej.kernels import cpu_matmul
    from eej.model.packed import pack

    layer = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
             (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
               for shape in layer * LAYERS + [(HIDDEN, VOCAB)]]
    if matmul == "cpu":
        weights = [pack(w) for w in weights]  # column tiles, as an engine lays them out
        product = cpu_matmul.matmul
    else:
        product = jnp.matmul

    @jax.jit
    def products(weights, x):  # x [M, HIDDEN]; the down projections read x repeated to INTERMEDIATE columns
        wide = jnp.tile(x, (1, -(-INTERMEDIATE // HIDDEN)))[:, :INTERMEDIATE]
        total = 0.0
        for w in weights:
            total = total + product(x if w.shape[0] == HIDDEN else wide, w)[:, :4].sum()
        return total

    out = {}
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, HIDDEN), dtype=np.float32))
        products(weights, x).block_until_ready()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            products(weights, x).block_until_ready()
            best = min(best, time.perf_counter() - start)
        out[m] = round(best * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matmul", choices=("cpu", "xla"), required=True)
    parser.add_argument("--rows", default="1,2,4,5,8,12,20", help="comma-separated counts of rows of x")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None, help="also write this JSON file (machine and load average included)")
    args = parser.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.exit(2, f"--rows must be comma-separated integers, got {args.rows!r}\n")
    if min(rows) < 1 or args.rounds < 1:
        parser.exit(2, "--rows and --rounds must be at least 1\n")

    from eej.bench.machine import machine_info

    machine = machine_info()
    machine["load_average_start"] = list(os.getloadavg())
    ms = measure(args.matmul, rows, args.rounds)
    machine["load_average_end"] = list(os.getloadavg())
    print(args.matmul, ms, "load average", machine["load_average_start"], "->", machine["load_average_end"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"matmul": args.matmul, "rounds": args.rounds, "ms_by_rows": ms, "machine": machine}, f, indent=1)


if __name__ == "__main__":
    main()
