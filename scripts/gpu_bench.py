#!/usr/bin/env python
"""Attention kernels and end-to-end decoding on a GPU: correctness against the references, then timings.

Run through scripts/gpu_bench.sh (it picks the interpreter and checks the backend):

  1. checks: every attention implementation (pallas decode + verify kernels, triton when jax-triton is
     installed) against the jnp reference on SmolLM2- and Llama-shaped random inputs (ragged lengths,
     length 1, a full cache; float32 and bfloat16), max abs error per case;
  2. kernels: milliseconds per call of each implementation for batch 1/8/32, decode (1 query) and
     verification (8 and 16 queries);
  3. decoding: tokens/s of `Engine.generate` (plain and every registered method) for batch 1/8/32 with
     each attention implementation, greedy, fixed length; and whether each implementation's tokens equal
     the xla implementation's.
Writes OUT.json (with the machine and device name) and OUT.md.

`--cpu-smoke` runs the same code on a tiny model and tiny shapes (Pallas interpreted, Triton skipped)
to check the script itself on a machine without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.machine import machine_info
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method, known_methods, random_method
from eej.model.attention import get_impl, reference_attention

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QUESTIONS = os.environ.get("EEJ_QUESTIONS", os.path.join(HERE, "..", "..", "shared", "data", "eval", "spec_bench.jsonl"))
FALLBACK_PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Give three tips for writing clear Python code.",
    "How do vaccines train the immune system?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List the planets of the solar system in order.",
]
# (label, Hq, Hkv, Dh): the real model here and a Llama-3-8B-like layer.
PHASES = {"checks", "timings", "decoding", "identity"}
HEAD_SHAPES = [("smollm2", 9, 3, 64), ("llama8b", 32, 8, 128)]


def available_impls(smoke: bool) -> dict[str, Callable | str]:
    """name -> callable, or the reason it is unavailable."""
    impls: dict[str, Callable | str] = {"xla": get_impl("xla")}
    for name in ("pallas", "triton"):
        try:
            impls[name] = get_impl(name)
        except ValueError as e:
            impls[name] = str(e)
    if smoke or jax.default_backend() != "gpu":
        impls["triton"] = "needs a GPU" if not isinstance(impls["triton"], str) else impls["triton"]
    return impls


def random_case(rng, b, t, hq, hkv, s, dh, dtype, kind: str):
    """q/k/v and positions: 'ragged' lengths in [1, S-t], 'one' = a single cached slot, 'full' = the last slot."""
    q = jnp.asarray(rng.standard_normal((b, t, hq, dh)), dtype)
    k = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    if kind == "ragged":
        starts = rng.integers(0, s - t + 1, size=b)
    elif kind == "one":
        starts = np.zeros(b, np.int64)
    else:
        starts = np.full(b, s - t)
    pos = jnp.asarray(starts[:, None] + np.arange(t)[None, :], jnp.int32)
    return q, k, v, pos


class Deadline:
    """Stops adding work once `seconds` have passed (so a time-limited GPU lease still returns results)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.hit = False

    def passed(self) -> bool:
        if self.end is not None and time.monotonic() > self.end:
            self.hit = True
        return self.hit


