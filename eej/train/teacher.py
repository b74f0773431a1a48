"""What the frozen base model says about training sequences, computed once and reused.

`hidden_states` gives the residual stream after any set of layer counts; `collect_hidden_states`
runs it over a whole data set in batches (host numpy, optionally float16 to halve memory), so an
add-on that reads frozen activations trains without re-running the frozen layers every step.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.model.cache import init_cache
from eej.model.transformer import Params, embed, run_layers
from eej.train.data import TokenizedData


def hidden_states(params: Params, tokens: jax.Array, cfg: ModelConfig, depths: Sequence[int]) -> dict[int, jax.Array]:
    """Residual stream [B, T, D] after the first `d` layers, for each d in `depths` (0 = embeddings).

    Depth `cfg.num_layers` is the last layer's output (before the final norm).
    """
    depths = sorted(set(int(d) for d in depths))
    if depths and not 0 <= depths[0] <= depths[-1] <= cfg.num_layers:
        raise ValueError(f"depths must be in [0, {cfg.num_layers}], got {depths}")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, b, t)
    x = embed(params, tokens, cfg)
    out, done = {}, 0
    for d in depths:
        x, cache = run_layers(params, x, cache, positions, cfg, start=done, end=d)
        out[d], done = x, d
    return out


def collect_hidden_states(
    params: Params,
    cfg: ModelConfig,
    data: TokenizedData,
    depths: Sequence[int],
    batch_size: int = 8,
    dtype=np.float32,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """`hidden_states` over every sequence of `data` -> {depth: [N, T, D] numpy array in `dtype`}."""
    from tqdm.auto import tqdm

    depths = tuple(sorted(set(depths)))
    fn = jax.jit(functools.partial(hidden_states, cfg=cfg, depths=depths))
    n, t = data.tokens.shape
    out = {d: np.zeros((n, t, cfg.hidden_size), dtype) for d in depths}
    for start in tqdm(range(0, n, batch_size), desc="teacher pass", disable=not progress):
        tokens = data.tokens[start : start + batch_size]
        rows = len(tokens)
        if rows < batch_size:  # keep one compiled shape
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - rows, axis=0)])
        result = fn(params, jnp.asarray(tokens))
        for d in depths:
            out[d][start : start + rows] = np.asarray(result[d][:rows], dtype)
    return out
