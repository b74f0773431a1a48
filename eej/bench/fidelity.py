"""Teacher-forced full-model argmax over prompt + answer: the reference for `token_agreement`.

One forward of the whole model over the sequence (jitted; lengths padded up to the engine's length
buckets so a few compiled shapes serve every answer). Right padding can't change earlier positions
of a causal model, so the padded tail is simply ignored.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from eej.decoding.engine import length_bucket
from eej.train.teacher import teacher_argmax
from eej.weights.registry import Model


def sequence_argmax(model: Model, sequence: Sequence[int]) -> np.ndarray:
    """Teacher argmax [len(sequence)] for one token sequence (padded to a length bucket, B = 1)."""
    n = len(sequence)
    padded = min(length_bucket(n), max(n, model.cfg.max_position))
    tokens = np.full((1, padded), model.cfg.pad_id, np.int32)
    tokens[0, :n] = sequence
    return np.asarray(teacher_argmax(model.params, jnp.asarray(tokens), model.cfg))[0, :n]
