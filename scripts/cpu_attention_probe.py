"""Time the CPU attention kernel alone at SmolLM2-135M's shapes: a step's 30 layers of attention over the cache.

    python scripts/cpu_attention_probe.py --batches 1,4 --queries 1,2,5 --positions 100,800 [--out PREFIX]

Each measurement is one jitted call running the kernel `--layers` times in a row (each layer's queries are the
previous layer's output, so nothing is folded away), over a [B, 3, capacity, 64] float32 cache, 9 query heads;
the query block of T tokens sits at positions [pos, pos + T). Reported: min and median ms of `--repeats` calls.
Kernel-only numbers, for before/after comparisons of `kernels/cpu_attention.cc` (docs/engine.md). `--out PREFIX`
writes PREFIX.json and PREFIX.md (`--note` goes into the markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.machine import machine_info
from eej.bench.report import markdown_table
from eej.kernels import cpu_attention


def _counts(text: str) -> list[int]:
    """"1,4" -> [1, 4]; anything but comma-separated integers of at least 1 is an argparse error (exit 2)."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 1, got {text!r}")
    return values


def time_case(b: int, t: int, pos: int, *, capacity: int, layers: int, repeats: int, hq: int = 9, hkv: int = 3,
              dh: int = 64) -> dict:
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((b, hkv, capacity, dh), np.float32))
    v = jnp.asarray(rng.standard_normal((b, hkv, capacity, dh), np.float32))
    q = jnp.asarray(rng.standard_normal((b, t, hq, dh), np.float32))
    positions = jnp.asarray(np.tile(np.arange(pos, pos + t, dtype=np.int32), (b, 1)))

    @jax.jit
    def run(q):
        return jax.lax.fori_loop(0, layers, lambda _, x: cpu_attention.attention(x, k, v, positions), q)

    run(q).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(q).block_until_ready()
        times.append(1e3 * (time.perf_counter() - start))
    return {"batch": b, "queries": t, "position": pos, "min_ms": min(times), "median_ms": float(np.median(times))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=_counts, default=[1, 4])
    parser.add_argument("--queries", type=_counts, default=[1, 2, 5])
    parser.add_argument("--positions", type=_counts, default=[100, 800])
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if min(args.capacity, args.layers, args.repeats) < 1:
        parser.error("--capacity, --layers and --repeats must be at least 1")
    if max(args.positions) + max(args.queries) > args.capacity:
        parser.error(f"--positions plus --queries must fit the --capacity of {args.capacity} slots")
    machine = machine_info()
    machine["load_average_start"] = list(os.getloadavg())
    rows = []
    for b in args.batches:
        for t in args.queries:
            for pos in args.positions:
                row = time_case(b, t, pos, capacity=args.capacity, layers=args.layers, repeats=args.repeats)
                rows.append(row)
                print(f"b={b} T={t} pos={pos}: min {row['min_ms']:.3f} ms, median {row['median_ms']:.3f} ms",
                      flush=True)
    machine["load_average_end"] = list(os.getloadavg())
    if args.out:
        command = " ".join(["python", "scripts/cpu_attention_probe.py", *(sys.argv[1:] if argv is None else argv)])
        result = {"machine": machine, "command": command, "capacity": args.capacity,
                  "layers": args.layers, "repeats": args.repeats, "rows": rows}
        with open(f"{args.out}.json", "w") as f:
            json.dump(result, f, indent=1)
        table = markdown_table(
            ("batch", "queries per row", "position", "min ms", "median ms"),
            [(str(r["batch"]), str(r["queries"]), str(r["position"]), f"{r['min_ms']:.3f}", f"{r['median_ms']:.3f}")
             for r in rows])
        lines = [f"# The CPU attention kernel alone ({args.layers} layers of SmolLM2-135M's attention, "
                 f"{args.capacity}-slot cache)", "", *([args.note, ""] if args.note else []),
                 f"`{result['command']}`; {machine['cpu']}, {machine['cpu_count']} CPUs, load average "
                 f"{machine['load_average_start'][0]:.2f} -> {machine['load_average_end'][0]:.2f}; ms per call of all "
                 f"{args.layers} layers, over {args.repeats} calls.", "", table]
        with open(f"{args.out}.md", "w") as f:
            f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
