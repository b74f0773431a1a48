#!/usr/bin/env python
"""Is MoEfication's quality cost the router's or the split's? The router against an oracle on the same split.

The oracle runs every expert and keeps, per token, the k whose exact outputs have the largest norm (what
the routers are trained to predict). Both are scored by teacher-forced top-1 agreement with the dense model
on held-out chat sequences (the first `--sequences` of a fixed shuffle of the given files, <= 128 tokens).
The oracle is installed by replacing `eej.model.moe.moe_ffn` for this process only (an analysis, not a mode).

    python scripts/moefy_oracle.py [--moefy artifacts/smollm2-135m/moefy.npz] [--ks 4,8,12]
        [--data ../shared/data/train/gsm8k_train.jsonl ../shared/data/train/codegen-instruct.json]
        [--out benchmarks/results/moefy_oracle]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

import eej.model.moe as moe
from eej.bench.machine import machine_info
from eej.bench.report import write_result
from eej.experts.moefy import load_moefied
from eej.train.data import load_training_data
from eej.train.teacher import teacher_argmax
from eej.weights.registry import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "train")


def oracle_ffn(layer: dict, h: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """Every expert runs; each token keeps the k with the largest output norm (unit weights)."""
    b, t, d = h.shape
    outs = jnp.stack([moe.experts_dense(layer["w_gate"][e:e + 1], layer["w_up"][e:e + 1], layer["w_down"][e:e + 1],
                                        h.reshape(b * t, d), jnp.ones((b * t, 1))) for e in range(cfg.num_experts)], axis=1)
    ids = jax.lax.top_k(jnp.linalg.norm(outs.astype(jnp.float32), axis=-1), cfg.experts_per_token)[1]  # [N, k]
    keep = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts, dtype=outs.dtype), axis=1)  # [N, E]
    return jnp.einsum("ned,ne->nd", outs, keep).reshape(b, t, d), ids.reshape(b, t, -1)


def agreement(params, cfg, tokens, mask, ref) -> float:
    # a fresh function each time: jit caches traces per function, and the oracle swaps what moe_ffn is
    got = np.asarray(jax.jit(lambda p, t: teacher_argmax.__wrapped__(p, t, cfg))(params, tokens))
    return float(np.mean((got == ref)[mask]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moefy", default=os.path.join(ROOT, "artifacts", "smollm2-135m", "moefy.npz"))
    ap.add_argument("--ks", default="4,8,12")
    ap.add_argument("--data", nargs="+", default=[os.path.join(DATA, "gsm8k_train.jsonl"), os.path.join(DATA, "codegen-instruct.json")])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "moefy_oracle"))
    args = ap.parse_args()
    dense = load_model("smollm2-135m", kernels="xla")
    data = load_training_data(args.data, dense.tokenizer, 128, 200, args.seed)
    tokens = jnp.asarray(data.tokens[: args.sequences])
    mask = np.arange(tokens.shape[1])[None] < data.lengths[: args.sequences, None]
    ref = np.asarray(teacher_argmax(dense.params, tokens, dense.cfg))
    model = load_moefied(dense, args.moefy)
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        cfg = model.cfg.replace(experts_per_token=k)
        router = agreement(model.params, cfg, tokens, mask, ref)
        routed_ffn, moe.moe_ffn = moe.moe_ffn, oracle_ffn
        try:
            oracle = agreement(model.params, cfg, tokens, mask, ref)
        finally:
            moe.moe_ffn = routed_ffn
        rows.append({"k": k, "router": round(router, 4), "oracle": round(oracle, 4)})
        print(rows[-1], flush=True)
    result = {"benchmark": "moefy_oracle", "machine": machine_info(), "artifact": os.path.relpath(args.moefy, ROOT),
              "num_experts": model.cfg.num_experts, "sequences": args.sequences, "tokens_scored": int(mask.sum()),
              "command": "python scripts/moefy_oracle.py " + shlex.join(sys.argv[1:]), "rows": rows}
    lines = ["# MoEfication: the routers against an oracle on the same split", "",
             f"`{result['artifact']}` ({result['num_experts']} experts); teacher-forced top-1 agreement with the dense model "
             f"on {args.sequences} held-out chat sequences ({result['tokens_scored']} tokens). Command: `{result['command']}`", "",
             "| k | router | oracle (k largest exact expert outputs) |", "|---|---|---|"]
    lines += [f"| {r['k']} | {r['router']:.3f} | {r['oracle']:.3f} |" for r in rows]
    write_result(result, "\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
