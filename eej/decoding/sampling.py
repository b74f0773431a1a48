"""Turning logits into tokens: greedy, temperature, top-k and top-p — one definition for every method.

`warped_log_probs` defines the distribution a token is drawn from; plain sampling and the lossless
speculative acceptance rule (eej.decoding.verify) both use it, so a speculative method samples from
exactly the distribution plain decoding does.

Two ways to draw (`SamplingConfig.coupled`):

- coupled (the default): `race_sample`. Every token a generation may sample at a position of a row has a key,
  `token_keys(streams, positions)`, from the row's stream (`row_streams`: the seed and the row) and the position the
  token lands at; the key fixes an exponential clock E_v ~ Exp(1) for every vocabulary id v, and the token drawn from
  weights w is argmin_v E_v / w_v — distributed as w / Σ w (an exponential race, the Gumbel-max trick in another
  form). The draw depends on nothing but the distribution and the key, so a drafter drawing its guess for a
  position with that position's key, and a verifier accepting the drafts that equal the target's own draw, commit
  exactly the tokens plain decoding samples (drafter-invariant speculative sampling: Daliri, Musco and Suresh
  2024, arXiv 2408.07978). What it costs: a draft is accepted a little less often than under the residual rule,
  whose acceptance Σ min(p, q) no coupling can beat (0.420 against 0.443 per first draft on held-out training
  prompts at temperature 0.7, Kangaroo's shipped drafter: docs/sampling.md).
- residual: `sample`'s one uniform per row and step through the inverse CDF, and speculative sampling's
  accept-or-resample rule (eej.decoding.verify.verify_sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from eej.config import SamplingConfig


def warped_log_probs(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Log-probabilities [..., V] after temperature, top-k and top-p (masked tokens get -inf).

    Not for greedy sampling (temperature 0), which is an argmax.
    """
    return jax.nn.log_softmax(_warped_logits(logits, sampling), axis=-1)


def _warped_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Logits [..., V] after temperature, top-k and top-p: `warped_log_probs` up to a per-row constant."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep_sorted = mass_before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def probabilities(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The sampling distribution [..., V]; one-hot on the argmax when greedy."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.exp(warped_log_probs(logits, sampling))


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig, keys: jax.Array | None) -> jax.Array:
    """Draw token ids [...] (int32) from logits [..., V]: the argmax when greedy; coupled, `race_sample` with the
    drawn tokens' `keys` [...] (uint32, `token_keys`); else from one uniform per row drawn with the PRNG `key`."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling.coupled:
        if keys is None:
            raise ValueError("coupled sampling needs the drawn tokens' keys (eej.decoding.sampling.token_keys)")
        return race_sample(logits, keys, sampling)
    warped = _warped_logits(logits, sampling)
    return sample_from_probs(jnp.exp(warped - jnp.max(warped, axis=-1, keepdims=True)), key)


def sample_from_probs(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Draw ids [...] (int32) from non-negative weights [..., V], each row with a positive sum (need not be 1)."""
    return inverse_cdf(probs, jax.random.uniform(key, probs.shape[:-1]))


def inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """The id [...] whose cumulative-weight interval holds `u` [...] (in [0, 1)) times the row's total weight.

    With u uniform this draws id i with probability weights[i] / sum(weights) (up to float32 rounding), as the
    Gumbel-max trick does, but from one random number per row instead of one per vocabulary entry: at a vocabulary
    of 49,152 that noise cost about a seventh of a batch-4 CPU decode step (scripts/sampler_bench.py). The search runs in
    two levels — a block of `_BLOCK` ids, then the id inside it — because one cumulative sum over the whole
    vocabulary is itself slow on XLA:CPU. A zero-weight id is never returned, whatever the rounding.
    """
    blocks = _in_blocks(weights.astype(jnp.float32))
    block = blocks.shape[-1]
    sums = jnp.sum(blocks, axis=-1)
    target = u * jnp.sum(sums, axis=-1)
    j = _interval(sums, target)
    before = jnp.sum(jnp.where(jnp.arange(sums.shape[-1]) < j[..., None], sums, 0.0), axis=-1)
    inner = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
    return (j * block + _interval(inner, target - before)).astype(jnp.int32)


_BLOCK = 256


