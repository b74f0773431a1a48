"""The GPU benchmark (scripts/gpu_bench.py): four phases, one JSON report and its markdown.

    settings = GpuSettings(methods=("plain", "kangaroo"))          # or GpuSettings.cpu_smoke() without a GPU
    report = gpu_report(model, prompts, settings, on_update=lambda r: write_result(r, gpu_markdown(r), "out/gpu"))

  checks    every attention kernel against the jnp reference (eej.bench.attention.check_kernels)
  timings   milliseconds per kernel call (eej.bench.attention.time_kernels)
  decoding  tokens/s of every method with every attention implementation and batch size, greedy, EOS
            ignored (fixed length), and whether each implementation's tokens equal the xla one's
  identity  float32 at full matmul precision: every (method, implementation)'s tokens against plain
            decoding on xla (lossless methods and every kernel must reproduce them exactly)

A method runs with its trained add-ons (its default preset); a missing add-on stops the run before
any phase. `random_addons=True` runs methods with random add-ons instead, and every such row says so
(speed only: acceptance is not representative).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.attention import (
    HEAD_SHAPES,
    Deadline,
    check_kernels,
    error_summary,
    error_text,
    implementations,
    time_kernels,
)
from eej.bench.contestants import MethodContestant, with_attention
from eej.bench.machine import machine_info
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import known_methods, parse_method, random_method
from eej.weights.registry import Model

PHASES = ("checks", "timings", "decoding", "identity")
TRAINED = "trained"
RANDOM = "random add-ons (speed only; acceptance not representative)"


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """What the GPU benchmark runs (defaults: a full run on a GPU; `cpu_smoke()`: tiny shapes, to check the code).

    phases: any of PHASES; decoding and identity run in the order given (the first gets the time budget first).
    impls: implementations checked and timed (None: all; xla always runs). decode_impls: those of the
    decoding phases (None: impls). methods: specs, None = every registered method. capacity: KV slots
    of the kernel timings. time_budget: seconds after which no new case starts. smoke: tiny head shapes,
    few kernel cases and iterations, no GPU needed (numbers mean nothing).
    """

    phases: tuple[str, ...] = PHASES
    impls: tuple[str, ...] | None = None
    decode_impls: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    max_new_tokens: int = 128
    rounds: int = 2
    capacity: int = 4096
    timing_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    time_budget: float | None = None
    random_addons: bool = False
    smoke: bool = False

    @classmethod
    def cpu_smoke(cls, **overrides: Any) -> GpuSettings:
        """The whole benchmark on a CPU: Pallas interpreted, Triton skipped, tiny shapes."""
        tiny = dict(batch_sizes=(1, 2), max_new_tokens=6, capacity=64, timing_dtypes=("float32",), smoke=True)
        return cls(**{**tiny, **overrides})


def decoding_contestants(model: Model, methods: Sequence[str], impls: dict[str, Callable | str],
                         random_addons: bool = False) -> tuple[dict[tuple[str, str], tuple[MethodContestant, str]], list[dict]]:
    """(method, impl) -> (contestant, add-ons label), and a record for each implementation unavailable here.

    methods: specs `NAME[:PRESET|:FILE]`. Trained add-ons unless random_addons (plain has none); a method
    whose add-ons are missing raises (eej.weights.artifacts.ArtifactError, a ValueError).
    """
    built, skipped = {}, []
    for impl, fn in impls.items():
        if isinstance(fn, str):
            skipped += [dict(method=m, impl=impl, skipped=fn) for m in methods]
            continue
        m = with_attention(model, impl)
        for method in methods:
            if method == "plain":
                built[method, impl] = (MethodContestant(m, method), "none")
            elif random_addons:
                engine = Engine(m, *random_method(m, parse_method(method)[0]))
                built[method, impl] = (MethodContestant(m, method, engine=engine), RANDOM)
            else:
                built[method, impl] = (MethodContestant(m, method), TRAINED)
    return built, skipped


def prefix_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Mean over rows of (tokens equal to the reference before the first difference) / reference length."""
    fractions = []
    for row, ref in zip(tokens, reference):
        n = 0
        while n < min(len(row), len(ref)) and row[n] == ref[n]:
            n += 1
        fractions.append(n / max(len(ref), 1))
    return float(np.mean(fractions))


