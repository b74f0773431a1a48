"""Kangaroo vs plain decoding on Spec-Bench questions, side by side in one run (a sweep tool).

Every variant is a contestant of the bench protocol (eej.bench.session: interleaved per batch, warm-up
and compile excluded, speedups against plain in the same run, identical-output rate, per category), so
the result is an `eej bench` JSON document and report. Variants are the product of --adapters (trained
artifacts; each fixes its exit layer) x --thresholds x --draft-steps x --draft-vocab; the registered
presets are simply `eej bench --methods kangaroo:PRESET,...`.

    python scripts/kangaroo_speed.py --adapters runs/l2/kangaroo.npz --thresholds 0.3,0.6 \
        --draft-steps 3,6 --draft-vocab 0,4096 --per-category 2 --out benchmarks/results/kangaroo_sweep
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys

from eej.bench.contestants import MethodContestant
from eej.bench.questions import SPEC_BENCH, load_questions, select_questions
from eej.bench.report import markdown_report, write_result
from eej.bench.runner import RunSettings
from eej.bench.session import bench_document
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.kangaroo import KangarooSettings, load_kangaroo
from eej.weights.artifacts import load_artifact
from eej.weights.registry import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", default=SPEC_BENCH, help="questions file (Spec-Bench schema)")
    p.add_argument("--per-category", type=int, default=2, help="first N questions of each category (0 = all)")
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--thresholds", default="0.6")
    p.add_argument("--draft-steps", default="6")
    p.add_argument("--draft-vocab", default="0")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="2-core machine shared with other jobs while measuring; methods interleaved per batch")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)

    model = load_model(args.model, kernels="xla")
    contestants = [MethodContestant(model, "plain")]
    for adapter, thr, steps, vocab in itertools.product(
        args.adapters, args.thresholds.split(","), args.draft_steps.split(","), args.draft_vocab.split(",")
    ):
        layer = load_artifact(adapter, "kangaroo", model.cfg)[1]["settings"]["exit_layer"]
        settings = KangarooSettings(adapter, layer, float(thr), int(steps), int(vocab))
        name = (f"l={layer} thr={float(thr):g} K={steps} V'={int(vocab) or model.cfg.vocab_size} "
                f"[{os.path.basename(os.path.dirname(os.path.abspath(adapter)))}]")
        contestants.append(MethodContestant(model, "kangaroo", engine=Engine(model, *load_kangaroo(model, settings)), name=name))

    questions = select_questions(load_questions(args.prompts), limit=args.per_category or None)
    described = {"command": "python scripts/kangaroo_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "note": args.note, "questions": args.prompts, "limit": args.per_category or None, "mt_bench_categories": "auto"}
    settings = RunSettings(args.max_new_tokens, args.batch_size, SamplingConfig(temperature=args.temperature), args.seed)
    doc, _ = bench_document(model, contestants, questions, settings, described, agreement=False)
    write_result(doc, markdown_report(doc), args.out)
    print(markdown_report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
