#!/usr/bin/env python
"""Layers as calls to one nested program (`eej.model.transformer.traced_once`) against every layer traced inline.

In one process, for each method and batch size: an engine built each way (`traced_once` swapped for the plain `block`
while the other engine is built), the seconds its first generation took (tracing, lowering and XLA's compile: the
compile cache is off), then interleaved timed generations of both (the order alternating each round), and whether both
decoded the same tokens. The inline engine is built first, so the process's one-time costs (the first method's
plain decoding, batch 1) fall on it: compare the later rows' first generations. One process at a time (nothing else
may run meanwhile).

    python scripts/nested_layers_ab.py [--methods plain,kangaroo:fixed,m2r2-spec:fixed] [--batches 1,4] [--rounds 8]
        [--out benchmarks/results/nested_layers_ab]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["EEJ_CACHE_DIR"] = ""  # no compile cache: the first generation compiles

import eej.model.transformer as transformer  # noqa: E402
from eej.bench.machine import load_average, machine_info  # noqa: E402
from eej.bench.report import markdown_table, write_result  # noqa: E402
from eej.decoding.engine import Engine  # noqa: E402
from eej.decoding.methods import build_method  # noqa: E402
from eej.weights.registry import load_model  # noqa: E402

PROMPTS = ["What is the capital of France? Answer in two sentences.",
           "Write a Python function that returns the sum of a list of numbers.",
           "List three prime numbers, then explain why.",
           "Summarize the plot of Hamlet in one paragraph."]
VARIANTS = {"inline": transformer.block, "nested": transformer.traced_once}


def measure(model, method: str, batch: int, rounds: int, max_new_tokens: int) -> dict:
    strategy, method_params = build_method(model, method) if method != "plain" else (None, None)
    prompts = [model.tokenizer.encode_chat(p) for p in (PROMPTS * batch)[:batch]]
    engines, first, tokens = {}, {}, {}
    try:
        for variant, layer in VARIANTS.items():
            transformer.traced_once = layer
            engines[variant] = Engine(model, strategy, method_params, share_programs=False)
            start = time.perf_counter()
            tokens[variant] = engines[variant].generate(prompts, max_new_tokens=max_new_tokens, eos_ids=()).tokens
            first[variant] = time.perf_counter() - start
    finally:
        transformer.traced_once = VARIANTS["nested"]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            start = time.perf_counter()
            engines[variant].generate(prompts, max_new_tokens=max_new_tokens, eos_ids=())
            times[variant].append(time.perf_counter() - start)
    return {"method": method, "batch": batch, "first_generation_s": {v: round(t, 2) for v, t in first.items()},
            "generation_s": {v: [round(t, 4) for t in ts] for v, ts in times.items()},
            "median_s": {v: round(statistics.median(ts), 4) for v, ts in times.items()},
            "same_tokens": tokens["inline"] == tokens["nested"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="plain,kangaroo:fixed,m2r2-spec:fixed")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/nested_layers_ab")
    args = ap.parse_args(argv)
    load_start = load_average()
    model = load_model("smollm2-135m")
    rows = []
    for method in args.methods.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(model, method, batch, args.rounds, args.max_new_tokens))
            print(rows[-1]["method"], rows[-1]["batch"], rows[-1]["first_generation_s"], rows[-1]["median_s"], file=sys.stderr)
    load_end = load_average()
    doc = {"machine": machine_info(), "load_average": {"start": load_start, "end": load_end},
           "command": "python scripts/nested_layers_ab.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": vars(args), "results": rows}
    table = markdown_table(
        ["method", "batch", "first generation s: inline", "nested", "decode s (median): inline", "nested", "nested / inline",
         "same tokens"],
        [[f"`{r['method']}`", str(r["batch"]), f"{r['first_generation_s']['inline']:.1f}",
          f"{r['first_generation_s']['nested']:.1f}", f"{r['median_s']['inline']:.3f}", f"{r['median_s']['nested']:.3f}",
          f"{r['median_s']['nested'] / r['median_s']['inline']:.3f}", "yes" if r["same_tokens"] else "NO"] for r in rows])
    markdown = (f"# Layers as calls to one nested program vs traced inline ({doc['machine']['cpu']}, load {load_start} -> "
                f"{load_end})\n\n`{doc['command']}`: SmolLM2-135M, default kernels, compile cache off, {args.max_new_tokens} "
                f"new tokens per prompt. First generation: tracing, lowering, XLA compile and the decode; decode: median of "
                f"{args.rounds} interleaved generations per engine.\n\n{table}\n")
    write_result(doc, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
