"""eej.bench.plain: the plain-decoding report against transformers (scripts/bench_plain.py) and its roofline."""

from __future__ import annotations

import jax
import pytest

from eej.bench.metrics import AnswerRecord
from eej.bench.plain import plain_markdown, plain_report, weight_bytes_per_token
from eej.weights.registry import load_model

MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "memory_gib": 8.0, "jax": "0.10.2", "jax_backend": "cpu"}
SETTINGS = {"prompts": 2, "max_new_tokens": 10, "rounds": 2}


def _record(contestant: str, qid: int, tokens: list[int], seconds: float, decode: float | None = None) -> AnswerRecord:
    return AnswerRecord(contestant, qid, "mt_bench", 1, [1], tokens, seconds, decode_seconds=decode)


def test_plain_report_from_fixed_length_runs():
    records = {
        1: [_record("plain", 1, [5] * 10, 1.0, 0.9), _record("hf", 1, [5] * 10, 2.0)],
        8: [_record("plain", 1, [5] * 10, 0.25, 0.2), _record("plain", 2, [6] * 10, 0.25, 0.2),
            _record("hf", 1, [5] * 10, 0.5), _record("hf", 2, [7] * 10, 0.5)],
    }
    report = plain_report(records, {"reduction": 20.0, "matvec": 40.0}, 10**9, "tiny", MACHINE, dict(SETTINGS))
    b1, b8 = report["results"]["batch"]["1"], report["results"]["batch"]["8"]
    assert b1["eej_tokens_per_second"] == 10.0 and b1["eej_decode_tokens_per_second"] == pytest.approx(10.0)
    assert b1["hf_tokens_per_second"] == 5.0 and b1["speedup_vs_hf"] == 2.0
    assert b8["eej_tokens_per_second"] == 40.0 and b8["eej_decode_tokens_per_second"] == 45.0 and b8["speedup_vs_hf"] == 2.0
    s = report["summary"]
    assert s["roofline_tokens_per_second"] == 40.0 and s["batch1_fraction_of_roofline"] == pytest.approx(0.25)
    assert s["batch8_over_batch1_throughput"] == 4.0 and report["hf_token_mismatch_rows"] == 1
    md = plain_markdown(report)
    assert "| 1 | 10.0 | 10.0 | 5.0 | 2.00x |" in md and "Batch-1 decode reaches 25% of the roofline." in md
    assert "Rows whose tokens differ from transformers': 1." in md and "2 interleaved rounds" in md
    alone = plain_report({1: records[1][:1]}, {"matvec": 40.0}, 10**9, "tiny", MACHINE, dict(SETTINGS))
    assert alone["hf_token_mismatch_rows"] is None and "| 1 | 10.0 | 10.0 | n/a | n/a |" in plain_markdown(alone)


def test_weight_bytes_per_token_leave_out_the_embedding():
    params = load_model("tiny-llama").params
    every = sum(x.nbytes for x in jax.tree.leaves(params))
    assert weight_bytes_per_token(params) == every - params["embed"].nbytes