def _decode(entry: tuple[MethodContestant, str], prompts: Sequence[Sequence[int]], max_new: int, rounds: int,
            baseline: list[list[int]] | None, rec: dict[str, Any]) -> list[list[int]] | None:
    """One (method, impl) row into `rec`: EOS ignored, tokens/s over `rounds` timed repeats (none: tokens only),
    the tokens compared with `baseline`'s; -> the baseline for the next rows (these tokens if there was none)."""
    contestant, rec["addons"] = entry
    try:
        first = contestant.generate(prompts, max_new, SamplingConfig(), 0, ignore_eos=True)
        if rounds:
            runs = [contestant.generate(prompts, max_new, SamplingConfig(), 0, ignore_eos=True) for _ in range(rounds)]
            tokens = [sum(len(t) for t in o.tokens) for o in runs]
            rec.update(tokens_per_second=sum(tokens) / sum(o.seconds for o in runs), compile_seconds=first.compile_seconds,
                       forwards_per_token=float(np.sum(runs[0].forwards) / max(tokens[0], 1)))
    except Exception as e:  # a kernel that fails to compile is a result, not a crash
        rec["error"] = error_text(e)
        return baseline
    if baseline is None:
        return first.tokens
    rec.update(tokens_equal_xla=first.tokens == baseline, prefix_agreement_xla=prefix_agreement(first.tokens, baseline))
    return baseline


def time_decoding(contestants: dict, methods: Sequence[str], impls: Sequence[str], batches: Sequence[int],
                  max_new: int, rounds: int, prompts: Sequence[Sequence[int]], deadline: Deadline | None = None,
                  on_record: Callable[[list], None] = lambda records: None) -> list[dict]:
    """Tokens/s per (batch, method, impl), EOS ignored, smallest batch first (a time budget cuts the largest);
    each method's tokens compared with the same method on the first implementation (xla).

    contestants: from `decoding_contestants`; prompts: token ids, the first `batch` of them make a batch.
    """
    deadline = deadline or Deadline(None)
    records: list[dict] = []
    for b in batches:
        for method in methods:
            baseline = None
            for impl in [i for i in impls if (method, i) in contestants]:
                if deadline.passed():
                    return records
                records.append(dict(method=method, impl=impl, batch=b, max_new_tokens=max_new))
                baseline = _decode(contestants[method, impl], prompts[:b], max_new, rounds, baseline, records[-1])
                on_record(records)
    return records


def identity_check(contestants: dict, methods: Sequence[str], impls: Sequence[str], max_new: int,
                   prompts: Sequence[Sequence[int]], deadline: Deadline | None = None) -> list[dict]:
    """float32 at full matmul precision: each (method, impl)'s tokens vs plain decoding on the first implementation.

    contestants: from `decoding_contestants` on a float32 model, built for this check alone (their
    compiled code must not be shared with runs at the default precision); prompts: one batch.
    """
    deadline = deadline or Deadline(None)
    records, baseline = [], None
    with jax.default_matmul_precision("highest"):
        for method in ["plain", *[m for m in methods if m != "plain"]]:
            for impl in [i for i in impls if (method, i) in contestants]:
                if not deadline.passed():
                    records.append(dict(method=method, impl=impl, batch=len(prompts), max_new_tokens=max_new, dtype="float32"))
                    baseline = _decode(contestants[method, impl], prompts, max_new, 0, baseline, records[-1])
    return records


