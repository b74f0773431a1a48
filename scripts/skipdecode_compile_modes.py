#!/usr/bin/env python
"""Which way of skipping a changing layer band inside one compiled loop is fastest: cond, switch or dynamic.

SkipDecode's layer count changes with the generation index inside the engine's single while_loop.
This runs the same schedule with each implementation of `SkipDecode` (see eej/decoding/skipdecode.py)
and plain decoding under the bench protocol (eej.bench.runner: the first N MT-Bench questions, both
turns), greedy, EOS ignored (every run does the same work), the interleaved run repeated --rounds
times; compile time is reported apart. All implementations must give the same tokens.

Two reference schedules bound what skipping can give on this machine: `static-K` runs a constant
K layers per step (K = the preset's mean, rounded; nothing conditional: the cost of the layers
alone) and `static-1` runs one layer (what a step costs besides the layers: embedding, LM head,
sampling, loop).

    python scripts/skipdecode_compile_modes.py [--preset 2x-untuned] [--prompts 8] [--max-new-tokens 128]
        [--rounds 3] [--batch-sizes 1,8] [--out benchmarks/results/skipdecode_compile_modes]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from eej.bench.contestants import MethodContestant
from eej.bench.machine import machine_info
from eej.bench.metrics import decode_tokens_per_second, tokens_per_second
from eej.bench.questions import SPEC_BENCH, mt_bench_questions
from eej.bench.report import write_result
from eej.bench.runner import RunSettings, run_bench
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.decoding.skipdecode import IMPLEMENTATIONS, SkipDecode, SkipSchedule
from eej.weights.registry import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", default=SPEC_BENCH)
    ap.add_argument("--preset", default="2x-untuned")
    ap.add_argument("--prompts", type=int, default=8, help="MT-Bench questions (one of each category in turn)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--note", default="rounds interleaved: ratios are side by side; say here whether the machine was shared")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "skipdecode_compile_modes"))
    args = ap.parse_args()

    model = load_model(args.model, kernels="xla")
    questions = mt_bench_questions(args.questions, args.prompts)
    strategy, method_params = build_method(model, f"skipdecode:{args.preset}")
    n = args.max_new_tokens
    mean_layers = round(strategy.schedule.average_layers(n - 1))
    engines = {impl: Engine(model, dataclasses.replace(strategy, implementation=impl), method_params) for impl in IMPLEMENTATIONS}
    engines[f"static-{mean_layers}"] = Engine(model, SkipDecode(SkipSchedule(strategy.schedule.warmup_layers, (mean_layers,))))
    engines["static-1"] = Engine(model, SkipDecode(SkipSchedule(0, (1,))))
    contestants = [MethodContestant(model, "plain"),
                   *[MethodContestant(model, "skipdecode", engine=engine, name=name) for name, engine in engines.items()]]

    results, compile_s, same, layers = {}, dict.fromkeys([c.name for c in contestants], 0.0), True, {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        records, compiled = run_bench(contestants, questions, model.tokenizer, RunSettings(n, bs, ignore_eos=True, rounds=args.rounds))
        by_name = {c.name: [r for r in records if r.contestant == c.name] for c in contestants}
        same &= all([r.tokens for r in by_name[impl]] == [r.tokens for r in by_name[IMPLEMENTATIONS[0]]] for impl in IMPLEMENTATIONS)
        plain_tps, plain_dtps = tokens_per_second(by_name["plain"]), decode_tokens_per_second(by_name["plain"])
        results[str(bs)] = {}
        for name, rows in by_name.items():
            compile_s[name] += compiled[name]
            layers[name] = sum(r.layers for r in rows) / sum(len(r.tokens) - 1 for r in rows)
            tps, dtps = tokens_per_second(rows), decode_tokens_per_second(rows)
            results[str(bs)][name] = {"tokens_per_second": tps, "decode_tokens_per_second": dtps,
                                      "speedup_vs_plain": tps / plain_tps, "decode_speedup_vs_plain": dtps / plain_dtps}
        print(f"batch {bs} done", flush=True)
    report = {
        "benchmark": "SkipDecode band-skipping implementations (one compiled loop)",
        "model": f"{args.model} ({model.cfg.dtype})",
        "machine": machine_info(),
        "note": args.note,
        "settings": {
            "preset": args.preset, "schedule": dataclasses.asdict(strategy.schedule), "prompts": len(records) // len(contestants),
            "max_new_tokens": n, "rounds": args.rounds, "greedy": True, "eos": "ignored",
        },
        "layers_per_step": layers,
        "identical_tokens_across_implementations": same,
        "compile_seconds": compile_s,
        "results": results,
    }
    write_result(report, render_markdown(report), args.out)
    print(render_markdown(report))


def render_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# {report['benchmark']}",
        "",
        f"Model {report['model']}, preset `{s['preset']}` (mean {report['layers_per_step']['cond']:.2f} layers per decode step), "
        f"{s['prompts']} Spec-Bench prompts, {s['max_new_tokens']} new tokens (EOS ignored), greedy, {s['rounds']} interleaved rounds. "
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, jax {m['jax']}. {report['note']}.",
        "",
        f"Identical tokens across implementations: {report['identical_tokens_across_implementations']}.",
        "",
        "| batch | method | tokens/s | decode tokens/s | speedup vs plain | decode speedup | compile s (all shapes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for bs, row in report["results"].items():
        for name, r in row.items():
            lines.append(
                f"| {bs} | {name} | {r['tokens_per_second']:.1f} | {r['decode_tokens_per_second']:.1f} | "
                f"{r['speedup_vs_plain']:.2f} | {r['decode_speedup_vs_plain']:.2f} | {report['compile_seconds'][name]:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
