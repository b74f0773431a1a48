"""A queue of prompts against batches of them: plain decoding and the speculative methods, on the real model.

`eej bench` answers its questions in fixed batches: a batch runs until its longest answer ends, so a row whose
answer ends early idles, and a method that makes some rows faster gains nothing until the last row of the batch is
faster too. `Engine.generate(..., batch_size=B)` keeps B rows busy instead: a prompt waiting in the queue takes the
row of the first answer to end (continuous batching), and the adaptive methods weigh the batch's throughput while
prompts wait. This script times both schedules for every contestant on the same prompts (the first turn of each
question, chat template, in `eej bench`'s batch order: categories kept together, shortest prompts first), rounds
interleaved with the contestants' order rotating, and checks every contestant's tokens against plain decoding's in
the same schedule. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/queue_bench.py --methods plain,again=plain,kangaroo \\
        --temperature 0.7 --draws 2 --out benchmarks/results/queue_spec_bench_t0.7_b4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from eej.bench.contestants import labelled_spec, unique
from eej.bench.machine import load_average, machine_info
from eej.bench.questions import load_questions, select_questions, with_draws
from eej.bench.report import markdown_table, write_result
from eej.bench.runner import plan_batches
from eej.config import SamplingConfig
from eej.decoding.engine import Engine, GenerationOutput
from eej.decoding.methods import build_method
from eej.weights.registry import load_model

SCHEDULES = ("batches", "queue")


def run_schedule(engine: Engine, prompts: list[list[int]], schedule: str, batch_size: int, max_new: int,
                 sampling: SamplingConfig, seed: int) -> dict[str, Any]:
    """One contestant's pass over `prompts`: fixed batches of `batch_size` in order, or one queue of them."""
    if schedule == "queue":
        outs = [engine.generate(prompts, max_new, sampling, seed=seed, batch_size=batch_size)]
    else:
        outs = [engine.generate(prompts[i : i + batch_size], max_new, sampling, seed=seed)
                for i in range(0, len(prompts), batch_size)]
    return summary(outs)


