"""What Kangaroo's "free" probe costs: its plain step (k = 0) with and without the probe, against plain decoding.

While the adaptive controller takes plain steps it keeps its acceptance estimate fresh with a probe every
`probe_every` steps (eej.decoding.adaptive): Kangaroo's adapter and draft head guess the next token from the
residual stream the plain step computes anyway, and the guess is scored against the step's own token. This times
the compiled decode loop with every step a plain step, once without a probe and once with a probe on every step
(the controller's choice replaced for the measurement), interleaved round by round with plain decoding. Run it
alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/free_probe_cost.py --batch 1 --out benchmarks/results/free_probe_cost_b1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.config import SamplingConfig
from eej.decoding import adaptive
from eej.decoding.engine import Engine, _decode_loop
from eej.decoding.methods import build_method
from eej.weights.registry import load_model

STEPS, MAX_NEW, PROMPT = 48, 128, 100


def plain_steps(probe: bool):
    """A `Controller.decide` that always takes a plain step, probing on every one or on none."""
    decide = adaptive.Controller.decide

    def plain(self, active, remaining, probe_every, free_probe):
        k, _, backoff = decide(self, active, remaining, probe_every, free_probe)
        return jnp.zeros_like(k), jnp.asarray(probe), backoff

    return plain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/free_probe_cost")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.temperature < 0:
        parser.error("--batch and --rounds must be >= 1, --temperature >= 0")
    load_start = load_average()
    model = load_model("smollm2-135m", kernels="auto")
    strategy, method_params = build_method(model, "kangaroo")
    strategy = dataclasses.replace(strategy, step_costs=(1.0,) * (strategy.max_draft_steps + 1))  # no calibration
    sampling = SamplingConfig(temperature=args.temperature)
    prompts = [list(range(100 + b, 100 + b + PROMPT)) for b in range(args.batch)]
    runs, decide = {}, adaptive.Controller.decide
    try:
        for name, probe in (("plain decoding", None), ("kangaroo, plain step", False), ("kangaroo, plain step + probe", True)):
            adaptive.Controller.decide = decide if probe is None else plain_steps(probe)  # read when the loop is traced
            engine = Engine(model) if probe is None else Engine(model, strategy, method_params)
            state, static, _, _ = engine._prefill(prompts, MAX_NEW, sampling, 0, ())
            loop, _ = engine._get("loop", _decode_loop, static, (engine.model.params, engine.method_params, state),
                                  donate=(2,), batch=args.batch)

            def run(engine=engine, loop=loop, state=state) -> float:
                s = jax.tree.map(jnp.copy, state).replace(steps=jnp.full((), MAX_NEW - STEPS, jnp.int32))
                start = time.perf_counter()
                jax.block_until_ready(loop(engine.model.params, engine.method_params, s))
                return 1e3 * (time.perf_counter() - start) / STEPS

            run()  # compiles
            runs[name] = run
    finally:
        adaptive.Controller.decide = decide
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    plain = float(np.median(times["plain decoding"]))
    rows = [{"contestant": name, "ms_per_step": float(np.median(ms)), "min_ms": float(np.min(ms)),
             "vs_plain": float(np.median(ms)) / plain} for name, ms in times.items()]
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()}
    doc = {"command": "scripts/free_probe_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine, "model": "smollm2-135m", "batch": args.batch, "temperature": args.temperature,
           "prompt_tokens": PROMPT, "steps_per_run": STEPS, "rounds": args.rounds, "rows": rows}
    lines = [f"# Kangaroo's plain step with and without a free probe (batch {args.batch}, "
             f"{'greedy' if sampling.greedy else f'temperature {args.temperature}'})", "",
             f"`{doc['command']}`; {machine['cpu']}, {machine['cpu_count']} CPUs, load average {load_start} -> "
             f"{machine['load_average_end']}; median (and minimum) of {args.rounds} interleaved rounds of {STEPS} steps "
             f"after a {PROMPT}-token prompt; eej's CPU kernels where they apply.", "",
             markdown_table(["contestant", "ms/step", "min ms", "vs plain"],
                            [[r["contestant"], f"{r['ms_per_step']:.2f}", f"{r['min_ms']:.2f}", f"{r['vs_plain']:.3f}x"]
                             for r in rows])]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
