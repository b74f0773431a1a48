"""Offline sweep of Kangaroo settings: committed tokens per step from held-out self-distilled answers.

On self-distilled data (the model's own greedy answers, `eej distill`) the
teacher-forced prefix *is* what greedy decoding produces, so whether a draft at position t is
accepted — the draft's top-1 equals the model's argmax there — can be read off the cached states
without generating anything. Simulating Kangaroo's greedy steps over each held-out answer gives,
for every (adapter, draft vocabulary V', max draft steps K, threshold): the mean committed tokens
per step (tau, exact) and the drafts per step (approximate after a rejection: confidences are
taken on the true prefix). With step costs from scripts/kangaroo_costs.py it predicts the speedup

    tau * plain_ms / (verify_ms(K) + (drafts + 1) * draft_ms(l, V'))

which picks the candidates that scripts/kangaroo_speed.py then measures for real.

    python scripts/kangaroo_sweep.py --adapters runs/final_l1/kangaroo.npz runs/final_l2/kangaroo.npz \
        --data runs/self_distill.jsonl --teacher-cache runs/teacher_sd --eval-fraction 0.05 \
        --costs benchmarks/results/kangaroo_costs.json --out benchmarks/results/kangaroo_sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


def simulate(match: np.ndarray, confidence: np.ndarray, start: int, end: int, k: int, threshold: float) -> tuple[int, int, int]:
    """Greedy Kangaroo over one answer: pending positions start..end (inclusive).

    match[t]: the draft made at position t (predicting t + 1) equals the model's argmax.
    Returns (committed tokens, steps, drafts made).
    """
    t, committed, steps, drafts = start, 0, 0, 0
    while t <= end:
        accepted, n, ok = 0, 0, True
        for i in range(k):
            pos = t + i
            if pos > end:
                break
            n += 1
            ok = ok and bool(match[pos])
            accepted += ok
            if confidence[pos] < threshold:
                break
        committed += accepted + 1
        steps += 1
        drafts += n
        t += accepted + 1
    return committed, steps, drafts


def write_report(path: str, meta: dict, rows: list[dict]) -> None:
    """Markdown: tau (drafts per step) by adapter x threshold for each K and V', then the best rows."""
    with open(path, "w") as f:
        f.write(f"# Kangaroo offline sweep ({meta['held_out_sequences']} held-out self-distilled answers, greedy)\n\n")
        f.write("tau = committed tokens per step (exact for greedy on self-distilled text); drafts = drafts per step "
                "(approximate after a rejection). Cells: tau (drafts).\n")
        thresholds = sorted({r["threshold"] for r in rows})
        adapters = list(dict.fromkeys(r["adapter"] for r in rows))
        for v, k in sorted({(r["draft_vocab"], r["max_draft_steps"]) for r in rows}):
            f.write(f"\n## V' = {v}, K = {k}\n\n| adapter | exit layer | top-1 | " + " | ".join(f"thr {t:g}" for t in thresholds)
                    + " |\n" + "|---" * (3 + len(thresholds)) + "|\n")
            for a in adapters:
                cells = {r["threshold"]: r for r in rows if r["adapter"] == a and r["draft_vocab"] == v and r["max_draft_steps"] == k}
                if cells:
                    first = next(iter(cells.values()))
                    f.write(f"| {a} | {first['exit_layer']} | {first['top1']:.3f} | "
                            + " | ".join(f"{cells[t]['tau']:.2f} ({cells[t]['drafts_per_step']:.2f})" if t in cells else "" for t in thresholds) + " |\n")
        if any("predicted_speedup" in r for r in rows):
            f.write("\n## Best predicted speedups (step costs from " + str(meta.get("costs")) + ")\n\n"
                    "| adapter | exit layer | V' | K | threshold | tau | drafts/step | predicted speedup |\n|---|---|---|---|---|---|---|---|\n")
            for r in sorted((r for r in rows if "predicted_speedup" in r), key=lambda r: -r["predicted_speedup"])[:15]:
                f.write(f"| {r['adapter']} | {r['exit_layer']} | {r['draft_vocab']} | {r['max_draft_steps']} | {r['threshold']:g} | "
                        f"{r['tau']:.2f} | {r['drafts_per_step']:.2f} | {r['predicted_speedup']:.2f} |\n")
        f.write(f"\nCommand: `{meta['command']}`\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--data", nargs="+", required=True, help="the training run's data (its held-out rows are used)")
    p.add_argument("--teacher-cache", required=True)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--thresholds", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--draft-steps", default="1,2,3,4,6")
    p.add_argument("--draft-vocab", default="0,1024,2048,4096,8192")
    p.add_argument("--costs", default=None, help="JSON from scripts/kangaroo_costs.py (batch 1 rows are used)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from eej.bench.report import write_json
    from eej.decoding.speculation import adapter_forward
    from eej.model.cache import init_cache
    from eej.model.transformer import final_norm, linear
    from eej.weights.artifacts import load_artifact
    from eej.train.data import DataOptions, predicting_positions, prepare_data
    from eej.train.teacher import data_fingerprint, teacher_cache
    from eej.weights.registry import load_model

    model = load_model(args.model, kernels="xla")
    cfg, params = model.cfg, model.params
    data_options = DataOptions(args.data, args.seq_len, args.max_examples)
    data, _, eval_rows, _ = prepare_data(model, data_options, args.eval_fraction, args.seed)
    predicting = predicting_positions(data.loss_mask)
    adapters = [(path, *load_artifact(path, "kangaroo", cfg)) for path in args.adapters]
    depths = sorted({h["settings"]["exit_layer"] for _, _, h in adapters})
    teacher = teacher_cache(model, data, depths, args.teacher_cache, 8, data_fingerprint(model, data_options, args.seed, len(data)))
    vocabs = [int(v) for v in args.draft_vocab.split(",")]
    steps_list = [int(k) for k in args.draft_steps.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]

    @jax.jit
    def target_argmax(h_final):
        return jnp.argmax(linear(final_norm(params, h_final, cfg), params["lm_head"]), -1)

    @jax.jit
    def draft_top1(adapter, head, h_exit):
        b, t, _ = h_exit.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        drafted, _ = adapter_forward(adapter, h_exit, init_cache(cfg, b, t, num_layers=1, dtype=jnp.float32), positions, cfg)
        logits = linear(drafted, head).astype(jnp.float32)
        return jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits, -1), -1)

    argmax = {int(r): np.asarray(target_argmax(jnp.asarray(np.asarray(teacher[f"h{cfg.num_layers}"][r:r + 1], np.float32))))[0] for r in eval_rows}
    costs = None
    if args.costs:
        with open(args.costs) as f:
            costs = [r for r in json.load(f)["rows"] if r["batch"] == 1]

    rows = []
    for path, arrays, header in adapters:
        layer = header["settings"]["exit_layer"]
        adapter = jax.tree.map(jnp.asarray, arrays["adapter"])
        ranking = arrays["vocab_rank"]
        for v in vocabs:
            if v > len(ranking):
                continue
            ids = np.asarray(ranking[:v]) if v else np.arange(cfg.vocab_size)
            head = jnp.take(params["lm_head"], jnp.asarray(ids), axis=1) if v else params["lm_head"]
            per_row = []
            for r in eval_rows:
                top, conf = draft_top1(adapter, head, jnp.asarray(np.asarray(teacher[f"h{layer}"][r:r + 1], np.float32)))
                positions = np.nonzero(predicting[r])[0]
                match = ids[np.asarray(top[0])] == argmax[int(r)]
                per_row.append((match, np.asarray(conf[0]), positions[0] + 1, positions[-1]))
            top1 = float(np.mean(np.concatenate([m[s - 1 : e + 1] for m, _, s, e in per_row])))
            for k, thr in itertools.product(steps_list, thresholds):
                totals = np.sum([simulate(m, c, s, e, k, thr) for m, c, s, e in per_row], axis=0)
                tau, drafts = totals[0] / totals[1], totals[2] / totals[1]
                row = {"adapter": path, "exit_layer": layer, "draft_vocab": v or cfg.vocab_size, "max_draft_steps": k,
                       "threshold": thr, "top1": top1, "tau": float(tau), "drafts_per_step": float(drafts)}
                if costs:
                    c = next((c for c in costs if c["exit_layer"] == layer and c["draft_vocab"] == (v or cfg.vocab_size)
                              and c.get("max_draft_steps", k) == k), None)
                    if c:
                        row["predicted_speedup"] = float(tau * c["plain_ms"] / (c["verify_ms"] + (drafts + 1) * c["draft_ms"]))
                rows.append(row)
            print(f"l={layer} V'={v or cfg.vocab_size}: top-1 agreement {top1:.3f}", file=sys.stderr)

    meta = {"command": "python scripts/kangaroo_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "held_out_sequences": int(len(eval_rows)), "costs": args.costs}
    write_json({**meta, "rows": rows}, args.out + ".json")
    write_report(args.out + ".md", meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
