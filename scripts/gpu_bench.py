#!/usr/bin/env python
"""Attention kernels and end-to-end decoding on a GPU: correctness against the references, then timings.

Run through scripts/gpu_bench.sh (it picks the interpreter and checks the backend). The phases
(eej.bench.gpu): kernel checks against the jnp reference, kernel timings, fixed-length decoding of
plain and every method per attention implementation and batch size, float32 token identity against
plain. Writes OUT.json (with the machine and device name) and OUT.md; exit status 1 if a check fails.

Methods run with their trained add-ons; a missing add-on is an error (exit 2). `--random-addons`
runs them with random add-ons instead (speed only), labelled so in the output. `--cpu-smoke` runs
everything on a tiny model and tiny shapes (Pallas interpreted, Triton skipped) to check the
benchmark without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from eej.bench.gpu import PHASES, GpuSettings, gpu_markdown, gpu_report
from eej.bench.questions import SPEC_BENCH, mt_bench_questions
from eej.bench.report import write_result
from eej.weights.registry import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and shapes, to check the benchmark without a GPU")
    ap.add_argument("--model", default=None, help="default: smollm2-135m (tiny-gqa with --cpu-smoke)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="decoding dtype (float32 with --cpu-smoke)")
    ap.add_argument("--batch-sizes", default=None, help="default 1,8,32 (1,2 with --cpu-smoke)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (6 with --cpu-smoke)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=None, help="KV slots in the kernel timings (default 4096)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--random-addons", action="store_true", help="methods with random add-ons (speed only; labelled)")
    ap.add_argument("--questions", default=SPEC_BENCH, help="MT-Bench questions (any Spec-Bench-schema file holding them)")
    ap.add_argument("--timing-dtypes", default=None, help="dtypes of the kernel timings (default bfloat16,float32)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    ap.add_argument("--impls", default=None, help="comma-separated attention implementations (default: all; xla always runs)")
    ap.add_argument("--decode-impls", default=None, help="implementations of the decoding and identity phases (default: --impls)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new case starts; what was measured is written (for time-limited GPU leases)")
    ap.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/gpu_<device>)")
    args = ap.parse_args(argv)

    listed = {k: tuple(v.split(",")) for k, v in vars(args).items()
              if k in ("phases", "impls", "decode_impls", "methods", "timing_dtypes") and v}
    given = dict(listed, batch_sizes=args.batch_sizes and tuple(int(b) for b in args.batch_sizes.split(",")),
                 max_new_tokens=args.max_new_tokens, rounds=args.rounds, capacity=args.capacity,
                 time_budget=args.time_budget, random_addons=args.random_addons)
    given = {k: v for k, v in given.items() if v is not None}
    settings = GpuSettings.cpu_smoke(**given) if args.cpu_smoke else GpuSettings(**given)
    name = args.model or ("tiny-gqa" if args.cpu_smoke else "smollm2-135m")
    dtype = "float32" if args.cpu_smoke else args.dtype
    device = jax.devices()[0]
    safe = "".join(c if c.isalnum() else "_" for c in getattr(device, "device_kind", device.platform).lower()).strip("_")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_{safe}")
    try:
        questions = mt_bench_questions(args.questions, max(settings.batch_sizes))
        model = load_model(name, dtype=dtype, kernels="xla")
        float32 = model if dtype == "float32" or "identity" not in settings.phases else load_model(name, dtype="float32", kernels="xla")
        report = gpu_report(model, [q.turns[0] for q in questions], settings, float32,
                            on_update=lambda r: write_result(r, gpu_markdown(r), out))
    except ValueError as e:
        print(f"gpu_bench: {e}", file=sys.stderr)
        return 2
    write_result(report, gpu_markdown(report), out)
    print(gpu_markdown(report))
    print(f"wrote {out}.json and {out}.md" + (" (stopped early by --time-budget)" if report["stopped_by_time_budget"] else ""))
    return 1 if any(not c.get("ok") for c in report["kernel_checks"]) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
