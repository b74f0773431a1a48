"""Verification of drafted tokens against the target model — the one acceptance rule every
self-speculative method (Kangaroo, M2R2) uses.

Greedy: accept the longest prefix of drafts equal to the target's argmax, then one more target
token. Coupled sampling (eej.decoding.sampling, the default): the same with the target's own coupled
draw in place of the argmax (`verify_tokens`): the committed tokens are plain sampling's own.
Residual sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft x_i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw from normalise(max(p_i - q_i, 0)); if every
draft is accepted draw a bonus token from p. p and q are the *warped* distributions of
`eej.decoding.sampling` (temperature, top-k, top-p), so the committed tokens are distributed exactly
as plain sampling's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eej.config import SamplingConfig
from eej.decoding.sampling import probabilities, sample_from_probs


def _first_false(ok: jax.Array) -> jax.Array:
    """Index of the first False along the last axis ([B, k] -> [B]); k if all True."""
    k = ok.shape[-1]
    return jnp.where(jnp.all(ok, axis=-1), k, jnp.argmin(ok, axis=-1)).astype(jnp.int32)


def verify_greedy(drafts: jax.Array, num_drafted: jax.Array, target_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance: `verify_tokens` against the argmax of target logits [B, k+1, V]."""
    return verify_tokens(drafts, num_drafted, jnp.argmax(target_logits, axis=-1).astype(jnp.int32))


def verify_tokens(drafts: jax.Array, num_drafted: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accept the longest prefix of drafts equal to the target's own tokens, then the target's next one.

    Args:
      drafts: [B, k] drafted tokens; only the first `num_drafted[b]` of row b are real.
      num_drafted: [B] int32 in [0, k].
      target: [B, k+1] int32 the target's token after the pending token and after each draft (its argmax, or its
        coupled draw: eej.decoding.sampling.race_sample).
    Returns:
      (tokens [B, k+1], counts [B]): commit `tokens[b, :counts[b]]` (accepted drafts + one target token).
    """
    k = drafts.shape[1]
    ok = (drafts == target[:, :k]) & (jnp.arange(k)[None] < num_drafted[:, None])
    accepted = _first_false(ok)
    return target, accepted + 1


def verify_sampling(
    drafts: jax.Array,
    num_drafted: jax.Array,
    draft_probs: jax.Array,
    target_logits: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
) -> tuple[jax.Array, jax.Array]:
    """Lossless speculative sampling.

    Args:
      drafts: [B, k] tokens, draft i drawn from `draft_probs[:, i]`; only the first `num_drafted[b]` are real.
      num_drafted: [B] int32 in [0, k].
      draft_probs: [B, k, V] the distributions the drafts were drawn from (q).
      target_logits: [B, k+1, V] target logits; warped with `sampling` into p.
      key: PRNG key.
    Returns:
      (tokens [B, k+1], counts [B]) as in `verify_greedy`.
    """
    if sampling.greedy:
        return verify_greedy(drafts, num_drafted, target_logits)
    b, k = drafts.shape
    p = probabilities(target_logits, sampling)  # [B, k+1, V]
    real = jnp.arange(k)[None] < num_drafted[:, None]
    q = jnp.where(real[..., None], draft_probs, 0.0)
    p_x = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    key_accept, key_resample = jax.random.split(key)
    u = jax.random.uniform(key_accept, (b, k))
    ok = real & (u * q_x < p_x)  # u < p/q without dividing by a zero q
    first = _first_false(ok)  # position of the first rejection (or k: all accepted)
    p_first = jnp.take_along_axis(p, first[:, None, None], axis=1)[:, 0]  # [B, V]
    q_first = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), first[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_first - q_first, 0.0)
    # A zero residual can only come from rounding (rejection then has probability 0): fall back to p.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_first)
    extra = sample_from_probs(residual, key_resample)
    padded = jnp.pad(drafts, ((0, 0), (0, 1)))
    tokens = jnp.where(jnp.arange(k + 1)[None] == first[:, None], extra[:, None], padded)
    return tokens.astype(jnp.int32), first + 1
