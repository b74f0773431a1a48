#!/usr/bin/env python
"""What drawing the token costs plain decoding: eej's two samplers (the coupled exponential race, the default, and
the residual rule's inverse CDF) against `jax.random.categorical`.

First the draw alone: a jitted loop of 200 draws from 4 x 49,152 random logits, best of 5 (ms per draw). Then
plain decoding of SmolLM2-135M, 4 rows of a 100-token prompt, 128 new tokens at temperature 0.7, once with each
sampler (patched in for the comparison), interleaved round by round; median decode ms per step.
Run it alone (`flock /tmp/eej-benchmark.lock`).

    python scripts/sampler_bench.py [--rounds 5] [--out benchmarks/results/sampler_b4_t0.7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import dataclasses

import eej.decoding.engine as engine_module
import eej.decoding.sampling as sampling_module
import eej.decoding.strategy as strategy_module
from eej.bench.machine import load_average, machine_info
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.files import write_atomic
from eej.weights.registry import load_model


def gumbel_sample(logits, key, sampling, keys):
    """The sampler eej used first: Gumbel-max noise over every logit."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, sampling_module.warped_log_probs(logits, sampling), axis=-1).astype(jnp.int32)


def inverse_cdf_sample(logits, key, sampling, keys):
    """The residual rule's sampler (`SamplingConfig(coupled=False)`): one uniform per row."""
    return sampling_module.sample(logits, key, dataclasses.replace(sampling, coupled=False), None)


def draw_ms(fn, batch: int, vocab: int = 49_152, draws: int = 200) -> float:
    """ms per draw of `fn(logits [batch, vocab], key, sampling, keys)`, in one jitted loop (best of 5)."""
    sampling = SamplingConfig(temperature=0.7)
    logits = jax.random.normal(jax.random.PRNGKey(0), (batch, vocab)) * 3

    @jax.jit
    def loop(logits, key):
        def body(i, total):  # the logits move a little each draw, so nothing is hoisted out of the loop
            keys = sampling_module.token_keys(jnp.arange(batch, dtype=jnp.uint32), jnp.full((batch,), i))
            return total + fn(logits + total[:, None].astype(jnp.float32) * 1e-6, jax.random.fold_in(key, i), sampling, keys)
        return jax.lax.fori_loop(0, draws, body, jnp.zeros((batch,), jnp.int32))

    loop(logits, jax.random.PRNGKey(1)).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        loop(logits, jax.random.PRNGKey(1)).block_until_ready()
        times.append((time.perf_counter() - start) / draws * 1e3)
    return round(min(times), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/sampler_b4_t0.7")
    args = ap.parse_args(argv)
    load_start = load_average()
    samplers = [("jax.random.categorical", gumbel_sample), ("inverse CDF (residual)", inverse_cdf_sample),
                ("exponential race (coupled, the default)", sampling_module.sample)]
    draws = {name: draw_ms(fn, args.batch) for name, fn in samplers}
    model = load_model("smollm2-135m", kernels="xla")
    prompts, sampling, new = [[1, 2, 3, 4, 5] * 20] * args.batch, SamplingConfig(temperature=0.7), 128
    engines = {}
    for name, fn in samplers:
        strategy_module.sample = engine_module.sample = fn  # traced into this engine's programs when it compiles
        engines[name] = Engine(model, share_programs=False)
        engines[name].generate(prompts, max_new_tokens=new, sampling=sampling, seed=0, eos_ids=())
    ms = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, eng in engines.items():
            out = eng.generate(prompts, max_new_tokens=new, sampling=sampling, seed=r + 1, eos_ids=())
            ms[name].append(round(out.decode_seconds / (new - 1) * 1e3, 2))
    rows = [{"sampler": n, "ms_per_draw": draws[n], "ms_per_step": statistics.median(t), "rounds": t} for n, t in ms.items()]
    doc = {"machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
           "command": "python scripts/sampler_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": {**vars(args), "prompt_tokens": 100, "max_new_tokens": new, "temperature": 0.7}, "results": rows}
    m = doc["machine"]
    lines = [f"# Drawing the token in plain decoding (batch {args.batch}, temperature 0.7)", "",
             (f"`{doc['command']}`; {m.get('cpu')}, {m.get('cpu_count')} CPUs, load average {load_start} -> "
              f"{doc['load_average']['end']}; median of {args.rounds} interleaved rounds of 127 decode steps."), "",
             "| sampler | ms per draw alone | decode ms/step | rounds |", "|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['ms_per_draw']:.3f} | {r['ms_per_step']:.2f} | {r['rounds']} |" for r in rows]
    write_atomic(args.out + ".md", "\n".join(lines) + "\n")
    write_atomic(args.out + ".json", json.dumps(doc, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
