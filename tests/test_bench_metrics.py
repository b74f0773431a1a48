"""Bench metrics on hand-made cases: ROUGE-L, token agreement, aggregation, speedup, task quality vs references."""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal

import numpy as np
import pytest

from eej.bench.metrics import (
    METRIC_KEYS,
    REFERENCE_KEYS,
    AnswerRecord,
    agreement_count,
    aggregate,
    between_run_sd,
    lcs_length,
    rouge_l,
    run_interval,
    speedup_interval,
    summarize,
)
from eej.bench.quality import corpus_bleu, exact_match, final_number, is_gsm8k, reference_rouge_l
from eej.bench.report import build_document, figure, markdown_report


def rec(contestant, qid, tokens, *, turn=1, category="qa", seconds=1.0, forwards=None, layers=None, agreement=None):
    return AnswerRecord(contestant, qid, category, turn, [5, 6], list(tokens), seconds, forwards, layers, agreement)


@pytest.mark.parametrize(
    "a, b, n",
    [("abcd", "acde", 3), ("", "abc", 0), ("abc", "abc", 3), ("abc", "xyz", 0), ("ABCBDAB", "BDCABA", 4), ("aaaa", "aa", 2)],
)
def test_lcs_length(a, b, n):
    assert lcs_length(list(a), list(b)) == n
    assert lcs_length(list(b), list(a)) == n


def test_rouge_l_known_values():
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    # LCS = 3 (1 3 4): P = R = 3/4.
    assert rouge_l([1, 3, 4, 9], [1, 2, 3, 4]) == pytest.approx(0.75)
    # LCS = 2: P = 2/2, R = 2/5, F1 = 2 * 1 * 0.4 / 1.4.
    assert rouge_l([1, 2], [1, 2, 3, 4, 5]) == pytest.approx(0.8 / 1.4)
    assert rouge_l([1, 2, 3, 4, 5], [1, 2]) == pytest.approx(0.8 / 1.4)
    # LCS = 4 of "ABCBDAB" vs "BDCABA": P = 4/7, R = 4/6.
    p, r = 4 / 7, 4 / 6
    assert rouge_l(list("ABCBDAB"), list("BDCABA")) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l([7, 8], [1, 2]) == 0.0
    assert rouge_l([], []) == 1.0
    assert rouge_l([], [1]) == 0.0 and rouge_l([1], []) == 0.0


def test_agreement_count_reads_the_position_before_each_token():
    prompt_len = 3
    # teacher argmax over prompt + answer: position p predicts token p + 1.
    argmax = [0, 0, 10, 11, 99, 13, 0]
    answer = [10, 11, 12, 13]
    assert agreement_count(answer, argmax, prompt_len) == 3  # 12 != 99
    assert agreement_count([10, 11, 99, 13], argmax, prompt_len) == 4


def test_identical_answers_give_one():
    plain = [rec("plain", q, [q, 2, 3], forwards=3, layers=60.0, agreement=3) for q in range(4)]
    other = [rec("m", q, [q, 2, 3], forwards=2, layers=30.0, agreement=3) for q in range(4)]
    out = summarize(plain + other, ["plain", "m"], ["qa"], reproducible=True)
    for name in ("plain", "m"):
        o = out[name]["overall"]
        assert o["identical_rate"] == 1.0 and o["rouge_l"] == 1.0 and o["token_agreement"] == 1.0
    assert out["plain"]["overall"]["mean_accepted_tokens"] == 1.0
    assert out["m"]["overall"]["mean_accepted_tokens"] == pytest.approx(12 / 8)
    assert out["plain"]["overall"]["avg_layers"] == 30.0  # 60 layers over the 2 decode-step tokens
    assert out["m"]["overall"]["avg_layers"] == 15.0


