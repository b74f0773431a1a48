"""scripts/controller_replay.py: a policy replayed on a recorded trace commits and costs what a hand count says."""

from __future__ import annotations

import pytest

from eej.testing import load_script

COSTS = [10.0, 13.0, 14.0, 15.0, 16.0]


@pytest.fixture(scope="module")
def replay():
    return load_script("controller_replay").replay


def test_a_fixed_k_makes_what_the_trace_allows(replay):
    trace = [(4, 5), (2, 1), (4, 3)]  # (drafts made with K = 4, tokens committed)
    # k = 2: min(d, 2) drafts, min(a, 2) + 1 tokens: 3, 1, 3 tokens at c(2) each
    assert replay(trace, COSTS, 100, 2, 0.9, 8, True)[:4] == (7, 42.0, 3, 3)
    # k = 4: 5, 1, 3 tokens at c(4), c(2), c(4)
    assert replay(trace, COSTS, 100, 4, 0.9, 8, True)[:4] == (9, 46.0, 3, 3)
    assert replay(trace, COSTS, 100, 0, 0.9, 8, True)[:4] == (3, 30.0, 3, 0)


def test_the_replayed_controller_follows_the_evidence(replay):
    always = [(4, 5)] * 40
    tokens, spent, steps, drafting, learned = replay(always, COSTS, 1000, "adaptive", 0.95, 8, True)
    # the first step asks for 4 (priors α = β = γ = 1/2: E(k) = 1, 1.5, 1.75, 1.875, 1.9375 over C(k) = 10, 13, 13.5,
    # 13.75, 13.875 is .100, .1154, .1296, .1364, .1396), and, every draft accepted, K = 4 every step
    assert drafting == steps and tokens == 5 * steps
    never = [(4, 1)] * 60
    tokens, spent, steps, drafting, _ = replay(never, COSTS, 1000, "adaptive", 0.95, 8, False)
    assert tokens == steps and drafting <= 2 + 60 // 8  # the prior fades in a draft or two; then only probes draft
    # what the first prompt taught carries to the next (--carry): after `always`, K = 4 from its first step
    assert learned[0] > 0.9
    tokens, _, steps, drafting, _ = replay(always[:5], COSTS, 1000, "adaptive", 0.95, 8, True, learned)
    assert tokens == 5 * steps and drafting == steps


def test_the_kangaroo_step_overhead_script_refuses_bad_arguments_before_loading_the_model(capsys):
    script = load_script("kangaroo_step_overhead")
    for bad in (["--batch", "0"], ["--rounds", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            script.main(bad)
        assert exit_.value.code == 2 and "must be" in capsys.readouterr().err


def test_whether_then_k_asks_for_k_whenever_the_controller_drafts(replay):
    # a 4th draft dear enough that the controller asks for 3 (from the priors: E(3) / C(3) = 1.875 / 13.75 = .136 >
    # E(4) / C(4) = 1.9375 / 15.625 = .124; every draft accepted: 4 / 15 > 5 / 30); deciding only whether, it asks for 4
    costs = COSTS[:4] + [30.0]
    always = [(4, 5)] * 10
    tokens, _, steps, drafting, _ = replay(always, costs, 1000, "adaptive", 0.95, 8, True)
    assert drafting == steps and tokens == 4 * steps
    tokens, _, steps, drafting, _ = replay(always, costs, 1000, "whether", 0.95, 8, True)
    assert drafting == steps and tokens == 5 * steps


def test_trace_rates_count_drafts_as_the_controller_does():
    script = load_script("controller_replay")
    trace = [(4, 5), (2, 1), (4, 3)]  # (drafts made with K = 4, tokens committed)
    rates = script.trace_rates([trace], 4)
    # first drafts accepted 2 of 3; after an accepted one the next made and accepted 3 of 3, then 1 of 2 (a = 2 of 4
    # drafts: the 3rd rejected); drafted on after 3 of 3, 1 of 2 (stopped after 2 of the 4 asked) and 3 of 3
    assert rates == pytest.approx({"first_draft_acceptance": 2 / 3, "following_acceptance": 4 / 5, "continuation": 7 / 8,
                                   "unsure_first_acceptance": 0.0, "confident_first_acceptance": 2 / 3,
                                   "confident_share": 1.0})
    # a step's only draft is one short of the confidence threshold: here one accepted, one rejected
    rates = script.trace_rates([trace + [(1, 2), (1, 1)]], 4)
    assert (rates["unsure_first_acceptance"], rates["confident_first_acceptance"], rates["confident_share"]) == \
        pytest.approx((1 / 2, 2 / 3, 3 / 5))


def test_the_gated_policy_drafts_on_confident_first_drafts_and_drops_unsure_ones(replay):
    # confident first drafts (the step made more than one) always accepted, unsure ones never: once the classes are
    # learnt, every confident step drafts K = 4 and every unsure one is dropped at the price of a dropped draft
    trace = [(4, 5), (1, 1)] * 40
    tokens, spent, steps, drafting, _ = replay(trace, COSTS, 1000, "gated", 0.95, 1, True, None, 10.5)
    tail = replay(trace[-20:], COSTS, 1000, "gated", 0.95, 1, True, _learned(replay, trace), 10.5)
    assert tail[:4] == (10 * 5 + 10, 10 * 16.0 + 10 * 10.5, 20, 10)
    # the averaged rule (α = 1/2 over both) drafts on every step, and pays c(1) for each unsure draft
    assert replay(trace[-20:], COSTS, 1000, "adaptive", 0.95, 1, True, _learned(replay, trace))[1] > tail[1]


def test_the_sunk_variant_verifies_unsure_first_drafts_that_cost_little_more_than_dropping(replay):
    # unsure first drafts accepted one time in ten; dropping one costs 12.9, verifying it c(1) = 13: with the made
    # draft's cost sunk, verifying pays for any α above 1/129; priced at c(0) = 10 (the engine's rule) it needs 0.3,
    # which α reaches once in the last 20 steps: right after an accepted unsure draft (0.08 -> 0.40)
    trace = ([(4, 5), (1, 2)] + [(4, 5), (1, 1)] * 9) * 8
    for policy, drafting in (("gated", 10 + 1), ("gated, sunk", 20)):
        learned = replay(trace, COSTS, 1000, policy, 0.95, 1, True, None, 12.9)[4]
        assert replay(trace[-20:], COSTS, 1000, policy, 0.95, 1, True, learned, 12.9)[3] == drafting


def _learned(replay, trace):
    return replay(trace, COSTS, 1000, "gated", 0.95, 1, True, None, 10.5)[4]