def gpu_report(model: Model, prompts: Sequence[str], settings: GpuSettings, identity_model: Model | None = None,
               on_update: Callable[[dict], None] = lambda report: None) -> dict[str, Any]:
    """Run the phases of `settings` (see the module docstring) -> the report (JSON-ready dict).

    prompts: chat prompts (at least max(batch_sizes)); identity_model: `model` in float32 (default: `model`,
    which must then be float32). on_update(report) is called after every phase and decoding row, so a
    run stopped early still leaves what it measured. ValueError, before any phase, for bad settings, a
    missing trained add-on, or no GPU (unless settings.smoke).
    """
    backend = jax.default_backend()
    if not settings.smoke and backend != "gpu":
        raise ValueError(f"JAX runs on {backend}, not a GPU (install the gpu extra: pip install -e '.[gpu]'); "
                         "use --cpu-smoke to check the benchmark here")
    unknown = [p for p in settings.phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase {unknown[0]!r}; known: {', '.join(PHASES)}")
    if settings.rounds < 1 or len(prompts) < max(settings.batch_sizes):
        raise ValueError(f"need rounds >= 1 and at least {max(settings.batch_sizes)} prompts (the largest batch)")
    impls = implementations(settings.impls)
    decode_impls = implementations(settings.decode_impls) if settings.decode_impls else impls
    methods = list(settings.methods or known_methods())
    ids = [model.tokenizer.encode_chat(p) for p in prompts]
    # Every engine is built up front: a missing add-on stops the run before any GPU time is spent.
    built = {}
    if "decoding" in settings.phases:
        built["decoding"] = decoding_contestants(model, methods, decode_impls, settings.random_addons)
    if "identity" in settings.phases:
        identity_model = identity_model or model
        if identity_model.cfg.dtype != "float32":
            raise ValueError("the identity phase needs a float32 model (identity_model)")
        built["identity"] = decoding_contestants(identity_model, list(dict.fromkeys(["plain", *methods])), decode_impls,
                                                 settings.random_addons)

    device = jax.devices()[0]
    deadline = Deadline(settings.time_budget)
    rng = np.random.default_rng(0)
    shapes, iters, queries = ((("tiny", 4, 2, 16),), 2, (1, 16)) if settings.smoke else (HEAD_SHAPES, 20, (1, 8, 16))
    report: dict[str, Any] = {
        "benchmark": "attention kernels and decoding" + (" (CPU smoke run: numbers mean nothing)" if settings.smoke else ""),
        "device": getattr(device, "device_kind", device.platform),
        "device_count": jax.device_count(),
        "machine": machine_info(),
        "impls": list(impls),
        "unavailable": {k: v for k, v in impls.items() if isinstance(v, str)},
        "settings": dict(phases=list(settings.phases), model=model.name, dtype=model.cfg.dtype,
                         batch_sizes=list(settings.batch_sizes), max_new_tokens=settings.max_new_tokens,
                         rounds=settings.rounds, kernel_capacity=settings.capacity, kernel_iters=iters,
                         greedy=True, eos="ignored (fixed-length outputs)", smoke=settings.smoke,
                         time_budget_s=settings.time_budget, random_addons=settings.random_addons),
        "kernel_checks": [],
        "kernel_timings": [],
        "decoding": [],
    }

    def update(key: str, value: Any) -> None:
        report[key] = value
        report["stopped_by_time_budget"] = deadline.hit
        on_update(report)

    if "checks" in settings.phases:
        update("kernel_checks", check_kernels(impls, shapes, min(settings.capacity, 256 if settings.smoke else 1024),
                                              2 if settings.smoke else 8, rng, settings.smoke, deadline))
    for dtype in settings.timing_dtypes if "timings" in settings.phases else ():
        update("kernel_timings", report["kernel_timings"] + time_kernels(
            impls, shapes, settings.capacity, settings.batch_sizes, queries, jnp.dtype(dtype), iters, rng, deadline))
    for phase in [p for p in settings.phases if p in built]:
        contestants, skipped = built[phase]
        if phase == "decoding":
            update("decoding", skipped + time_decoding(
                contestants, methods, list(decode_impls), settings.batch_sizes, settings.max_new_tokens, settings.rounds,
                ids, deadline, on_record=lambda records, skipped=skipped: update("decoding", skipped + records)))
        else:
            batch = min(8, max(settings.batch_sizes))
            update("identity_float32", skipped + identity_check(
                contestants, methods, list(decode_impls), min(settings.max_new_tokens, 64), ids[:batch], deadline))
    report["stopped_by_time_budget"] = deadline.hit
    return report


def _row(records: list[dict], **match: Any) -> dict:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), {})


