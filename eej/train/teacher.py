"""What the frozen base model says about training sequences, computed once and reused.

`hidden_states` gives the residual stream after any set of layer counts; `collect_hidden_states`
runs it over a whole data set in batches (host numpy, optionally float16 to halve memory), so an
add-on that reads frozen activations trains without re-running the frozen layers every step.
`teacher_cache` keeps such states on disk (float16, memory-mapped) with the log-normaliser of the
full next-token distribution, reused by every run on the same data (`data_fingerprint`);
`teacher_argmax` is the full model's teacher-forced argmax.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.model.cache import init_cache
from eej.model.transformer import Params, embed, forward, logits_from_hidden, run_layers
from eej.train.data import DataOptions, TokenizedData, file_digests, length_batches, sample_positions
from eej.weights.registry import Model

TEACHER_FORMAT = 1


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def teacher_argmax(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Full-model argmax at every position: tokens [B, T] -> int32 [B, T] (position t predicts token t+1)."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, positions, init_cache(cfg, batch, length), cfg)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def distillation_head(model: Model, ranking: np.ndarray, size: int) -> tuple[jax.Array, int]:
    """The LM head [D, V'] over the `size` most frequent answer tokens of `ranking` (`token_ranking`),
    which a draft is distilled on, and V'; size 0: the full head [D, V] and V' = 0."""
    if not size:
        return model.params["lm_head"], 0
    vocab = ranking[:size]
    if len(vocab) < size:
        print(f"note: the answers use only {len(vocab)} distinct tokens; draft_vocab {size} -> {len(vocab)}", file=sys.stderr)
    return jnp.take(model.params["lm_head"], jnp.asarray(vocab), axis=1), int(len(vocab))


# ----------------------------------------------------------------------------- the on-disk teacher cache


def data_fingerprint(model: Model, data: DataOptions, seed: int, sequences: int) -> dict:
    """What a cache of the frozen model's view of the training data depends on (the files' content, not their paths)."""
    return {
        "model": model.cfg.name, "data": file_digests(data.files), "seq_len": data.seq_len,
        "max_examples": data.max_examples, "seed": seed, "sequences": sequences,
    }


def _teacher_fn(params, tokens, *, cfg, depths):
    states = hidden_states(params, tokens, cfg, (*depths, cfg.num_layers))
    logits = logits_from_hidden(params, states[cfg.num_layers], cfg)
    return {d: states[d].astype(jnp.float16) for d in states}, jax.nn.logsumexp(logits, axis=-1)


def teacher_cache(model: Model, data: TokenizedData, depths: Sequence[int], directory: str, batch_size: int,
                  fingerprint: dict, progress: bool = True) -> dict:
    """Cached frozen-model states for every sequence of `data` (computed if missing or stale).

    Returns {"h{d}": [N, T, D] float16 memmap for each depth d (N = cfg.num_layers included),
    "lse": [N, T] float32 log-normaliser of the full next-token distribution}.
    """
    cfg = model.cfg
    depths = tuple(sorted(set(int(d) for d in depths) | {cfg.num_layers}))
    meta_path = os.path.join(directory, "meta.json")
    want = {"format": TEACHER_FORMAT, **fingerprint}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want and set(depths) <= set(meta["depths"]):
            return _open_teacher(directory, meta["depths"])
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(meta_path):  # stale: rewritten below; an interrupted rewrite must not look complete
        os.remove(meta_path)
    n, t = data.tokens.shape
    arrays = {f"h{d}": np.lib.format.open_memmap(os.path.join(directory, f"h{d}.npy"), "w+", np.float16, (n, t, cfg.hidden_size)) for d in depths}
    arrays["lse"] = np.lib.format.open_memmap(os.path.join(directory, "lse.npy"), "w+", np.float32, (n, t))
    fn = jax.jit(functools.partial(_teacher_fn, cfg=cfg, depths=depths[:-1]))
    for _, rows, tokens in length_batches(data, batch_size, "teacher pass", progress):
        width = tokens.shape[1]
        states, lse = fn(model.params, jnp.asarray(tokens))
        for d in depths:
            arrays[f"h{d}"][rows, :width] = np.asarray(states[d][: len(rows)])
        arrays["lse"][rows, :width] = np.asarray(lse[: len(rows)])
    for a in arrays.values():
        a.flush()
    with open(meta_path, "w") as f:
        json.dump({**want, "depths": list(depths)}, f)
    return _open_teacher(directory, depths)


def teacher_batch(teacher: dict, predicting: np.ndarray, rows: np.ndarray, depths: Sequence[int], final_layer: int,
                  num_positions: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A distillation batch of the sequences `rows` from a `teacher_cache`: their states h{d} [B, T, D] for each
    d in `depths`, and `num_positions` predicting positions b, t [M] (sampled if there are more, padded with zero
    `weight` [M] if fewer) with the final layer's state h_final [M, D] and log-normaliser lse [M] there."""
    rows = np.asarray(rows)
    b, t, real = sample_positions(predicting[rows], num_positions, rng)
    out = {f"h{d}": np.asarray(teacher[f"h{d}"][rows]) for d in depths}
    return {**out, "b": b, "t": t, "weight": (np.arange(num_positions) < real).astype(np.float32),
            "h_final": np.asarray(teacher[f"h{final_layer}"][rows])[b, t], "lse": np.asarray(teacher["lse"][rows])[b, t]}


def _open_teacher(directory: str, depths) -> dict:
    out = {f"h{d}": np.load(os.path.join(directory, f"h{d}.npy"), mmap_mode="r") for d in depths}
    out["lse"] = np.load(os.path.join(directory, "lse.npy"), mmap_mode="r")
    return out
