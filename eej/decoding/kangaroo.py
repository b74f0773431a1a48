"""Kangaroo: self-speculative decoding with a double early exit (Liu et al. 2024, arXiv 2404.18911).

Draft model = the target's first `exit_layer` layers + a small trained adapter + an LM head. The
adapter is one attention-only Llama block: input RMSNorm, self-attention with RoPE, residual, then a
final RMSNorm (no MLP). Each step:

1. Draft: the pending token, then each new draft, goes through the shallow layers [0, l) (their KV
   is written to the model cache and kept: verification never recomputes it), then the adapter
   (its own one-layer KV cache) and the draft head. A row stops after `max_draft_steps` drafts or
   after a draft whose top-1 probability is below `exit_threshold` (the second early exit).
2. Verify: layers [l, N) run once over the saved layer-l hidden states of [pending, drafts...], then
   the full LM head; `eej.decoding.verify` accepts the longest agreeing prefix plus one token
   (greedy), or applies lossless speculative sampling.
3. Roll back: the model cache and the adapter cache are set to the committed length.

The last draft also goes through the shallow layers and the adapter before verification, so the
adapter cache never misses an accepted token (the reference code instead re-feeds it next round).

Beyond the paper: batches with per-row draft lengths, lossless sampling (q = the warped draft
distribution each draft was drawn from), and a cheap draft head — a frequency-ranked subset of the
vocabulary (`draft_head` [D, V'] + `draft_ids` [V'] in method_params); verification keeps the full
head, so the output is unchanged. The adapter, draft head and prefill tap are the shared drafting
pieces of eej.decoding.speculation.

method_params = {"adapter": {"attn_norm": [D], "wq": [D, Hq*Dh], "wk": [D, Hkv*Dh],
                             "wv": [D, Hkv*Dh], "wo": [Hq*Dh, D], "norm": [D]},
                 ("draft_head": [D, V'], "draft_ids": [V'] int32)}
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from eej.config import ModelConfig
from eej.decoding.adaptive import TEST_STEP_COSTS, Judged, SelfSpeculative, judged, probe_overlap, verify_by_width
from eej.decoding.methods import register_method
from eej.decoding.speculation import (
    accept,
    adapter_forward,
    check_adapter,
    draft_head,
    draft_loop,
    load_adapter,
    prefill_tapped,
    random_adapter,
    rollback,
)
from eej.decoding.strategy import StepInputs, StepResult
from eej.model.cache import init_cache
from eej.model.control import run_if
from eej.model.transformer import embed, linear, logits_from_hidden, qkv, run_layers
from eej.settings import setting
from eej.weights.registry import Model


@dataclasses.dataclass(frozen=True)
class Kangaroo(SelfSpeculative):
    """Kangaroo's static settings; the adapter (and draft head) travel in method_params.

    exit_layer: l, the number of target layers the draft shares (0 <= l < N).
    exit_threshold: a row stops drafting after a draft whose top-1 probability is below this.
    max_draft_steps: the most drafts per step (K); a step commits at most K + 1 tokens.
    adaptive, step_costs, probe_every: the draft length chosen each step (eej.decoding.adaptive); the
      probe is nearly free here: a plain step runs layers [0, l) anyway, so the adapter and draft head make
      a first draft, which the step drops and scores against its own token. So it comes on every plain step
      (backing off to every 8th while the rule keeps choosing plain steps): the estimate recovers from a run
      of rejections within a few steps, not the 8-64 a sparser schedule takes (scripts/controller_replay.py,
      docs/adaptive.md). The first draft is gated: the rule decides again once it knows whether it is
      confident (`SelfSpeculative`).
    """

    name: ClassVar[str] = "kangaroo"
    lossless: ClassVar[bool] = True
    batch_invariant: ClassVar[bool] = True
    free_probe: ClassVar[bool] = True

    exit_layer: int = setting(2, at_least=0, integer=True)
    exit_threshold: float = setting(0.6, at_least=0.0, at_most=1.0)
    max_draft_steps: int = setting(6, at_least=1, integer=True)
    probe_every: int = setting(1, at_least=1, integer=True, kw_only=True)

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        check_adapter("kangaroo", cfg, self.exit_layer, method_params)

    def prefill_drafter(self, params, method_params, tokens, prompt_lens, cache, cfg):
        """Prompt through layers [0, l), the adapter and layers [l, N); both caches end at `prompt_lens`."""
        logits, cache, hidden, positions = prefill_tapped(params, tokens, prompt_lens, cache, cfg, self.exit_layer)
        adapter_cache = init_cache(cfg, tokens.shape[0], cache.capacity, num_layers=1)
        _, adapter_cache = adapter_forward(method_params["adapter"], hidden, adapter_cache, positions, cfg, kv_limit=tokens.shape[1])
        return logits, cache, adapter_cache.with_lengths(prompt_lens)

    def _shallow(self, s: StepInputs, cache, token, positions):
        """One token per row [B] at `positions` [B, 1] through layers [0, l) -> (hidden [B, 1, D], cache)."""
        return run_layers(s.params, embed(s.params, token[:, None], s.cfg), cache, positions, s.cfg, 0, self.exit_layer)

    def speculate(self, s: StepInputs, k, probe, full, then=None):
        """One step drafting up to k [B] (see `SelfSpeculative`); its probe is the gated first draft (`then`), so
        `probe` is never set here."""
        cfg, max_k = s.cfg, self.max_draft_steps
        start = s.cache.lengths
        adapter = s.method_params["adapter"]
        head, ids = draft_head(s.params, s.method_params)
        hidden0 = jnp.zeros((s.batch, max_k + 1, cfg.hidden_size), cfg.jnp_dtype)

        def draft_fn(carry, token, i):
            cache, adapter_cache, hidden = carry
            positions = (start + i)[:, None]
            h, cache = self._shallow(s, cache, token, positions)
            drafted, adapter_cache = adapter_forward(adapter, h, adapter_cache, positions, cfg)
            hidden = lax.dynamic_update_slice(hidden, h, (0, i, 0))
            return (cache, adapter_cache, hidden), linear(drafted[:, 0], head, impl=cfg.matmul_impl)

        draft_key, verify_key = jax.random.split(s.key)
        keys = s.token_keys(max_k + 1)  # [B, K + 1]: the drafted and verified positions' (coupled sampling)
        carry, drafts = draft_loop(
            draft_fn, (s.cache, s.method_state, hidden0), s.pending, draft_key, s.sampling,
            max_steps=max_k, exit_threshold=self.draft_threshold(full), vocab_size=cfg.vocab_size, vocab_ids=ids,
            num_steps=k, keys=keys, then=then,
        )

        def last_token(carry):
            """The last token (the last draft, or the pending one) through its shallow layers (for verification) and
            its adapter K/V — done already where the first drafts were dropped: the pending token's, by the loop."""
            cache, adapter_cache, hidden = carry
            positions = (start + drafts.steps)[:, None]
            h, cache = self._shallow(s, cache, drafts.last(s.pending), positions)
            _, new_k, new_v = qkv(adapter, h, positions, cfg)
            return cache, adapter_cache.write(0, new_k, new_v, positions), lax.dynamic_update_slice(hidden, h, (0, drafts.steps, 0))

        if drafts.confident is None:
            cache, adapter_cache, hidden = last_token(carry)
        else:
            cache, adapter_cache, hidden = run_if(~drafts.dropped, last_token, carry)

        def verify(width: int, cache):
            positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
            deep, cache = run_layers(s.params, hidden[:, :width], cache, positions, cfg, self.exit_layer)
            logits = logits_from_hidden(s.params, deep, cfg)
            tokens, counts = accept(drafts.first(width - 1), logits, verify_key, s.sampling, keys)
            return cache, (jnp.pad(tokens, ((0, 0), (0, max_k + 1 - width))), counts, logits[:, 0])

        cache, (tokens, counts, first_logits) = verify_by_width(drafts.steps, max_k, verify, cache)
        hits, trials = judged(drafts.num_drafted, counts)
        if drafts.confident is not None:  # dropped first drafts: scored against the step's one token, as a probe
            scored = drafts.dropped & s.active
            # Under residual sampling the overlap takes two full-vocabulary distributions: computed only on a step that
            # scores.
            at = None if keys is None else keys[:, 0]
            overlap = lax.cond(jnp.any(scored), lambda: probe_overlap(first_logits, tokens[:, 0], drafts.first_logits, ids,
                                                                      s.sampling, at),
                               lambda: jnp.zeros(scored.shape, jnp.float32))
            hits = hits + jnp.where(scored, overlap, 0.0)
            trials = trials + scored.astype(jnp.float32)
        cache, adapter_cache = rollback((cache, adapter_cache), start + counts)
        shallow_passes = jnp.asarray(drafts.steps + 1, jnp.float32)
        result = StepResult(
            tokens=tokens,
            counts=counts,
            cache=cache,
            method_state=adapter_cache,
            forwards=jnp.ones((s.batch,), jnp.int32),
            layers=jnp.full((s.batch,), shallow_passes * self.exit_layer + (cfg.num_layers - self.exit_layer)),
            drafted=drafts.num_drafted,
        )
        return result, Judged(hits, trials, drafts.asked, drafts.confident)


