"""What adaptive Kangaroo's step costs beyond the fixed one's: its plain step with and without the "free" probe, and
four drafts chosen by the controller against four drafts every step, each against plain decoding.

While the adaptive controller takes plain steps it keeps its acceptance estimate fresh with a probe every
`probe_every` steps (eej.decoding.adaptive): Kangaroo's adapter and draft head guess the next token from the
residual stream the plain step computes anyway, and the guess is scored against the step's own token. When it drafts,
its step carries the controller's bookkeeping and a traced draft length. This times the compiled decode loops of:

- plain decoding;
- adaptive Kangaroo, every step a plain step, without a probe and with a probe on every step (the controller's
  choice replaced for the measurement);
- Kangaroo with `adaptive: false` and no confidence stop (four drafts every step), and adaptive Kangaroo forced to
  four drafts (the calibration's forcing, which has no confidence stop either): the same drafts and verification;

interleaved round by round. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/kangaroo_step_overhead.py --batch 1 --out benchmarks/results/kangaroo_step_overhead_b1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

from eej.bench.loop_timer import decode_loop_timer
from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.config import SamplingConfig
from eej.decoding import adaptive
from eej.decoding.engine import Engine
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


def forced(k: int):
    """The calibration's edit of the method state that makes every step draft k, with no confidence stop."""
    return lambda state: {**state, "controller": state["controller"].replace(force=jnp.full((), k, jnp.int32))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/kangaroo_step_overhead")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.temperature < 0:
        parser.error("--batch and --rounds must be >= 1, --temperature >= 0")
    load_start = load_average()
    model = load_model("smollm2-135m", kernels="auto")
    strategy, method_params = build_method(model, "kangaroo")
    K = strategy.max_draft_steps
    adaptive_strategy = dataclasses.replace(strategy, step_costs=(1.0,) * (K + 1))  # given: no calibration run
    fixed = dataclasses.replace(strategy, adaptive=False, exit_threshold=0.0)
    sampling = SamplingConfig(temperature=args.temperature)
    prompts = [list(range(100 + b, 100 + b + PROMPT)) for b in range(args.batch)]
    contestants = [  # name, strategy (None: plain decoding), Controller.decide while tracing, method-state edit
        ("plain decoding", None, None, None),
        ("kangaroo, plain step", adaptive_strategy, plain_steps(False), None),
        ("kangaroo, plain step + probe", adaptive_strategy, plain_steps(True), None),
        (f"kangaroo fixed, {K} drafts", fixed, None, None),
        (f"kangaroo adaptive, forced to {K} drafts", adaptive_strategy, None, forced(K)),
    ]
    runs, decide = {}, adaptive.Controller.decide
    try:
        for name, strat, replaced, edit in contestants:
            adaptive.Controller.decide = replaced or decide  # read when the loop is traced, below
            engine = Engine(model) if strat is None else Engine(model, strat, method_params)
            run, _ = decode_loop_timer(engine, prompts, MAX_NEW, STEPS, sampling, edit)
            run()  # the first call of a compiled program is not representative
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
    doc = {"command": "scripts/kangaroo_step_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine, "model": "smollm2-135m", "batch": args.batch, "temperature": args.temperature,
           "prompt_tokens": PROMPT, "steps_per_run": STEPS, "rounds": args.rounds, "rows": rows}
    lines = [f"# Adaptive Kangaroo's step against the fixed one's and plain decoding's (batch {args.batch}, "
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
