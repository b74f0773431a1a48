"""Grouped-query attention of a block of queries over the static KV cache.

One op, several implementations: "xla" (the jnp reference here, the CPU default; on CPU a long block
runs as a loop over query chunks, `xla_attention`) and the kernels
registered by `kernels/` (Pallas / Triton, and "cpu": a C++ kernel for decode steps on a CPU) under other names. A kernel module is imported the first
time its implementation is selected, so optional GPU dependencies (jax-triton) are needed only then.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from eej.config import ModelConfig

_IMPLS: dict[str, Callable[..., jax.Array]] = {}
# Implementations whose module registers them on import (see `kernels/`).
_LAZY_IMPLS = {"pallas": "eej.kernels.pallas_attention", "triton": "eej.kernels.triton_attention",
               "cpu": "eej.kernels.cpu_attention"}


def register_impl(name: str, fn: Callable[..., jax.Array]) -> None:
    """Make `fn(q, k_cache, v_cache, positions, *, sliding_window)` selectable as `impl=name`."""
    _IMPLS[name] = fn


def available_impls() -> tuple[str, ...]:
    return ("xla", *sorted(set(_IMPLS) | set(_LAZY_IMPLS)))


def get_impl(name: str) -> Callable[..., jax.Array]:
    """The implementation registered as `name` (importing its module if needed); ValueError if unknown or unusable."""
    if name == "xla":
        return xla_attention
    if name not in _IMPLS and name in _LAZY_IMPLS:
        import importlib

        try:
            importlib.import_module(_LAZY_IMPLS[name])
        except ImportError as e:
            raise ValueError(f"attention implementation {name!r} is unavailable: {e}") from None
    if name not in _IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; available: {', '.join(available_impls())}")
    return _IMPLS[name]


def attention_mask(positions: jax.Array, capacity: int, sliding_window: int | None) -> jax.Array:
    """[..., S] bool: a query at `positions[...]` may read cache slot s (s <= position, within the window)."""
    slots = jnp.arange(capacity)
    pos = positions[..., None]
    mask = slots <= pos
    if sliding_window is not None:
        mask &= slots > pos - sliding_window
    return mask


def reference_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal GQA over the cache, plain jnp.

    Args:
      q: [B, T, Hq, Dh] queries (already rotated).
      k_cache, v_cache: [B, Hkv, S, Dh], already holding the block's own keys/values.
      positions: [B, T] query positions; a query reads slots 0..position.
    Returns:
      [B, T, Hq, Dh] attention output in q's dtype.
    """
    b, t, hq, dh = q.shape
    hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    # Queries of one KV head as rows [G*T] (g-major), so both products are batched over (B, Hkv).
    qg = q.reshape(b, t, hkv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, dh).astype(jnp.float32)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k_cache.astype(jnp.float32)) * (dh**-0.5)
    row_positions = jnp.tile(positions, (1, g))  # [B, G*T]
    mask = attention_mask(row_positions, capacity, sliding_window)[:, None]  # [B, 1, G*T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, hkv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dh).astype(q.dtype)


# Largest attention-score array [B, Hq, T, S] (float32 bytes) that the "xla" implementation builds at once on CPU;
# a longer block (a prefill) runs as a loop over query chunks. Chosen by scripts/prefill_chunks.py
# (benchmarks/results/prefill_chunks.md): built whole, the scores of a 4 x 900-token prefill (117 MB per layer)
# outgrow the CPU's caches.
CPU_SCORE_BYTES = 8 << 20
# Blocks of at most this many queries (a decode or verification step) always run whole.
MAX_WHOLE_QUERIES = 16


def score_budget() -> int | None:
    """Score bytes `xla_attention` builds at once on this backend (None: no limit — accelerators take big ops)."""
    return CPU_SCORE_BYTES if jax.default_backend() == "cpu" else None


def xla_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None = None,
    max_score_bytes: int | None | str = "auto",
) -> jax.Array:
    """`reference_attention`, run over chunks of queries when a block of more than `MAX_WHOLE_QUERIES` queries (a
    prefill) would build more than `max_score_bytes` of scores.

    Each query's softmax is independent of the others, so chunking the queries changes no value beyond float
    rounding. Shapes as in `reference_attention`; `max_score_bytes="auto"` takes `score_budget()`.
    """
    budget = score_budget() if max_score_bytes == "auto" else max_score_bytes
    b, t, hq, dh = q.shape
    per_query = b * hq * k_cache.shape[2] * 4
    if budget is None or t <= MAX_WHOLE_QUERIES or t * per_query <= budget:
        return reference_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    chunk = max(1, budget // per_query)
    n = -(-t // chunk)
    pad = n * chunk - t  # padded queries sit at position 0 (slot 0 is always readable) and are dropped
    q_chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, hq, dh).swapaxes(0, 1)
    pos_chunks = jnp.pad(positions, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    def one_chunk(operand: tuple[jax.Array, jax.Array]) -> jax.Array:
        qc, pc = operand
        return reference_attention(qc, k_cache, v_cache, pc, sliding_window=sliding_window)

    out = jax.lax.map(one_chunk, (q_chunks, pos_chunks))  # [n, B, chunk, Hq, Dh]
    return out.swapaxes(0, 1).reshape(b, n * chunk, hq, dh)[:, :t]


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
) -> jax.Array:
    """Dispatch to `cfg.attention_impl`; shapes as in `reference_attention`."""
    return get_impl(cfg.attention_impl)(q, k_cache, v_cache, positions, sliding_window=cfg.sliding_window)
