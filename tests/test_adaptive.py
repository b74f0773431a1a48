"""Adaptive speculation: the controller's choice against hand calculations, probes, step times measured and
kept on disk, and an untrained drafter on the real model settling on plain steps."""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding import calibration, kangaroo, m2r2
from eej.decoding.adaptive import (
    Controller,
    best_draft_length,
    drafted_onward,
    expected_step_costs,
    expected_tokens,
    monotone_costs,
    next_backoff,
    probe_due,
    probe_overlap,
    split_judged,
)
from eej.decoding.sampling import race_sample, token_keys
from eej.decoding.engine import Engine
from eej.decoding.engine import _step as engine_step
from eej.decoding.kangaroo import Kangaroo, random_kangaroo
from eej.decoding.speculation import init_adapter, random_adapter
from eej.kernels import cpu_attention, cpu_matmul
from eej.testing import agreeable_model, plain_tokens, random_prompts, tiny_model
from eej.weights.registry import with_kernels

COSTS = jnp.asarray([1.0, 1.3, 1.45, 1.6, 1.75])


def test_expected_tokens_are_the_geometric_prefix_sums():
    np.testing.assert_allclose(expected_tokens(jnp.asarray([0.0, 0.5, 1.0]), 3),
                               [[1, 1, 1, 1], [1, 1.5, 1.75, 1.875], [1, 2, 3, 4]])


def test_early_stops_shorten_both_the_expected_gain_and_the_expected_cost():
    # a row that drafts on with β = 0.5 reaches draft i with probability 0.5^(i-1): E = 1 + .5 + .5 * .25 + .25 * .125
    np.testing.assert_allclose(expected_tokens(jnp.asarray([0.5]), 3, jnp.asarray([0.5])), [[1, 1.5, 1.625, 1.65625]])
    np.testing.assert_allclose(expected_tokens(jnp.asarray([0.5]), 3, jnp.asarray([1.0])), expected_tokens(jnp.asarray([0.5]), 3))
    one = jnp.asarray([True, False])
    # C(k) = c(0) + sum_i P(longest draft >= i) (c(i) - c(i-1)): 1 + .3 + .5 * .15 + .25 * .15 + .125 * .15
    np.testing.assert_allclose(expected_step_costs(COSTS, one, jnp.asarray([0.5, 1.0])), [1, 1.3, 1.375, 1.4125, 1.43125])
    # two rows at β = 0.5: the longest reaches draft 2 with 1 - .5^2, draft 3 with 1 - .75^2, draft 4 with 1 - .875^2
    both = expected_step_costs(COSTS, jnp.asarray([True, True]), jnp.asarray([0.5, 0.5]))
    np.testing.assert_allclose(both, [1, 1.3, 1.4125, 1.478125, 1.513281], rtol=1e-6)
    np.testing.assert_allclose(expected_step_costs(COSTS, one, None), COSTS)


def test_knowing_that_rows_stop_early_changes_the_pick():
    costs = jnp.asarray([1.0, 1.29, 1.42, 1.51, 1.68])  # this CPU's Kangaroo costs at batch 1, relative
    alpha, row = jnp.asarray([0.7]), jnp.asarray([True])
    # every draft asked for made: E / c = 1, 1.318, 1.542, 1.678, 1.651 -> k = 3
    assert int(best_draft_length(alpha, row, costs)) == 3
    # a row that drafts on after 1 in 5 drafts rarely pays for a 4th draft it asks for: E / C = 1, 1.318, 1.366,
    # 1.3729, 1.3730 -> k = 4
    assert int(best_draft_length(alpha, row, costs, continuation=jnp.asarray([0.2]))) == 4


def test_a_step_tells_of_its_first_draft_and_of_the_drafts_after_an_accepted_one():
    # asked for 4: 3 of 4 accepted; the first rejected; all 4 accepted; 2 made (the row stopped) and both accepted
    (first_hits, first_trials), (follow_hits, follow_trials) = split_judged(
        jnp.asarray([3.0, 0.0, 4.0, 2.0]), jnp.asarray([4.0, 1.0, 4.0, 2.0]), 4)
    assert first_hits.tolist() == [1, 0, 1, 1] and first_trials.tolist() == [1, 1, 1, 1]
    # each accepted draft before the 4th asks whether the next was made and accepted: 2 of 3, -, 3 of 3, 1 of 2
    assert follow_hits.tolist() == [2, 0, 3, 1] and follow_trials.tolist() == [3, 0, 3, 2]
    (first_hits, first_trials), (follow_hits, follow_trials) = split_judged(jnp.asarray([0.3]), jnp.asarray([1.0]), 0)
    assert np.allclose(first_hits, 0.3) and first_trials.tolist() == [1] and follow_trials.tolist() == [0]  # a probe


def test_expected_tokens_with_drafts_that_follow_an_accepted_one_more_often():
    # α = .5 for the first draft, γ = .8 after an accepted one: E = 1, 1.5, 1.5 + .4, 1.9 + .32
    np.testing.assert_allclose(expected_tokens(jnp.asarray([0.5]), 3, following=jnp.asarray([0.8])), [[1, 1.5, 1.9, 2.22]])
    np.testing.assert_allclose(expected_tokens(jnp.asarray([0.5]), 3, jnp.asarray([0.5]), jnp.asarray([0.25])),
                               expected_tokens(jnp.asarray([0.5]), 3, jnp.asarray([0.5])))  # γ = α β: as if alike