# ----------------------------------------------------------------------------- registration


@dataclasses.dataclass(frozen=True)
class KangarooSettings:
    """What `configs/<model>/kangaroo.yaml` presets hold.

    adapter: path of the trained artifact (relative paths: from the repository root).
    exit_layer, exit_threshold, max_draft_steps, adaptive, probe_every: see `Kangaroo`.
    draft_vocab_size: V' of the reduced draft head (the artifact's most frequent tokens); 0 = full head.
    """

    adapter: str
    exit_layer: int = setting(at_least=0, integer=True)
    exit_threshold: float = setting(0.6, at_least=0.0, at_most=1.0)
    max_draft_steps: int = setting(6, at_least=1, integer=True)
    draft_vocab_size: int = setting(0, at_least=0, integer=True)
    adaptive: bool = setting(True, choices=(True, False))
    probe_every: int = setting(1, at_least=1, integer=True)


def load_kangaroo(model: Model, settings: KangarooSettings) -> tuple[Kangaroo, dict]:
    """(strategy, method_params) from a trained artifact; checks it fits the model and the settings."""
    method_params = load_adapter(model, settings.adapter, settings.exit_layer, settings.draft_vocab_size)
    strategy = Kangaroo(settings.exit_layer, settings.exit_threshold, settings.max_draft_steps, adaptive=settings.adaptive,
                        probe_every=settings.probe_every)
    return strategy, method_params


def random_kangaroo(model: Model, seed: int, **overrides: Any) -> tuple[Kangaroo, dict]:
    """An untrained Kangaroo for any model (tests): random adapter, reduced draft head of half the vocabulary;
    adaptive, with made-up step costs (`TEST_STEP_COSTS`) so that no calibration runs."""
    fields = dict(exit_layer=min(1, model.cfg.num_layers - 1), exit_threshold=0.02, max_draft_steps=4)
    fields.update(overrides)
    fields.setdefault("step_costs", TEST_STEP_COSTS[: fields["max_draft_steps"] + 1])
    return Kangaroo(**fields), random_adapter(model, seed)


register_method("kangaroo", settings=KangarooSettings, load=load_kangaroo, random=random_kangaroo)
