"""What RMSNorm's fixed-order row sum (eej.model.transformer.row_sum) costs plain decoding's step, against XLA's own
reduction (`jnp.mean`, what the norm used before: faster to write, but its order depends on how many rows share the
step), at batch 1 and 4 on the real model, interleaved round by round. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/row_sum_cost.py --out benchmarks/results/row_sum_cost
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax.numpy as jnp
from jax import lax

from eej.bench.loop_timer import decode_loop_timer
from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.model import transformer
from eej.weights.registry import load_model

STEPS, MAX_NEW = 48, 64
PROMPTS = ("Write a short poem about the sea.", "List three prime numbers.", "Explain how a bicycle gear works.", "Hi!")


def xla_reduction_norm(x, weight, eps):
    """RMSNorm as it was: XLA's reduction over the last axis (its order chosen by shape)."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/row_sum_cost")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    load_start = load_average()
    model = load_model("smollm2-135m")
    fixed_order = transformer.rms_norm
    rows = []
    for batch in (1, 4):
        prompts = [model.tokenizer.encode_chat(text) for text in PROMPTS[:batch]]
        runs = {}
        for name, norm in (("row_sum (now)", fixed_order), ("XLA reduction (before)", xla_reduction_norm)):
            transformer.rms_norm = norm  # what the engine's programs trace (compiled here, before the timing)
            try:
                runs[name] = decode_loop_timer(Engine(model, share_programs=False), prompts, MAX_NEW, STEPS, SamplingConfig())[0]
            finally:
                transformer.rms_norm = fixed_order
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(run())
        for name, ms in times.items():
            rows.append({"batch": batch, "norm": name, "ms_per_step_median": statistics.median(ms), "ms_per_step_min": min(ms)})
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()}
    doc = {"command": "scripts/row_sum_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": "smollm2-135m", "kernels": [model.cfg.matmul_impl, model.cfg.attention_impl], "steps": STEPS,
           "rounds": args.rounds, "machine": machine, "rows": rows}
    lines = ["# RMSNorm's fixed-order row sum: plain decoding's step", "",
             f"`{doc['command']}`; {machine.get('cpu', '')}; load average {load_start} -> {machine['load_average_end']}; "
             f"matmul {model.cfg.matmul_impl}, attention {model.cfg.attention_impl}; median (and minimum) of "
             f"{args.rounds} interleaved rounds of {STEPS} greedy steps.", "",
             markdown_table(["batch", "norm", "ms per step (median)", "minimum"],
                            [[str(r["batch"]), r["norm"], f"{r['ms_per_step_median']:.2f}", f"{r['ms_per_step_min']:.2f}"]
                             for r in rows])]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