def test_drafts_that_follow_an_accepted_one_change_the_pick():
    costs = jnp.asarray([1.0, 1.29, 1.42, 1.51, 1.68])  # this CPU's Kangaroo costs at batch 1, relative
    alpha, row, beta = jnp.asarray([0.5]), jnp.asarray([True]), jnp.asarray([0.8])
    # C(k) = 1, 1.29, 1.394, 1.4516, 1.5386; γ = α β = .4: E = 1, 1.5, 1.7, 1.78, 1.812 -> E / C peaks at k = 3 (1.226)
    assert int(best_draft_length(alpha, row, costs, None, beta)) == 3
    # γ = .8: E = 1, 1.5, 1.9, 2.22, 2.476 -> E / C = 1, 1.163, 1.363, 1.529, 1.609: k = 4
    assert int(best_draft_length(alpha, row, costs, None, beta, jnp.asarray([0.8]))) == 4
    # a first draft accepted 28 times in 100 does not pay for itself (1.28 / 1.3, 1.3584 / 1.45, ...) but does when the
    # drafts after it are accepted 9 times in 10: E(3) / c(3) = (1 + .28 * 2.71) / 1.6 = 1.099, E(4) / c(4) = 1.122
    assert int(best_draft_length(jnp.asarray([0.28]), row, COSTS)) == 0
    assert int(best_draft_length(jnp.asarray([0.28]), row, COSTS, None, None, jnp.asarray([0.9]))) == 4


def test_the_controller_learns_the_first_and_the_following_acceptance_apart():
    ctl, rows = Controller.start(2, 4), jnp.asarray([True, True])
    for step in range(80):  # row 0: every draft accepted; row 1: its first draft every other step, never a second
        hit = float(step % 2)
        ctl = ctl.after(4, False, ctl.backoff, jnp.asarray([4.0, hit]), jnp.asarray([4.0, 1.0 + hit]), rows,
                        jnp.asarray([4, 1 + int(hit)]))
    assert float(ctl.acceptance[0]) > 0.95 and float(ctl.following[0]) > 0.95
    assert 0.35 < float(ctl.acceptance[1]) < 0.65 and float(ctl.following[1]) < 0.05
    # a free probe (a plain step scoring the drafter's guess) tells of the first draft only ...
    probed = ctl.after(0, True, ctl.backoff, jnp.asarray([0.0, 1.0]), jnp.ones(2), rows, jnp.zeros(2, jnp.int32))
    assert float(probed.acceptance[0]) < float(ctl.acceptance[0]) and float(probed.acceptance[1]) > float(ctl.acceptance[1])
    other = ctl.after(0, True, ctl.backoff, jnp.asarray([1.0, 0.0]), jnp.ones(2), rows, jnp.zeros(2, jnp.int32))
    assert other.following.tolist() == probed.following.tolist()
    # ... and a step of at most one draft cannot see a second: there γ and β drift a step back towards the prior 1/2
    assert 0.5 < float(probed.following[0]) < float(ctl.following[0]) and float(ctl.following[1]) < float(probed.following[1]) < 0.5
    one = ctl.after(1, False, ctl.backoff, jnp.asarray([1.0, 1.0]), jnp.ones(2), rows, jnp.ones(2, jnp.int32))
    assert one.following.tolist() == probed.following.tolist() and one.continuation.tolist() == probed.continuation.tolist()
    assert float(one.continuation[0]) < float(ctl.continuation[0])
    # a step that drafts is not a probe (free: nothing more to score); a plain step that is due one is
    k, probe, _ = ctl.decide(rows.at[1].set(False), None, 8, True)
    assert int(k) == 4 and not bool(probe)
    never = Controller.start(1, 4, tuple(COSTS.tolist())).replace(hits=jnp.zeros(1), idle=jnp.full((), 7, jnp.int32))
    k, probe, _ = never.decide(jnp.asarray([True]), None, 8, True)
    assert int(k) == 0 and bool(probe)


def test_the_continuation_is_learnt_from_the_drafts_rows_made():
    went_on, could = drafted_onward(jnp.asarray([4, 2, 1, 0, 3]), 4)
    assert went_on.tolist() == [3, 1, 0, 0, 2] and could.tolist() == [3, 2, 1, 0, 3]  # stopped early: one more trial
    ctl = Controller.start(2, 4)
    for _ in range(60):  # row 0 always drafts the 4 asked, row 1 stops after its first draft
        ctl = ctl.after(4, False, ctl.backoff, jnp.zeros(2), jnp.ones(2), jnp.asarray([True, True]), jnp.asarray([4, 1]))
    assert float(ctl.continuation[0]) > 0.95 and float(ctl.continuation[1]) < 0.05
    forced = ctl.replace(force=jnp.full((), 2, jnp.int32))  # calibration steps draft all k whatever the drafter says
    assert forced.after(2, False, ctl.backoff, jnp.zeros(2), jnp.ones(2), jnp.asarray([True, True]),
                        jnp.asarray([2, 2])).continuation.tolist() == ctl.continuation.tolist()


def test_confident_and_unsure_first_drafts_are_judged_apart():
    ctl = Controller.start(2, 4, tuple(COSTS.tolist()))
    rows = jnp.asarray([True, True])
    for _ in range(30):  # row 0: a confident first draft, accepted; row 1: an unsure one, rejected
        ctl = ctl.after(1, False, ctl.backoff, jnp.asarray([1.0, 0.0]), jnp.asarray([1.0, 1.0]), rows,
                        jnp.ones(2, jnp.int32), confident=jnp.asarray([True, False]))
    sure, unsure = ctl.acceptance_given(jnp.asarray([True, True])), ctl.acceptance_given(jnp.asarray([False, False]))
    assert float(sure[0]) > 0.85 and float(unsure[1]) < 0.15
    np.testing.assert_allclose([sure[1], unsure[0]], [0.5, 0.5])  # no evidence for those: still the prior
    share = np.asarray(ctl.confident_share)
    assert share[0] > 0.85 and share[1] < 0.15
    # a step that observed no class (None) leaves the classes alone
    same = ctl.after(1, False, ctl.backoff, jnp.asarray([1.0, 1.0]), jnp.ones(2), rows, jnp.ones(2, jnp.int32))
    np.testing.assert_array_equal(same.class_hits, ctl.class_hits)


