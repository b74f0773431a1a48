"""Grouped-query attention of a block of queries over the static KV cache.

One op, several implementations: "xla" (the jnp reference here, the CPU default) and the kernels
registered by `kernels/` (Pallas / Triton) under other names. A kernel module is imported the first
time its implementation is selected, so optional GPU dependencies (jax-triton) are needed only then.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from eej.config import ModelConfig

_IMPLS: dict[str, Callable[..., jax.Array]] = {}
# Implementations whose module registers them on import (see `kernels/`).
_LAZY_IMPLS = {"pallas": "eej.kernels.pallas_attention", "triton": "eej.kernels.triton_attention"}


def register_impl(name: str, fn: Callable[..., jax.Array]) -> None:
    """Make `fn(q, k_cache, v_cache, positions, *, sliding_window)` selectable as `impl=name`."""
    _IMPLS[name] = fn


def available_impls() -> tuple[str, ...]:
    return ("xla", *sorted(set(_IMPLS) | set(_LAZY_IMPLS)))


def get_impl(name: str) -> Callable[..., jax.Array]:
    """The implementation registered as `name` (importing its module if needed); ValueError if unknown or unusable."""
    if name == "xla":
        return reference_attention
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


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
) -> jax.Array:
    """Dispatch to `cfg.attention_impl`; shapes as in `reference_attention`."""
    return get_impl(cfg.attention_impl)(q, k_cache, v_cache, positions, sliding_window=cfg.sliding_window)
