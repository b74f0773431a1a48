#!/usr/bin/env python
"""Which way of skipping a changing layer band inside one compiled loop is fastest: cond, switch or dynamic.

SkipDecode's layer count changes with the generation index inside the engine's single while_loop.
This runs the same schedule with each implementation of `SkipDecode` (see eej/decoding/skipdecode.py)
and plain decoding, greedy, EOS ignored (every run does the same work), rounds interleaved so machine
drift hits all alike; compile time is reported apart. All implementations must give the same tokens.

Two reference schedules bound what skipping can give on this machine: `static-K` runs a constant
K layers per step (K = the preset's mean, rounded; nothing conditional: the cost of the layers
alone) and `static-1` runs one layer (what a step costs besides the layers: embedding, LM head,
sampling, loop).

    python scripts/skipdecode_compile_modes.py [--preset 2x-untuned] [--prompts 8] [--max-new-tokens 128]
        [--rounds 3] [--out benchmarks/results/skipdecode_compile_modes]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_plain import DEFAULT_QUESTIONS, load_prompts  # noqa: E402

from eej.bench.machine import machine_info  # noqa: E402
from eej.config import SamplingConfig  # noqa: E402
from eej.decoding.engine import Engine  # noqa: E402
from eej.decoding.skipdecode import IMPLEMENTATIONS, SkipDecode, SkipSchedule, build_skipdecode  # noqa: E402
from eej.weights.registry import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default=DEFAULT_QUESTIONS)
    ap.add_argument("--preset", default="2x-untuned")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--note", default="rounds interleaved: ratios are side by side; say here whether the machine was shared")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "results", "skipdecode_compile_modes"))
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    model = load_model("smollm2-135m")
    tok = model.tokenizer
    prompts = sorted((tok.encode_chat(t) for t in load_prompts(args.questions, args.prompts)), key=len)
    strategy, method_params = build_skipdecode(model, args.preset)
    engines = {"plain": Engine(model)}
    for impl in IMPLEMENTATIONS:
        engines[impl] = Engine(model, dataclasses.replace(strategy, implementation=impl), method_params)
    n, greedy = args.max_new_tokens, SamplingConfig()
    mean_layers = round(strategy.schedule.average_layers(n - 1))
    engines[f"static-{mean_layers}"] = Engine(model, SkipDecode(SkipSchedule(strategy.schedule.warmup_layers, (mean_layers,))))
    engines["static-1"] = Engine(model, SkipDecode(SkipSchedule(0, (1,))))

    def batches(bs: int) -> list[list[list[int]]]:
        return [prompts[i : i + bs] for i in range(0, len(prompts), bs) if len(prompts[i : i + bs]) == bs]

    compile_s = {name: 0.0 for name in engines}
    tokens: dict[str, list] = {}
    for name, engine in engines.items():
        for bs in batch_sizes:
            for group in batches(bs):
                out = engine.generate(group, n, greedy, eos_ids=())
                compile_s[name] += out.compile_seconds
                if bs == batch_sizes[0]:
                    tokens.setdefault(name, []).extend(out.tokens)
    same = all(tokens[impl] == tokens[IMPLEMENTATIONS[0]] for impl in IMPLEMENTATIONS)

    runs = {name: {bs: {"tokens": 0, "seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0} for bs in batch_sizes} for name in engines}
    layers = {}
    for r in range(args.rounds):
        for bs in batch_sizes:
            for group in batches(bs):
                for name, engine in engines.items():
                    out = engine.generate(group, n, greedy, eos_ids=())
                    rec = runs[name][bs]
                    rec["tokens"] += sum(out.new_tokens)
                    rec["seconds"] += out.seconds
                    rec["decode_tokens"] += sum(out.new_tokens) - bs
                    rec["decode_seconds"] += out.decode_seconds
                    layers[name] = out.layers[0] / max(1, out.new_tokens[0] - 1)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    results = {}
    for bs in batch_sizes:
        plain = runs["plain"][bs]
        row = {}
        for name in engines:
            rec = runs[name][bs]
            tps = rec["tokens"] / rec["seconds"]
            dtps = rec["decode_tokens"] / rec["decode_seconds"]
            row[name] = {
                "tokens_per_second": tps,
                "decode_tokens_per_second": dtps,
                "speedup_vs_plain": tps / (plain["tokens"] / plain["seconds"]),
                "decode_speedup_vs_plain": dtps / (plain["decode_tokens"] / plain["decode_seconds"]),
            }
        results[str(bs)] = row
    report = {
        "benchmark": "SkipDecode band-skipping implementations (one compiled loop)",
        "model": "smollm2-135m (float32)",
        "machine": machine_info(),
        "note": args.note,
        "settings": {
            "preset": args.preset, "schedule": dataclasses.asdict(strategy.schedule), "prompts": len(prompts),
            "max_new_tokens": n, "rounds": args.rounds, "greedy": True, "eos": "ignored",
        },
        "layers_per_step": layers,
        "identical_tokens_across_implementations": same,
        "compile_seconds": compile_s,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = render_markdown(report)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


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