def test_known_mismatch_gives_the_exact_fraction():
    plain = [rec("plain", q, [1, 2, 3, 4], agreement=4) for q in range(5)]
    other = [rec("m", q, [1, 2, 3, 4], agreement=4) for q in range(4)] + [rec("m", 4, [1, 2, 9, 9], agreement=3)]
    o = summarize(plain + other, ["plain", "m"], ["qa"], reproducible=True)["m"]["overall"]
    assert o["identical_rate"] == pytest.approx(4 / 5)
    assert o["token_agreement"] == pytest.approx(19 / 20)
    assert o["rouge_l"] == pytest.approx((4 * 1.0 + 0.5) / 5)  # LCS 2 of 4 and 4: F1 = 0.5


def test_speed_and_speedup_per_category():
    records = [
        rec("plain", 1, [1] * 10, category="a", seconds=1.0),
        rec("plain", 2, [1] * 30, category="b", seconds=1.0),
        rec("m", 1, [1] * 10, category="a", seconds=0.5),
        rec("m", 2, [1] * 30, category="b", seconds=2.0),
    ]
    out = summarize(records, ["plain", "m"], ["a", "b"], reproducible=True)
    assert out["plain"]["overall"]["tokens_per_second"] == pytest.approx(20.0)
    assert out["m"]["per_category"]["a"]["speedup"] == pytest.approx(2.0)
    assert out["m"]["per_category"]["b"]["speedup"] == pytest.approx(0.5)
    assert out["m"]["overall"]["speedup"] == pytest.approx((40 / 2.5) / 20.0)
    assert out["plain"]["overall"]["speedup"] == 1.0
    # Peers count no forwards or layers: those metrics are None, not zero.
    assert out["m"]["overall"]["mean_accepted_tokens"] is None and out["m"]["overall"]["avg_layers"] is None


def test_row_speedup_charges_a_row_only_while_it_generates():
    # plain: two full answers, each row busy the whole 1 s loop; m: one answer ended after 2 of its batch's steps,
    # which lowers its tokens/s (the batch waited for the long row) but not its generating rows' speed.
    records = [
        dataclasses.replace(rec("plain", 1, [1] * 11, seconds=1.0), row_decode_seconds=1.0),
        dataclasses.replace(rec("plain", 2, [1] * 11, seconds=1.0), row_decode_seconds=1.0),
        dataclasses.replace(rec("m", 1, [1] * 11, seconds=0.5), row_decode_seconds=0.5),
        dataclasses.replace(rec("m", 2, [1] * 3, seconds=0.5), row_decode_seconds=0.1),
    ]
    out = summarize(records, ["plain", "m"], ["qa"], reproducible=False)
    assert out["m"]["overall"]["speedup"] == pytest.approx((14 / 1.0) / (22 / 2.0))
    assert out["m"]["overall"]["row_speedup"] == pytest.approx((12 / 0.6) / (20 / 2.0))
    assert out["m"]["per_category"]["qa"]["row_speedup"] == pytest.approx(2.0)
    assert out["plain"]["overall"]["row_speedup"] == 1.0
    # A contestant without row times (a peer) has none; nor does anyone when plain has none.
    peer = [dataclasses.replace(r, contestant="peer", row_decode_seconds=None) for r in records[:2]]
    assert summarize(records + peer, ["plain", "m", "peer"], ["qa"], reproducible=False)["peer"]["overall"]["row_speedup"] is None
    bare = [dataclasses.replace(r, row_decode_seconds=None) if r.contestant == "plain" else r for r in records]
    assert summarize(bare, ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]["row_speedup"] is None


def test_sampling_reports_no_identical_rate_and_multi_turn_keys_match_by_turn():
    plain = [rec("plain", 1, [1, 2], turn=1), rec("plain", 1, [3, 4], turn=2)]
    other = [rec("m", 1, [1, 2], turn=1), rec("m", 1, [3, 5], turn=2)]
    greedy = summarize(plain + other, ["plain", "m"], ["qa"], reproducible=True)["m"]["overall"]
    assert greedy["identical_rate"] == 0.5
    sampled = summarize(plain + other, ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]
    assert sampled["identical_rate"] is None
    assert sampled["rouge_l"] == pytest.approx((1.0 + 0.5) / 2)


