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
    return jax.nn.log_softmax(logits, axis=-1)


def probabilities(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The sampling distribution [..., V]; one-hot on the argmax when greedy."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.exp(warped_log_probs(logits, sampling))


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Draw token ids [...] (int32) from logits [..., V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warped_log_probs(logits, sampling), axis=-1).astype(jnp.int32)


def sample_from_probs(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Draw ids [...] from (possibly unnormalised, non-negative) probabilities [..., V]."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