def _knowing(sure: float, unsure: float, share: float, batch: int = 1, guess_cost: float = 1.01) -> Controller:
    """A controller that has seen enough: first drafts confident with chance `share`, accepted with `sure` or `unsure`,
    and a draft after an accepted one always made and accepted (β = γ = 1)."""
    ctl = Controller.start(batch, 4, tuple(COSTS.tolist()))
    many = jnp.full((batch,), 1000.0)
    return ctl.replace(class_hits=jnp.stack([unsure * many, sure * many], axis=1), class_trials=jnp.stack([many, many], 1),
                       share_hits=share * many, share_trials=many, onward_hits=many, onward_trials=many,
                       follow_hits=many, follow_trials=many, guess_cost=jnp.asarray(guess_cost))


def test_the_rule_decides_again_once_it_knows_which_first_drafts_are_confident():
    ctl, row = _knowing(sure=1.0, unsure=0.0, share=0.5), jnp.asarray([True])
    # confident: every draft accepted, E(k) = 1 + k against c(k): 5 / 1.75 is the best; unsure: nothing is accepted
    assert int(ctl.refined(jnp.asarray([True]), row, None)) == 4
    assert int(ctl.refined(jnp.asarray([False]), row, None)) == 0
    # at batch 2 one unsure row keeps the batch on plain steps (the makespan rule)
    two = _knowing(sure=1.0, unsure=0.0, share=0.5, batch=2)
    assert int(two.refined(jnp.asarray([True, False]), jnp.asarray([True, True]), None)) == 0
    assert int(two.refined(jnp.asarray([True, False]), jnp.asarray([True, False]), None)) == 4  # unless it is done


def test_first_drafts_are_made_when_what_a_confident_one_saves_outweighs_making_them():
    row = jnp.asarray([True])
    # all confident first drafts: drafting 4 saves 1 - 1.75 / 5 of a plain step's time per token, far above 1%
    assert bool(_knowing(sure=1.0, unsure=0.0, share=1.0).gate_pays(row, None))
    # confident one time in a thousand: the saving times the chance is below what the drafts cost
    assert not bool(_knowing(sure=1.0, unsure=0.0, share=0.001).gate_pays(row, None))
    assert not bool(_knowing(sure=1.0, unsure=0.0, share=1.0, guess_cost=2.0).gate_pays(row, None))  # dear drafts
    assert not bool(_knowing(sure=0.0, unsure=0.0, share=1.0).gate_pays(row, None))  # nothing accepted: nothing saved
    # at batch 4 every row must be confident: 0.5^4 of the time
    four = _knowing(sure=1.0, unsure=0.0, share=0.5, batch=4, guess_cost=1.05)
    saving = 1 - 1.75 / 5
    assert bool(four.gate_pays(jnp.ones(4, bool), None)) == (0.5 ** 4 * saving > 0.05)


@pytest.mark.parametrize("acceptance,active,want", [
    ([0.0], [True], 0),               # drafts never accepted: plain steps
    ([1.0], [True], 4),               # always accepted: (k+1)/c(k) grows to k = 4 (5 / 1.75 = 2.86)
    ([0.5], [True], 2),               # 1, 1.5/1.3, 1.75/1.45, 1.875/1.6, 1.9375/1.75 = 1, 1.154, 1.207, 1.172, 1.107
    ([0.2], [True], 0),               # 1.2 / 1.3 < 1
    ([0.9, 0.0], [True, True], 0),    # the batch waits for its last row, which drafts would only slow: c(k) / 1
    ([0.9, 0.0], [True, False], 4),   # a finished row counts for nothing: row 0 alone, c(k) / E(k) least at k = 4
    ([0.9, 0.5], [True, True], 2),    # the slower row decides: c / E = 1, .867, .829, .853, .903 for α = 0.5
    ([0.35] * 4, [True] * 4, 1),      # (1, 1.35, 1.4725, 1.515, 1.530) / c = (1, 1.038, 1.016, 0.947, 0.874)
    ([0.0, 1.0], [False, False], 0),  # nothing active: a plain step
])
def test_controller_picks_what_a_hand_calculation_picks(acceptance, active, want):
    k = best_draft_length(jnp.asarray(acceptance, jnp.float32), jnp.asarray(active), COSTS)
    assert int(k) == want


@pytest.mark.parametrize("remaining,want", [
    ([10, 10], 0),   # equal budgets: row 1's 10 c(k) / 1 is the finish time, least at k = 0
    ([100, 1], 4),   # row 1 ends next step anyway: row 0's 100 c(k) / E(k) = 100, 68.4, 53.5, 46.5, 42.7
    ([10, 9], 0),    # row 0: 10 c / E = 10, 6.84, ...; row 1: 9 c(k) = 9, 11.7, ...: max least at k = 0 (10)
    ([40, 20], 1),   # k = 1: max(40 * 1.3 / 1.9, 20 * 1.3) = 27.4 < 40 at k = 0, < max(21.4, 29) at k = 2
])
def test_controller_weighs_rows_by_the_budget_they_have_left(remaining, want):
    k = best_draft_length(jnp.asarray([0.9, 0.0]), jnp.asarray([True, True]), COSTS, jnp.asarray(remaining))
    assert int(k) == want


