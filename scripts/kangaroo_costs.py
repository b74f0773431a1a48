"""What a Kangaroo step costs, piece by piece, next to a plain decoding step (same run, interleaved).

Times (ms, the minimum over repeated interleaved calls — the least disturbed by other jobs on a shared
machine; medians are kept in the JSON) at batch B for:
  plain      one token through all N layers + the full LM head (one plain decoding step)
  draft      one token through layers [0, l) + the adapter + the draft head (full or V' columns)
  verify     K+1 tokens through layers [l, N) + the full LM head, for each K in --draft-steps
From these, the speedup a given mean number of committed tokens per step (tau) would give:
  speedup(tau, drafts) = tau * plain / (verify(K) + (drafts + 1) * draft)
(the last draft also runs layers [0, l) and the adapter; its head is not needed — counted anyway).

    python scripts/kangaroo_costs.py --exit-layers 1,2,4 --draft-vocab 0,2048,4096 --draft-steps 1,2,3,4,6 \
        --out benchmarks/results/kangaroo_costs
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--exit-layers", default="1,2,4,6,8")
    p.add_argument("--draft-vocab", default="0,4096,16384", help="V' values (0 = full head)")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--draft-steps", default="1,2,3,4,6", help="K values (verification runs K+1 tokens)")
    p.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/kangaroo_costs")
    args = p.parse_args(argv)

    from eej.bench.machine import machine_info
    from eej.bench.report import markdown_table, write_result
    from eej.decoding.speculation import adapter_forward, init_adapter
    from eej.model.cache import init_cache
    from eej.model.transformer import embed, linear, logits_from_hidden, run_layers
    from eej.weights.registry import load_model

    model = load_model(args.model, kernels="xla")
    cfg, params = model.cfg, model.params
    adapter = jax.tree.map(jnp.asarray, init_adapter(cfg, 0))
    layers = [int(x) for x in args.exit_layers.split(",")]
    vocabs = [int(x) for x in args.draft_vocab.split(",")]
    ks = [int(x) for x in args.draft_steps.split(",")]
    capacity = args.context + 64

    def plain(params, cache, token, pos):
        x, cache = run_layers(params, embed(params, token[:, None], cfg), cache, pos[:, None], cfg)
        return jnp.argmax(logits_from_hidden(params, x, cfg), -1), cache

    def draft(params, adapter, head, cache, acache, token, pos, *, exit_layer):
        h, cache = run_layers(params, embed(params, token[:, None], cfg), cache, pos[:, None], cfg, 0, exit_layer)
        a, acache = adapter_forward(adapter, h, acache, pos[:, None], cfg)
        return jnp.argmax(linear(a, head), -1), cache, acache

    def verify(params, hidden, cache, pos, *, exit_layer):
        positions = pos[:, None] + jnp.arange(hidden.shape[1])[None]
        x, cache = run_layers(params, hidden, cache, positions, cfg, exit_layer)
        return jnp.argmax(logits_from_hidden(params, x, cfg), -1), cache

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        start = time.perf_counter()
        jax.block_until_ready(fn(*a))
        return time.perf_counter() - start

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        cache = init_cache(cfg, batch, capacity)
        acache = init_cache(cfg, batch, capacity, num_layers=1)
        token = jnp.full((batch,), 100, jnp.int32)
        pos = jnp.full((batch,), args.context, jnp.int32)
        fns = {"plain": (jax.jit(plain), (params, cache, token, pos))}
        rank = np.arange(cfg.vocab_size)
        for l in layers:
            for k in ks:
                hidden = jnp.ones((batch, k + 1, cfg.hidden_size), cfg.jnp_dtype)
                fns[f"verify l={l} K={k}"] = (jax.jit(functools.partial(verify, exit_layer=l)), (params, hidden, cache, pos))
            for v in vocabs:
                head = params["lm_head"] if v == 0 else jnp.take(params["lm_head"], jnp.asarray(rank[:v]), axis=1)
                fns[f"draft l={l} V'={v or cfg.vocab_size}"] = (
                    jax.jit(functools.partial(draft, exit_layer=l)), (params, adapter, head, cache, acache, token, pos)
                )
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved: every piece once per round
            for name, (fn, a) in fns.items():
                samples[name].append(timed(fn, *a))
        ms = {name: 1000 * float(np.min(v)) for name, v in samples.items()}
        medians = {name: 1000 * float(np.median(v)) for name, v in samples.items()}
        print(f"batch {batch}: " + ", ".join(f"{n} {t:.2f}" for n, t in ms.items()), file=sys.stderr)
        for l, v, k in itertools.product(layers, vocabs, ks):
            d, ver = ms[f"draft l={l} V'={v or cfg.vocab_size}"], ms[f"verify l={l} K={k}"]
            rows.append({
                "batch": batch, "exit_layer": l, "draft_vocab": v or cfg.vocab_size, "max_draft_steps": k,
                "plain_ms": ms["plain"], "draft_ms": d, "verify_ms": ver,
                "median_ms": {"plain": medians["plain"], "draft": medians[f"draft l={l} V'={v or cfg.vocab_size}"],
                              "verify": medians[f"verify l={l} K={k}"]},
                # committed tokens per step needed to break even when every step drafts K tokens
                "break_even_tau": (ver + (k + 1) * d) / ms["plain"],
            })
    result = {"model": args.model, "context": args.context, "repeats": args.repeats,
              "command": "python scripts/kangaroo_costs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "note": "machine shared with other jobs; minimum of interleaved calls", "rows": rows}
    table = markdown_table(
        ["batch", "exit layer", "draft vocab", "K", "plain step", "draft token", "verify K+1 tokens", "tau to break even with K drafts"],
        [[str(r["batch"]), str(r["exit_layer"]), str(r["draft_vocab"]), str(r["max_draft_steps"]),
          *(f"{r[k]:.2f}" for k in ("plain_ms", "draft_ms", "verify_ms", "break_even_tau"))] for r in rows])
    write_result(result, f"# Kangaroo step costs ({args.model}, context {args.context}; ms, minimum of {args.repeats} interleaved "
                 f"calls)\n\n{table}\n\nCommand: `{result['command']}`\n\nMachine: {json.dumps(result['machine'])}. {result['note']}.\n",
                 args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
