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
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eej.kernels import cpu_attention


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=_ints, default=[1, 4])
    parser.add_argument("--queries", type=_ints, default=[1, 2, 5])
    parser.add_argument("--positions", type=_ints, default=[100, 800])
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    load_start = os.getloadavg()
    rows = []
    for b in args.batches:
        for t in args.queries:
            for pos in args.positions:
                row = time_case(b, t, pos, capacity=args.capacity, layers=args.layers, repeats=args.repeats)
                rows.append(row)
                print(f"b={b} T={t} pos={pos}: min {row['min_ms']:.3f} ms, median {row['median_ms']:.3f} ms",
                      flush=True)
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": "cpu",
                   "load_average_start": load_start, "load_average_end": os.getloadavg()}
        result = {"machine": machine, "command": " ".join(["python"] + sys.argv), "capacity": args.capacity,
                  "layers": args.layers, "repeats": args.repeats, "rows": rows}
        with open(f"{args.out}.json", "w") as f:
            json.dump(result, f, indent=1)
        lines = [f"# The CPU attention kernel alone ({args.layers} layers of SmolLM2-135M's attention, "
                 f"{args.capacity}-slot cache)", "", args.note, "",
                 f"`{result['command']}`; {cpu}, {os.cpu_count()} CPUs, load average {load_start[0]:.2f} -> "
                 f"{machine['load_average_end'][0]:.2f}; ms per call of all {args.layers} layers, over "
                 f"{args.repeats} calls.", "", "| batch | queries per row | position | min ms | median ms |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['queries']} | {r['position']} | {r['min_ms']:.3f} | {r['median_ms']:.3f} |"
                  for r in rows]
        with open(f"{args.out}.md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