@pytest.mark.parametrize("acceptance,active,want", [
    ([0.9, 0.0], [True, True], 4),    # Σ E = 2, 2.9, 3.71, 4.439, 5.095 over c: 2, 2.23, 2.56, 2.77, 2.91 (waiting: 0)
    ([0.35] * 4, [True] * 4, 1),      # four alike rows: one row's E / c, as without a queue
    ([0.3, 0.0, 0.0, 0.0], [True] * 4, 0),  # Σ E = 4, 4.3, 4.39, ... over c: 4, 3.31, ...: one row's gain is too small
    ([0.9, 0.0], [True, False], 4),   # a finished row counts for nothing
    ([0.0, 1.0], [False, False], 0),  # nothing active: a plain step
])
def test_with_prompts_queued_the_controller_picks_the_batchs_throughput(acceptance, active, want):
    """While prompts wait for a row (Engine.generate with a batch_size) no row idles after it ends, so the rule is the
    batch's committed tokens per millisecond, argmax_k Σ_b E_b(k) / C(k), not its last row's finish time."""
    acceptance, active = jnp.asarray(acceptance, jnp.float32), jnp.asarray(active)
    assert int(best_draft_length(acceptance, active, COSTS, queued=jnp.asarray(True))) == want
    assert int(best_draft_length(acceptance, active, COSTS, queued=False)) == int(best_draft_length(acceptance, active, COSTS))


def test_on_a_gpu_like_cost_table_the_same_rule_drafts_more():
    flat = jnp.asarray([1.0, 1.02, 1.04, 1.06, 1.08])  # verification of a few tokens costs about one step
    assert int(best_draft_length(jnp.asarray([0.5]), jnp.asarray([True]), flat)) == 4  # 1.9375 / 1.08 = 1.79
    assert int(best_draft_length(jnp.asarray([0.5]), jnp.asarray([True]), COSTS)) == 2
    assert int(best_draft_length(jnp.asarray([0.3]), jnp.asarray([True]), flat)) == 3  # 1.417 / 1.06 > 1.425 / 1.08
    assert int(best_draft_length(jnp.asarray([0.3]), jnp.asarray([True]), COSTS)) == 0


def test_probes_back_off_while_they_find_nothing_and_come_back_when_acting():
    """Probe every 4 steps, then 8, 16, 32 (MAX_BACKOFF = 3) while the rule never acts; after it acts, every 4 again."""
    idle, backoff, probes = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), []
    for step in range(140):
        acting = jnp.asarray(step == 100)
        due = probe_due(idle, backoff, 4) & ~acting
        if bool(due):
            probes.append(step)
        idle = jnp.where(due | acting, 0, idle + 1)
        backoff = next_backoff(backoff, due, acting)
    assert probes == [3, 11, 27, 59, 91, 104, 112, 128]


def test_probe_overlap_is_the_acceptance_probability():
    target = jnp.log(jnp.asarray([[0.5, 0.3, 0.2, 0.0 + 1e-30]]))
    draft = jnp.log(jnp.asarray([[0.1, 0.6, 0.3]]))  # over token ids [0, 1, 3]
    ids = jnp.asarray([0, 1, 3])
    residual = SamplingConfig(temperature=1.0, coupled=False)
    # sum_v min(p_v, q_v): min(.5,.1) + min(.3,.6) + min(.2,0) + min(0,.3) = 0.4
    np.testing.assert_allclose(probe_overlap(target, jnp.asarray([1]), draft, ids, residual, None), [0.4], atol=1e-6)
    greedy = SamplingConfig()
    assert float(probe_overlap(target, jnp.asarray([0]), draft, ids, greedy, None)[0]) == 0.0  # argmax 0 vs draft's 1
    confident = jnp.log(jnp.asarray([[0.9, 0.05, 0.05]]))
    assert float(probe_overlap(target, jnp.asarray([0]), confident, ids, greedy, None)[0]) == 1.0


def test_a_coupled_probe_scores_whether_the_drafts_own_draw_is_the_targets():
    sampling = SamplingConfig(temperature=1.0)
    target = jnp.log(jnp.asarray([[0.5, 0.3, 0.2, 1e-30]] * 64))
    keys = token_keys(jnp.arange(64, dtype=jnp.uint32), jnp.full((64, 1), 9))[:, 0]
    drawn = race_sample(target, keys, sampling)
    ids = jnp.asarray([0, 1, 2])
    same = probe_overlap(target, drawn, target[:, :3], ids, sampling, keys)  # the target's distribution: always agrees
    np.testing.assert_array_equal(same, np.ones(64))
    elsewhere = jnp.log(jnp.asarray([[1e-30, 1e-30, 1.0]] * 64))  # all on token 2: agrees exactly where 2 was drawn
    np.testing.assert_array_equal(probe_overlap(target, drawn, elsewhere, ids, sampling, keys), np.asarray(drawn == 2))
    assert 0 < int(jnp.sum(drawn == 2)) < 64


def test_an_unrewarding_drafter_settles_on_plain_steps_and_stays_lossless():
    model = tiny_model("tiny-gqa", 3)
    strategy, method_params = random_kangaroo(model, 1, exit_layer=2, exit_threshold=0.0, max_draft_steps=4,
                                              step_costs=tuple(COSTS.tolist()), probe_every=4)
    prompts = random_prompts(np.random.default_rng(0), [5, 9], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 40)
    controller = out.method_state["controller"]
    chosen = np.asarray(controller.chosen)
    assert chosen.sum() == out.steps and chosen[0] >= out.steps - 4  # a few drafting steps while the prior fades
    assert float(jnp.min(controller.trials)) > 5  # probes kept scoring the drafter while it did not draft ...
    assert int(best_draft_length(controller.acceptance, jnp.asarray([True, True]), COSTS)) == 0  # ... and it stays unrewarding
    assert sum(out.speculated_steps) <= 2 * int(chosen[1:].sum()) and sum(out.new_tokens) / sum(out.forwards) < 1.1


