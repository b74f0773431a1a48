"""What a verification of w tokens costs against a one-token step, by XLA CPU flag and matmul implementation.

Times SmolLM2-135M's full forward (all layers + the LM head, the work a plain step or a verification of w
tokens does) and the LM head alone, over w = 1..--max-width tokens per row at --batch rows (default 1), each as a compiled loop of
--steps steps (the cache donated, as in decoding); the minimum over --rounds rounds. Each variant (an XLA flag
set and `--matmul` implementation) runs in a process of its own, since XLA reads its flags once. Writes
PREFIX.json and PREFIX.md.

On a CPU a one-token step's matmuls are matrix-vector products, and from two tokens on they are small matrix
products, run by another kernel (YNNPACK by default in JAX 0.10, Eigen or oneDNN with the flags below) that
costs more per weight read: docs/adaptive.md, section `adaptive_v10_*`, "Why a verification costs so much on this
CPU". The `cpu-kernel` variant runs eej's own kernel for those few rows (`--matmul cpu`, eej.kernels.cpu_matmul),
which reads the weights once whatever the width. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/verify_width_cost.py --out benchmarks/results/verify_width_cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# name: (XLA_FLAGS, ModelConfig.matmul_impl, ModelConfig.attention_impl)
VARIANTS = {
    "default": ("", "xla", "xla"),
    "cpu-kernel": ("", "cpu", "xla"),
    "cpu-kernels": ("", "cpu", "cpu"),
    "eigen": ("--xla_cpu_use_xnnpack=false", "xla", "xla"),
    "onednn": ("--xla_cpu_use_xnnpack=false --xla_cpu_use_onednn=true", "xla", "xla"),
    "xnn-graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", "xla", "xla"),
    "no-ynn": ("--xla_cpu_experimental_ynn_fusion_type=", "xla", "xla"),
}


def measure(model_name: str, max_width: int, steps: int, rounds: int, matmul: str = "xla", attention: str = "xla",
            capacity: int | None = None, batch: int = 1) -> dict:
    """{"forward": {w: ms}, "head": {w: ms}} in this process (its XLA flags), with `matmul` and `attention`
    implementations, `batch` rows and a cache of `capacity` slots (default: just what the steps fill)."""
    import functools
    import time

    import jax
    import jax.numpy as jnp
    from jax import lax

    from eej.model.cache import init_cache
    from eej.model.packed import pack_projections
    from eej.model.transformer import embed, logits_from_hidden, run_layers
    from eej.weights.registry import load_model

    model = load_model(model_name, kernels="xla")
    cfg, params = model.cfg.replace(matmul_impl=matmul, attention_impl=attention), model.params
    if matmul == "cpu":  # column tiles, as an engine packs them
        params = pack_projections(params)
    capacity = capacity or 64 + steps * max_width

    @functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(1,))
    def loop(params, cache, width, head_only):
        def body(i, carry):
            cache, tokens, hidden = carry
            if head_only:  # the argmax (every column) fed back, so the steps do not fold into one
                top = jnp.argmax(logits_from_hidden(params, hidden, cfg), -1)
                return cache, tokens, hidden + top[..., None].astype(hidden.dtype) * 1e-9
            positions = jnp.broadcast_to(32 + i * width + jnp.arange(width, dtype=jnp.int32)[None], (batch, width))
            x, cache = run_layers(params, embed(params, tokens, cfg), cache, positions, cfg)
            return cache, jnp.argmax(logits_from_hidden(params, x, cfg), -1).astype(jnp.int32), hidden

        start = (cache, jnp.ones((batch, width), jnp.int32), jnp.ones((batch, width, cfg.hidden_size), cfg.jnp_dtype))
        cache, tokens, hidden = lax.fori_loop(0, steps, body, start)
        return cache, tokens, hidden

    out: dict = {"forward": {}, "head": {}}
    for kind in out:
        for width in range(1, max_width + 1):
            best = float("inf")
            for r in range(rounds + 1):  # round 0 compiles
                cache = init_cache(cfg, batch, capacity)
                t = time.perf_counter()
                jax.block_until_ready(loop(params, cache, width, kind == "head"))
                if r:
                    best = min(best, (time.perf_counter() - t) / steps * 1e3)
            out[kind][width] = round(best, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-width", type=int, default=5)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--out", default="benchmarks/results/verify_width_cost")
    p.add_argument("--batch", type=int, default=1, help="rows per step (a verification of w tokens is batch * w rows)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--capacity", type=int, default=None,
                   help="cache slots (default: what the steps fill; decoding sizes it to prompt + new tokens)")
    p.add_argument("--child-matmul", default="xla", help=argparse.SUPPRESS)
    p.add_argument("--child-attention", default="xla", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.max_width, args.steps, args.rounds, args.child_matmul,
                                 args.child_attention, args.capacity, args.batch)))
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.max_width < 1 or args.steps < 1 or args.rounds < 1 or args.batch < 1:
        print(f"verify_width_cost: error: unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})" if unknown
              else "verify_width_cost: error: --max-width, --steps, --rounds and --batch must be at least 1", file=sys.stderr)
        return 2
    if args.capacity is not None and args.capacity < 32 + args.steps * args.max_width:
        print(f"verify_width_cost: error: --capacity must hold the {32 + args.steps * args.max_width} positions the "
              "steps reach", file=sys.stderr)
        return 2

    from eej.bench.machine import machine_info
    from eej.bench.report import markdown_table, write_result

    machine = machine_info()
    machine["load_average_start"] = list(os.getloadavg())
    results = {}
    for name in variants:
        flags, matmul, attention = VARIANTS[name]
        env = {**os.environ, "XLA_FLAGS": flags}
        child = [sys.executable, __file__, "--child", "--model", args.model, "--max-width", str(args.max_width),
                 "--steps", str(args.steps), "--rounds", str(args.rounds), "--child-matmul", matmul,
                 "--child-attention", attention, "--batch", str(args.batch)] + (["--capacity", str(args.capacity)] if args.capacity else [])
        done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results[name] = {kind: {int(w): ms for w, ms in by_width.items()} for kind, by_width in measured.items()}
        print(name, results[name], flush=True)
    machine["load_average_end"] = list(os.getloadavg())

    widths = list(range(1, args.max_width + 1))
    rows = []
    for name in variants:
        for kind in ("forward", "head"):
            ms = results[name][kind]
            flags, matmul, attention = VARIANTS[name]
            rows.append([name, kind, f"`{flags}`" if flags else "(none)", matmul, attention]
                        + [f"{ms[w]:.2f} ({ms[w] / ms[1]:.2f}x)" for w in widths])
    command = "python scripts/verify_width_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command, "machine": machine, "model": args.model, "batch": args.batch, "steps": args.steps,
           "rounds": args.rounds, "capacity": args.capacity,
           "variants": {n: {"xla_flags": VARIANTS[n][0], "matmul": VARIANTS[n][1], "attention": VARIANTS[n][2],
                            **results[n]} for n in variants}}
    markdown = "\n".join([
        f"# Verification width cost (full forward and LM head, batch {args.batch})",
        "",
        f"`{command}` — {machine.get('cpu')} x{machine.get('cpu_count')}, JAX {machine.get('jax')}, load average "
        f"{machine.get('load_average_start')} -> {machine['load_average_end']}. Milliseconds per step (minimum over "
        f"{args.rounds} rounds of a {args.steps}-step compiled loop) and the ratio to one token.",
        "",
        markdown_table(["variant", "what", "XLA_FLAGS", "matmul", "attention"] + [f"w={w}" for w in widths], rows),
        "",
    ])
    write_result(doc, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
