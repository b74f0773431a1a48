#!/usr/bin/env python
"""Layers as a Python-unrolled tuple (eej's decoding layout) or stacked and run with `lax.scan`?

Both designs run the real model (SmolLM2-135M, float32) with eej's own layer (`eej.model.transformer.block`);
only how the layers are laid out and iterated differs:

  unrolled  params["layers"] is a tuple of L per-layer dicts and the cache a tuple of L [B, Hkv, S, Dh]
            arrays; a Python loop emits L copies of the layer (eej today).
  scan      params["layers"] is one dict of [L, ...] arrays and the cache one [L, B, Hkv, S, Dh] array per
            k and v; `lax.scan` runs one compiled layer body L times, reading layer i's weights and cache
            slice and writing the slice back (levanter / MaxText style).

Measured, interleaved (rounds alternate the designs so machine drift hits both):
  plain     a whole greedy generation of N tokens at batch B inside one `lax.while_loop` (tokens/s),
  kangaroo  one Kangaroo-shaped speculative step: K drafts, each a token through layers [0, l) + an
            attention-only adapter block + a V'-column draft head, then K+1 tokens through layers [l, N)
            and the full head (ms per step) — the shapes of `eej.decoding.kangaroo` with its shipped settings,
  and the compile time of each jitted function. The two designs' tokens must be identical.

    python scripts/scan_vs_unrolled.py [--batches 1,8] [--new-tokens 64] [--rounds 3] [--out benchmarks/results/scan_vs_unrolled]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.model.cache import init_cache
from eej.model.transformer import attention_block, block, embed, linear, logits_from_hidden, rms_norm, stack_layers
from eej.weights.registry import load_model

EXIT_LAYER, DRAFTS, DRAFT_VOCAB = 2, 4, 4096


# ----------------------------------------------------------------------------- the two layer runners


def unrolled(layers, x, ks, vs, positions, cfg, start, end):
    ks, vs = list(ks), list(vs)
    for i in range(start, end):
        x, ks[i], vs[i] = block(layers[i], x, ks[i], vs[i], positions, cfg)
    return x, tuple(ks), tuple(vs)


def scanned(layers, x, k, v, positions, cfg, start, end):
    """Layers [start, end) of stacked `layers` with the stacked cache k, v [L, B, Hkv, S, Dh] carried (in place)."""

    def body(carry, i):
        x, k, v = carry
        layer = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), layers)
        x, ki, vi = block(layer, x, lax.dynamic_index_in_dim(k, i, keepdims=False),
                          lax.dynamic_index_in_dim(v, i, keepdims=False), positions, cfg)
        k = lax.dynamic_update_index_in_dim(k, ki, i, 0)
        v = lax.dynamic_update_index_in_dim(v, vi, i, 0)
        return (x, k, v), None

    (x, k, v), _ = lax.scan(body, (x, k, v), jnp.arange(start, end))
    return x, k, v


RUNNERS = {"unrolled": unrolled, "scan": scanned}


def design_inputs(design, params, cfg, batch, capacity):
    cache = init_cache(cfg, batch, capacity)
    if design == "unrolled":
        return params, cache.k, cache.v
    return {**params, "layers": stack_layers(params["layers"])}, jnp.stack(cache.k), jnp.stack(cache.v)


# ----------------------------------------------------------------------------- plain generation


def plain_generate(params, k, v, prompt, *, design, cfg, new_tokens):
    run = RUNNERS[design]
    n = cfg.num_layers
    p = prompt.shape[1]
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), prompt.shape)
    x, k, v = run(params["layers"], embed(params, prompt, cfg), k, v, positions, cfg, 0, n)
    first = jnp.argmax(logits_from_hidden(params, x[:, -1], cfg), -1).astype(jnp.int32)
    out = jnp.zeros((prompt.shape[0], new_tokens), jnp.int32).at[:, 0].set(first)

    def body(state):
        t, token, k, v, out = state
        pos = jnp.full((prompt.shape[0], 1), p - 1, jnp.int32) + t
        x, k, v = run(params["layers"], embed(params, token[:, None], cfg), k, v, pos, cfg, 0, n)
        token = jnp.argmax(logits_from_hidden(params, x[:, 0], cfg), -1).astype(jnp.int32)
        return t + 1, token, k, v, out.at[:, t].set(token)

    state = (jnp.int32(1), first, k, v, out)
    return lax.while_loop(lambda s: s[0] < new_tokens, body, state)[-1]


# ----------------------------------------------------------------------------- a Kangaroo-shaped step


def kangaroo_step(params, adapter, head, k, v, ak, av, token, start, *, design, cfg):
    """K drafts through [0, l) + adapter + V' head, then K+1 tokens through [l, N) + the full head -> target argmax."""
    run = RUNNERS[design]
    batch = token.shape[0]
    hidden = jnp.zeros((batch, DRAFTS + 1, cfg.hidden_size), jnp.float32)
    for i in range(DRAFTS + 1):
        pos = (start + i)[:, None]
        h, k, v = run(params["layers"], embed(params, token[:, None], cfg), k, v, pos, cfg, 0, EXIT_LAYER)
        a, ak, av = attention_block(adapter, h, ak, av, pos, cfg)
        logits = linear(rms_norm(a[:, 0], adapter["norm"], cfg.rms_eps), head)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        hidden = hidden.at[:, i].set(h[:, 0])
    positions = start[:, None] + jnp.arange(DRAFTS + 1, dtype=jnp.int32)[None]
    deep, k, v = run(params["layers"], hidden, k, v, positions, cfg, EXIT_LAYER, cfg.num_layers)
    return jnp.argmax(logits_from_hidden(params, deep, cfg), -1), k, v, ak, av


