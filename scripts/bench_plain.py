#!/usr/bin/env python
"""Plain decoding speed on the real model: eej vs transformers + torch `generate`, and the roofline.

Greedy, a fixed number of new tokens (EOS ignored by both, so both do the same work), the same
chat-formatted Spec-Bench prompts, batch 1 and batch 8, rounds interleaved so machine drift hits
both alike; warm-up and compile time excluded. The roofline is the bytes of weights read per
decoded token divided by the measured streaming bandwidth of the machine.

    python scripts/bench_plain.py [--questions ../shared/data/eval/spec_bench.jsonl] [--prompts 8]
        [--max-new-tokens 128] [--rounds 2] [--out benchmarks/results/plain_cpu]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

from eej.bench.machine import machine_info, measure_bandwidth
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.jsonl import read_jsonl
from eej.weights.registry import load_model, smollm2_path

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QUESTIONS = os.environ.get(
    "EEJ_QUESTIONS", os.path.join(HERE, "..", "..", "shared", "data", "eval", "spec_bench.jsonl")
)


def load_prompts(path: str, n: int) -> list[str]:
    """First turns of `n` questions, spread over the file's categories in order."""
    try:
        rows = [obj for _, obj in read_jsonl(path, "questions file")]
    except ValueError as e:
        sys.exit(f"{e} (pass --questions or set EEJ_QUESTIONS)")
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["turns"][0])
    out: list[str] = []
    while len(out) < n and any(by_cat.values()):
        for cat in list(by_cat):
            if by_cat[cat] and len(out) < n:
                out.append(by_cat[cat].pop(0))
    return out


def weight_bytes_per_token(params) -> int:
    """Bytes a decode step reads: every weight except the embedding table (one row is gathered)."""
    leaves = jax.tree.leaves({k: v for k, v in params.items() if k != "embed"})
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


