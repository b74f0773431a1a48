#!/usr/bin/env python
"""Replay the adaptive draft-length controller on recorded drafting traces: what each policy would commit per step
and what it would cost, without re-running the model.

A method runs with a fixed K (`adaptive: false`; its confidence stop as configured) at batch 1 on prompts from the
*training* sets in ../shared/data/train (never the evaluation sets), and every decode step records the drafts each
row made (d) and the tokens it committed (a + 1, a accepted). Asking for k <= K drafts on that step would have made
min(d, k) drafts, committed min(a, k) + 1 tokens and cost c(min(d, k)) — the method's measured step-cost table (the
adaptive engine's own calibration on this machine). Under greedy decoding and under coupled sampling (the default,
docs/sampling.md) every policy commits the same text and a draft at a position is the same draw whatever k asked for
it, so the replay of a policy is exact in tokens per step (with XLA's matmul, `--kernels xla`, up to a rare near-tie
that rounds differently at another verification width); under `--residual-sampling` it is an approximation (a
shorter draft would have sampled differently). The controller is eej.decoding.adaptive's own: `Controller.decide` and `Controller.after`,
what every adaptive step calls, with `judged`; a free probe (Kangaroo) is scored by whether the trace's first draft
was accepted, and costs nothing extra here; any other probe is a real one-draft step.

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/controller_replay.py [--out benchmarks/results/controller_replay]
        [--kernels cpu] [--probe-every 1,8] [--carry] [--whether-then-k]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.machine import load_average, machine_info
from eej.bench.report import write_result
from eej.cli.options import add_residual_sampling_argument
from eej.config import SamplingConfig
from eej.decoding import adaptive, kangaroo, m2r2
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.weights.registry import load_model

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")
MODULES = {"kangaroo": kangaroo, "m2r2-spec": m2r2}
ADAPTIVE = ("adaptive", "whether")  # the replayed controller's policies (`replay`)


def training_prompts(per_set: int) -> dict[str, list[str]]:
    """Prompt sets from the training data: grade-school maths questions, code + role-play instructions, and requests
    to summarize a passage of Shakespeare (a long input the answer does not copy: drafts are rarely accepted)."""
    with open(os.path.join(TRAIN, "gsm8k_train.jsonl")) as f:
        math = [json.loads(line)["question"] for line in f][100:100 + per_set]
    chat = []
    for name in ("codegen-instruct.json", "roleplay-simple-deduped-roleplay-instruct.json"):
        with open(os.path.join(TRAIN, name)) as f:
            chat += [row["instruction"] for row in json.load(f)[200:200 + per_set // 2]]
    with open(os.path.join(TRAIN, "tinyshakespeare.txt")) as f:
        lines = f.read().split("\n")
    passages = ["Summarize the following passage in a few sentences.\n\n" + "\n".join(lines[1000 + 500 * i:1030 + 500 * i])
                for i in range(per_set)]
    return {"math": math, "code+roleplay": chat, "passages": passages}


def trace_rates(traces: list[list[tuple[int, int]]], max_k: int) -> dict[str, float]:
    """What traces recorded at K drafts say of each kind of draft: the first draft's acceptance, a draft's chance of
    being made and accepted after an accepted one (before the K-th: the controller's γ), and of being made at all
    after a draft (β) — counted as the controller counts them (`judged`, `split_judged`, `drafted_onward`)."""
    drafted, committed = (jnp.asarray([step[i] for t in traces for step in t]) for i in (0, 1))
    (first_hits, first_trials), (follow_hits, follow_trials) = adaptive.split_judged(*adaptive.judged(drafted, committed), max_k)
    went_on, could = adaptive.drafted_onward(drafted, max_k)

    def rate(hits, trials) -> float:
        return float(jnp.sum(hits) / jnp.maximum(jnp.sum(trials), 1.0))

    # with the confidence stop and K >= 2, a first draft short of the threshold is exactly a step's only draft
    sure = (drafted >= 2).astype(jnp.float32)
    return {"first_draft_acceptance": rate(first_hits, first_trials),
            "following_acceptance": rate(follow_hits, follow_trials), "continuation": rate(went_on, could),
            "unsure_first_acceptance": rate(first_hits * (1 - sure), first_trials * (1 - sure)),
            "confident_first_acceptance": rate(first_hits * sure, first_trials * sure),
            "confident_share": rate(first_trials * sure, first_trials)}


def record(model, method: str, prompts: list[str], temperature: float, max_new: int,
           coupled: bool = True) -> tuple[list, list[float], int, float | None]:
    """-> (one trace per prompt: [(drafted, committed)] per decode step, the step costs c(0..K) in ms, K, and for a
    method that gates its first draft the cost of a step that makes its first draft and drops it, else None)."""
    module = MODULES[method]
    strategy, method_params = build_method(model, method)
    sampling = SamplingConfig(temperature=temperature, coupled=coupled)
    encoded = [model.tokenizer.encode_chat(p) for p in prompts]
    adaptive_out = Engine(model, strategy, method_params).generate(encoded[:1], max_new_tokens=max_new, sampling=sampling)
    controller = adaptive_out.method_state["controller"]
    costs = np.asarray(controller.costs).tolist()  # calibrated on this machine
    guess_cost = float(controller.guess_cost) if strategy.free_probe else None
    steps: list[tuple[int, int]] = []
    real = module.judged

    def recording(drafted, counts):
        jax.debug.callback(lambda d, c: steps.append((int(d[0]), int(c[0]))), drafted, counts)
        return real(drafted, counts)

    module.judged = recording
    try:
        engine = Engine(model, dataclasses.replace(strategy, adaptive=False), method_params, share_programs=False)
        traces = []
        for prompt in encoded:
            steps.clear()
            out = engine.generate([prompt], max_new_tokens=max_new, sampling=sampling, seed=1)
            traces.append(list(steps[-out.steps:]))
    finally:
        module.judged = real
    return traces, costs, strategy.max_draft_steps, guess_cost


def replay(trace: list[tuple[int, int]], costs: list[float], max_new: int, policy: Any, decay: float,
           probe_every: int, free_probe: bool, learned: tuple | None = None,
           guess_cost: float | None = None) -> tuple[float, float, int, int, tuple]:
    """One prompt under `policy` (an int: that k every step; "adaptive": the controller; "whether": the controller
    deciding only whether to draft, then asking for K, the confidence stop choosing the length; "gated": the
    controller as a method that gates its first draft runs it, `SelfSpeculative.step`; "gated, sunk": the same with
    the second decision pricing k = 0 at what dropping the made drafts costs, `guess_cost`, not c(0)) -> (tokens, ms, steps,
    drafting steps, what the controller learned: the next prompt's start under --carry). `learned`: start from an
    earlier prompt's pooled estimates, as an engine's later generations do (else from the prior). `guess_cost`: what
    "gated" pays for a step that makes its first draft and drops it (default: c(0) plus `adaptive.MIN_DRAFT_COST`
    of it; the other policies score their free probes for nothing)."""
    if policy in ("gated", "gated, sunk"):
        guess_cost = costs[0] * (1.0 + adaptive.MIN_DRAFT_COST) if guess_cost is None else guess_cost
        return replay_gated(trace, costs, guess_cost, max_new, decay, probe_every, learned, policy == "gated, sunk")
    controller = _controller(costs, learned)
    row = jnp.asarray([True])
    tokens = spent = drafting = 0
    made = 1  # the prefill's token
    for drafted, committed in trace:
        probe = False
        if policy in ADAPTIVE:
            k, probe, backoff = controller.decide(row, jnp.asarray([max_new - made]), probe_every, free_probe)
            k, probe = int(k), bool(probe)
            k = len(costs) - 1 if policy == "whether" and k > 0 else k
        else:
            k = policy
        d = min(drafted, k)
        a = min(committed - 1, d)
        if policy in ADAPTIVE:
            new_hits, new_trials = adaptive.judged(jnp.asarray([d]), jnp.asarray([a + 1]))
            if free_probe and probe and d == k and a == d and drafted > k:  # the guess after the last committed token
                new_hits, new_trials = new_hits + float(committed - 1 > k), new_trials + 1.0
            controller = controller.after(k, probe, backoff, new_hits, new_trials, row, jnp.asarray([d]), decay)
        tokens, spent, drafting = tokens + a + 1, spent + costs[d], drafting + (k > 0)
        made += a + 1
    return tokens, spent, len(trace), drafting, tuple(float(x) for x in controller.pooled)


def _controller(costs: list[float], learned: tuple | None, **fields: Any) -> adaptive.Controller:
    """The batch-1 controller a replay starts from: the prior, or an earlier prompt's pooled estimates (`learned`)."""
    controller = adaptive.Controller.start(1, len(costs) - 1, tuple(costs)).replace(**fields)
    return controller if learned is None else controller.started_from_pooled(learned)


def replay_gated(trace: list[tuple[int, int]], costs: list[float], guess_cost: float, max_new: int, decay: float,
                 probe_every: int, learned: tuple | None = None,
                 sunk: bool = False) -> tuple[float, float, int, int, tuple]:
    """`replay` of the gated first draft: where the rule drafts, a probe is due or `Controller.gate_pays`, the first
    draft is made; the rule then decides again knowing whether it is confident — in a fixed-K trace with the
    confidence stop, a first draft is confident exactly where the step made more than one (`Controller.refined`) — and
    where that says 0 the draft is dropped (the step costs `guess_cost`) and scored as a probe. `sunk`: the second
    decision prices k = 0 at `guess_cost`, the made draft's cost sunk (not the engine's rule: docs/adaptive.md,
    "The two-row matmul path, end to end")."""
    controller = _controller(costs, learned, guess_cost=jnp.asarray(guess_cost))
    row = jnp.asarray([True])
    tokens = spent = drafting = 0
    made = 1  # the prefill's token
    for drafted, committed in trace:
        remaining = jnp.asarray([max_new - made])
        k, probe, backoff = controller.decide(row, remaining, probe_every, True)
        gate = int(k) == 0 and (bool(probe) or bool(controller.gate_pays(row, remaining)))
        confident = jnp.asarray([drafted >= 2])
        first_made = int(k) > 0 or gate  # the first draft is made: the rule drafts, or the gate opened
        if first_made:
            backoff = jnp.zeros((), jnp.int32) if gate and not bool(probe) else backoff
            second = controller.replace(costs=controller.costs.at[0].set(guess_cost)) if sunk else controller
            k = int(second.refined(confident, row, remaining))
        else:
            k = 0
        dropped = first_made and k == 0
        if dropped:  # scored against the step's token
            d, a, cost = 0, 0, guess_cost
            hits, trials = jnp.asarray([float(committed > 1)]), jnp.asarray([1.0])
        else:
            d = min(drafted, k)
            a = min(committed - 1, d)
            cost = costs[d]
            hits, trials = adaptive.judged(jnp.asarray([d]), jnp.asarray([a + 1]))
        controller = controller.after(k, dropped, backoff, hits, trials, row, jnp.asarray([d]), decay,
                                      confident=confident if first_made else None)
        tokens, spent, drafting = tokens + a + 1, spent + cost, drafting + (k > 0)
        made += a + 1
    return tokens, spent, len(trace), drafting, tuple(float(x) for x in controller.pooled)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="kangaroo,m2r2-spec")
    ap.add_argument("--temperatures", default="0.0,0.7")
    ap.add_argument("--decays", default="0.8,0.9,0.95,0.98", help="the controller's per-draft decay, comma-separated")
    ap.add_argument("--per-set", type=int, default=8, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--probe-every", default="", help="adaptive policies' probe intervals, comma-separated (default: "
                    "the method's own)")
    ap.add_argument("--carry", action="store_true", help="also replay each set's prompts in order on one controller, "
                    "each starting from what the last one learnt (an engine's later generations do)")
    ap.add_argument("--whether-then-k", action="store_true", help="also replay each adaptive policy deciding only "
                    "whether to draft, then asking for K (the confidence stop choosing the length)")
    ap.add_argument("--kernels", choices=("xla", "cpu"), default="xla", help="the model's kernels (their step costs "
                    "differ: eej generate and eej bench use cpu on a CPU)")
    add_residual_sampling_argument(ap)
    ap.add_argument("--out", default="benchmarks/results/controller_replay")
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in MODULES]
    if unknown:
        print(f"error: --methods takes {', '.join(MODULES)} (got {', '.join(unknown)})", file=sys.stderr)
        return 2
    load_start = load_average()
    model = load_model("smollm2-135m", kernels=args.kernels)
    sets = training_prompts(args.per_set)
    decays = [float(x) for x in args.decays.split(",")]
    rows = []
    for method in args.methods.split(","):
        strategy, _ = build_method(model, method)
        for temperature in (float(t) for t in args.temperatures.split(",")):
            recorded = {name: record(model, method, prompts, temperature, args.max_new_tokens,
                                      not args.residual_sampling) for name, prompts in sets.items()}
            if args.carry:  # the sets' prompts in turn: what carrying an estimate across unlike prompts does
                traces_by_set = [traces for traces, _, _, _ in recorded.values()]
                _, costs, max_k, guess_cost = next(iter(recorded.values()))
                recorded["alternating"] = ([t for turn in zip(*traces_by_set) for t in turn], costs, max_k, guess_cost)
            for set_name, (traces, costs, max_k, guess_cost) in recorded.items():
                rates = trace_rates(traces, max_k)
                print(method, temperature, set_name, {k: round(v, 3) for k, v in rates.items()}, flush=True)
                probes = [int(x) for x in args.probe_every.split(",") if x] or [strategy.probe_every]
                policies = [(f"fixed k={k}", k, adaptive.DECAY, strategy.probe_every, False) for k in range(max_k + 1)]
                policies += [(f"adaptive, decay {d}" + (f", probe every {n}" if args.probe_every else ""), "adaptive", d, n, False)
                             for d in decays for n in probes]
                if strategy.free_probe:
                    policies += [(label + ", gated first draft" + sunk, "gated" + sunk, d, n, False)
                                 for label, policy, d, n, _ in list(policies) if policy == "adaptive"
                                 for sunk in ("", ", sunk")]
                if args.whether_then_k:
                    policies += [(label + ", whether then K", "whether", d, n, False)
                                 for label, policy, d, n, _ in list(policies) if policy == "adaptive"]
                if args.carry:
                    policies += [(label + ", carried", policy, d, n, True)
                                 for label, policy, d, n, _ in list(policies) if policy in ADAPTIVE]
                for label, policy, decay, probe_every, carry in policies:
                    got, learned = [], None
                    for t in traces:
                        got.append(replay(t, costs, args.max_new_tokens, policy, decay, probe_every, strategy.free_probe,
                                          learned, guess_cost))
                        learned = got[-1][4] if carry else None
                    tokens, spent, steps, drafting = (sum(x) for x in list(zip(*got))[:4])
                    rows.append({"method": method, "temperature": temperature, "prompts": set_name, "policy": label,
                                 "speed_vs_plain_steps": tokens / spent * costs[0], "tokens_per_step": tokens / steps,
                                 "drafting_fraction": drafting / steps, "steps": steps, "step_costs_ms": costs,
                                 "dropped_draft_step_ms": guess_cost,
                                 "trace_rates": rates})
                    print(method, temperature, set_name, label, f"{rows[-1]['speed_vs_plain_steps']:.3f}", flush=True)
    doc = {"command": "scripts/controller_replay.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
           "model": "smollm2-135m", "max_new_tokens": args.max_new_tokens, "prompts_per_set": args.per_set,
           "default_decay": adaptive.DECAY, "coupled": not args.residual_sampling, "rows": rows}
    lines = ["# Controller replay on recorded drafting traces (batch 1; training-set prompts)", "",
             f"`{doc['command']}`; {doc['machine'].get('cpu', '')}; load average {load_start} -> {doc['load_average_end']}. "
             "Speed: committed tokens per ms by the measured step costs, against plain steps of the same method "
             "(c(0)); exact in tokens under greedy and " + ("approximate under residual-rule sampling" if args.residual_sampling
                                                     else "coupled sampling") + " (see the script's docstring).", "",
             "Each set's drafts as the fixed-K traces recorded them (first: the first draft's acceptance, and of first "
             "drafts short of the confidence threshold and at it, with the share at it; following: made and accepted "
             "after an accepted draft, the controller's γ; onward: made after a draft, β):", "",
             "| method | temp | prompts | first | first, unsure | first, confident | confident share | following | onward |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = {}
    for r in rows:
        seen.setdefault((r["method"], r["temperature"], r["prompts"]), r["trace_rates"])
    lines += [f"| {m} | {t} | {p} | {v['first_draft_acceptance']:.3f} | {v['unsure_first_acceptance']:.3f} | "
              f"{v['confident_first_acceptance']:.3f} | {v['confident_share']:.3f} | {v['following_acceptance']:.3f} | "
              f"{v['continuation']:.3f} |" for (m, t, p), v in seen.items()]
    lines += ["",
             "| method | temp | prompts | policy | speed vs plain steps | tokens/step | drafting |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['temperature']} | {r['prompts']} | {r['policy']} | {r['speed_vs_plain_steps']:.3f}x "
              f"| {r['tokens_per_step']:.2f} | {r['drafting_fraction']:.2f} |" for r in rows]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
