"""The pieces of self-speculative decoding that do not depend on how drafts are made.

A self-speculative step (Kangaroo, M2R2's self-speculation) is: draft up to `max_steps` tokens with
a cheap drafter, each row stopping on its own when the drafter's confidence drops; verify them with
the target model in one pass; accept with `eej.decoding.verify`; roll every cache back to the
committed length. This module holds the drafter-independent parts:

- `draft_loop`: the compiled drafting loop. A drafter is a function
  `draft_fn(carry, tokens [B], i) -> (carry, logits [B, V'])` that feeds token i of every row (the
  pending token, then the previous draft) and returns the draft logits for the next position, over
  the full vocabulary or a reduced draft vocabulary `vocab_ids` [V']. The loop samples (or takes
  the argmax), records the distribution q each draft was drawn from (so that speculative sampling
  stays lossless), and keeps per-row stop decisions with static shapes.
- `accept`: the shared acceptance rule applied to a `DraftResult`.
- `rollback`: every KV cache in a pytree set to the committed lengths.

Batching: all rows run every iteration (static shapes); the loop continues while any row still
drafts. A row that has stopped keeps computing throw-away drafts at positions past its own, which
later verification and rollback ignore.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from eej.config import SamplingConfig
from eej.decoding.sampling import warped_log_probs
from eej.decoding.verify import verify_greedy, verify_sampling
from eej.model.cache import KVCache

DraftFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]


@struct.dataclass
class DraftResult:
    """What a drafting loop produced for B rows with room for K drafts.

    tokens: [B, K] int32 drafts; only the first `num_drafted[b]` of row b are real.
    num_drafted: [B] int32 in [1, K].
    probs: [B, K, V] float32 distributions the drafts were drawn from (None when greedy).
    steps: int32 scalar: loop iterations run (= max of num_drafted).
    """

    tokens: jax.Array
    num_drafted: jax.Array
    probs: jax.Array | None
    steps: jax.Array

    @property
    def last(self) -> jax.Array:
        """[B] the draft of the last iteration (each row's last real draft if it drafted `steps`)."""
        return lax.dynamic_index_in_dim(self.tokens, jnp.maximum(self.steps - 1, 0), axis=1, keepdims=False)


def draft_loop(
    draft_fn: DraftFn,
    carry: Any,
    pending: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    *,
    max_steps: int,
    exit_threshold: float,
    vocab_size: int,
    vocab_ids: jax.Array | None = None,
) -> tuple[Any, DraftResult]:
    """Draft up to `max_steps` tokens per row after `pending` [B].

    Row b stops after `max_steps` drafts, or after a draft whose top-1 draft probability (softmax of
    the draft logits at temperature 1, over the draft vocabulary) is below `exit_threshold` — that
    draft is kept.

    Args:
      draft_fn: see the module docstring; called with iteration index i (int32 scalar) for the
        token at offset i after the committed tokens.
      carry: the drafter's state (caches, buffers), threaded through every call.
      vocab_size: V, the full vocabulary (the size of the returned `probs`).
      vocab_ids: [V'] int32 token ids of the draft logits' columns; None when V' = V.
    Returns:
      (carry after the last call, DraftResult).
    """
    batch = pending.shape[0]
    greedy = sampling.greedy
    tokens0 = jnp.zeros((batch, max_steps), jnp.int32)
    probs0 = None if greedy else jnp.zeros((batch, max_steps, vocab_size), jnp.float32)

    def to_full(q: jax.Array) -> jax.Array:
        if vocab_ids is None:
            return q
        return jnp.zeros((batch, vocab_size), q.dtype).at[:, vocab_ids].set(q)

    def body(state):
        i, token, carry, tokens, probs, num, active = state
        carry, logits = draft_fn(carry, token, i)
        logits = logits.astype(jnp.float32)
        confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
        if greedy:
            choice = jnp.argmax(logits, axis=-1)
        else:
            log_q = warped_log_probs(logits, sampling)
            choice = jax.random.categorical(jax.random.fold_in(key, i), log_q, axis=-1)
            probs = lax.dynamic_update_slice(probs, to_full(jnp.exp(log_q))[:, None], (0, i, 0))
        draft = (choice if vocab_ids is None else vocab_ids[choice]).astype(jnp.int32)
        tokens = lax.dynamic_update_slice(tokens, draft[:, None], (0, i))
        num = num + active.astype(jnp.int32)
        active = active & (confidence >= exit_threshold) & (i + 1 < max_steps)
        return i + 1, draft, carry, tokens, probs, num, active

    state = (jnp.zeros((), jnp.int32), pending, carry, tokens0, probs0, jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool))
    steps, _, carry, tokens, probs, num, _ = lax.while_loop(lambda s: jnp.any(s[-1]), body, state)
    return carry, DraftResult(tokens=tokens, num_drafted=num, probs=probs, steps=steps)


def accept(drafts: DraftResult, target_logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Verify drafts against target logits [B, K+1, V] -> (tokens [B, K+1], counts [B]) (see eej.decoding.verify)."""
    if sampling.greedy:
        return verify_greedy(drafts.tokens, drafts.num_drafted, target_logits)
    return verify_sampling(drafts.tokens, drafts.num_drafted, drafts.probs, target_logits, key, sampling)


def rollback(caches: Any, lengths: jax.Array) -> Any:
    """Every `KVCache` in the pytree `caches` with `lengths` [B] committed tokens (data stays; see cache.py)."""
    return jax.tree.map(
        lambda c: c.with_lengths(lengths) if isinstance(c, KVCache) else c, caches, is_leaf=lambda c: isinstance(c, KVCache)
    )
