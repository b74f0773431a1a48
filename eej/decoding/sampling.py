"""Turning logits into tokens: greedy, temperature, top-k and top-p — one definition for every method.

`warped_log_probs` defines the distribution a token is drawn from; plain sampling and the lossless
speculative acceptance rule (eej.decoding.verify) both use it, so a speculative method samples from
exactly the distribution plain decoding does.
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


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Draw token ids [...] (int32) from logits [..., V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
    weights = weights.astype(jnp.float32)
    vocab = weights.shape[-1]
    block = min(_BLOCK, vocab)
    padded = jnp.pad(weights, [(0, 0)] * (weights.ndim - 1) + [(0, -vocab % block)])
    blocks = padded.reshape(*padded.shape[:-1], -1, block)  # [..., V / block, block]
    sums = jnp.sum(blocks, axis=-1)
    target = u * jnp.sum(sums, axis=-1)
    j = _interval(sums, target)
    before = jnp.sum(jnp.where(jnp.arange(sums.shape[-1]) < j[..., None], sums, 0.0), axis=-1)
    inner = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
    return (j * block + _interval(inner, target - before)).astype(jnp.int32)


_BLOCK = 256


def _interval(weights: jax.Array, target: jax.Array) -> jax.Array:
    """The index [...] of the first cumulative weight [..., n] above `target` [...], kept to a positive weight."""
    index = jnp.sum(jnp.cumsum(weights, axis=-1) <= target[..., None], axis=-1)
    positive = weights > 0
    n = weights.shape[-1]
    first = jnp.argmax(positive, axis=-1)
    last = n - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.clip(index, first, last)