def summary(outs: list[GenerationOutput]) -> dict[str, Any]:
    """What a pass took (compile excluded) and did, over its generate calls."""
    tokens = [t for out in outs for t in out.tokens]
    return {"tokens": tokens, "new_tokens": sum(len(t) for t in tokens),
            "seconds": sum(out.seconds for out in outs), "prefill_seconds": sum(out.prefill_seconds for out in outs),
            "loop_steps": sum(out.steps for out in outs), "row_steps": sum(sum(out.row_steps) for out in outs),
            "speculated_steps": sum(sum(out.speculated_steps) for out in outs),
            "forwards": sum(sum(out.forwards) for out in outs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", default="../shared/data/eval/spec_bench.jsonl")
    parser.add_argument("--mt-bench-categories", default="auto")
    parser.add_argument("--methods", default="plain,again=plain,kangaroo")
    parser.add_argument("--limit", type=int, default=4, help="questions per category")
    parser.add_argument("--draws", type=int, default=1, help="answers per question (sampling only)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True, help="result prefix: PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    for name in ("limit", "draws", "batch_size", "max_new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    specs = dict(labelled_spec(s) for s in unique(args.methods.split(","), "--methods"))
    if specs.get("plain") != "plain":
        parser.error("--methods must hold plain (the baseline)")
    load_start = load_average()
    model = load_model(args.model)
    sampling = SamplingConfig(temperature=args.temperature)
    questions = with_draws(select_questions(load_questions(args.questions, args.mt_bench_categories), limit=args.limit),
                           args.draws, sampling.greedy)
    order = [q for batch in plan_batches(questions, args.batch_size, model.tokenizer) for q in batch]
    prompts = [model.tokenizer.encode_chat(q.turns[0]) for q in order]
    engines = {name: Engine(model, *build_method(model, spec)) for name, spec in specs.items()}
    for name, engine in engines.items():  # compile every shape a pass uses, off the clock
        for schedule in SCHEDULES:
            run_schedule(engine, prompts, schedule, args.batch_size, args.max_new_tokens, sampling, args.seed)
        print(f"warmed up {name}", file=sys.stderr)
    names = list(engines)
    passes: dict[tuple[str, str], list[dict[str, Any]]] = {(n, s): [] for n in names for s in SCHEDULES}
    for r in range(args.rounds):
        rotated = names[r % len(names):] + names[: r % len(names)]
        for name in rotated:
            for schedule in (SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]):
                start = time.perf_counter()
                result = run_schedule(engines[name], prompts, schedule, args.batch_size, args.max_new_tokens, sampling,
                                      args.seed)
                result["wall_seconds"] = time.perf_counter() - start
                passes[(name, schedule)].append(result)
                print(f"round {r + 1} {name} {schedule}: {result['seconds']:.1f} s", file=sys.stderr)
    rows = []
    for schedule in SCHEDULES:
        plain = passes[("plain", schedule)]
        for name in names:
            runs = passes[(name, schedule)]
            first = runs[0]
            speedups = [p["seconds"] / m["seconds"] for p, m in zip(plain, runs)]
            over_batches = [b["seconds"] / m["seconds"] for b, m in zip(passes[(name, "batches")], runs)]
            rows.append({
                "contestant": name, "method": specs[name], "schedule": schedule,
                "tokens_per_second": [m["new_tokens"] / m["seconds"] for m in runs],
                "speedup_median": statistics.median(speedups), "speedups": speedups,
                "over_batches_median": statistics.median(over_batches), "over_batches": over_batches,
                "identical_rate": sum(a == b for a, b in zip(first["tokens"], plain[0]["tokens"])) / len(prompts),
                "new_tokens": first["new_tokens"], "loop_steps": first["loop_steps"],
                "prefill_share": statistics.median(m["prefill_seconds"] / m["seconds"] for m in runs),
                "speculated_share": first["speculated_steps"] / max(first["row_steps"], 1),
                "tokens_per_forward": (first["new_tokens"] - len(prompts)) / max(first["forwards"] - len(prompts), 1),
                "seconds": [m["seconds"] for m in runs],
            })
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()}
    command = "scripts/queue_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command, "model": args.model, "questions": args.questions, "prompts": len(prompts),
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
           "rounds": args.rounds, "kernels": [model.cfg.matmul_impl, model.cfg.attention_impl], "machine": machine,
           "rows": rows}
    table = markdown_table(
        ["schedule", "contestant", "tokens/s (median)", "speedup over plain (rounds)", "over its batches",
         "identical", "loop steps", "drafted", "tokens per forward", "prefill share"],
        [[r["schedule"], r["contestant"], f"{statistics.median(r['tokens_per_second']):.1f}",
          f"{r['speedup_median']:.3f}x ({', '.join(f'{s:.3f}' for s in r['speedups'])})",
          f"{r['over_batches_median']:.3f}x", f"{r['identical_rate']:.3f}", str(r["loop_steps"]),
          f"{r['speculated_share']:.0%}", f"{r['tokens_per_forward']:.2f}", f"{r['prefill_share']:.0%}"]
         for r in rows])
    lines = [f"# A queue of prompts against batches: {args.model}, batch {args.batch_size}, temperature {args.temperature}",
             "", f"`{command}`; {machine.get('cpu', '')}; load average {load_start} -> {machine['load_average_end']}; "
             f"matmul {model.cfg.matmul_impl}, attention {model.cfg.attention_impl}; {len(prompts)} prompts (first "
             f"turns), up to {args.max_new_tokens} new tokens; {args.rounds} interleaved rounds, compile excluded. "
             "Speedup: plain's seconds over the contestant's in the same round and schedule (median, then each round); "
             "over its batches: the contestant's batches' seconds over its queue's (1.000 for the batches rows).", "",
             table]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