def gpu_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: failed checks, kernel times, decoding tokens/s per implementation, float32 identity."""
    m, impls = report["machine"], report["impls"]
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
              "| shape | dtype | batch | queries | " + " | ".join(impls) + " |",
              "|---|---|---:|---:|" + "---:|" * len(impls)]
    timings = report["kernel_timings"]
    for key in sorted({(r["shape"], r["dtype"], r["batch"], r["queries"]) for r in timings}):
        rows = [_row(timings, shape=key[0], dtype=key[1], batch=key[2], queries=key[3], impl=impl) for impl in impls]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(f"{r['ms']:.3f}" if "ms" in r else "n/a" for r in rows) + " |")
    lines += ["", f"## Decoding ({report['settings']['model']}, greedy, tokens/s)", "",
              "| method | batch | " + " | ".join(impls) + " | xla speedup vs plain | same tokens as xla |",
              "|---|---:|" + "---:|" * len(impls) + "---:|---|"]
    decoding = [r for r in report["decoding"] if "tokens_per_second" in r]
    for method, b in sorted({(r["method"], r["batch"]) for r in report["decoding"] if "batch" in r}):
        rows = {impl: _row(decoding, method=method, batch=b, impl=impl) for impl in impls}
        same = [f"{impl}: {'yes' if r['tokens_equal_xla'] else 'no'}"
                + (f" ({r['prefix_agreement_xla']:.2f})" if "prefix_agreement_xla" in r else "")
                for impl, r in rows.items() if "tokens_equal_xla" in r]
        mine, plain = rows["xla"].get("tokens_per_second"), _row(decoding, method="plain", batch=b, impl="xla").get("tokens_per_second")
        label = method + (" (random add-ons)" if _random(report["decoding"], method) else "")
        lines.append(f"| {label} | {b} | " + " | ".join(f"{r['tokens_per_second']:.1f}" if r else "n/a" for r in rows.values())
                     + f" | {f'{mine / plain:.2f}x' if mine and plain else 'n/a'} | {', '.join(same) or '-'} |")
    lines += ["", "(same tokens: whether every row equals the xla implementation's output; in brackets the mean "
              "fraction of each row that agrees before the first difference.)"]
    ident = report.get("identity_float32") or []
    if ident:
        lines += ["", "## float32 token identity (full-precision matmuls; vs plain decoding on the xla implementation)", "",
                  "| method | impl | batch | new tokens | same tokens as plain on xla |", "|---|---|---:|---:|---|"]
        for r in ident:
            verdict = ((error_summary(r["error"]) if r.get("error") else None) or r.get("skipped")
                       or ("baseline" if "tokens_equal_xla" not in r
                           else f"{'yes' if r['tokens_equal_xla'] else 'no'} ({r['prefix_agreement_xla']:.2f})"))
            label = r["method"] + (" (random add-ons)" if _random(ident, r["method"]) else "")
            lines.append(f"| {label} | {r['impl']} | {r.get('batch', '')} | {r.get('max_new_tokens', '')} | {verdict} |")
    return "\n".join(lines) + "\n"


def _random(records: list[dict], method: str) -> bool:
    """Whether `method` ran with random add-ons in these records (labelled so wherever it appears)."""
    return any(r.get("method") == method and str(r.get("addons", "")).startswith("random") for r in records)
