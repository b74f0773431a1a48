#!/usr/bin/env python
"""Plain decoding speed on the real model: eej vs transformers + torch `generate`, and the roofline.

The bench protocol (eej.bench.runner) with EOS ignored by both (the same work), the first N MT-Bench
questions of the Spec-Bench file (chat template, both turns), batch 1 and batch 8, the whole
interleaved run repeated --rounds times; warm-up and compile time excluded. The roofline is the bytes
of weights read per decoded token over the machine's measured streaming bandwidth (eej.bench.plain).

    python scripts/bench_plain.py [--questions ../shared/data/eval/spec_bench.jsonl] [--prompts 8]
        [--max-new-tokens 128] [--rounds 2] [--batch-sizes 1,8] [--no-hf] [--out benchmarks/results/plain_cpu]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import os

from eej.bench.contestants import method_contestants
from eej.bench.machine import machine_info, measure_bandwidth
from eej.bench.peers import load_peers
from eej.bench.plain import plain_markdown, plain_report, weight_bytes_per_token
from eej.bench.questions import SPEC_BENCH, mt_bench_questions
from eej.bench.report import write_result
from eej.bench.runner import RunSettings, run_bench
from eej.weights.registry import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", default=SPEC_BENCH)
    ap.add_argument("--prompts", type=int, default=8, help="MT-Bench questions (one of each category in turn)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "plain_cpu"))
    args = ap.parse_args()

    bandwidth = measure_bandwidth()  # first, on a quiet process
    questions = mt_bench_questions(args.questions, args.prompts)
    model = load_model(args.model, kernels="xla")
    contestants = [*method_contestants(model, ["plain"]), *load_peers([] if args.no_hf else ["hf"], args.model, model)]
    records = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        settings = RunSettings(args.max_new_tokens, batch, ignore_eos=True, rounds=args.rounds)
        records[batch] = run_bench(contestants, questions, model.tokenizer, settings)[0]
    settings = {"prompts": len(records[batch]) // len(contestants), "questions": os.path.relpath(args.questions),
                "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "greedy": True,
                "eos": "ignored (fixed-length outputs)", "dtype": model.cfg.dtype, "batch_sizes": list(records),
                "torch_threads": None if args.no_hf else contestants[1].torch.get_num_threads(),
                "attention": model.cfg.attention_impl}
    report = plain_report(records, bandwidth, weight_bytes_per_token(model.params), args.model, machine_info(), settings)
    write_result(report, plain_markdown(report), args.out)
    print(plain_markdown(report))


if __name__ == "__main__":
    main()