def _in_blocks(weights: jax.Array) -> jax.Array:
    """Weights [..., V] as [..., ceil(V / block), block] blocks of `_BLOCK` ids (fewer for a smaller vocabulary), the
    last padded with zeros: the two-level layout both samplers search."""
    vocab = weights.shape[-1]
    block = min(_BLOCK, vocab)
    padded = jnp.pad(weights, [(0, 0)] * (weights.ndim - 1) + [(0, -vocab % block)])
    return padded.reshape(*padded.shape[:-1], -1, block)


def _interval(weights: jax.Array, target: jax.Array) -> jax.Array:
    """The index [...] of the first cumulative weight [..., n] above `target` [...], kept to a positive weight."""
    index = jnp.sum(jnp.cumsum(weights, axis=-1) <= target[..., None], axis=-1)
    positive = weights > 0
    n = weights.shape[-1]
    first = jnp.argmax(positive, axis=-1)
    last = n - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.clip(index, first, last)


# ----------------------------------------------------------------------------- coupled draws: exponential races

_BLOCK_SALT = 0x2545F491  # the block clocks' keys are the id clocks' keys xor this (any constant)


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit avalanche (MurmurHash3's finaliser) of uint32 x: every input bit flips each output bit
    with probability about 1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def row_streams(key: jax.Array, rows: int | jax.Array) -> jax.Array:
    """[B] uint32: each row's stream of token keys for a generation seeded with the PRNG `key`; `rows`: B, for rows
    0..B-1, or their indices [B] (int32) in the generation — a prompt queued for a free row of a batch keeps the
    stream of its place in the queue (`Engine.generate` with a `batch_size`). Row b's does not depend on the batch
    size."""
    rows = jnp.arange(rows) if isinstance(rows, int) else rows
    return jax.vmap(lambda b: jax.random.bits(jax.random.fold_in(key, b), (), jnp.uint32))(rows)


def token_keys(streams: jax.Array, positions: jax.Array) -> jax.Array:
    """The keys [B, ...] (uint32) of the tokens landing at `positions` [B, ...] (sequence positions, int32) of rows
    with `streams` [B]: what fixes a coupled draw there (`race_sample`)."""
    streams = streams.reshape(streams.shape + (1,) * (positions.ndim - 1))
    return _mix(streams ^ _mix(positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))


def _clocks(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Exp(1) clocks [..., N] (float32 in [2^-25, 17.4]) for the ids [N], or [..., N] of their own, under keys [...]
    (uint32)."""
    bits = _mix(keys[..., None] ^ _mix(ids.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F)))
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), 24 bits
    return -jnp.log(uniform)


def race_sample(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig, ids: jax.Array | None = None,
                vocab_size: int | None = None) -> jax.Array:
    """The coupled draw (module docstring) from logits [..., V'] under token keys [...] (uint32) -> ids [...] int32.

    ids: [V'] the vocabulary ids of the logits' columns (a draft head's reduced vocabulary), out of `vocab_size`;
    None: the columns are the whole vocabulary. A draw over a subset is the full-vocabulary draw, for the same key,
    from logits that are -inf off the subset.

    The race runs in two rounds so that only a few hundred clocks are computed, not one per id: blocks of `_BLOCK`
    ids race with their summed weights W_S on clocks of their own (block S wins with probability W_S / Σ W), then
    the ids of the winning block race on theirs (id v wins with probability w_v / W_S).
    """
    warped = _warped_logits(logits, sampling)
    weights = jnp.exp(warped - jnp.max(warped, axis=-1, keepdims=True))  # [..., V']; 0 where top-k / top-p masked
    vocab = weights.shape[-1] if ids is None else vocab_size
    if vocab is None:
        raise ValueError("race_sample over a subset of the vocabulary needs vocab_size")
    # The subset's weights in place in the whole vocabulary, so that its block sums round as the full draw's do.
    full = weights if ids is None else jnp.zeros(weights.shape[:-1] + (vocab,), jnp.float32).at[..., ids].set(weights)
    blocks = _in_blocks(full)
    num_blocks, block = blocks.shape[-2:]
    sums = jnp.sum(blocks, axis=-1)
    keys = keys.astype(jnp.uint32)
    won = jnp.argmax(sums / _clocks(keys ^ jnp.uint32(_BLOCK_SALT), jnp.arange(num_blocks)), axis=-1)  # [...]
    inner = jnp.take_along_axis(blocks, won[..., None, None], axis=-2)[..., 0, :]  # [..., block]
    inner_ids = won[..., None] * block + jnp.arange(block)
    return (won * block + jnp.argmax(inner / _clocks(keys, inner_ids), axis=-1)).astype(jnp.int32)
