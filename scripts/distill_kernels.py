"""How fast `eej distill` answers with XLA's kernels and with eej's CPU kernels (`--kernels xla|cpu`), and whether
the greedy answers agree.

`eej distill` is plain greedy decoding of training prompts in batches; this times that decoding (the engine's
compiled programs: a first pass over the batches compiles them, the second is timed) on training prompts [skip, skip + prompts) of its own order, answered
`--batch` at a time, with each kernel choice in turn, and counts the answers that came out token-identical. Run it
alone (`flock /tmp/eej-benchmark.lock`):

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/distill_kernels.py --out benchmarks/results/distill_kernels
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.decoding.engine import Engine
from eej.train.distill import SHIPPED_FILES, DistillOptions, distill_prompts
from eej.weights.registry import load_model, with_kernels

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--skip", type=int, default=3200, help="prompts of the distillation order to leave out")
    parser.add_argument("--batch", type=int, default=16, help="prompts answered together (eej distill's default)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default="benchmarks/results/distill_kernels")
    args = parser.parse_args(argv)
    if min(args.prompts, args.batch, args.max_new_tokens) < 1 or args.skip < 0:
        parser.error("--prompts, --batch and --max-new-tokens must be >= 1, --skip >= 0")
    load_start = load_average()
    base = load_model("smollm2-135m", kernels="xla")
    files = tuple(os.path.join(TRAIN, name) for name in SHIPPED_FILES)
    prompts = [ids for _, ids in distill_prompts(base, DistillOptions(files=files, max_prompts=args.skip + args.prompts))[args.skip:]]
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    rows, answers = [], {}
    for kernels in ("xla", "cpu"):
        engine = Engine(with_kernels(base, kernels))
        for batch in batches:  # compiles every program the batches need (their prompt lengths differ)
            engine.generate(batch, args.max_new_tokens)
        start, tokens, answers[kernels] = time.perf_counter(), 0, []
        for batch in batches:
            out = engine.generate(batch, args.max_new_tokens)
            tokens += sum(out.new_tokens)
            answers[kernels] += out.tokens
        seconds = time.perf_counter() - start
        rows.append({"kernels": kernels, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds})
    identical = sum(a == b for a, b in zip(answers["xla"], answers["cpu"]))
    for row in rows:
        row["vs_xla"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()}
    doc = {"command": "scripts/distill_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine, "model": "smollm2-135m", "prompts": args.prompts, "skip": args.skip, "batch": args.batch,
           "max_new_tokens": args.max_new_tokens, "identical_answers": identical, "rows": rows}
    lines = ["# `eej distill`'s decoding with XLA's kernels and eej's CPU kernels", "",
             f"`{doc['command']}`; {machine['cpu']}, {machine['cpu_count']} CPUs, load average {load_start} -> "
             f"{machine['load_average_end']}. {args.prompts} training prompts from {args.skip} on in distillation order, "
             f"greedy, {args.batch} at a time, up to {args.max_new_tokens} new tokens; compilation excluded. "
             f"Token-identical answers: {identical} of {args.prompts}.", "",
             markdown_table(["kernels", "seconds", "tokens", "tokens/s", "vs xla"],
                            [[r["kernels"], f"{r['seconds']:.1f}", str(r["tokens"]), f"{r['tokens_per_second']:.1f}",
                              f"{r['vs_xla']:.2f}x"] for r in rows])]
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
