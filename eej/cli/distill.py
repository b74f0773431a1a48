"""Self-distill training data: `eej distill --data FILES --out DIR` (the library: eej/train/distill.py).

The model answers the training files' prompts with eej's batched engine, into resumable JSONL shards that
`eej train METHOD --data DIR/shard-*.jsonl` reads. Evaluation sets (a folder named `eval`) are refused.
"""

from __future__ import annotations

import argparse
import sys

from eej.cli.train import add_option_flags, options_from_args
from eej.train.distill import DistillOptions, distill
from eej.weights.registry import KERNELS, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True, help="directory of the shards (rerun with the same options to resume)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="the answering model's matmul and attention kernels (eej.weights.registry): auto (eej's CPU "
                        "kernels on a CPU: 2.15x XLA's speed at batch 16, benchmarks/results/distill_kernels), cpu, or "
                        "xla (how the shipped artifacts' answers were made); greedy answers can differ where two tokens "
                        "nearly tie, so a directory keeps one choice")
    add_option_flags(p, DistillOptions)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(DistillOptions, args)
    shards = distill(load_model(args.model, kernels=args.kernels), options, args.out, progress=not args.no_progress)
    print(f"wrote {len(shards)} shard(s) under {args.out}", file=sys.stderr)
    return 0
