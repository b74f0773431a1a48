"""Bench metrics on hand-made cases: ROUGE-L, token agreement, aggregation, speedup."""

from __future__ import annotations

import pytest

from eej.bench.metrics import AnswerRecord, agreement_count, aggregate, lcs_length, rouge_l, summarize


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
    out = summarize(plain + other, ["plain", "m"], ["qa"], greedy=True)
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
    o = summarize(plain + other, ["plain", "m"], ["qa"], greedy=True)["m"]["overall"]
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
    out = summarize(records, ["plain", "m"], ["a", "b"], greedy=True)
    assert out["plain"]["overall"]["tokens_per_second"] == pytest.approx(20.0)
    assert out["m"]["per_category"]["a"]["speedup"] == pytest.approx(2.0)
    assert out["m"]["per_category"]["b"]["speedup"] == pytest.approx(0.5)
    assert out["m"]["overall"]["speedup"] == pytest.approx((40 / 2.5) / 20.0)
    assert out["plain"]["overall"]["speedup"] == 1.0
    # Peers count no forwards or layers: those metrics are None, not zero.
    assert out["m"]["overall"]["mean_accepted_tokens"] is None and out["m"]["overall"]["avg_layers"] is None


def test_sampling_reports_no_identical_rate_and_multi_turn_keys_match_by_turn():
    plain = [rec("plain", 1, [1, 2], turn=1), rec("plain", 1, [3, 4], turn=2)]
    other = [rec("m", 1, [1, 2], turn=1), rec("m", 1, [3, 5], turn=2)]
    greedy = summarize(plain + other, ["plain", "m"], ["qa"], greedy=True)["m"]["overall"]
    assert greedy["identical_rate"] == 0.5
    sampled = summarize(plain + other, ["plain", "m"], ["qa"], greedy=False)["m"]["overall"]
    assert sampled["identical_rate"] is None
    assert sampled["rouge_l"] == pytest.approx((1.0 + 0.5) / 2)


def test_aggregate_of_nothing_and_missing_baseline():
    empty = aggregate([], None, None, True)
    assert empty["answers"] == 0 and empty["tokens_per_second"] is None and empty["speedup"] is None
    with pytest.raises(ValueError, match="plain"):
        summarize([rec("m", 1, [1])], ["m"], ["qa"], greedy=True)