def test_a_later_generation_starts_from_what_the_last_one_learnt():
    model = tiny_model("tiny-gqa", 3)
    strategy, method_params = random_kangaroo(model, 1, exit_layer=2, exit_threshold=0.0, max_draft_steps=4,
                                              step_costs=tuple(COSTS.tolist()), probe_every=4)
    prompts = random_prompts(np.random.default_rng(0), [5, 9], model.cfg.vocab_size)
    engine = Engine(model, strategy, method_params)

    def drafting_steps(out) -> int:
        return int(np.asarray(out.method_state["controller"].chosen)[1:].sum())

    first, second = (engine.generate(prompts, max_new_tokens=40, eos_ids=()) for _ in range(2))
    assert first.tokens == second.tokens == plain_tokens(model, prompts, 40)
    # The uninformed prior (1/2) drafts until it fades; the next generation starts from the acceptance the first
    # ended with (an untrained drafter's: near 0) and does not pay for that again.
    assert drafting_steps(first) >= _drafting_steps_while_the_prior_fades(COSTS, 4) >= 1
    assert drafting_steps(second) < drafting_steps(first)
    sampled = SamplingConfig(temperature=0.8)  # what greedy generations learnt is not carried into sampled ones
    fresh = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40, sampling=sampled, seed=3, eos_ids=())
    after = engine.generate(prompts, max_new_tokens=40, sampling=sampled, seed=3, eos_ids=())
    assert after.tokens == fresh.tokens and drafting_steps(after) == drafting_steps(fresh)
    engine.forget()  # and after `forget` a generation starts from the prior again
    assert drafting_steps(engine.generate(prompts, max_new_tokens=40, eos_ids=())) == drafting_steps(first)


def test_an_agreeable_drafter_keeps_drafting():
    model = agreeable_model("tiny-gqa", 1)
    adapter = init_adapter(model.cfg, 0, 0.01, norm=np.asarray(model.params["final_norm"]))
    strategy = Kangaroo(exit_layer=3, exit_threshold=0.0, max_draft_steps=4, step_costs=tuple(COSTS.tolist()))
    method_params = {"adapter": {k: jnp.asarray(v) for k, v in adapter.items()}}
    prompts = random_prompts(np.random.default_rng(2), [5, 12, 3], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 40)
    assert sum(out.speculated_steps) > 0.8 * sum(out.row_steps) and sum(out.new_tokens) / sum(out.forwards) > 1.5


def test_step_times_are_measured_once_per_shape_and_kept_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    # a tiny model's steps take microseconds: its rounds disagree by more than a real model's; steadiness is pinned below
    monkeypatch.setattr(calibration, "STEADY_SPREAD", float("inf"))
    model = tiny_model("tiny-llama", 0)
    strategy = Kangaroo(exit_layer=1, exit_threshold=0.0, max_draft_steps=3)  # no step_costs: the engine measures
    method_params = random_adapter(model, 0)
    prompts = random_prompts(np.random.default_rng(1), [6], model.cfg.vocab_size)
    engine = Engine(model, strategy, method_params)
    first = engine.generate(prompts, max_new_tokens=20, eos_ids=())
    stored = json.loads((tmp_path / calibration.STEP_TIMES_FILE).read_text())
    (entry,) = stored.values()
    # c(0..3), then a step that makes its first drafts and drops them (Kangaroo gates its first draft)
    assert entry["key"]["batch"] == 1 and len(entry["ms"]) == 4 + 1 and all(m > 0 for m in entry["ms"])
    # the raw times are stored; the controller gets them made increasing (`monotone_costs`)
    controller = first.method_state["controller"]
    np.testing.assert_allclose(np.asarray(controller.costs), monotone_costs(entry["ms"][:4]), rtol=1e-3)
    assert float(controller.guess_cost) >= float(controller.costs[0]) * 1.01 - 1e-6

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("eej.decoding.engine.time_loop", no_measuring)
    again = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=20, eos_ids=())  # a new process, in effect
    np.testing.assert_allclose(np.asarray(again.method_state["controller"].costs), monotone_costs(entry["ms"][:4]), rtol=1e-3)
    assert again.tokens == first.tokens == plain_tokens(model, prompts, 20)

    # A corrupt file, or a foreign entry, means measuring again, never an error or other tokens.
    monkeypatch.undo()
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "STEADY_SPREAD", float("inf"))
    (tmp_path / calibration.STEP_TIMES_FILE).write_text("{not json")
    assert Engine(model, strategy, method_params).generate(prompts, max_new_tokens=20, eos_ids=()).tokens == first.tokens
    assert len(json.loads((tmp_path / calibration.STEP_TIMES_FILE).read_text())) == 1
    data = json.loads((tmp_path / calibration.STEP_TIMES_FILE).read_text())
    (digest,) = data
    data[digest]["ms"] = [-1, "x"]
    (tmp_path / calibration.STEP_TIMES_FILE).write_text(json.dumps(data))
    assert Engine(model, strategy, method_params).generate(prompts, max_new_tokens=20, eos_ids=()).tokens == first.tokens
    assert all(m > 0 for m in json.loads((tmp_path / calibration.STEP_TIMES_FILE).read_text())[digest]["ms"])


