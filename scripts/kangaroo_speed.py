"""Kangaroo vs plain decoding on Spec-Bench prompts, side by side in one run (a sweep tool).

For every prompt (or batch of prompts), plain decoding and every Kangaroo variant run one after the
other (interleaved, so machine load hits all alike), after an untimed warm-up that compiles each
shape. Reports per variant: speedup (total tokens / total seconds vs plain's), mean committed tokens
per target forward, identical-output rate vs plain (greedy), and per-category speedups.

Variants are the product of --adapters (trained artifacts; each fixes its exit layer) x
--thresholds x --draft-steps x --draft-vocab.

    python scripts/kangaroo_speed.py --adapters runs/l2/kangaroo.npz --thresholds 0.3,0.6 \
        --draft-steps 3,6 --draft-vocab 0,4096 --per-category 2 --out benchmarks/results/kangaroo_sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def load_prompts(path: str, per_category: int, seed: int) -> list[tuple[str, str]]:
    """(category, first-turn text) pairs; MT-Bench's categories are one Spec-Bench category."""
    by_cat: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                cat = "mt_bench" if r["category"] in MT_BENCH else r["category"]
                by_cat.setdefault(cat, []).append(r["turns"][0])
    rng = np.random.default_rng(seed)
    out = []
    for cat, texts in by_cat.items():
        pick = rng.permutation(len(texts))[: per_category if per_category > 0 else len(texts)]
        out += [(cat, texts[i]) for i in sorted(pick)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", default="../shared/data/eval/spec_bench.jsonl")
    p.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench category (0 = all)")
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--thresholds", default="0.6")
    p.add_argument("--draft-steps", default="6")
    p.add_argument("--draft-vocab", default="0")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)

    from eej.bench.machine import machine_info
    from eej.config import SamplingConfig
    from eej.decoding.engine import Engine
    from eej.decoding.kangaroo import KangarooSettings, load_kangaroo
    from eej.weights.artifacts import load_artifact
    from eej.weights.registry import load_model

    model = load_model(args.model)
    sampling = SamplingConfig(temperature=args.temperature)
    engines: dict[str, Engine] = {"plain": Engine(model)}
    for adapter, thr, steps, vocab in itertools.product(
        args.adapters, args.thresholds.split(","), args.draft_steps.split(","), args.draft_vocab.split(",")
    ):
        layer = load_artifact(adapter, "kangaroo", model.cfg)[1]["settings"]["exit_layer"]
        settings = KangarooSettings(adapter, layer, float(thr), int(steps), int(vocab))
        name = f"l={layer} thr={float(thr):g} K={steps} V'={int(vocab) or model.cfg.vocab_size} [{os.path.basename(os.path.dirname(os.path.abspath(adapter)))}]"
        engines[name] = Engine(model, *load_kangaroo(model, settings))

    prompts = load_prompts(args.prompts, args.per_category, args.seed)
    tok = model.tokenizer
    encoded = [(cat, tok.encode_chat(text)) for cat, text in prompts]
    batches = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
    run = lambda eng, batch: eng.generate([ids for _, ids in batch], args.max_new_tokens, sampling, seed=args.seed)  # noqa: E731

    start = time.perf_counter()
    seen_shapes = set()
    for batch in batches:  # warm-up: compile every shape once, untimed
        shape = engines["plain"]._layout([ids for _, ids in batch], args.max_new_tokens)
        if shape not in seen_shapes:
            seen_shapes.add(shape)
            for eng in engines.values():
                run(eng, batch)
    print(f"warm-up (compiles) {time.perf_counter() - start:.0f} s for {len(seen_shapes)} shapes", file=sys.stderr)

    records = {name: [] for name in engines}
    for i, batch in enumerate(batches):
        outs = {name: run(eng, batch) for name, eng in engines.items()}
        for name, out in outs.items():
            for row, (cat, _) in enumerate(batch):
                records[name].append({
                    "category": cat, "tokens": out.tokens[row], "new": out.new_tokens[row],
                    "forwards": out.forwards[row], "seconds": out.seconds / len(batch),
                    "decode_seconds": out.decode_seconds / len(batch),
                })
        print(f"batch {i + 1}/{len(batches)}: " + ", ".join(
            f"{n.split(' [')[0]} {sum(o.new_tokens) / o.seconds:.1f} t/s" for n, o in outs.items()), file=sys.stderr)

    def summary(rows, base_rows):
        new, secs, fw = sum(r["new"] for r in rows), sum(r["seconds"] for r in rows), sum(r["forwards"] for r in rows)
        base_tps = sum(r["new"] for r in base_rows) / sum(r["seconds"] for r in base_rows)
        same = [r["tokens"] == b["tokens"] for r, b in zip(rows, base_rows)]
        # decode-only: tokens after the first (which the prefill makes) over decode-loop seconds
        dec = sum(r["new"] - 1 for r in rows) / sum(r["decode_seconds"] for r in rows)
        base_dec = sum(r["new"] - 1 for r in base_rows) / sum(r["decode_seconds"] for r in base_rows)
        return {"tokens_per_second": new / secs, "speedup": (new / secs) / base_tps, "decode_speedup": dec / base_dec,
                "mean_accepted": new / fw, "identical_rate": sum(same) / len(same), "new_tokens": new}

    cats = sorted({c for c, _ in prompts})
    results = []
    for name, rows in records.items():
        base = records["plain"]
        entry = {"variant": name, **summary(rows, base), "categories": {}}
        for cat in cats:
            idx = [j for j, r in enumerate(rows) if r["category"] == cat]
            entry["categories"][cat] = summary([rows[j] for j in idx], [base[j] for j in idx])
        results.append(entry)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {
        "model": args.model, "prompts": args.prompts, "per_category": args.per_category, "n_prompts": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "command": "python scripts/kangaroo_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "note": "2-core machine shared with other jobs while measuring; methods interleaved per batch",
    }
    with open(args.out + ".json", "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Kangaroo vs plain ({args.model}, {len(prompts)} Spec-Bench prompts, batch {args.batch_size}, "
                f"temperature {args.temperature}, {args.max_new_tokens} new tokens)\n\n")
        f.write("| variant | tokens/s | speedup | decode-only speedup | mean accepted | identical | " + " | ".join(cats) + " |\n")
        f.write("|---" * (6 + len(cats)) + "|\n")
        for r in sorted(results, key=lambda r: -r["speedup"]):
            f.write(f"| {r['variant']} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['decode_speedup']:.2f}x | {r['mean_accepted']:.2f} | "
                    f"{r['identical_rate']:.2f} | " + " | ".join(f"{r['categories'][c]['speedup']:.2f}x" for c in cats) + " |\n")
        f.write(f"\nCommand: `{meta['command']}`\n\nMachine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores; "
                f"{meta['note']}.\n")
    print(open(args.out + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
