"""The interface between the engine and a decoding method.

A strategy is a frozen (hashable) dataclass holding the method's static settings; its trainable
add-ons (adapters, predictors, ...) travel separately as a `method_params` pytree so that they are
jit arguments, never closed over. The engine owns prompts, caches, sampling keys, stopping and
bookkeeping; a strategy only says how to produce the next committed tokens:

    result = strategy.step(StepInputs(...))       # everything a step reads, one struct

Cache convention between steps: the cache holds every committed token except the newest one,
`pending`, which the next step feeds first. So after a step that commits n tokens, the strategy
sets `cache.lengths` to (old length + n).

Settings declared with `eej.settings.setting(default, at_least=..., ...)` are checked when the
strategy is built (one-line ValueErrors); checks that relate several fields go in `check`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from eej.config import ModelConfig, SamplingConfig
from eej.decoding.sampling import sample, token_keys
from eej.model.cache import KVCache
from eej.model.transformer import Params, embed, logits_from_hidden, run_layers
from eej.settings import check_settings


@struct.dataclass
class StepInputs:
    """What one strategy step reads, for B rows.

    params: the model params; method_params: the strategy's add-ons (a pytree, or None).
    cache: the model KV cache, holding every committed token but `pending`.
    method_state: the strategy's own carried state (what its `prefill` returned, then its last step's).
    pending: [B] int32, the newest committed token of each row (not yet in the cache).
    key: a PRNG key for this step.
    noise: [B] uint32, the rows' streams of token keys (eej.decoding.sampling.row_streams): a coupled draw of the token
      landing at position n of row b uses token_keys(noise, n) (`token_keys`); None where nothing samples coupled.
    active: [B] bool, rows still generating (finished rows keep computing throw-away tokens; a method
      that decides for the whole batch ignores them).
    remaining: [B] int32, tokens each row may still commit (its budget, max_new_tokens, less what it has committed;
      EOS may end it sooner), or None where not known (taken as equal). A batch runs until its last row ends, so
      a method deciding for the whole batch weighs its rows by it (eej.decoding.adaptive.best_draft_length).
    queued: bool scalar, True while prompts wait for a row to free up (`Engine.generate` with a `batch_size`): a row
      that finishes is refilled at once, so the batch's throughput counts, not its last row; None where not known.
    sampling, cfg: static (part of the compiled program, not traced).
    scoring: static; True when the engine teacher-forces a reference (`Engine.score`): the step must return
      `StepResult.logits`, and a method that skips computing them in plain decoding computes them then.
    """

    params: Params
    method_params: Any
    cache: KVCache
    method_state: Any
    pending: jax.Array
    key: jax.Array
    active: jax.Array
    sampling: SamplingConfig = struct.field(pytree_node=False)
    cfg: ModelConfig = struct.field(pytree_node=False)
    scoring: bool = struct.field(pytree_node=False, default=False)
    remaining: jax.Array | None = None
    noise: jax.Array | None = None
    queued: jax.Array | None = None

    @property
    def batch(self) -> int:
        return self.pending.shape[0]

    @property
    def positions(self) -> jax.Array:
        """[B, 1]: the position of each row's pending token."""
        return self.cache.lengths[:, None]

    def token_keys(self, width: int = 1) -> jax.Array | None:
        """[B, width] uint32: the keys of the next `width` tokens each row may commit (at its pending token's position
        + 1, + 2, ...), for coupled draws (eej.decoding.sampling.sample); None without `noise`."""
        if self.noise is None:
            return None
        return token_keys(self.noise, self.positions + 1 + jnp.arange(width, dtype=jnp.int32)[None])

    def sample(self, logits: jax.Array) -> jax.Array:
        """The token [B] each row draws from logits [B, V] for the position after its pending token."""
        keys = self.token_keys()
        return sample(logits, self.key, self.sampling, None if keys is None else keys[:, 0])