class HFRunner:
    def __init__(self, pad_id: int):
        import torch
        import transformers

        path = smollm2_path()
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
        self.model.generation_config.eos_token_id = None
        self.pad_id = pad_id

    def generate(self, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], float]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only batching in transformers expects
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                do_sample=False, eos_token_id=None, pad_token_id=self.pad_id,
            )
        seconds = time.perf_counter() - start
        return out[:, width:].tolist(), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default=DEFAULT_QUESTIONS)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "results", "plain_cpu"))
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    bandwidth = measure_bandwidth()  # first, on a quiet process
    model = load_model("smollm2-135m")
    tok = model.tokenizer
    texts = load_prompts(args.questions, args.prompts)
    # Sorted by length so that a batch pads its prompts as little as possible (what `eej generate` does too).
    prompts = sorted((tok.encode_chat(t) for t in texts), key=len)
    engine = Engine(model)
    hf = None if args.no_hf else HFRunner(model.cfg.pad_id)
    n = args.max_new_tokens
    greedy = SamplingConfig()

    def batches(bs: int) -> list[list[list[int]]]:
        return [prompts[i : i + bs] for i in range(0, len(prompts), bs) if len(prompts[i : i + bs]) == bs]

    # Warm-up (and compile) every shape once.
    compile_seconds = 0.0
    for bs in batch_sizes:
        for group in batches(bs):
            compile_seconds += engine.generate(group, n, greedy, eos_ids=()).compile_seconds
    if hf is not None:
        hf.generate(prompts[:1], 8)

    records: dict[str, dict[int, list[dict]]] = {"eej": {b: [] for b in batch_sizes}, "hf": {b: [] for b in batch_sizes}}
    mismatches = 0
    for r in range(args.rounds):
        for bs in batch_sizes:
            for group in batches(bs):
                out = engine.generate(group, n, greedy, eos_ids=())
                records["eej"][bs].append(
                    {"tokens": sum(out.new_tokens), "seconds": out.seconds, "decode_seconds": out.decode_seconds,
                     "decode_tokens": sum(out.new_tokens) - bs}
                )
                if hf is not None:
                    hf_tokens, secs = hf.generate(group, n)
                    records["hf"][bs].append({"tokens": sum(len(t) for t in hf_tokens), "seconds": secs})
                    mismatches += sum(a != b for a, b in zip(out.tokens, hf_tokens))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def tps(recs: list[dict], key: str = "seconds", tokens: str = "tokens") -> float:
        return sum(x[tokens] for x in recs) / sum(x[key] for x in recs) if recs else float("nan")

    best_bw = max(bandwidth.values())
    per_token = weight_bytes_per_token(model.params)
    roofline = best_bw * 1e9 / per_token
    results = {"batch": {}}
    for bs in batch_sizes:
        e = records["eej"][bs]
        row = {
            "eej_tokens_per_second": tps(e),
            "eej_decode_tokens_per_second": tps(e, "decode_seconds", "decode_tokens"),
            "eej_seconds_per_run": statistics.median(x["seconds"] for x in e),
        }
        if hf is not None:
            row["hf_tokens_per_second"] = tps(records["hf"][bs])
            row["speedup_vs_hf"] = row["eej_tokens_per_second"] / row["hf_tokens_per_second"]
        results["batch"][str(bs)] = row
    b1 = results["batch"].get("1")
    summary = {
        "weight_bytes_per_token": per_token,
        "bandwidth_gb_per_s": bandwidth,
        "roofline_tokens_per_second": roofline,
    }
    if b1:
        summary["batch1_fraction_of_roofline"] = b1["eej_decode_tokens_per_second"] / roofline
    if b1 and "8" in results["batch"]:
        summary["batch8_over_batch1_throughput"] = (
            results["batch"]["8"]["eej_tokens_per_second"] / b1["eej_tokens_per_second"]
        )
    report = {
        "benchmark": "plain decoding, eej vs transformers+torch",
        "model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32)",
        "machine": machine_info(),
        "settings": {
            "prompts": len(prompts), "questions": os.path.relpath(args.questions), "max_new_tokens": n,
            "rounds": args.rounds, "greedy": True, "eos": "ignored (fixed-length outputs)", "dtype": "float32",
            "batch_sizes": batch_sizes, "torch_threads": None if hf is None else hf.torch.get_num_threads(),
            "attention": model.cfg.attention_impl,
        },
        "compile_seconds": compile_seconds,
        "hf_token_mismatch_rows": None if hf is None else mismatches,
        "results": results,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(render_markdown(report))
    print(render_markdown(report))


def render_markdown(report: dict) -> str:
    m = report["machine"]
    s = report["summary"]
    lines = [
        f"# {report['benchmark']}",
        "",
        f"Model: {report['model']}. Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, "
        f"JAX {m['jax']} ({m['jax_backend']}).",
        f"Settings: {report['settings']['prompts']} Spec-Bench prompts (chat template), greedy, "
        f"{report['settings']['max_new_tokens']} new tokens each, {report['settings']['rounds']} interleaved rounds, "
        "warm-up and compile excluded.",
        "",
        "| batch | eej tokens/s | eej decode-only tokens/s | transformers tokens/s | eej / transformers |",
        "|---:|---:|---:|---:|---:|",
    ]
    for bs, row in report["results"]["batch"].items():
        hf = row.get("hf_tokens_per_second")
        hf_cell = "n/a" if hf is None else f"{hf:.1f}"
        ratio_cell = "n/a" if hf is None else f"{row['speedup_vs_hf']:.2f}x"
        lines.append(
            f"| {bs} | {row['eej_tokens_per_second']:.1f} | {row['eej_decode_tokens_per_second']:.1f} | "
            f"{hf_cell} | {ratio_cell} |"
        )
    bw = ", ".join(f"{k} {v:.1f} GB/s" for k, v in s["bandwidth_gb_per_s"].items())
    lines += [
        "",
        f"Roofline: {s['weight_bytes_per_token'] / 1e6:.0f} MB of weights read per token; measured bandwidth {bw}; "
        f"roofline {s['roofline_tokens_per_second']:.1f} tokens/s (best probe).",
    ]
    if "batch1_fraction_of_roofline" in s:
        lines.append(f"Batch-1 decode reaches {100 * s['batch1_fraction_of_roofline']:.0f}% of the roofline.")
    if "batch8_over_batch1_throughput" in s:
        lines.append(f"Batch-8 throughput is {s['batch8_over_batch1_throughput']:.2f}x batch 1.")
    if report.get("hf_token_mismatch_rows") is not None:
        lines.append(f"Rows whose tokens differ from transformers': {report['hf_token_mismatch_rows']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