# ----------------------------------------------------------------------------- measuring


def compiled(fn, *args):
    start = time.perf_counter()
    return jax.jit(fn).lower(*args).compile(), round(time.perf_counter() - start, 2)


def timed(fn, args, repeats: int = 1) -> float:
    jax.block_until_ready(fn(*args))  # not the first call of a fresh executable
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def measure(model, batch: int, args) -> dict:
    """Both designs at one batch size: compile seconds, plain tokens/s, Kangaroo-shaped step ms, identical outputs."""
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(0)
    adapter = {n: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32) for n, s in
               {"attn_norm": (576,), "wq": (576, 576), "wk": (576, 192), "wv": (576, 192), "wo": (576, 576), "norm": (576,)}.items()}
    prompt = jnp.asarray(rng.integers(100, 40000, (batch, args.prompt_len)), jnp.int32)
    capacity = args.prompt_len + args.new_tokens + DRAFTS + 2
    row, fns, outs = {"batch": batch}, {}, {}
    for design in RUNNERS:
        p, k, v = design_inputs(design, params, cfg, batch, capacity)
        ak, av = (jnp.zeros((batch, cfg.num_kv_heads, capacity, cfg.head_dim)),) * 2
        plain_args = (p, k, v, prompt)
        step_args = (p, adapter, params["lm_head"][:, :DRAFT_VOCAB], k, v, ak, av, prompt[:, -1], jnp.full((batch,), args.prompt_len))
        gen = functools.partial(plain_generate, design=design, cfg=cfg, new_tokens=args.new_tokens)
        step = functools.partial(kangaroo_step, design=design, cfg=cfg)
        fns[design, "plain"], row[f"{design}_plain_compile_s"] = compiled(gen, *plain_args)
        fns[design, "kangaroo"], row[f"{design}_kangaroo_compile_s"] = compiled(step, *step_args)
        fns[design, "plain"] = (fns[design, "plain"], plain_args)
        fns[design, "kangaroo"] = (fns[design, "kangaroo"], step_args)
        outs[design] = (np.asarray(fns[design, "plain"][0](*plain_args)), np.asarray(fns[design, "kangaroo"][0](*step_args)[0]))
    row["identical"] = all(np.array_equal(a, b) for a, b in zip(outs["unrolled"], outs["scan"]))
    times = {key: [] for key in fns}
    for _ in range(args.rounds):  # interleaved: machine drift hits both designs alike
        for (design, what), (fn, fn_args) in fns.items():
            times[design, what].append(timed(fn, fn_args, 1 if what == "plain" else args.step_repeats))
    for design in RUNNERS:
        row[f"{design}_plain_tokens_per_s"] = round(batch * args.new_tokens / float(np.median(times[design, "plain"])), 2)
        row[f"{design}_kangaroo_step_ms"] = round(1e3 * float(np.median(times[design, "kangaroo"])), 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/scan_vs_unrolled")
    args = ap.parse_args(argv)
    model = load_model("smollm2-135m", kernels="xla")
    load_start = load_average()
    results = [measure(model, int(b), args) for b in args.batches.split(",")]
    doc = {"machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
           "command": "python scripts/scan_vs_unrolled.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": vars(args) | {"exit_layer": EXIT_LAYER, "drafts": DRAFTS, "draft_vocab": DRAFT_VOCAB}, "results": results}
    rows = [[str(r["batch"]), d, str(r[f"{d}_plain_tokens_per_s"]), str(r[f"{d}_plain_compile_s"]),
             str(r[f"{d}_kangaroo_step_ms"]), str(r[f"{d}_kangaroo_compile_s"])] for r in results for d in RUNNERS]
    markdown = "\n\n".join([
        f"# Unrolled layers vs lax.scan over stacked layers ({doc['machine']['cpu']}, load {load_start} -> {load_average()})",
        f"`{doc['command']}`; SmolLM2-135M float32, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"median of {args.rounds} interleaved rounds.",
        markdown_table(["batch", "design", "plain tokens/s", "plain compile s", "kangaroo-shaped step ms", "its compile s"], rows),
        "Tokens identical between the designs: " + ", ".join(f"batch {r['batch']}: {r['identical']}" for r in results) + "\n"])
    write_result(doc, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
