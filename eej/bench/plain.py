"""Plain decoding against transformers at fixed length, and the roofline (scripts/bench_plain.py, `make bench-plain`).

    records = {b: run_bench([plain, hf], questions, tokenizer, RunSettings(128, b, ignore_eos=True, rounds=2))[0]
               for b in (1, 8)}
    report = plain_report(records, measure_bandwidth(), weight_bytes_per_token(model.params), "smollm2-135m",
                          machine_info(), settings)
    print(plain_markdown(report))

The roofline is the bytes of weights a decode step reads divided by the measured streaming bandwidth:
the fastest batch-1 decoding the machine allows.
"""

from __future__ import annotations

from typing import Any

import jax

from eej.bench.metrics import AnswerRecord, decode_tokens_per_second, tokens_per_second

BENCHMARK = "plain decoding, eej vs transformers+torch"


def weight_bytes_per_token(params: dict[str, Any]) -> int:
    """Bytes a decode step reads: every weight except the embedding table (one row of it is gathered)."""
    leaves = jax.tree.leaves({k: v for k, v in params.items() if k != "embed"})
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


def plain_report(records: dict[int, list[AnswerRecord]], bandwidth: dict[str, float], weight_bytes: int, model: str,
                 machine: dict[str, Any], settings: dict[str, Any], peer: str = "hf") -> dict[str, Any]:
    """The report (JSON-ready) from fixed-length runs of eej `plain` (and the transformers `peer`, if it ran)
    at each batch size: tokens/s, decode-only tokens/s, the ratio to the peer, rows whose tokens differ from
    the peer's, and the roofline (bandwidth: GB/s per probe, eej.bench.machine.measure_bandwidth)."""
    results, mismatches, has_peer = {}, 0, False
    for batch, rows in records.items():
        plain = [r for r in rows if r.contestant == "plain"]
        row = {"eej_tokens_per_second": tokens_per_second(plain), "eej_decode_tokens_per_second": decode_tokens_per_second(plain)}
        theirs = {r.key: r.tokens for r in rows if r.contestant == peer}
        if theirs:
            has_peer = True
            row["hf_tokens_per_second"] = tokens_per_second([r for r in rows if r.contestant == peer])
            row["speedup_vs_hf"] = row["eej_tokens_per_second"] / row["hf_tokens_per_second"]
            mismatches += sum(r.tokens != theirs[r.key] for r in plain)
        results[str(batch)] = row
    roofline = max(bandwidth.values()) * 1e9 / weight_bytes
    summary = {"weight_bytes_per_token": weight_bytes, "bandwidth_gb_per_s": bandwidth, "roofline_tokens_per_second": roofline}
    if "1" in results:
        summary["batch1_fraction_of_roofline"] = results["1"]["eej_decode_tokens_per_second"] / roofline
        if "8" in results:
            summary["batch8_over_batch1_throughput"] = results["8"]["eej_tokens_per_second"] / results["1"]["eej_tokens_per_second"]
    return {"benchmark": BENCHMARK, "model": model, "machine": machine, "settings": settings,
            "hf_token_mismatch_rows": mismatches if has_peer else None, "results": {"batch": results}, "summary": summary}


def plain_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one row per batch size, then the roofline."""
    m, s, settings = report["machine"], report["summary"], report["settings"]
    lines = [
        f"# {report['benchmark']}",
        "",
        f"Model: {report['model']}. Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, "
        f"JAX {m['jax']} ({m['jax_backend']}).",
        f"Settings: {settings['prompts']} Spec-Bench prompts (chat template), greedy, "
        f"{settings['max_new_tokens']} new tokens each, {settings['rounds']} interleaved rounds, "
        "warm-up and compile excluded.",
        "",
        "| batch | eej tokens/s | eej decode-only tokens/s | transformers tokens/s | eej / transformers |",
        "|---:|---:|---:|---:|---:|",
    ]
    for bs, row in report["results"]["batch"].items():
        hf = row.get("hf_tokens_per_second")
        peer = ["n/a", "n/a"] if hf is None else [f"{hf:.1f}", f"{row['speedup_vs_hf']:.2f}x"]
        lines.append(f"| {bs} | {row['eej_tokens_per_second']:.1f} | {row['eej_decode_tokens_per_second']:.1f} | "
                     f"{peer[0]} | {peer[1]} |")
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
