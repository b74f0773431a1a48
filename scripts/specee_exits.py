"""SpecEE exit-layer histograms (and fidelity) on Spec-Bench first turns (what `eej bench` does not record).

For each `--methods` spec (SpecEE presets or settings files), answers the first turn of the
selected questions greedily, batch by batch as `eej bench` would, and sums the strategy's own
per-step exit-layer counter (`exit_counts` in its method state: one count per decode step, the
last layer meaning "no early exit"). With `--fidelity`, also plain decoding's answers and, per spec,
token agreement and ROUGE-L as `eej bench` defines them (eej.bench.fidelity / metrics). Writes JSON
and a PNG with one histogram per spec. No timing (so it needs no quiet machine).

    python scripts/specee_exits.py --methods specee,specee:t0.7 --limit 2 \
        --out benchmarks/results/specee_exit_layers
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    from eej.bench.fidelity import sequence_argmax
    from eej.bench.metrics import agreement_count, rouge_l
    from eej.bench.questions import SPEC_BENCH, load_questions, select_questions
    from eej.bench.report import write_json
    from eej.bench.runner import plan_batches
    from eej.decoding.engine import Engine
    from eej.decoding.methods import build_method
    from eej.weights.registry import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", default=SPEC_BENCH)
    p.add_argument("--methods", required=True, help="comma-separated SpecEE specs")
    p.add_argument("--limit", type=int, default=2, help="questions per category")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--fidelity", action="store_true", help="also token agreement and ROUGE-L against plain decoding")
    p.add_argument("--out", required=True, help="output path without extension (.json and .png)")
    args = p.parse_args(argv)

    model = load_model(args.model, kernels="xla")
    questions = select_questions(load_questions(args.questions), limit=args.limit)
    batches = plan_batches(questions, args.batch_size, model.tokenizer)
    result = {"command": "python scripts/specee_exits.py " + " ".join(sys.argv[1:]), "questions": len(questions),
              "batch_size": args.batch_size, "methods": {}}
    plain = {}
    if args.fidelity:
        engine = Engine(model)
        for batch in batches:
            out = engine.generate([model.tokenizer.encode_chat(q.turns[0]) for q in batch], args.max_new_tokens)
            plain.update({q.question_id: t for q, t in zip(batch, out.tokens)})
    for spec in [s for s in args.methods.split(",") if s.strip()]:
        strategy, method_params = build_method(model, spec)
        engine = Engine(model, strategy, method_params)
        counts = np.zeros(model.cfg.num_layers, np.int64)
        per_category: dict[str, np.ndarray] = {}
        agree = total = 0
        rouge = []
        for batch in batches:
            prompts = [model.tokenizer.encode_chat(q.turns[0]) for q in batch]
            out = engine.generate(prompts, args.max_new_tokens)
            if args.fidelity:
                for q, prompt, tokens in zip(batch, prompts, out.tokens):
                    agree += agreement_count(tokens, sequence_argmax(model, prompt + tokens), len(prompt))
                    total += len(tokens)
                    rouge.append(rouge_l(tokens, plain[q.question_id]))
            c = np.asarray(out.method_state["exit_counts"])
            counts += c
            per_category[batch[0].category] = per_category.get(batch[0].category, 0) + c
        layers = np.arange(1, model.cfg.num_layers + 1)
        result["methods"][spec] = {
            "strategy": repr(strategy),
            "exit_layer_histogram": counts.tolist(),
            "steps": int(counts.sum()),
            "early_exit_rate": round(float(1 - counts[-1] / max(counts.sum(), 1)), 4),
            "mean_layers": round(float((counts * layers).sum() / max(counts.sum(), 1)), 3),
            "per_category": {k: v.tolist() for k, v in per_category.items()},
        }
        if args.fidelity:
            result["methods"][spec]["token_agreement"] = round(agree / max(total, 1), 4)
            result["methods"][spec]["rouge_l"] = round(float(np.mean(rouge)), 4)
        print(spec, json.dumps({k: v for k, v in result["methods"][spec].items() if k != "per_category"}), file=sys.stderr)
    write_json(result, args.out + ".json")
    _plot(result, args.out + ".png")
    return 0


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(result["methods"])
    fig, axes = plt.subplots(len(specs), 1, figsize=(8, 2.2 * len(specs)), squeeze=False, sharex=True)
    for ax, spec in zip(axes[:, 0], specs):
        m = result["methods"][spec]
        hist = np.asarray(m["exit_layer_histogram"], float)
        ax.bar(np.arange(len(hist)), hist / max(hist.sum(), 1), color=["C0"] * (len(hist) - 1) + ["C7"])
        ax.set_ylabel("share of steps")
        ax.set_title(f"{spec}: early exits {m['early_exit_rate']:.1%}, mean layers {m['mean_layers']:.2f}", fontsize=9)
    axes[-1, 0].set_xlabel("exit layer (0-based; the last bar = no early exit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
