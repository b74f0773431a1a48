"""What every attention kernel here shares: input checks, the row packing of grouped-query heads, and
the merge of partial results over KV splits.

The op (see `eej.model.attention`): q [B, T, Hq, Dh], caches [B, Hkv, S, Dh], positions [B, T];
query (b, t, head) reads cache slots 0..positions[b, t] (and only the last `sliding_window` of
them when that is set). A kernel program handles one (row b, KV head h) pair and packs the
G = Hq / Hkv query heads of h for all T queries into R "rows" of one tile:

    row r = t * G + g   (query t, head h * G + g),   R = T * G rounded up to a power of two >= 16,

so each K/V block is read once for all of them. Power-of-two tiles of at least 16 rows are what the
Triton lowering needs (tl.dot); padded rows repeat the last real row's position (so no row is
ever empty) and are dropped after the kernel.

A program may also cover only one of `splits` contiguous parts of the cache ("flash decoding"):
it then returns its unnormalised output with its running max and denominator, and
`merge_splits` combines the parts exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The most queries one call handles: a decode step (1) or a verification block of drafted tokens.
MAX_QUERIES = 16
MIN_ROWS = 16
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Masked score / initial running max: finite, so exp(m_old - m_new) never meets inf - inf.
NEG_INF = -1e30


class KernelShapeError(ValueError):
    """Inputs a kernel cannot take (wrong ranks, mismatched sizes, unsupported dtype or window)."""


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_inputs(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None,
    max_queries: int = MAX_QUERIES,
    name: str = "attention",
) -> tuple[int, int, int, int, int, int]:
    """Validate the op's inputs; returns (B, T, Hq, Hkv, S, Dh). Raises KernelShapeError with one clear line."""
    if q.ndim != 4:
        raise KernelShapeError(f"{name}: q must be [B, T, Hq, Dh], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise KernelShapeError(f"{name}: k_cache must be [B, Hkv, S, Dh], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise KernelShapeError(f"{name}: v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    b, t, hq, dh = q.shape
    kb, hkv, s, kdh = k_cache.shape
    if kb != b:
        raise KernelShapeError(f"{name}: q has batch {b} but the cache has batch {kb}")
    if kdh != dh:
        raise KernelShapeError(f"{name}: q has head dim {dh} but the cache has head dim {kdh}")
    if hq % hkv:
        raise KernelShapeError(f"{name}: {hq} query heads are not a multiple of {hkv} KV heads")
    if positions.shape != (b, t):
        raise KernelShapeError(f"{name}: positions must be [B, T] = {(b, t)}, got shape {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise KernelShapeError(f"{name}: positions must be integers, got {positions.dtype}")
    if not 1 <= t <= max_queries:
        raise KernelShapeError(f"{name}: takes 1..{max_queries} queries per row, got T={t}")
    for label, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise KernelShapeError(f"{name}: {label} dtype {x.dtype} is not supported (float32 or bfloat16)")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelShapeError(f"{name}: sliding_window must be a positive int or None, got {sliding_window!r}")
    return b, t, hq, hkv, s, dh


def packed_rows(num_queries: int, group_size: int) -> int:
    """R: tile rows for T queries x G grouped heads (a power of two >= MIN_ROWS)."""
    return max(MIN_ROWS, next_power_of_2(num_queries * group_size))


def pack_queries(q: jax.Array, positions: jax.Array, num_kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """q [B, T, Hq, Dh], positions [B, T] -> (rows [B, Hkv, R, Dh] in q's dtype, row positions [B, R] int32)."""
    b, t, hq, dh = q.shape
    g = hq // num_kv_heads
    rows = q.reshape(b, t, num_kv_heads, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * g, dh)
    row_pos = jnp.repeat(positions.astype(jnp.int32), g, axis=1)  # [B, T*G], r = t*G + g
    extra = packed_rows(t, g) - t * g
    if extra:
        rows = jnp.pad(rows, ((0, 0), (0, 0), (0, extra), (0, 0)))
        row_pos = jnp.pad(row_pos, ((0, 0), (0, extra)), mode="edge")
    return rows, row_pos


def unpack_rows(out: jax.Array, num_queries: int, num_heads: int) -> jax.Array:
    """Kernel output [B, Hkv, R, Dh] -> [B, T, Hq, Dh] (padded rows dropped)."""
    b, hkv, _, dh = out.shape
    g = num_heads // hkv
    out = out[:, :, : num_queries * g].reshape(b, hkv, num_queries, g, dh)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, num_queries, num_heads, dh)


def merge_splits(acc: jax.Array, row_max: jax.Array, denom: jax.Array) -> jax.Array:
    """Combine per-split partial results exactly.

    Args:
      acc: [B, Hkv, P, R, Dh] float32, sum over the split's slots of exp(score - row_max) * v.
      row_max, denom: [B, Hkv, P, R] float32 running max and sum of exp(score - row_max).
    Returns:
      [B, Hkv, R, Dh] float32 softmax-weighted values. A split that saw no visible slot has
      denom 0 and row_max NEG_INF, so its weight is 0.
    """
    top = jnp.max(row_max, axis=2, keepdims=True)
    weight = jnp.exp(row_max - top)
    total = jnp.sum(denom * weight, axis=2)
    out = jnp.sum(acc * weight[..., None], axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def kv_block_size(capacity: int, requested: int) -> int:
    """The largest power of two <= `requested` that divides `capacity` (KV blocks tile the cache exactly)."""
    block = min(next_power_of_2(requested), next_power_of_2(capacity))
    while capacity % block:
        block //= 2
    return block


def split_count(num_blocks: int, programs: int, requested: int | None, target_programs: int = 128) -> int:
    """How many parts to split each row's KV blocks into: `requested`, or enough programs to fill a GPU.

    The result divides `num_blocks`. With B * Hkv programs already >= target, no split.
    """
    want = requested if requested is not None else max(1, target_programs // max(programs, 1))
    want = max(1, min(want, num_blocks))
    while num_blocks % want:
        want -= 1
    return want