def test_spread_compares_each_rounds_costs_relative_to_its_first_point():
    assert calibration.spread([[10.0, 12.0], [20.0, 24.0]]) == pytest.approx(0.0)  # a uniformly slower round: steady
    assert calibration.spread([[10.0, 12.0, 15.0], [10.0, 12.0, 18.0]]) == pytest.approx(0.2)  # 1.8 / 1.5 - 1
    assert calibration.spread([[10.0, 12.0], [5.0, 12.0]]) == pytest.approx(1.0)  # the first point disturbed: 2.4 / 1.2
    assert calibration.spread([[7.0], [9.0]]) == 0.0 and calibration.spread([[7.0, 9.0]]) == 0.0


class _FakeLoopState(NamedTuple):
    steps: jax.Array
    point: jax.Array


def _fake_timed_loop(monkeypatch, rounds: list[list[float]]):
    """A decode loop on a fake clock: its runs take, in order, the milliseconds per step that `rounds` [round][point]
    lists for the point each run times (the first round is time_loop's warm-up). Returns (loop, edits, state, runs:
    the points timed so far)."""
    clock, runs = [0.0], []

    def loop(s):
        ms = rounds[len(runs) // len(rounds[0])][int(s.point)]
        runs.append(int(s.point))
        clock[0] += ms * calibration.CALIBRATION_STEPS / 1e3
        return s._replace(steps=s.steps + calibration.CALIBRATION_STEPS)

    monkeypatch.setattr(calibration, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    edits = [lambda s, i=i: s._replace(point=jnp.asarray(i)) for i in range(len(rounds[0]))]
    return loop, edits, _FakeLoopState(jnp.asarray(0), jnp.asarray(0)), runs


def test_a_calibration_whose_rounds_disagree_is_measured_again(monkeypatch):
    steady, disturbed = [10.0, 12.0, 14.0], [20.0, 12.0, 14.0]  # the plain step slowed 2x in one round
    warm_up, n = [[50.0, 50.0, 50.0]], calibration.ROUNDS
    loop, edits, state, runs = _fake_timed_loop(monkeypatch, warm_up + [disturbed] + [steady] * (n - 1) + [steady] * n)
    measured = calibration.time_loop(loop, state, edits)
    assert measured.steady and measured.ms == pytest.approx(steady)
    assert runs == [0, 1, 2] * (1 + 2 * n)  # the warm-up, the disturbed set of rounds, one steady set

    # Never steady: the steadiest set is used (its medians) and said to be unsteady; no more than ATTEMPTS sets.
    sets = [[[10.0, 12.0, 14.0 * (1 + 2.0 * (r == 0) / (a + 1))] for r in range(n)] for a in range(calibration.ATTEMPTS)]
    loop, edits, state, runs = _fake_timed_loop(monkeypatch, warm_up + [r for rounds in sets for r in rounds])
    measured = calibration.time_loop(loop, state, edits)
    assert not measured.steady and measured.ms == pytest.approx(steady)  # the medians of the last (steadiest) set
    assert len(runs) == 3 * (1 + calibration.ATTEMPTS * n)


def test_an_unsteady_calibration_is_used_but_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    model = tiny_model("tiny-llama", 0)
    strategy = Kangaroo(exit_layer=1, exit_threshold=0.0, max_draft_steps=3)
    table = [1.0, 1.2, 1.4, 1.6, 1.1]  # c(0..3), then the first drafts made and dropped
    measured = []

    def unsteady(loop, state, edits, **kwargs):
        measured.append(len(edits))
        return calibration.Measured(table[: len(edits)], steady=False)

    monkeypatch.setattr("eej.decoding.engine.time_loop", unsteady)
    prompts = random_prompts(np.random.default_rng(1), [6], model.cfg.vocab_size)
    out = Engine(model, strategy, random_adapter(model, 0)).generate(prompts, max_new_tokens=12, eos_ids=())
    assert measured == [5] and not (tmp_path / calibration.STEP_TIMES_FILE).exists()
    np.testing.assert_allclose(np.asarray(out.method_state["controller"].costs), monotone_costs(table[:4]), rtol=1e-6)
    assert out.tokens == plain_tokens(model, prompts, 12)


def test_step_times_of_a_changed_cpu_kernel_are_not_reused(tmp_path, monkeypatch):
    cfg = tiny_model("tiny-llama", 0).cfg.replace(matmul_impl="cpu", attention_impl="cpu")
    strategy = Kangaroo(exit_layer=1, exit_threshold=0.0, max_draft_steps=3)

    def key():
        return calibration.step_times_key(cfg, strategy, None, 1, 64)

    before = key()
    assert before["matmul"].startswith("cpu:") and before["attention"].startswith("cpu:")
    assert calibration.step_times_key(cfg.replace(matmul_impl="xla"), strategy, None, 1, 64)["matmul"] == "xla"
    for module in (cpu_matmul, cpu_attention):  # a kernel edited (a new eej version): its key changes, the other's not
        edited = tmp_path / module.SOURCE.name
        edited.write_text(module.SOURCE.read_text() + "\n// edited\n")
        monkeypatch.setattr(module, "SOURCE", edited)
        changed = key()
        name = "matmul" if module is cpu_matmul else "attention"
        assert changed[name] != before[name] and changed == {**before, name: changed[name]}
        monkeypatch.undo()


def test_an_empty_cache_dir_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EEJ_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    assert calibration.cache_dir() is None
    model = tiny_model("tiny-llama", 0)
    engine = Engine(model, Kangaroo(exit_layer=1, max_draft_steps=2), random_adapter(model, 0))
    engine.generate(random_prompts(np.random.default_rng(1), [4], model.cfg.vocab_size), max_new_tokens=12, eos_ids=())
    assert os.listdir(tmp_path) == []


def test_fixed_drafting_is_the_papers_behaviour():
    model = agreeable_model("tiny-llama", 2)
    strategy, method_params = random_kangaroo(model, 3, exit_layer=2, exit_threshold=0.0, max_draft_steps=3, adaptive=False)
    prompts = random_prompts(np.random.default_rng(4), [7], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=30, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 30)
    chosen = np.asarray(out.method_state["controller"].chosen)
    assert chosen[3] == out.steps and out.speculated_steps == out.row_steps  # every step drafted K = 3


def _recorded_widths(monkeypatch, module) -> list[int]:
    """Every decode step's verification width less one (what `module` passes `verify_by_width`), as it runs."""
    widths: list[int] = []
    real = module.verify_by_width

    def recording(drafted, max_drafts, verify, cache):
        jax.debug.callback(lambda d: widths.append(int(d)), drafted)
        return real(drafted, max_drafts, verify, cache)

    monkeypatch.setattr(module, "verify_by_width", recording)
    return widths


@pytest.mark.parametrize("module,build", [(kangaroo, random_kangaroo), (m2r2, m2r2.random_spec)])
def test_verification_is_as_wide_as_the_drafts_made(monkeypatch, own_programs, module, build):
    """K = 4 asked every step (fixed); a threshold of 1 stops every row after its first draft (a draft's confidence
    is below 1), so each step verifies 2 tokens, not 5 — and the output stays plain decoding's."""
    widths = _recorded_widths(monkeypatch, module)
    model = tiny_model()
    prompts = random_prompts(np.random.default_rng(5), [6, 9], model.cfg.vocab_size)
    for threshold, drafted in [(1.0, {1}), (0.0, {4})]:
        widths.clear()
        strategy, method_params = build(model, 1, exit_threshold=threshold, max_draft_steps=4, adaptive=False)
        out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=12, eos_ids=())
        assert out.tokens == plain_tokens(model, prompts, 12)
        assert set(widths) == drafted and len(widths) == out.steps


@pytest.mark.parametrize("module,build", [(kangaroo, random_kangaroo), (m2r2, m2r2.random_spec)])
def test_a_finished_row_drafts_nothing(monkeypatch, own_programs, module, build):
    """Fixed K = 3 with no confidence stop: a row drafts 3 every step until it has its 14 tokens (the prefill's
    one and those its steps committed), then none while the batch's other row finishes — the output unchanged."""
    steps: list[tuple[list[int], list[int]]] = []
    real = module.judged

    def recording(drafted, counts):
        jax.debug.callback(lambda d, c: steps.append((np.asarray(d).tolist(), np.asarray(c).tolist())), drafted, counts)
        return real(drafted, counts)

    monkeypatch.setattr(module, "judged", recording)
    model = agreeable_model("tiny-gqa", 1)
    strategy, method_params = build(model, 1, exit_threshold=0.0, max_draft_steps=3, adaptive=False)
    prompts = random_prompts(np.random.default_rng(7), [5, 11, 8], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=14, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 14)
    made = np.ones(len(prompts), int)  # the prefill's token
    finished_rows_seen = 0
    for drafted, counts in steps[-out.steps:]:
        for row, (d, c) in enumerate(zip(drafted, counts)):
            assert d == (3 if made[row] < 14 else 0), (row, made[row], d)
            finished_rows_seen += made[row] >= 14
            made[row] += c
    assert finished_rows_seen > 0  # the case happened


def test_calibrated_costs_never_fall_with_more_drafts():
    """A noisy measurement where drafting 2 read cheaper than drafting 1 must not make 2 look like a bargain."""
    # each draft adds at least MIN_DRAFT_COST (1%) of a plain step: 2 drafts at least 41 + 0.3, 4 at least 44 + 0.3
    np.testing.assert_allclose(monotone_costs([30.0, 41.0, 39.5, 44.0, 43.0]), [30.0, 41.0, 41.3, 44.0, 44.3], rtol=1e-6)
    strategy = Kangaroo(exit_layer=1, max_draft_steps=2)
    state = {"drafter": (), "controller": Controller.start(1, 2)}
    np.testing.assert_allclose(strategy.calibrate(state, [10.0, 9.0, 12.0])["controller"].costs, [10.0, 10.1, 12.0], rtol=1e-6)


def test_a_draft_measured_free_is_still_refused_once_drafts_are_rejected():
    """Noise under load once read c(1) = c(0) on the real model (costs 53.5, 53.5, 79.6, 86.7, 101.6 ms after `monotone_costs`
    clamped a lower c(1)): one draft then looked free, and with every draft rejected the rule drafted forever. The
    calibrated table charges each draft at least 1% of a plain step, and the prior fades."""
    costs = monotone_costs([53.5, 52.0, 79.6, 86.7, 101.6])
    assert float(costs[1]) > float(costs[0])
    assert 0 < _drafting_steps_while_the_prior_fades(costs, 4) < 60


def test_calibration_times_full_drafts_whatever_the_threshold(monkeypatch, own_programs):
    """c(k) is the cost of k drafts and k + 1 verified: a step forced to draft k does not stop at a low-confidence
    draft (here every draft is), while the steps that decode afterwards do."""
    monkeypatch.setenv("EEJ_CACHE_DIR", "")
    widths = _recorded_widths(monkeypatch, kangaroo)
    model = tiny_model()
    strategy, method_params = random_kangaroo(model, 1, exit_threshold=1.0, max_draft_steps=3, step_costs=None)
    engine = Engine(model, strategy, method_params)
    prompts = random_prompts(np.random.default_rng(6), [8], model.cfg.vocab_size)
    out = engine.generate(prompts, max_new_tokens=16, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 16)
    decoding = widths[-out.steps:]
    assert set(decoding) <= {0, 1} and {0, 1, 2, 3} <= set(widths[:-out.steps])


def _drafting_steps_while_the_prior_fades(costs: jax.Array, max_drafts: int) -> int:
    """How many steps the controller drafts, from its prior, when every draft is rejected and no row stops drafting
    early: its own rule and update replayed on the cost table `costs` [K + 1] (one row, batch 1)."""
    ctl, active, steps = Controller.start(1, max_drafts, tuple(np.asarray(costs).tolist())), jnp.asarray([True]), 0
    while (k := int(best_draft_length(ctl.acceptance, active, ctl.costs, None, ctl.continuation, ctl.following))) > 0:
        ctl = ctl.after(k, False, ctl.backoff, jnp.zeros(1), jnp.ones(1), active, jnp.asarray([k]))
        steps += 1
        assert steps < 100, "the prior never fades"
    return steps


def test_the_prior_fades_sooner_when_drafting_costs_more():
    assert _drafting_steps_while_the_prior_fades(COSTS, 4) < _drafting_steps_while_the_prior_fades(COSTS * 0.1 + 0.9, 4)
    assert _drafting_steps_while_the_prior_fades(jnp.asarray([1.0, 3.0, 4.0]), 2) == 0  # never pays, even at 1/2


@pytest.mark.real_model
@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_an_untrained_adapter_on_the_real_model_costs_only_the_probes(real_model, kernels, tmp_path, monkeypatch):
    """Acceptance ~0: after the prior fades the controller takes plain steps, with a probe on every plain step at
    first and more rarely (every 8th) as the probes keep finding nothing (costs measured here, with XLA's kernels and with eej's: their
    ratios differ, and so does how long the prior takes to fade).

    The adapter's projections are N(0, 1), so its drafts are noise. Not `init_adapter`'s default start near the logit
    lens at layer 2: its guesses score ~0.13 against this answer's tokens, and a one-token draft pays where it measures
    under ~1.13 plain steps (CI's loaded machine measured about that, and the controller rightly drafted on 23 steps)."""
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    model = with_kernels(real_model, kernels)
    strategy = Kangaroo(exit_layer=2, exit_threshold=0.0, max_draft_steps=4)
    adapter = init_adapter(model.cfg, 0, scale=1.0)
    method_params = {"adapter": {k: jnp.asarray(v) for k, v in adapter.items()}}
    prompts = [model.tokenizer.encode_chat("Name three rivers in Europe.")]
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=64, eos_ids=())
    assert out.tokens == Engine(model).generate(prompts, max_new_tokens=64, eos_ids=()).tokens
    controller = out.method_state["controller"]
    costs, chosen = np.asarray(controller.costs), np.asarray(controller.chosen)
    # Drafting only while the prior (1/2) fades, as long as the measured costs make that last; one more step for a
    # chance agreement of the untrained drafter with a probe.
    fading = _drafting_steps_while_the_prior_fades(controller.costs, 4)
    assert chosen[1:].sum() <= fading + 1 and sum(out.speculated_steps) <= fading + 1
    assert out.steps >= 63 - (fading + 1)  # about one token per step: nothing lost to speculation that never pays
    assert np.all(costs > 0) and costs[4] > costs[0]  # measured on this machine: drafting 4 costs more than none
    assert int(best_draft_length(controller.acceptance, jnp.asarray([True]), controller.costs)) == 0  # learnt: no draft pays
    assert int(controller.backoff) > 0  # and the probes that kept finding so have spaced out
    assert (chosen * costs).sum() <= 1.05 * out.steps * costs[0]  # within 5% of all-plain steps, by the measured costs