def test_aggregate_of_nothing_and_missing_baseline():
    empty = aggregate([], None, None, True)
    assert empty["answers"] == 0 and empty["tokens_per_second"] is None and empty["speedup"] is None
    with pytest.raises(ValueError, match="plain"):
        summarize([rec("m", 1, [1])], ["m"], ["qa"], reproducible=True)


# ----------------------------------------------------------------------------- task quality against references


def test_reference_rouge_l_known_values():
    assert reference_rouge_l("The cat sat.", "the cat sat") == 1.0  # lower-cased, punctuation dropped
    # LCS 2 ("the cat"): P = 2/6, R = 2/2, F1 = 2 * (1/3) / (4/3).
    assert reference_rouge_l("the cat sat on the mat", "the cat") == pytest.approx(0.5)
    assert reference_rouge_l("cats running", "cat run") == 1.0  # Porter-stemmed
    # Acceptable answers: the best. "George Harrison": P = 2/4, R = 1 -> 2/3; "James Ray": 0.
    assert reference_rouge_l("George Harrison sang it", ("James Ray", "George Harrison")) == pytest.approx(2 / 3)
    assert reference_rouge_l("", "the cat") == 0.0


def test_corpus_bleu_known_values():
    assert corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    # n-gram precisions 4/5, 3/4, 2/3, 1/2; the answer is longer, so no brevity penalty.
    assert corpus_bleu(["a b c d e"], ["a b c d"]) == pytest.approx(100 * (0.2 ** 0.25))
    # Corpus BLEU pools n-gram counts over answers (not a mean of sentence scores): 7/8, 5/6, 3/4, 1/2.
    assert corpus_bleu(["a b c d", "a b c x"], ["a b c d", "a b c d"]) == pytest.approx(100 * (105 / 384) ** 0.25)


