"""Cost-aware, self-tuning speculation and exits: each step does what pays on this machine.

A self-speculative step asked for up to k drafts makes d ≤ k of them: a row stops early after a draft its
drafter is not confident of (the method's `exit_threshold`), which it does with probability 1 - β_b after
each draft, so it makes at least i drafts with probability β_b^(i-1). Its accepted prefix ends at the first
rejection, or at the last draft. The first draft is accepted with probability α_b; after an accepted draft
(k not reached) the next one is made *and* accepted with probability γ_b. Taking every draft as accepted alike,
independently of whether the row drafts on (γ = α β), under-asks: a draft is made only after a confident one,
and is then accepted more often than a first guess (Kangaroo's adapter on training prompts, greedy, four drafts:
first drafts accepted 0.49 of the time on maths and 0.37 on code and role-play; a draft made after an accepted
one, 0.57 and 0.56; so γ = 0.47 and 0.45 where α β reads 0.30 and 0.19: scripts/controller_replay.py). The step commits in
expectation E_b(k) = 1 + α_b (1 + γ_b + ... + γ_b^(k-1)) tokens, and costs what its longest row drafted
costs: C(k) = c(0) + Σ_{i≤k} P(some row drafts ≥ i) (c(i) - c(i-1)), c(d) the milliseconds of a step that
drafts d and verifies d + 1. (With no early stop and drafts accepted independently, β = 1 and γ = α:
E_b(k) = 1 + α_b + ... + α_b^k and C(k) = c(k).)
A batch runs until its last row ends, so what a user waits for is the row that finishes last: at the pace of
a step drafting k, row b, with R_b tokens of its budget left, needs R_b C(k) / E_b(k) more milliseconds.
Each step the controller drafts

    k* = argmin_k  max_b R_b C(k) / E_b(k)        over the active rows, k = 0 (a plain step) included,

one k for the whole batch, the one that brings its last row in soonest: a row whose drafts are rarely
accepted keeps the batch on plain steps (drafting would slow that row, and the batch waits for it), while
a row close to the end of its budget counts for little. Not what the batch's most optimistic row would
want, nor the batch's total tokens per second, which rows that finish early and then idle inflate. At
batch 1 it is k* = argmax_k E(k) / C(k). While prompts wait in a queue for a row (`Engine.generate` with a
`batch_size`; `StepInputs.queued`) a row that finishes takes the next prompt and nobody waits for the last row:
then k* = argmax_k Σ_b E_b(k) / C(k), the batch's committed tokens per millisecond.

- c(k) is measured on the running machine: the engine times its compiled decode loop forced to draft k
  tokens every step, for every k, at the batch size and cache size it is about to run
  (`SelfSpeculative.calibration_points`), and keeps the table on disk per machine
  (eej.decoding.calibration), made increasing in k (`monotone_costs`: timing noise must not make a longer
  draft look cheaper, nor a draft free). On a CPU verifying a few tokens costs well over one step; on a GPU about one step —
  the same rule then drafts far more.
- α_b and γ_b are exponential moving averages (decay `DECAY` per judged draft, prior 1/2 worth two drafts)
  of what verification observed (`split_judged`): α_b of first drafts (accepted or not), γ_b of each accepted
  draft before the k-th (whether the next one was made and accepted). An engine's later generations
  (same sampling) start from the pooled α, β and γ its last one ended with, still worth two drafts, instead of 1/2:
  a generation no longer pays, at its start, for drafts the prior promised and the text it has been decoding
  withholds (on chat at batch 4, part of the 4-5% of steps `adaptive_v19` drafted on). Greedy tokens
  never depend on it; under sampling the draws consumed do, so the sample of a given seed depends on the
  engine's earlier generations, its distribution never (`Engine.forget` starts afresh). β_b likewise, of what the
  drafting loop did: after each draft but its last a row went on, and after its last one it stopped if
  that came before the k asked for. (Without β the rule charged c(k) and credited k drafts for a k that rows
  stopping early rarely reach.) While the controller is
  not speculating the estimate is kept fresh by a probe every `probe_every` plain steps: a drafter that
  reads the residual stream of a plain step (Kangaroo: layer l) makes its first draft and, where the rule still
  says plain, drops it and scores it against the plain step's own output, for the price of its adapter and draft
  head (`free_probe`: a first draft, it informs α); any
  other drafter takes one real speculative step of one draft instead.
- Such a drafter also gates its first draft (`SelfSpeculative.step`): a first draft that reaches the method's
  confidence threshold is accepted far more often than one that does not (Kangaroo on training prompts, sampled
  at 0.7: 0.63 against 0.13 on code and role-play), so the controller keeps α apart for the two classes, with
  the share π_b of confident first drafts, and decides twice. Before the step, as above, from α_b; and where that
  says plain, it makes the first drafts anyway when what they could save outweighs what they cost — all active
  rows confident (chance Π_b π_b) would save the share s = 1 - min_k F(k) / F(0) of a plain step, F the rule's
  objective at each row's α_sure, against the measured cost of a step whose first drafts are dropped
  (`Controller.gate_pays`). Once the first drafts are made, it decides again with each row's α given its draft's
  class (`Controller.refined`); where that says 0 the drafts are dropped and the step verifies one token, and
  scores them as a probe. Replayed on training prompts (scripts/controller_replay.py), this gains most where the
  averaged rule hesitated: sampled code and role-play 1.314x -> 1.352x of plain steps, summaries 1.059x -> 1.075x.
  A probe after which speculation still does not pay doubles the wait for the next one, up to 2^MAX_BACKOFF times `probe_every`, and
  any step the rule chooses to speculate brings it back to `probe_every`: on text where the drafter never
  pays, the probes' cost fades (a probe is a step that does not pay, by the estimate) instead of staying
  a fixed fraction of every step.

The output is untouched: greedy verification and speculative sampling are lossless for any k, and k
depends only on past steps. `adaptive=False` (a preset's `adaptive: false`) drafts `max_draft_steps`
every step, as the papers do.

The early-exit methods get the same discipline with `ExitEconomics` (their own decisions, same parts):
each step M2R2's exit attempts the fast stream only when the measured costs and the observed exit rate
say an attempt saves time on average (a failed attempt re-runs every layer), and SpecEE checks a layer's
predictor only where the chance of exiting there, times the layers it would save, outweighs the check
and the full-vocabulary argmax a firing predictor that does not lead to an exit wastes — with a probe of
the other choice every `probe_every` steps (backing off the same way) so the estimates stay fresh. M2R2's
exit starts an engine's later generations from the rates the last one ended with, as the controller does
(`AdaptiveExit.carries_rates`); SpecEE does not (see `SpecEE.carries_rates`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from eej.decoding.sampling import probabilities, race_sample
from eej.decoding.strategy import StepInputs, StepResult, Strategy, full_prefill
from eej.model.control import branch_whole_step, cond_in_place, switch_in_place
from eej.settings import setting

DECAY = 0.95  # per judged draft: follows the last ~20 drafts (0.9 lost 1.2%: scripts/controller_replay.py)
EXIT_DECAY = 0.9  # per observed decision of an early-exit method (not replayed; unchanged)
PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0
# The least a draft adds to a step, as a fraction of a plain step: below what any drafter costs (Kangaroo's adapter and
# 4096-token head read 2.4% of the weights a SmolLM2-135M step reads), so it only lifts readings that noise made free.
MIN_DRAFT_COST = 0.01
MAX_BACKOFF = 3  # probes that change nothing space out to at most 2**3 x probe_every steps
# Step costs (k = 0, 1, ...: relative) that random test instances carry instead of measuring: drafting pays from an
# acceptance of about 0.3, so an untrained drafter settles on plain steps and an agreeable one drafts.
TEST_STEP_COSTS = (1.0, 1.3, 1.45, 1.6, 1.75, 1.9, 2.05, 2.2)


@struct.dataclass
class ExitEconomics:
    """What an adaptive method carries to decide whether acting pays: discounted rates, step costs, the probe
    schedule. An early-exit method's n decisions are batch-level (e.g. one per layer); `Controller` adds the
    speculative controller's own bookkeeping.

    hits, trials: [n] float32 discounted successes and attempts of n decisions, the prior (1/2, worth two) included.
    costs: [m] float32, the method's measured step costs (ms, or relative / layer units before measuring).
    idle: int32, steps since the method last probed or acted (a probe is due every `probe_every` << backoff).
    backoff: int32 in [0, MAX_BACKOFF], probes since the rule last chose to act (see `probe_due`).
    force: int32, a calibration mode when >= 0 (the method's own meaning), -1: decide.
    """

    hits: jax.Array
    trials: jax.Array
    costs: jax.Array
    idle: jax.Array
    backoff: jax.Array
    force: jax.Array

    @classmethod
    def start(cls, decisions: int, costs: tuple[float, ...], prior: Any = None, **extra: Any) -> "ExitEconomics":
        """The state before any observation; `prior`: [decisions] the rates to start from (default 1/2 each), each
        worth `PRIOR_TRIALS` observations."""
        hits = jnp.full((decisions,), PRIOR_HITS, jnp.float32) if prior is None else \
            jnp.asarray(prior, jnp.float32) * PRIOR_TRIALS
        return cls(hits=hits, trials=jnp.full((decisions,), PRIOR_TRIALS, jnp.float32),
                   costs=jnp.asarray(costs, jnp.float32), idle=jnp.zeros((), jnp.int32), backoff=jnp.zeros((), jnp.int32),
                   force=jnp.full((), -1, jnp.int32), **extra)

    @property
    def rate(self) -> jax.Array:
        return self.hits / self.trials

    @property
    def optimistic_rate(self) -> jax.Array:
        """[n] (hits + 1) / (trials + 1): each rate as if the next observation were a success. An upper bound that
        shrinks as observations accumulate (with EXIT_DECAY's window, to about 1/11 above the rate), so that a
        rarely successful decision is not written off after a dry run it was likely to have (SpecEE's layers that
        fire on a few percent of their checks)."""
        return (self.hits + 1.0) / (self.trials + 1.0)

    def probe_due(self, probe_every: int) -> jax.Array:
        """Whether this step probes: `probe_every` << backoff steps since the last probe or action."""
        return probe_due(self.idle, self.backoff, probe_every)

    def observe(self, hits: jax.Array, trials: jax.Array, tried: jax.Array, probed: jax.Array | bool = False,
                acting: jax.Array | bool = False) -> "ExitEconomics":
        """After a step: `hits` of `trials` [n] observed; `tried` (bool scalar): whether the method tried at all;
        `probed`: the step was a probe; `acting`: the rule itself chose to try (resets the backoff)."""
        new_hits, new_trials = discounted(self.hits, self.trials, hits, trials, trials > 0, EXIT_DECAY)
        return self.replace(hits=new_hits, trials=new_trials, idle=jnp.where(tried, 0, self.idle + 1),
                            backoff=next_backoff(self.backoff, probed, acting))

    def started_from(self, rate: jax.Array) -> "ExitEconomics":
        """This state with its prior moved to `rate` [n] (an earlier generation's), worth `PRIOR_TRIALS` each."""
        return self.replace(hits=jnp.asarray(rate, jnp.float32) * PRIOR_TRIALS,
                            trials=jnp.full(self.trials.shape, PRIOR_TRIALS, jnp.float32))


@struct.dataclass
class Controller(ExitEconomics):
    """The adaptive draft-length controller's carried state (B rows, drafts up to K): `ExitEconomics` over the B
    rows' first drafts (hits, trials: discounted accepted and judged first drafts; α = hits / trials), with costs
    [K + 1] what a step drafting k tokens costs, plus

    chosen: [K + 1] int32, how many steps drafted k tokens.
    onward_hits, onward_trials: [B] float32, discounted drafts after which a row drafted on, and drafts after which
      it could have (it went on, or stopped before the k asked for); β = onward_hits / onward_trials.
    follow_hits, follow_trials: [B] float32, discounted accepted drafts before the k-th after which the next draft
      was made and accepted, and all accepted drafts before the k-th; γ = follow_hits / follow_trials.
    class_hits, class_trials: [B, 2] float32, discounted accepted and judged first drafts that fell short of the
      method's confidence threshold (column 0) and that reached it (column 1): α given the first draft's class.
    share_hits, share_trials: [B] float32, discounted judged first drafts that reached the threshold, and all of them:
      the confident share π.
    guess_cost: float32, what a plain step costs that also makes a first draft (a gated step whose draft is dropped),
      in the units of `costs`.
    """

    chosen: jax.Array
    onward_hits: jax.Array
    onward_trials: jax.Array
    follow_hits: jax.Array
    follow_trials: jax.Array
    class_hits: jax.Array
    class_trials: jax.Array
    share_hits: jax.Array
    share_trials: jax.Array
    guess_cost: jax.Array

    @classmethod
    def start(cls, batch: int, max_drafts: int, costs: tuple[float, ...] | None = None) -> "Controller":
        costs = costs or (1.0,) * (max_drafts + 1)
        return super().start(batch, costs, chosen=jnp.zeros((max_drafts + 1,), jnp.int32),
                             onward_hits=jnp.full((batch,), PRIOR_HITS, jnp.float32),
                             onward_trials=jnp.full((batch,), PRIOR_TRIALS, jnp.float32),
                             follow_hits=jnp.full((batch,), PRIOR_HITS, jnp.float32),
                             follow_trials=jnp.full((batch,), PRIOR_TRIALS, jnp.float32),
                             class_hits=jnp.full((batch, 2), PRIOR_HITS, jnp.float32),
                             class_trials=jnp.full((batch, 2), PRIOR_TRIALS, jnp.float32),
                             share_hits=jnp.full((batch,), PRIOR_HITS, jnp.float32),
                             share_trials=jnp.full((batch,), PRIOR_TRIALS, jnp.float32),
                             guess_cost=jnp.asarray(costs[0] * (1.0 + MIN_DRAFT_COST), jnp.float32))

    @property
    def acceptance(self) -> jax.Array:
        """[B] α: the estimated probability that a row's first draft of a step is accepted."""
        return self.rate

    @property
    def following(self) -> jax.Array:
        """[B] γ: the estimated probability that, after an accepted draft (k not reached), a row makes another draft
        and it is accepted too."""
        return self.follow_hits / self.follow_trials

    @property
    def continuation(self) -> jax.Array:
        """[B] the estimated probability that a row drafts on after a draft (its confidence stays above the
        threshold), where it was asked for more."""
        return self.onward_hits / self.onward_trials

    @property
    def confident_share(self) -> jax.Array:
        """[B] π: the estimated share of a row's first drafts that reach the confidence threshold."""
        return self.share_hits / self.share_trials

    def acceptance_given(self, confident: jax.Array) -> jax.Array:
        """[B] α of a first draft known to be confident or not (confident [B] bool)."""
        rates = self.class_hits / self.class_trials
        return jnp.where(confident, rates[:, 1], rates[:, 0])

    def refined(self, confident: jax.Array, active: jax.Array, remaining: jax.Array | None,
                queued: jax.Array | bool = False) -> jax.Array:
        """The draft length (int32 scalar) once each active row's first draft is known to be confident or not
        (confident [B]): `best_draft_length` with each row's α given its draft's class; a row whose first draft is
        not confident stops after it (the confidence stop), so it adds nothing after its first draft."""
        onward = jnp.where(confident, self.continuation, 0.0)
        return best_draft_length(self.acceptance_given(confident), active, self.costs, remaining, onward,
                                 jnp.where(confident, self.following, 0.0), queued)

    def gate_pays(self, active: jax.Array, remaining: jax.Array | None, queued: jax.Array | bool = False) -> jax.Array:
        """Whether a step the rule would take plain should make its first drafts anyway, to draft on if they are
        confident (bool scalar): when every active row's first draft is confident (chance Π_b π_b) drafting saves a
        share s of a plain step's time, by the rule's own objective, so making the drafts saves Π π · s · c(0) on
        average against what they cost, guess_cost - c(0)."""
        everyone = jnp.ones(active.shape, bool)
        objective = draft_objective(self.acceptance_given(everyone), active, self.costs, remaining, self.continuation,
                                    self.following, queued)
        saving = 1.0 - jnp.min(objective) / jnp.maximum(objective[0], 1e-12)
        chance = jnp.prod(jnp.where(active, self.confident_share, 1.0))
        return jnp.any(active) & (chance * saving * self.costs[0] > self.guess_cost - self.costs[0])

    def decide(self, active: jax.Array, remaining: jax.Array | None, probe_every: int,
               free_probe: bool, queued: jax.Array | bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """This step's (k, probe, backoff): the draft length the rule picks for the active rows [B] with `remaining`
        [B] tokens of budget (`best_draft_length`; `queued`: prompts wait for a free row), or — when that is 0 and a
        probe is due — a probe (free: a plain step that scores the drafter's guess; else one real draft), or the
        calibration's forced k; the backoff after the step."""
        wanted = best_draft_length(self.acceptance, active, self.costs, remaining, self.continuation, self.following,
                                   queued)
        due = (wanted == 0) & probe_due(self.idle, self.backoff, probe_every)
        k = wanted if free_probe else jnp.where(due, 1, wanted)
        forced = self.force >= 0
        k = jnp.where(forced, self.force, k)
        return k, due & ~forced, next_backoff(self.backoff, due, wanted > 0)

    @property
    def pooled(self) -> tuple[jax.Array, ...]:
        """(α, β, γ, π, α_unsure, α_sure) pooled over the rows (float32 scalars): what a generation learnt
        (`SelfSpeculative.learned`)."""
        classes = jnp.sum(self.class_hits, axis=0) / jnp.sum(self.class_trials, axis=0)
        return (jnp.sum(self.hits) / jnp.sum(self.trials), jnp.sum(self.onward_hits) / jnp.sum(self.onward_trials),
                jnp.sum(self.follow_hits) / jnp.sum(self.follow_trials),
                jnp.sum(self.share_hits) / jnp.sum(self.share_trials), classes[0], classes[1])

    def started_from_pooled(self, learned: tuple[jax.Array | float, ...]) -> "Controller":
        """This state with its prior moved to an earlier generation's pooled (α, β, γ, π, α_unsure, α_sure), each still
        worth `PRIOR_TRIALS` judged drafts (`SelfSpeculative.start_from`)."""

        def prior(rate, like):
            return jnp.full(like.shape, rate * PRIOR_TRIALS, jnp.float32), jnp.full(like.shape, PRIOR_TRIALS, jnp.float32)

        alpha, beta, gamma, share, unsure, sure = learned
        (hits, trials), (onward_hits, onward_trials), (follow_hits, follow_trials), (share_hits, share_trials) = (
            prior(alpha, self.hits), prior(beta, self.onward_hits), prior(gamma, self.follow_hits),
            prior(share, self.share_hits))
        class_hits, class_trials = prior(jnp.stack([unsure, sure]), self.class_hits)
        return self.replace(hits=hits, trials=trials, onward_hits=onward_hits, onward_trials=onward_trials,
                            follow_hits=follow_hits, follow_trials=follow_trials, class_hits=class_hits,
                            class_trials=class_trials, share_hits=share_hits, share_trials=share_trials)

    def after(self, k: jax.Array | int, probe: jax.Array | bool, backoff: jax.Array, hits: jax.Array,
              trials: jax.Array, active: jax.Array, drafted: jax.Array | None = None,
              decay: float = DECAY, confident: jax.Array | None = None) -> "Controller":
        """The state after a step that asked for k drafts (probing or not), in which the rows made `drafted` [B]
        (None: not observed) and verification judged `hits` of `trials` [B] drafts (`judged`; a probe: the scored
        guess, hits in [0, 1] of one trial); `confident` [B]: whether each row's first draft reached the confidence
        threshold (None: not observed; the confident share and the classes' α then keep their estimates)."""
        (first_hits, first_trials), (follow_hits, follow_trials) = split_judged(hits, trials, k)
        class_hits, class_trials, share_hits, share_trials = (self.class_hits, self.class_trials, self.share_hits,
                                                              self.share_trials)
        if confident is not None:
            sure = confident.astype(jnp.float32)
            column = jnp.stack([1.0 - sure, sure], axis=1) > 0  # [B, 2]: the first draft's class
            class_hits, class_trials = discounted(class_hits, class_trials, first_hits[:, None], first_trials[:, None],
                                                  active[:, None] & column & (first_trials[:, None] > 0), decay)
            share_hits, share_trials = discounted(share_hits, share_trials, sure * first_trials, first_trials,
                                                  active & (first_trials > 0), decay)
        hits, trials = discounted(self.hits, self.trials, first_hits, first_trials, active, decay)
        deciding = active & (self.force < 0)
        # A step asked for at most one draft cannot tell whether a second would have been made or accepted: there
        # γ and β drift back towards the prior, or a low estimate would keep the rule at one draft for good.
        blind = deciding & (jnp.asarray(k) <= 1)
        follow_hits, follow_trials = discounted(*towards_prior(self.follow_hits, self.follow_trials, blind, decay),
                                                follow_hits, follow_trials, deciding & (follow_trials > 0), decay)
        onward_hits, onward_trials = towards_prior(self.onward_hits, self.onward_trials, blind, decay)
        if drafted is not None:
            went_on, could = drafted_onward(drafted, k)
            onward_hits, onward_trials = discounted(onward_hits, onward_trials, went_on, could, deciding & (could > 0),
                                                    decay)
        return self.replace(hits=hits, trials=trials, idle=jnp.where((jnp.asarray(k) > 0) | probe, 0, self.idle + 1),
                            backoff=backoff, chosen=self.chosen.at[k].add(1), onward_hits=onward_hits,
                            onward_trials=onward_trials, follow_hits=follow_hits, follow_trials=follow_trials,
                            class_hits=class_hits, class_trials=class_trials, share_hits=share_hits,
                            share_trials=share_trials)


def probe_due(idle: jax.Array, backoff: jax.Array, probe_every: int) -> jax.Array:
    """Whether a probe is due after `idle` steps without one: every probe_every * 2^backoff steps."""
    return idle + 1 >= probe_every * jnp.left_shift(jnp.ones((), jnp.int32), backoff)


def next_backoff(backoff: jax.Array, probed: jax.Array, acting: jax.Array) -> jax.Array:
    """The backoff after a step: back to 0 when the rule chose to act (draft, attempt, check), one more (up to
    MAX_BACKOFF) after a probe the rule did not ask for."""
    return jnp.where(acting, 0, jnp.where(probed, jnp.minimum(backoff + 1, MAX_BACKOFF), backoff)).astype(jnp.int32)


def discounted(hits: jax.Array, trials: jax.Array, new_hits: jax.Array, new_trials: jax.Array, where: jax.Array,
               decay: float = DECAY):
    """(hits, trials) after observing new_hits of new_trials where `where` (old ones decayed by `decay` per new trial)."""
    decay = decay ** new_trials
    return jnp.where(where, decay * hits + new_hits, hits), jnp.where(where, decay * trials + new_trials, trials)


def towards_prior(hits: jax.Array, trials: jax.Array, where: jax.Array, decay: float = DECAY):
    """(hits, trials) [B] moved a step back towards the prior (1/2 worth two) where `where`: what a judged trial's
    decay does to old evidence, with the prior in the new trial's place."""
    def blend(old: jax.Array, prior: float) -> jax.Array:
        return jnp.where(where, decay * old + (1.0 - decay) * prior, old)

    return blend(hits, PRIOR_HITS), blend(trials, PRIOR_TRIALS)


def drafted_onward(drafted: jax.Array, k: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """What a step asked for k drafts tells of each row's continuation, from the drafts it made (drafted [B]):
    (drafts after which it drafted on [B], drafts after which it could have [B]) — every draft but the last,
    and the last one too when the row stopped before k."""
    made = drafted.astype(jnp.float32)
    went_on = jnp.maximum(made - 1.0, 0.0)
    return went_on, went_on + ((made >= 1) & (made < jnp.asarray(k, jnp.float32))).astype(jnp.float32)


def split_judged(hits: jax.Array, trials: jax.Array, k: jax.Array | int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """What a step asked for k drafts tells of the first draft and of the drafts after an accepted one, from the
    accepted `hits` of judged `trials` [B] (`judged`; a free probe: hits in [0, 1] of one trial, k = 0):
    ((first hits, first trials), (follow hits, follow trials)) [B] each. Of a accepted drafts, each one before the
    k-th is a follow trial, a success where the next draft was accepted too: a - 1 of min(a, k - 1)."""
    follow_trials = jnp.maximum(jnp.minimum(hits, jnp.asarray(k, jnp.float32) - 1.0), 0.0)
    return (jnp.minimum(hits, 1.0), jnp.minimum(trials, 1.0)), (jnp.maximum(hits - 1.0, 0.0), follow_trials)


def expected_tokens(acceptance: jax.Array, max_drafts: int, continuation: jax.Array | None = None,
                    following: jax.Array | None = None) -> jax.Array:
    """E(k) = 1 + α (1 + γ + ... + γ^(k-1)) for k = 0..K: first-draft acceptance α, and γ the chance that a draft after
    an accepted one is made and accepted [...] -> [..., K + 1]. Without γ, drafts are taken as accepted alike and
    independently of a row drafting on with probability β: γ = α β (β = 1, no early stop: E = 1 + α + ... + α^k)."""
    if following is None:
        following = acceptance if continuation is None else acceptance * continuation
    gains = acceptance[..., None] * following[..., None] ** jnp.arange(max_drafts)
    return 1.0 + jnp.concatenate([jnp.zeros_like(gains[..., :1]), jnp.cumsum(gains, axis=-1)], axis=-1)


def expected_step_costs(costs: jax.Array, active: jax.Array, continuation: jax.Array | None = None) -> jax.Array:
    """C(k) = c(0) + Σ_{i≤k} P(some active row drafts ≥ i) (c(i) - c(i-1)) for k = 0..K: a step costs what its
    longest draft costs. costs [K + 1]; active, continuation β [B] (None: no row stops early: C = c)."""
    if continuation is None:
        return costs
    reach = continuation[:, None] ** jnp.arange(costs.shape[0] - 1)  # [B, K]: P(row drafts >= i), i = 1..K
    longest = 1.0 - jnp.prod(jnp.where(active[:, None], 1.0 - reach, 1.0), axis=0)  # [K]
    return costs[0] + jnp.concatenate([jnp.zeros((1,), costs.dtype), jnp.cumsum(longest * jnp.diff(costs))])


def draft_objective(acceptance: jax.Array, active: jax.Array, costs: jax.Array,
                    remaining: jax.Array | None = None, continuation: jax.Array | None = None,
                    following: jax.Array | None = None, queued: jax.Array | bool = False) -> jax.Array:
    """[K + 1] what the rule minimises for each k (arguments as `best_draft_length`): the time until the batch's last
    row is in, max_b remaining_b C(k) / E_b(k), or while prompts are queued the time per committed token of the batch,
    C(k) / Σ_b E_b(k) (0 when no row is active)."""
    remaining = jnp.ones(acceptance.shape, jnp.float32) if remaining is None else remaining.astype(jnp.float32)
    step_costs = expected_step_costs(costs, active, continuation)
    gains = expected_tokens(acceptance, costs.shape[0] - 1, continuation, following)
    last_row = jnp.max(jnp.where(active[:, None], remaining[:, None] * step_costs[None, :] / gains, 0.0), axis=0)
    batch_gain = jnp.sum(jnp.where(active[:, None], gains, 0.0), axis=0)
    per_token = jnp.where(batch_gain > 0, step_costs / jnp.maximum(batch_gain, 1e-12), 0.0)
    return jnp.where(queued, per_token, last_row)


def best_draft_length(acceptance: jax.Array, active: jax.Array, costs: jax.Array,
                      remaining: jax.Array | None = None, continuation: jax.Array | None = None,
                      following: jax.Array | None = None, queued: jax.Array | bool = False) -> jax.Array:
    """argmin_k max_b remaining_b C(k) / E_b(k) over the active rows (module docstring): acceptance α, active,
    remaining (None: equal budgets), continuation β (None: rows never stop early), following γ (None: α β) [B];
    costs c [K + 1] -> int32 k (0 when no row is active; ties: the shorter).

    queued (bool scalar): prompts wait for a row to free up (`Engine.generate` with a `batch_size`), so a row that
    finishes early does not idle and the batch's last row is not what anyone waits for: then the k of most
    committed tokens per millisecond over the batch, argmax_k Σ_b E_b(k) / C(k)."""
    objective = draft_objective(acceptance, active, costs, remaining, continuation, following, queued)
    return jnp.argmin(objective).astype(jnp.int32)


def probe_overlap(target_logits: jax.Array, target_tokens: jax.Array, draft_logits: jax.Array,
                  draft_ids: jax.Array | None, sampling, keys: jax.Array | None) -> jax.Array:
    """[B] the chance that a draft from q (draft logits [B, V'], columns `draft_ids` [V'] or the full vocabulary) is
    accepted where the target's logits [B, V] say p and it drew `target_tokens` [B]: under greedy decoding whether
    the draft's argmax is that token; under coupled sampling whether the draft's own draw with the position's `keys`
    [B] is (eej.decoding.sampling.race_sample); under residual sampling Σ_v min(p_v, q_v)."""
    if sampling.greedy or sampling.coupled:
        if sampling.greedy:
            guess = jnp.argmax(draft_logits, axis=-1)
            guess = guess if draft_ids is None else draft_ids[guess]
        else:
            guess = race_sample(draft_logits, keys, sampling, draft_ids, target_logits.shape[-1])
        return (guess == target_tokens).astype(jnp.float32)
    p = probabilities(target_logits, sampling)
    q = probabilities(draft_logits, sampling)
    if draft_ids is not None:
        q = jnp.zeros_like(p).at[:, draft_ids].set(q)
    return jnp.sum(jnp.minimum(p, q), axis=-1)


def verify_by_width(drafted: jax.Array | int, max_drafts: int, verify: Callable[[int, Any], tuple[Any, Any]],
                    cache: Any) -> tuple[Any, Any]:
    """`verify(w, cache)` -> (cache, out) for the verification width w = drafted + 1, `drafted` the draft loop's
    steps (`DraftResult.steps`: at most the k asked for, fewer when every row's draft fell below its confidence
    threshold first): one compiled branch per width when traced, so that a short draft pays only for a short
    verification, the cache updated in place (eej.model.control); a Python int: that width only."""
    return switch_in_place(drafted, [functools.partial(verify, w) for w in range(1, max_drafts + 2)], cache)


@struct.dataclass
class Judged:
    """What a speculative step tells the controller (`SelfSpeculative.speculate`).

    hits, trials: [B] float32, the drafts verification accepted and judged (`judged`; plus a scored guess).
    asked: int32 scalar, the draft length the step asked for in the end (a gated step's refined k; 0 where its first
      drafts were dropped); None: the k it was given.
    confident: [B] bool, whether each row's first draft (or scored guess) reached the confidence threshold; None: not
      observed.
    """

    hits: jax.Array
    trials: jax.Array
    asked: jax.Array | None = None
    confident: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SelfSpeculative(Strategy):
    """Base of the self-speculative strategies: the adaptive draft length, written once.

    A subclass declares `max_draft_steps` and `exit_threshold` and implements `speculate(inputs, k, probe, full, then)`:
    one step drafting up to k [B] tokens per row (0 for a finished row; `full`: all k, no confidence stop — how
    calibration times c(k)) and verifying what it drafted, that returns (StepResult, Judged) — the drafts
    verification judged and accepted — and, if it needs more than the full prefill, `prefill_drafter` returning its
    own state. A drafter whose first draft is nearly free (`free_probe`: it reads the residual a plain step computes)
    gates it: `then` is given to its `draft_loop`, and the step makes its first drafts whenever the rule drafts, is
    due to probe, or finds that drafting on confident first drafts pays (`Controller.gate_pays`); once the drafts are
    made, the rule decides again knowing which of them are confident (`Controller.refined`), and where it then
    drafts nothing the first drafts are dropped and scored as a probe (the step verifies one token).

    adaptive: choose k each step (module docstring); False: always max_draft_steps.
    step_costs: what a step drafting k = 0..K tokens costs (ms, or relative) at the batch and cache size in use;
      None: the engine measures them (`calibration_points`) before the first run of each shape.
    probe_every: while not drafting, score the drafter every this many steps.
    """

    free_probe: ClassVar[bool] = False  # the drafter can score a plain step's token for little (see module docstring)

    adaptive: bool = setting(True, choices=(True, False), kw_only=True)
    step_costs: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)
    probe_every: int = setting(8, at_least=1, integer=True, kw_only=True)

    @property
    def max_step_tokens(self) -> int:
        return self.max_draft_steps + 1

    def check(self) -> None:
        if self.step_costs is not None and (len(self.step_costs) != self.max_draft_steps + 1 or min(self.step_costs) <= 0):
            raise ValueError(f"{self.name} step_costs must hold {self.max_draft_steps + 1} positive times (k = 0..K drafts)")

    def prefill_drafter(self, params, method_params, tokens, prompt_lens, cache, cfg) -> tuple[jax.Array, Any, Any]:
        """The prompt through the model (and the drafter): -> (last-token logits [B, V], cache, drafter state)."""
        logits, cache = full_prefill(params, tokens, prompt_lens, cache, cfg)
        return logits, cache, ()

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        logits, cache, drafter = self.prefill_drafter(params, method_params, tokens, prompt_lens, cache, cfg)
        controller = Controller.start(tokens.shape[0], self.max_draft_steps, self.step_costs)
        return logits, cache, {"drafter": drafter, "controller": controller}

    def speculate(self, inputs: StepInputs, k: jax.Array, probe: jax.Array | bool, full: jax.Array | bool,
                  then: Callable[[jax.Array], jax.Array] | None = None) -> tuple[StepResult, Judged]:
        raise NotImplementedError

    def speculate_or_plain(self, s: StepInputs, k: jax.Array, probe: jax.Array, full: jax.Array,
                           then: Callable[[jax.Array], jax.Array] | None = None) -> tuple[StepResult, Judged]:
        """`speculate(s, k, probe, full, then)`; where no row drafts and no probe is due, the same method traced for the
        int k = 0 instead: no drafting loop, one verification width, no probe. That is the step an adaptive method
        takes while speculation does not pay, and it then tests one predicate where the traced k = 0 step tests
        one per conditional it passes (the drafting loop's, the K + 1 verification widths', the probe's): free on
        a CPU, but XLA:GPU reads each back to the host (11 reads per Kangaroo step on an H200, docs/adaptive.md).
        Where `eej.model.control.branch_whole_step()` holds: not on a CPU, where the branch itself cost more."""

        def run(k: jax.Array | int, probe: jax.Array | bool, full: jax.Array | bool, then):
            def branch(state):
                result, judged = self.speculate(s.replace(cache=state[0], method_state=state[1]), k, probe, full, then)
                if then is None and gated:  # the k = 0 branch returns what the gated branch does
                    judged = judged.replace(asked=jnp.zeros((), jnp.int32), confident=jnp.zeros(k_shape, bool))
                return (result.cache, result.method_state), (result.replace(cache=None, method_state=None), judged)

            return branch

        k_shape, gated = jnp.shape(k), then is not None
        (cache, drafter), (result, judged) = cond_in_place(
            jnp.any(k > 0) | probe, run(k, probe, full, then), run(0, False, False, None),
            (s.cache, s.method_state))
        return result.replace(cache=cache, method_state=drafter), judged

    def draft_threshold(self, full: jax.Array | bool) -> jax.Array | float:
        """The confidence below which a row stops drafting: the method's `exit_threshold`, none when `full`."""
        return self.exit_threshold if full is False else jnp.where(full, 0.0, self.exit_threshold)

    def step(self, s: StepInputs) -> StepResult:
        ctl: Controller = s.method_state["controller"]
        then = None
        if self.adaptive:
            queued = False if s.queued is None else s.queued
            k, probe, backoff = ctl.decide(s.active, s.remaining, self.probe_every, self.free_probe, queued)
            forced = ctl.force >= 0
            if self.free_probe:  # a gated first draft (class docstring)
                guess = ctl.force == self.guess_mode
                gate = (~forced & (k == 0) & (probe | ctl.gate_pays(s.active, s.remaining, queued))) | guess
                backoff = jnp.where(gate & ~probe, 0, backoff)  # the rule itself chose to make the drafts

                def refine(confident: jax.Array) -> jax.Array:
                    refined = ctl.refined(confident, s.active, s.remaining, queued)
                    return jnp.where(guess, 0, jnp.where(forced, ctl.force, refined)).astype(jnp.int32)

                then, k, probe = refine, jnp.where(gate, self.max_draft_steps, jnp.minimum(k, self.max_draft_steps)), False
        else:
            k, probe, backoff, forced = self.max_draft_steps, False, ctl.backoff, False
        # Finished rows draft nothing: their drafts would only widen the verification.
        drafter_inputs, k_rows = s.replace(method_state=s.method_state["drafter"]), jnp.where(s.active, k, 0)
        if self.adaptive and branch_whole_step():
            result, verdict = self.speculate_or_plain(drafter_inputs, k_rows, probe, forced, then)
        else:
            result, verdict = self.speculate(drafter_inputs, k_rows, probe, forced, then)
        asked = k if verdict.asked is None else verdict.asked
        # A gated step whose first drafts were dropped scored them: a probe.
        probed = probe if then is None else (k > 0) & (asked == 0)
        ctl = ctl.after(asked, probed, backoff, verdict.hits, verdict.trials, s.active, result.drafted,
                        confident=verdict.confident)
        return result.replace(method_state={"drafter": result.method_state, "controller": ctl})

    @property
    def guess_mode(self) -> int:
        """The calibration's forced mode past the draft lengths 0..K: a gated step whose first drafts are dropped."""
        return self.max_draft_steps + 1

    def calibration_points(self) -> list[Callable[[Any], Any]] | None:
        """Edits of the method state that force every step to draft k = 0..K tokens (all k: a forced step does not stop
        at a low-confidence draft, so that c(k) is the cost of k drafts and k + 1 verified), to be timed (None: the
        costs are known, or nothing adapts)."""
        if not self.adaptive or self.step_costs is not None:
            return None

        def forcing(k: int) -> Callable[[Any], Any]:
            return lambda state: {**state, "controller": state["controller"].replace(force=jnp.full((), k, jnp.int32))}

        return [forcing(k) for k in range(self.max_draft_steps + 1 + self.free_probe)]

    def calibrate(self, method_state: Any, milliseconds: list[float]) -> Any:
        """The controller's costs from the measured c(0..K), made increasing (`monotone_costs`): drafting more never costs
        less, and a noisy c(k) below c(k - 1) (timing noise: seen at 10-25% on a 2-core VM) would make the rule prefer the
        longer draft for its cost alone."""
        controller, costs = method_state["controller"], monotone_costs(milliseconds[: self.max_draft_steps + 1])
        controller = controller.replace(costs=costs)
        if len(milliseconds) > self.max_draft_steps + 1:  # the gated step that drops its drafts (`guess_mode`)
            guess = jnp.maximum(jnp.asarray(milliseconds[self.guess_mode], jnp.float32), costs[0] * (1.0 + MIN_DRAFT_COST))
            controller = controller.replace(guess_cost=guess)
        return {**method_state, "controller": controller}

    def learned(self, method_state: Any) -> tuple[jax.Array, ...] | None:
        """The batch's acceptance α, continuation β, following γ, confident share π and the acceptance of first drafts
        short of the confidence threshold and at it, α_unsure and α_sure, at the end of a generation, pooled over its
        rows (float32 scalars): the next generation on the engine starts from them (`start_from`). None when not
        adaptive."""
        if not self.adaptive:
            return None
        return method_state["controller"].pooled

    def start_from(self, method_state: Any, learned: tuple[jax.Array, ...]) -> Any:
        """The controller's prior moved to an earlier generation's pooled α, β, γ, π, α_unsure and α_sure, still worth
        `PRIOR_TRIALS` judged drafts (the probes and drafts of this generation take over as fast as from the uninformed
        1/2)."""
        return {**method_state, "controller": method_state["controller"].started_from_pooled(learned)}


def monotone_costs(milliseconds: Any) -> jax.Array:
    """[K + 1] step costs c(0..K) -> float32 costs with each c(k) raised to the largest c(j), j <= k, and to at least
    c(k - 1) + `MIN_DRAFT_COST` c(0): a draft is never free. Noise that reads c(1) <= c(0) (a 2-core VM under load) would
    otherwise make one draft cost what a plain step costs, and with E(1) = 1 + α > E(0) for any α > 0 the rule would
    draft forever on text where no draft is accepted."""
    costs = jnp.asarray(milliseconds, jnp.float32)
    floor = MIN_DRAFT_COST * costs[0] * jnp.arange(costs.shape[0], dtype=jnp.float32)
    return lax.cummax(costs - floor, axis=0) + floor


def judged(drafted: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What verification observed of the drafts: (accepted [B], judged [B]) from the drafts made (num_drafted [B])
    and the tokens committed (counts [B] = accepted + 1): the accepted ones and the first rejected one."""
    accepted = (counts - 1).astype(jnp.float32)
    return accepted, accepted + (counts - 1 < drafted).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class AdaptiveExit(Strategy):
    """Base of the adaptive early-exit strategies: what they share of `ExitEconomics`, written once.

    A subclass keeps its `ExitEconomics` at method_state["economics"], declares the fields `adaptive` and
    `step_costs` and `calibration_modes` (how many forced modes its step knows: `force` 0..modes-1), and
    decides each step from the economics itself. Where `carries_rates`, an engine's later generations (same
    sampling) start from the rates its last one ended with, each still worth `PRIOR_TRIALS` observations, as the
    speculative controller does: a generation no longer spends its first steps learning again what the text it
    decodes has shown.
    """

    calibration_modes: ClassVar[int] = 0
    carries_rates: ClassVar[bool] = True

    def calibration_points(self) -> list[Callable[[Any], Any]] | None:
        """Edits of the method state setting the economics' `force` to 0..calibration_modes-1 (None: the costs are
        known, or nothing adapts)."""
        if not self.adaptive or self.step_costs is not None:
            return None

        def forcing(mode: int) -> Callable[[Any], Any]:
            return lambda state: {**state, "economics": state["economics"].replace(force=jnp.full((), mode, jnp.int32))}

        return [forcing(m) for m in range(self.calibration_modes)]

    def calibrate(self, method_state: Any, milliseconds: list[float]) -> Any:
        return {**method_state, "economics": method_state["economics"].replace(costs=jnp.asarray(milliseconds, jnp.float32))}

    def learned(self, method_state: Any) -> jax.Array | None:
        """[n] float32: the rates of the economics' n decisions at the end of a generation (None when not adaptive or
        not `carries_rates`)."""
        return method_state["economics"].rate if self.adaptive and self.carries_rates else None

    def start_from(self, method_state: Any, learned: jax.Array) -> Any:
        return {**method_state, "economics": method_state["economics"].started_from(learned)}