def _branchings(jaxpr) -> int:
    """cond and while equations in a jaxpr, those nested in their bodies and branches included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("cond", "while")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _branchings(inner)
    return count


@pytest.mark.parametrize("build", [random_kangaroo, m2r2.random_spec])
def test_a_step_that_drafts_nothing_branches_like_plain_decodings(monkeypatch, build):
    """The fallback step tests no more predicates than plain decoding's step (XLA:GPU reads each back to the host):
    the adaptive step is one conditional between speculating and a step traced for k = 0, which has no drafting
    loop, no switch over verification widths and no probe."""
    monkeypatch.setenv("EEJ_CONDITIONALS", "lax")  # one `cond` per conditional in the jaxpr
    monkeypatch.setenv("EEJ_BRANCH_STEP", "1")  # a GPU's default
    model = tiny_model("tiny-gqa", seed=3)
    prompts = random_prompts(np.random.default_rng(4), [5, 8], model.cfg.vocab_size)

    def step_jaxpr(engine: Engine):
        state, static, _, _ = engine._prefill(prompts, 8, SamplingConfig(), 0, ())
        step = functools.partial(engine_step, cfg=model.cfg, strategy=engine.strategy, sampling=SamplingConfig())
        return jax.make_jaxpr(step)(engine.model.params, engine.method_params, state).jaxpr

    plain = step_jaxpr(Engine(model))
    adaptive = step_jaxpr(Engine(model, *build(model, 1)))
    top = [eqn for eqn in adaptive.eqns if eqn.primitive.name == "cond"]
    assert len(top) == 1 + sum(eqn.primitive.name == "cond" for eqn in plain.eqns)
    fallback, speculating = top[-1].params["branches"]
    assert _branchings(fallback.jaxpr) == _branchings(plain) < _branchings(speculating.jaxpr)
    # Drafting dear enough that the prior's 1/2 does not pay: plain steps, and a probe every 4 (a real draft for M2R2)
    out = Engine(model, *build(model, 1, step_costs=(1.0, 2.0, 2.5, 3.0, 3.5), probe_every=4)).generate(prompts, max_new_tokens=12, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 12)
    assert 0 < sum(out.speculated_steps) < sum(out.row_steps) or build is random_kangaroo  # Kangaroo's probes are free