@pytest.mark.parametrize(
    "text, number",
    [
        ("The answer is $1,000.", Decimal(1000)),
        ("400*.5=$<<400*.5=200>>200\n#### 1000", Decimal(1000)),
        ("first 5, then\n#### 7 and finally 9", Decimal(9)),  # the last number after the last ####
        ("x = -3.5", Decimal("-3.5")),
        ("pages 10-12", Decimal(12)),  # a hyphen after a digit is no minus sign
        ("no number here", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_match_and_gsm8k_references():
    reference = "He pays 400*.5=$200 more\nSo it cost $1000 in total.\n#### 1000"
    assert is_gsm8k(reference)
    assert not is_gsm8k("Area is 3") and not is_gsm8k(("#### 3",)) and not is_gsm8k("#### none")
    assert exact_match("So the total is $1,000.00.", reference)
    assert not exact_match("It costs 600 dollars, not 1000 but 999.", reference)
    assert not exact_match("I cannot tell.", reference)


def texted(contestant, qid, category, text):
    return dataclasses.replace(rec(contestant, qid, [1], category=category), text=text)


REFERENCES = {(1, 1): "a b c d", (2, 1): "so 3+4=7\n#### 7", (3, 1): ("Paris", "the city of Paris")}
CATEGORIES = ["translation", "math_reasoning", "rag", "qa"]


def quality_records():
    answers = {
        "plain": ["a b c d", "The answer is 7.", "Paris", "anything"],
        "m": ["a b c d e", "The answer is 8.", "It is Paris", "x"],
    }
    return [texted(name, q, CATEGORIES[q - 1], text)
            for name, texts in answers.items() for q, text in enumerate(texts, 1)]


def test_reference_metrics_per_category_and_overall():
    out = summarize(quality_records(), ["plain", "m"], CATEGORIES, reproducible=True, references=REFERENCES)
    m, plain = out["m"]["overall"], out["plain"]["overall"]
    assert (m["reference_rouge_l_count"], m["reference_skipped"]) == (3, 1)  # qa has no reference
    assert (m["reference_bleu_count"], m["reference_exact_match_count"]) == (1, 1)
    # translation P = 4/5, R = 1 -> 8/9; math "the answer is 8" vs "so 3 4 7 7": 0; rag best 0.5 ("paris" of 3 words).
    assert m["reference_rouge_l"] == pytest.approx((8 / 9 + 0 + 0.5) / 3)
    assert m["reference_bleu"] == pytest.approx(100 * (0.2 ** 0.25))
    assert m["reference_exact_match"] == 0.0
    # plain: math LCS 1 ("7"), P = 1/4, R = 1/5 -> 2/9.
    assert plain["reference_rouge_l"] == pytest.approx((1 + 2 / 9 + 1) / 3)
    assert plain["reference_bleu"] == pytest.approx(100.0) and plain["reference_exact_match"] == 1.0
    rag, qa = out["m"]["per_category"]["rag"], out["m"]["per_category"]["qa"]
    assert rag["reference_rouge_l"] == pytest.approx(0.5) and rag["reference_bleu"] is None
    assert (rag["reference_bleu_count"], rag["reference_exact_match_count"], rag["reference_skipped"]) == (0, 0, 0)
    assert qa["reference_rouge_l"] is None and (qa["reference_rouge_l_count"], qa["reference_skipped"]) == (0, 1)
    # Without references every reference_* key is None (not measured), and METRIC_KEYS holds them all.
    bare = summarize(quality_records(), ["plain", "m"], CATEGORIES, reproducible=True)["m"]["overall"]
    assert set(REFERENCE_KEYS) <= set(METRIC_KEYS) and all(bare[k] is None for k in REFERENCE_KEYS)


def document(references):
    summary = summarize(quality_records(), ["plain", "m"], CATEGORIES, reproducible=True, references=references)
    infos = {"plain": {"kind": "method"}, "m": {"kind": "method"}}
    settings = {"questions": "q.jsonl", "command": "eej bench", "categories": CATEGORIES}
    return build_document({"name": "tiny"}, {}, settings, summary, infos, {})


def test_report_shows_task_quality_only_with_references():
    report = markdown_report(document(REFERENCES))
    assert "## Task quality" in report
    quality = report.split("## Task quality")[1].split("## Settings")[0]
    assert f"| `m` | method | {(8 / 9 + 0.5) / 3:.3f} | 3 | {100 * 0.2 ** 0.25:.2f} | 1 | 0.000 | 1 | n/a | 0 | 1 |" in quality
    assert "| rag | `m` | 0.500 | 1 | n/a | 0 | n/a | 0 | n/a | 0 | 0 |" in quality
    assert "| qa |" not in quality and "Categories without references (not scored): qa." in quality
    assert "## Task quality" not in markdown_report(document(None))


def timed_calls(contestant, seconds, tokens=10, rows=1, turn=1):
    """One record per row of one-turn generate calls: call c (batch c) took seconds[c] for `rows` rows of `tokens`."""
    return [dataclasses.replace(rec(contestant, (c, j), [1] * tokens, turn=turn, seconds=s / rows),
                                row_decode_seconds=s / rows, batch=c)
            for c, s in enumerate(seconds) for j in range(rows)]


def test_speedup_interval_is_a_point_when_every_call_speeds_up_alike():
    plain = timed_calls("plain", [1.0, 2.0, 3.0, 1.5, 0.5, 4.0])
    fast = timed_calls("m", [0.5, 1.0, 1.5, 0.75, 0.25, 2.0])
    low, high = speedup_interval(fast, plain)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    low, high = speedup_interval(fast, plain, row=True)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)


def test_speedup_interval_pairs_the_calls():
    # The machine slowed every contestant down in the same calls: paired, that is no uncertainty at all.
    drift = [1.0, 3.0, 0.7, 2.2, 1.4, 5.0, 0.9, 1.8]
    plain = timed_calls("plain", drift)
    same = timed_calls("m", [0.8 * d for d in drift])
    assert speedup_interval(same, plain) == pytest.approx((1.25, 1.25))


def test_speedup_interval_spans_the_calls_ratios_and_holds_the_point_estimate():
    plain = timed_calls("plain", [1.0] * 8, rows=3)
    ratios = [0.8, 1.3, 0.9, 1.1, 1.0, 1.4, 0.7, 1.2]
    m = timed_calls("m", [1 / r for r in ratios], rows=3)
    low, high = speedup_interval(m, plain)
    point = summarize(plain + m, ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]
    assert min(ratios) < low < point["speedup"] < high < max(ratios)
    assert (point["speedup_ci_low"], point["speedup_ci_high"]) == (low, high)
    # Rows of one call share its timing: the unit is the call, so more rows per call change nothing.
    one_row = speedup_interval(timed_calls("m", [1 / r for r in ratios]), timed_calls("plain", [1.0] * 8))
    assert one_row == pytest.approx((low, high))
    narrower = speedup_interval(m, plain, level=0.5)
    assert low < narrower[0] < narrower[1] < high
    assert speedup_interval(m, plain) == (low, high)  # a fixed seed: the same interval every time


def test_speedup_interval_needs_enough_calls_and_their_timings():
    plain, m = timed_calls("plain", [1.0] * 5), timed_calls("m", [0.5] * 5)
    assert speedup_interval(m, plain) is None  # 5 calls: too few
    plain, m = timed_calls("plain", [1.0] * 6), timed_calls("m", [0.5] * 6)
    assert speedup_interval(m, plain) is not None
    assert speedup_interval([dataclasses.replace(r, batch=None) for r in m], plain) is None  # calls not recorded
    assert speedup_interval([dataclasses.replace(r, row_decode_seconds=None) for r in m], plain, row=True) is None
    out = summarize(plain + m, ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]
    assert out["speedup_ci_low"] == pytest.approx(2.0) and out["row_speedup_ci_high"] == pytest.approx(2.0)
    few = summarize(plain[:5] + m[:5], ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]
    assert few["speedup"] == pytest.approx(2.0) and few["speedup_ci_low"] is None and few["speedup_run_ci_low"] is None


def test_the_run_interval_holds_the_bootstrap_interval_and_noise_between_runs():
    plain = timed_calls("plain", [1.0] * 8)
    m = timed_calls("m", [1 / r for r in [0.8, 1.3, 0.9, 1.1, 1.0, 1.4, 0.7, 1.2]])
    o = summarize(plain + m, ["plain", "m"], ["qa"], reproducible=False)["m"]["overall"]
    assert o["speedup_run_ci_low"] < o["speedup_ci_low"] < o["speedup"] < o["speedup_ci_high"] < o["speedup_run_ci_high"]
    assert (o["speedup_run_ci_low"], o["speedup_run_ci_high"]) == run_interval(o["speedup"], o["speedup_ci_low"],
                                                                               o["speedup_ci_high"])
    # Each side's log half-width and z times the noise add in quadrature; no noise leaves the interval as it was.
    low, high = run_interval(2.0, 2.0 * math.exp(-0.03), 2.0 * math.exp(0.04), run_sd=0.02)
    z = 1.959963984540054
    assert math.log(2.0 / low) == pytest.approx(math.hypot(0.03, z * 0.02))
    assert math.log(high / 2.0) == pytest.approx(math.hypot(0.04, z * 0.02))
    assert run_interval(2.0, 1.9, 2.2, run_sd=0.0) == pytest.approx((1.9, 2.2))
    # A point interval (every call sped up alike) becomes the noise between runs alone.
    low, high = run_interval(1.0, 1.0, 1.0, run_sd=0.05, level=0.5)
    assert math.log(high) == pytest.approx(-math.log(low)) == pytest.approx(0.6744897501960817 * 0.05)


def test_between_run_sd_finds_the_noise_the_intervals_leave_out():
    """Simulated A/A controls (true speedup 1): each run's log speedup scatters with its interval's own spread and
    noise between runs of 0.03 on top; the estimate finds the 0.03, and 0 where the intervals cover the scatter."""
    rng = np.random.default_rng(0)
    z = 1.959963984540054
    se = rng.uniform(0.01, 0.04, 20_000)
    noisy = rng.normal(0.0, np.sqrt(se**2 + 0.03**2))
    covered = rng.normal(0.0, se)
    as_controls = lambda logs: [(math.exp(x), math.exp(x - z * e), math.exp(x + z * e)) for x, e in zip(logs, se)]
    assert between_run_sd(as_controls(noisy)) == pytest.approx(0.03, abs=0.002)
    assert between_run_sd(as_controls(covered)) < 0.004
    assert between_run_sd([(1.0, 0.9, 1.1)]) == 0.0
    with pytest.raises(ValueError, match="no A/A controls"):
        between_run_sd([])


def test_report_shows_speedup_intervals_only_where_they_were_measured():
    doc = document(None)
    assert "95% CI" not in markdown_report(doc).split("## Definitions")[0]
    doc["methods"]["m"]["overall"].update(speedup_ci_low=0.934, speedup_ci_high=1.061)
    report = markdown_report(doc)
    assert "| speedup 95% CI | compile s (excluded) |" in report and "| 0.93-1.06 |" in report
    doc["methods"]["m"]["overall"].update(speedup_run_ci_low=0.9, speedup_run_ci_high=1.1)
    report = markdown_report(doc)
    assert "| speedup 95% CI | speedup 95% CI with run noise | compile s (excluded) |" in report
    assert "| 0.93-1.06 | 0.90-1.10 |" in report
    assert "row speedup 95% CI" not in report.split("## Definitions")[0]


def test_report_shows_row_speedup_only_where_it_was_measured():
    doc = document(None)
    assert "row speedup |" not in markdown_report(doc).split("## Definitions")[0]  # documents from before it
    for c in doc["methods"].values():
        c["overall"]["row_speedup"] = 1.25
    report = markdown_report(doc)
    assert "| row speedup | compile s (excluded) |" in report and "| 1.25x |" in report


def test_plot_adds_the_task_quality_panel_only_with_references():
    assert len(figure(document(REFERENCES)).axes) == 3
    assert len(figure(document(None)).axes) == 2
    doc = document(REFERENCES)
    doc["methods"]["m"]["overall"]["reference_perplexity"] = 12.5
    assert len(figure(doc).axes) == 4  # and one for the references' perplexity, when computed


def test_reference_perplexity_is_a_ratio_of_sums_over_the_scored_answers_with_a_reference():
    records = quality_records()
    nll = {(1, 1): (6.0, 3), (2, 1): (2.0, 1), (3, 1): None, (4, 1): (9.0, 9)}  # (4, 1): qa, no reference
    for r in records:
        if nll[r.key] is not None:
            r.reference_nll, r.reference_tokens = nll[r.key]
    out = summarize(records, ["plain", "m"], CATEGORIES, reproducible=True, references=REFERENCES)["m"]
    o = out["overall"]
    assert o["reference_perplexity"] == pytest.approx(math.exp(8.0 / 4)) and o["reference_perplexity_count"] == 2
    assert o["reference_skipped"] == 1  # the question without a reference, whatever its nll says
    cat = out["per_category"]
    assert cat["translation"]["reference_perplexity"] == pytest.approx(math.exp(2.0))
    assert (cat["rag"]["reference_perplexity"], cat["rag"]["reference_perplexity_count"]) == (None, 0)  # not scored
    assert (cat["qa"]["reference_perplexity"], cat["qa"]["reference_perplexity_count"], cat["qa"]["reference_skipped"]) == (None, 0, 1)