@struct.dataclass
class StepResult:
    """What one strategy step produced.

    tokens: [B, K] int32 candidate tokens to commit, in order; only the first `counts[b]` count.
    counts: [B] int32 in [1, K]: how many of them row b commits.
    cache: the model cache with `lengths` advanced by `counts` (see the module docstring).
    method_state: the strategy's own carried state.
    forwards: [B] int32 — full-model (target) forward passes made for the row this step.
    layers: [B] float32 — transformer layers computed for the row this step (drafting included).
    drafted: [B] int32 — tokens the row drafted and verified this step (speculative methods; None: none).
    exited: [B] bool — the row's token left the stack early this step (early exit; None: never).
    checked: [B] bool — the step checked whether the row's token may leave the stack early (SpecEE's predictors,
      M2R2's fast stream and its exit predictor); an adaptive early exit's controller skips the check on steps where
      it does not pay (None: never checks).
    logits: [B, V] float — the full-vocabulary logits of the distribution the step drew its first token from
      (the one the method decided by: e.g. an early exit's layer), for teacher-forced scoring (`Engine.score`);
      None: the step does not provide them (a one-token method must when `StepInputs.scoring` is set). They are
      the logits the step computes anyway, so returning them costs nothing in the decode loop (unused outputs
      are dropped by XLA).
    """

    tokens: jax.Array
    counts: jax.Array
    cache: KVCache
    method_state: Any
    forwards: jax.Array
    layers: jax.Array
    drafted: jax.Array | None = None
    exited: jax.Array | None = None
    checked: jax.Array | None = None
    logits: jax.Array | None = None

    @classmethod
    def one_token(cls, token: jax.Array, cache: KVCache, method_state: Any, forwards: Any, layers: Any,
                  exited: Any = None, checked: Any = None, logits: jax.Array | None = None) -> "StepResult":
        """A step that commits one token per row: token [B]; cache (lengths not yet advanced); forwards,
        layers, exited and checked per row [B] or one value for every row; logits [B, V] the token was drawn from."""
        batch = token.shape[0]
        return cls(
            tokens=token[:, None].astype(jnp.int32),
            counts=jnp.ones((batch,), jnp.int32),
            cache=cache.with_lengths(cache.lengths + 1),
            method_state=method_state,
            forwards=jnp.broadcast_to(jnp.asarray(forwards, jnp.int32), (batch,)),
            layers=jnp.broadcast_to(jnp.asarray(layers, jnp.float32), (batch,)),
            exited=None if exited is None else jnp.broadcast_to(jnp.asarray(exited, bool), (batch,)),
            checked=None if checked is None else jnp.broadcast_to(jnp.asarray(checked, bool), (batch,)),
            logits=logits,
        )


def last_token_logits(params: Params, hidden: jax.Array, prompt_lens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, V] at each row's last prompt position, from hidden states [B, P, D]."""
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return logits_from_hidden(params, last, cfg)


def prompt_positions(tokens: jax.Array) -> jax.Array:
    """Positions [B, P] of right-padded prompts [B, P]: 0..P-1 in every row."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def full_prefill(
    params: Params, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """Run the whole model over right-padded prompts [B, P]; -> (last-token logits [B, V], cache).

    The returned cache has `lengths = prompt_lens`.
    """
    positions = prompt_positions(tokens)
    hidden, cache = run_layers(params, embed(params, tokens, cfg), cache, positions, cfg, kv_limit=tokens.shape[1])
    return last_token_logits(params, hidden, prompt_lens, cfg), cache.with_lengths(prompt_lens)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base class of decoding methods. Subclasses are frozen dataclasses (static under jit)."""

    name: ClassVar[str] = "strategy"
    # Lossless methods produce exactly plain decoding's tokens (greedy) / distribution (sampling).
    lossless: ClassVar[bool] = True
    # Batch-invariant methods give each row the tokens it would get alone. Methods that make one
    # decision for the whole batch (e.g. exit a layer only when every row may) set this False.
    batch_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_settings(self, self.name)
        self.check()

    def check(self) -> None:
        """Raise ValueError if settings that depend on each other don't fit (single fields: `setting`)."""

    @property
    def max_step_tokens(self) -> int:
        """K: the most tokens one step can commit per row."""
        return 1

    def validate(self, cfg: ModelConfig, method_params: Any) -> None:
        """Raise ValueError with a clear message if the settings or add-ons don't fit `cfg`."""

    def calibration_points(self) -> list[Callable[[Any], Any]] | None:
        """What this strategy measures on the running machine: edits of the method state (after the prefill)
        under which the engine times its decode loop, at the batch and cache size it is about to run; None:
        nothing to measure (the default)."""
        return None

    def calibrate(self, method_state: Any, milliseconds: list[float]) -> Any:
        """The method state (after the prefill) told the measured milliseconds per step, one per calibration point."""
        return method_state

    def learned(self, method_state: Any) -> Any:
        """What a finished generation (its final method state) learned that the engine's next generation with the same
        sampling may start from; None (the default): nothing carries over."""
        return None

    def start_from(self, method_state: Any, learned: Any) -> Any:
        """The method state (after the prefill and calibration) of a generation that starts from what an earlier one
        `learned`."""
        return method_state

    def prefill(
        self,
        params: Params,
        method_params: Any,
        tokens: jax.Array,
        prompt_lens: jax.Array,
        cache: KVCache,
        cfg: ModelConfig,
    ) -> tuple[jax.Array, KVCache, Any]:
        """Process right-padded prompts [B, P] -> (last-token logits [B, V], cache, method_state)."""
        logits, cache = full_prefill(params, tokens, prompt_lens, cache, cfg)
        return logits, cache, ()

    def step(self, inputs: StepInputs) -> StepResult:
        """Feed `inputs.pending` [B] (the newest committed token per row) and propose the next tokens."""
        raise NotImplementedError
