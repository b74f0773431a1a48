"""Teacher-forced full-model argmax over prompt + answer: the reference for `token_agreement`.

One forward of the whole model over the sequence (jitted; lengths padded up to the engine's length
buckets so a few compiled shapes serve every answer). Right padding can't change earlier positions
of a causal model, so the padded tail is simply ignored.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.decoding.engine import length_bucket
from eej.model.cache import init_cache
from eej.model.transformer import Params, forward
from eej.weights.registry import Model


@functools.partial(jax.jit, static_argnames=("cfg",))
def teacher_argmax(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Full-model argmax at every position: tokens [B, T] -> int32 [B, T] (position t predicts token t+1)."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, positions, init_cache(cfg, batch, length), cfg)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sequence_argmax(model: Model, sequence: Sequence[int]) -> np.ndarray:
    """Teacher argmax [len(sequence)] for one token sequence (padded to a length bucket, B = 1)."""
    n = len(sequence)
    padded = min(length_bucket(n), max(n, model.cfg.max_position))
    tokens = np.full((1, padded), model.cfg.pad_id, np.int32)
    tokens[0, :n] = sequence
    return np.asarray(teacher_argmax(model.params, jnp.asarray(tokens), model.cfg))[0, :n]