def check_kernels(impls, shapes, capacity: int, batch: int, rng, smoke: bool = False,
                  deadline: Deadline | None = None) -> list[dict]:
    """Every kernel vs the reference: 1/5/16 queries, ragged / single-slot / full lengths, a sliding window."""
    deadline = deadline or Deadline(None)
    records = []
    cases = [(t, kind, None) for t in (1, 5, 16) for kind in ("ragged", "one", "full")]
    cases += [(t, "ragged", capacity // 4) for t in (1, 16)]
    if smoke:  # interpreted kernels compile slowly: a few of each kind
        cases = [(1, "ragged", None), (1, "full", None), (5, "one", None), (16, "ragged", capacity // 4)]
    for label, hq, hkv, dh in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            for t, kind, window in cases:
                if deadline.passed():
                    return records
                q, k, v, pos = random_case(rng, batch, t, hq, hkv, capacity, dh, dtype, kind)
                # The truth at full float32 precision (on a GPU the default f32 matmul may use TF32).
                with jax.default_matmul_precision("highest"):
                    want = np.asarray(reference_attention(q, k, v, pos, sliding_window=window), np.float32)
                for name, fn in impls.items():
                    if name == "xla" or isinstance(fn, str):
                        continue
                    rec = dict(impl=name, shape=label, dtype=jnp.dtype(dtype).name, queries=t, lengths=kind,
                               sliding_window=window, batch=batch, capacity=capacity)
                    try:
                        call = jax.jit(lambda *a, fn=fn, w=window: fn(*a, sliding_window=w))
                        got = np.asarray(call(q, k, v, pos), np.float32)
                        err = float(np.max(np.abs(got - want)))
                        tol = 2e-3 if dtype == jnp.float32 else 5e-2
                        rec.update(max_abs_error=err, ok=bool(np.isfinite(err) and err <= tol))
                    except Exception as e:  # a kernel that fails to lower is a result, not a crash
                        rec.update(ok=False, error=error_text(e))
                    records.append(rec)
    return records


def error_text(e: BaseException, limit: int = 2000) -> str:
    """The whole error message (compiler errors put the cause on their last lines), capped at `limit` characters."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit // 2] + " [...] " + text[-limit // 2 :]


def error_summary(text: str) -> str:
    """One line for a markdown list: the first and the last non-empty line of an error."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"[:400]


def time_call(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_kernels(impls, shapes, capacity: int, batches, query_counts, dtype, iters: int, rng,
                 deadline: Deadline | None = None) -> list[dict]:
    deadline = deadline or Deadline(None)
    records = []
    for label, hq, hkv, dh in shapes:
        for b in batches:
            for t in query_counts:
                if deadline.passed():
                    return records
                q, k, v, pos = random_case(rng, b, t, hq, hkv, capacity, dh, dtype, "ragged")
                visible = int(np.sum(np.asarray(pos)[:, -1] + 1))
                for name, fn in impls.items():
                    rec = dict(impl=name, shape=label, dtype=jnp.dtype(dtype).name, batch=b, queries=t,
                               capacity=capacity)
                    if isinstance(fn, str):
                        rec["skipped"] = fn
                    else:
                        try:
                            ms = time_call(jax.jit(lambda *a, fn=fn: fn(*a, sliding_window=None)), (q, k, v, pos), iters)
                            kv_bytes = 2 * visible * hkv * dh * jnp.dtype(dtype).itemsize
                            rec.update(ms=ms, visible_kv_gb_per_s=kv_bytes / (ms * 1e-3) / 1e9)
                        except Exception as e:
                            rec["error"] = error_text(e)
                    records.append(rec)
    return records


def load_prompts(path: str, n: int) -> list[str]:
    if not os.path.isfile(path):
        return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["turns"][0] for r in rows[:n]]


def prefix_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Mean over rows of (tokens equal to the reference before the first difference) / reference length."""
    fractions = []
    for row, ref in zip(tokens, reference):
        n = 0
        while n < min(len(row), len(ref)) and row[n] == ref[n]:
            n += 1
        fractions.append(n / max(len(ref), 1))
    return float(np.mean(fractions))


def method_instance(model, name: str):
    """The method as shipped (trained add-ons, default preset); random add-ons if those are missing."""
    try:
        strategy, params = build_method(model, name)
        return strategy, params, "shipped"
    except Exception:
        strategy, params = random_method(model, name, seed=0)
        return strategy, params, "random add-ons (speed only; acceptance not representative)"


def build_engines(model, impls, methods) -> tuple[dict, list[dict]]:
    """(method, impl) -> (engine, add-ons note), and records for the pairs that could not be built."""
    import dataclasses

    engines, failed = {}, []
    for method in methods:
        for name, fn in impls.items():
            if isinstance(fn, str):
                failed.append(dict(method=method, impl=name, skipped=fn))
                continue
            m = dataclasses.replace(model, cfg=model.cfg.replace(attention_impl=name))
            try:
                strategy, params, addons = method_instance(m, method)
                engines[method, name] = (Engine(m, strategy, params), addons)
            except Exception as e:
                failed.append(dict(method=method, impl=name, error=error_text(e)))
    return engines, failed


def time_decoding(model, impls, methods, batches, max_new: int, rounds: int, prompt_texts,
                  deadline: Deadline | None = None, on_record: Callable[[list], None] = lambda records: None) -> list[dict]:
    """Tokens/s per (batch, method, impl), smallest batch first (so a time budget cuts the largest batches);
    each method's tokens compared with the same method on the xla implementation."""
    deadline = deadline or Deadline(None)
    encode = getattr(model.tokenizer, "encode_chat", model.tokenizer.encode)
    engines, records = build_engines(model, impls, methods)
    for b in batches:
        prompts = [encode(p) for p in prompt_texts[:b]]
        for method in methods:
            baseline = None
            for name in impls:
                if (method, name) not in engines:
                    continue
                if deadline.passed():
                    return records
                engine, addons = engines[method, name]
                rec = dict(method=method, impl=name, batch=b, max_new_tokens=max_new, addons=addons)
                try:
                    first = engine.generate(prompts, max_new, SamplingConfig(), eos_ids=())
                    runs = [engine.generate(prompts, max_new, SamplingConfig(), eos_ids=()) for _ in range(rounds)]
                    tokens = sum(sum(o.new_tokens) for o in runs)
                    seconds = sum(o.seconds for o in runs)
                    rec.update(tokens_per_second=tokens / seconds, compile_seconds=first.compile_seconds,
                               forwards_per_token=float(np.sum(runs[0].forwards) / max(sum(runs[0].new_tokens), 1)))
                    if name == "xla":
                        baseline = first.tokens
                    elif baseline is not None:
                        rec["tokens_equal_xla"] = first.tokens == baseline
                        rec["prefix_agreement_xla"] = prefix_agreement(first.tokens, baseline)
                except Exception as e:
                    rec["error"] = error_text(e)
                records.append(rec)
                on_record(records)
                print(f"  decoding {method} {name} batch {b}: {rec.get('tokens_per_second', rec.get('error'))}", flush=True)
    return records


def identity_check(model, impls, methods, batch: int, max_new: int, prompt_texts,
                   deadline: Deadline | None = None) -> list[dict]:
    """float32 at full matmul precision: each (method, impl)'s tokens vs plain decoding on the xla
    implementation (lossless methods and every kernel must reproduce it exactly)."""
    deadline = deadline or Deadline(None)
    encode = getattr(model.tokenizer, "encode_chat", model.tokenizer.encode)
    prompts = [encode(p) for p in prompt_texts[:batch]]
    methods = ["plain", *[m for m in methods if m != "plain"]]
    records, baseline = [], None
    with jax.default_matmul_precision("highest"):
        engines, failed = build_engines(model, impls, methods)
        records += failed
        for method in methods:
            for name in impls:
                if (method, name) not in engines or deadline.passed():
                    continue
                engine, addons = engines[method, name]
                rec = dict(method=method, impl=name, batch=batch, max_new_tokens=max_new, dtype="float32", addons=addons)
                try:
                    tokens = engine.generate(prompts, max_new, SamplingConfig(), eos_ids=()).tokens
                    if baseline is None:
                        baseline = tokens  # plain on xla: the first pair built
                    else:
                        rec.update(tokens_equal_xla=tokens == baseline, prefix_agreement_xla=prefix_agreement(tokens, baseline))
                except Exception as e:
                    rec["error"] = error_text(e)
                records.append(rec)
                print(f"  identity {method} {name}: {rec.get('tokens_equal_xla', rec.get('error', 'baseline'))}", flush=True)
    return records


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# {report['benchmark']}", "",
             f"Device: {report['device']} (JAX {m['jax']}, backend {m['jax_backend']}); host {m['cpu']}.",
             f"Settings: {json.dumps(report['settings'])}", ""]
    checks = report["kernel_checks"]
    bad = [c for c in checks if not c.get("ok")]
    lines += [f"## Kernel checks: {len(checks) - len(bad)}/{len(checks)} within tolerance", ""]
    for c in bad:
        lines.append(f"- FAIL {c['impl']} {c['shape']} {c['dtype']} T={c['queries']} {c['lengths']}: "
                     f"{error_summary(c['error']) if 'error' in c else c.get('max_abs_error')}")
    lines += ["", "## Kernel time (ms per call, ragged lengths)", "",
              "| shape | dtype | batch | queries | " + " | ".join(report["impls"]) + " |",
              "|---|---|---:|---:|" + "---:|" * len(report["impls"])]
    keys = sorted({(r["shape"], r["dtype"], r["batch"], r["queries"]) for r in report["kernel_timings"]})
    for key in keys:
        cells = []
        for impl in report["impls"]:
            r = next((x for x in report["kernel_timings"] if (x["shape"], x["dtype"], x["batch"], x["queries"]) == key
                      and x["impl"] == impl), {})
            cells.append(f"{r['ms']:.3f}" if "ms" in r else "n/a")
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    lines += ["", f"## Decoding ({report['settings']['model']}, greedy, tokens/s)", "",
              "| method | batch | " + " | ".join(report["impls"]) + " | xla speedup vs plain | same tokens as xla |",
              "|---|---:|" + "---:|" * len(report["impls"]) + "---:|---|"]
    plain_xla = {r["batch"]: r["tokens_per_second"] for r in report["decoding"]
                 if r.get("method") == "plain" and r.get("impl") == "xla" and "tokens_per_second" in r}
    keys = sorted({(r["method"], r["batch"]) for r in report["decoding"] if "batch" in r})
    for method, b in keys:
        cells, same = [], []
        for impl in report["impls"]:
            r = next((x for x in report["decoding"] if x.get("method") == method and x.get("batch") == b
                      and x["impl"] == impl), {})
            cells.append(f"{r['tokens_per_second']:.1f}" if "tokens_per_second" in r else "n/a")
            if "tokens_equal_xla" in r:
                agree = f" ({r['prefix_agreement_xla']:.2f})" if "prefix_agreement_xla" in r else ""
                same.append(f"{impl}: {'yes' if r['tokens_equal_xla'] else 'no'}{agree}")
        mine = next((x["tokens_per_second"] for x in report["decoding"] if x.get("method") == method
                     and x.get("batch") == b and x["impl"] == "xla" and "tokens_per_second" in x), None)
        ratio = f"{mine / plain_xla[b]:.2f}x" if mine and b in plain_xla else "n/a"
        lines.append(f"| {method} | {b} | " + " | ".join(cells) + f" | {ratio} | {', '.join(same) or '-'} |")
    lines += ["", "(same tokens: whether every row equals the xla implementation's output; in brackets the mean "
              "fraction of each row that agrees before the first difference.)"]
    ident = report.get("identity_float32") or []
    if ident:
        lines += ["", "## float32 token identity (full-precision matmuls; vs plain decoding on the xla implementation)", "",
                  "| method | impl | batch | new tokens | same tokens as plain on xla |", "|---|---|---:|---:|---|"]
        for r in ident:
            verdict = (error_summary(r["error"]) if r.get("error") else None) or r.get("skipped") or ("baseline" if "tokens_equal_xla" not in r else
                                         f"{'yes' if r['tokens_equal_xla'] else 'no'} ({r['prefix_agreement_xla']:.2f})")
            lines.append(f"| {r['method']} | {r['impl']} | {r.get('batch', '')} | {r.get('max_new_tokens', '')} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and shapes, to check the script without a GPU")
    ap.add_argument("--model", default=None, help="default: smollm2-135m (tiny-gqa with --cpu-smoke)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="decoding dtype")
    ap.add_argument("--batch-sizes", default=None, help="default 1,8,32 (1,2 with --cpu-smoke)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (6 with --cpu-smoke)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=None, help="KV slots in the kernel benchmarks (default 4096)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--questions", default=DEFAULT_QUESTIONS)
    ap.add_argument("--timing-dtypes", default="bfloat16,float32", help="dtypes of the kernel timings")
    ap.add_argument("--phases", default=",".join(sorted(PHASES)),
                    help="comma-separated subset of checks,timings,decoding,identity (default: all)")
    ap.add_argument("--decode-impls", default=None,
                    help="implementations for the decoding and identity phases (default: those of --impls)")
    ap.add_argument("--impls", default=None, help="comma-separated attention implementations (default: all; xla always runs)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new case starts; what was measured is written (for time-limited GPU leases)")
    ap.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/gpu_<device>)")
    args = ap.parse_args()

    smoke = args.cpu_smoke
    backend = jax.default_backend()
    if not smoke and backend != "gpu":
        print(f"gpu_bench: JAX runs on {backend}, not a GPU (install the gpu extra: pip install -e '.[gpu]'); "
              "use --cpu-smoke to check the script here", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", device.platform)
    batches = [int(x) for x in (args.batch_sizes or ("1,2" if smoke else "1,8,32")).split(",")]
    max_new = args.max_new_tokens or (6 if smoke else 128)
    capacity = args.capacity or (64 if smoke else 4096)
    shapes = [("tiny", 4, 2, 16)] if smoke else HEAD_SHAPES
    iters = 2 if smoke else 20
    rng = np.random.default_rng(0)
    impls = available_impls(smoke)
    if args.impls:
        wanted = args.impls.split(",")
        unknown = [w for w in wanted if w not in impls]
        if unknown:
            print(f"gpu_bench: unknown --impls {unknown}; known: {', '.join(impls)}", file=sys.stderr)
            return 2
        impls = {k: v for k, v in impls.items() if k in wanted or k == "xla"}  # xla is the baseline
    decode_impls = impls
    if args.decode_impls:
        decode_impls = {k: v for k, v in available_impls(smoke).items() if k in args.decode_impls.split(",") or k == "xla"}
    phases = set(args.phases.split(","))
    if phases - PHASES:
        print(f"gpu_bench: unknown --phases {sorted(phases - PHASES)}; known: {', '.join(sorted(PHASES))}", file=sys.stderr)
        return 2
    print(f"device {device_name}; implementations: " + ", ".join(
        f"{k}{'' if callable(v) else ' (unavailable: ' + v + ')'}" for k, v in impls.items()), flush=True)

    deadline = Deadline(args.time_budget)
    model_name = args.model or ("tiny-gqa" if smoke else "smollm2-135m")
    report: dict[str, Any] = {
        "benchmark": "attention kernels and decoding" + (" (CPU smoke run: numbers mean nothing)" if smoke else ""),
        "device": device_name,
        "device_count": jax.device_count(),
        "machine": machine_info(),
        "impls": list(impls),
        "unavailable": {k: v for k, v in impls.items() if isinstance(v, str)},
        "settings": dict(phases=sorted(phases), model=model_name, dtype="float32" if smoke else args.dtype, batch_sizes=batches, max_new_tokens=max_new,
                         rounds=args.rounds, kernel_capacity=capacity, kernel_iters=iters, greedy=True,
                         eos="ignored (fixed-length outputs)", smoke=smoke, time_budget_s=args.time_budget),
        "kernel_checks": [],
        "kernel_timings": [],
        "decoding": [],
    }
    safe = "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_")
    out = args.out or os.path.join(HERE, "..", "benchmarks", "results", f"gpu_{safe}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write() -> None:
        """Rewritten after every phase, so a run stopped early still leaves what it measured."""
        report["stopped_by_time_budget"] = deadline.hit
        with open(out + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(out + ".md", "w") as f:
            f.write(render_markdown(report))

    checks = [] if "checks" not in phases else check_kernels(impls, shapes, capacity=min(capacity, 256 if smoke else 1024), batch=2 if smoke else 8,
                           rng=rng, smoke=smoke, deadline=deadline)
    report["kernel_checks"] = checks
    write()
    print(f"kernel checks: {sum(c.get('ok', False) for c in checks)}/{len(checks)} ok", flush=True)
    for c in checks:
        if not c.get("ok"):
            print(f"  FAIL {c}", flush=True)
    timing_dtypes = [jnp.float32] if smoke else [jnp.dtype(d) for d in args.timing_dtypes.split(",")]
    for dtype in timing_dtypes if "timings" in phases else []:
        report["kernel_timings"] += time_kernels(impls, shapes, capacity, batches,
                                                 (1, 16) if smoke else (1, 8, 16), dtype, iters, rng, deadline)
        write()
    print("kernel timings done", flush=True)

    from eej.weights.registry import load_model

    model = load_model(model_name, dtype="float32" if smoke else args.dtype)
    methods = args.methods.split(",") if args.methods else list(known_methods())
    prompt_texts = load_prompts(args.questions, max(batches))

    def on_record(records: list) -> None:
        report["decoding"] = records
        write()

    def run_decoding() -> None:
        report["decoding"] = time_decoding(model, decode_impls, methods, batches, max_new, args.rounds, prompt_texts,
                                           deadline, on_record)
        write()

    def run_identity() -> None:
        model32 = model if model.cfg.dtype == "float32" else load_model(model_name, dtype="float32")
        report["identity_float32"] = identity_check(model32, decode_impls, methods, min(8, max(batches)), min(max_new, 64),
                                                    prompt_texts, deadline)
        write()

    # decoding and identity run in the order --phases names them (the first gets the time budget first)
    order = [p for p in args.phases.split(",") if p in ("decoding", "identity")]
    for phase in order:
        {"decoding": run_decoding, "identity": run_identity}[phase]()
    print(render_markdown(report))
    print(f"wrote {out}.json and {out}.md" + (" (stopped early by --time-budget)" if deadline.hit else ""))
    failed = [c for c in checks if not c.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
