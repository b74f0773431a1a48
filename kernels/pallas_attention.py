"""Pallas attention over the static KV cache: (1) single-query decode, (2) verification of up to 16 drafted tokens.

Both kernels are the same program (`_attend_kernel`): grid (B, Hkv, splits); program (b, h, j)
holds the packed query rows of KV head h of row b (all G grouped heads x T queries, see
`eej.kernels.layout`), walks the KV blocks of its part j of the cache with an online softmax, and
stops at the last block any of its rows can see — the loop bound is read from the row
positions in-kernel, so no work is spent on the empty tail of the cache (positions are a plain
input, not TPU scalar prefetch, so the same kernel lowers through Triton on GPU). Causality
inside a verification block falls out of the per-row positions: the block's own keys are already
in the cache and row t sees slots <= positions[b, t].

- `decode_attention` (T = 1): one new token per row.
- `verify_attention` (1 <= T <= 16): a block of drafted tokens under speculative verification.
- On GPU both split long caches into parts by default (flash decoding; `layout.merge_splits`
  combines them), because B * Hkv programs alone leave most of a GPU idle at small batch.
- `attention` is the op registered as `--attention pallas`: T = 1 -> decode, T <= 16 -> verify,
  longer blocks (prefill) -> the XLA reference (a prefill is one call per prompt, not the hot path);
  on a TPU, T <= 16 -> the Mosaic kernel of `eej.kernels.mosaic_attention` instead.

On CPU the kernels run with `interpret=True` (how CI tests them); on GPU they lower through
Pallas' Triton backend. The pure-jnp reference is `decode_attention_reference` (the shape-checked
`eej.model.attention.reference_attention`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from eej.model.attention import reference_attention, register_impl, xla_attention
from eej.parallel.sharding import per_shard

from eej.kernels.layout import (
    MAX_QUERIES,
    NEG_INF,
    KernelShapeError,
    check_inputs,
    kv_block_size,
    merge_splits,
    pack_queries,
    split_count,
    unpack_rows,
)
from eej.kernels.mosaic_attention import mosaic_attention

DEFAULT_BLOCK_K = 128
_SQUEEZED = getattr(pl, "squeezed", None)  # `None` in older Pallas


def _default_interpret() -> bool:
    """Interpret (emulate) the kernel unless a GPU backend runs it; EEJ_PALLAS_INTERPRET=1 forces it."""
    if os.environ.get("EEJ_PALLAS_INTERPRET", "") not in ("", "0"):
        return True
    return jax.default_backend() not in ("gpu", "cuda", "rocm")


def _attend_kernel(
    q_ref,
    k_ref,
    v_ref,
    pos_ref,
    *out_refs,
    block_k: int,
    blocks_per_split: int,
    sliding_window: int | None,
    scale: float,
    normalize: bool,
):
    """One (row, KV head, split) program. q_ref [R, Dh], k_ref/v_ref [S, Dh], pos_ref [R] int32.

    Writes o_ref [R, Dh] (normalize) or acc_ref [R, Dh], max_ref [R], denom_ref [R] (partials).
    """
    pos = pos_ref[...]
    # Mixed q/cache dtypes compute in float32; float32 products at full precision (no TF32 on GPU).
    dtype = q_ref.dtype if q_ref.dtype == k_ref.dtype else jnp.float32
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    q = q_ref[...].astype(dtype)
    rows, dh = q.shape
    split = pl.program_id(2)
    first = split * blocks_per_split
    # Blocks past the furthest visible slot of any row (its length) are never loaded.
    end = jnp.minimum(first + blocks_per_split, (jnp.max(pos) + block_k) // block_k)
    if sliding_window is not None:
        first = jnp.maximum(first, jnp.maximum(jnp.min(pos) - sliding_window + 1, 0) // block_k)

    def body(i, carry):
        row_max, denom, acc = carry
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :].astype(dtype)
        v = v_ref[pl.ds(start, block_k), :].astype(dtype)
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * scale
        slots = (start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
        visible = slots <= pos[:, None]
        if sliding_window is not None:
            visible &= slots > pos[:, None] - sliding_window
        scores = jnp.where(visible, scores, NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        probs = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp(row_max - new_max)
        denom = denom * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(
            probs.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision
        )
        return new_max, denom, acc

    init = (
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, dh), jnp.float32),
    )
    row_max, denom, acc = lax.fori_loop(first, end, body, init)
    if normalize:
        (o_ref,) = out_refs
        o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, max_ref, denom_ref = out_refs
        acc_ref[...] = acc
        max_ref[...] = row_max
        denom_ref[...] = denom


def _check_gpu_shapes(capacity: int, head_dim: int, block_k: int, name: str) -> None:
    """What the Triton lowering needs beyond the op's own checks (power-of-two tiles of >= 16)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise KernelShapeError(f"{name}: on GPU the head dim must be a power of two >= 16, got {head_dim}")
    if block_k < 16:
        raise KernelShapeError(
            f"{name}: on GPU the KV capacity must be a multiple of 16, got {capacity} (choose another cache size)"
        )


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "block_k", "kv_splits", "interpret", "num_warps", "num_stages", "name"),
)
def _attention_call(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None,
    block_k: int,
    kv_splits: int | None,
    interpret: bool,
    num_warps: int,
    num_stages: int,
    name: str,
) -> jax.Array:
    b, t, hq, hkv, capacity, dh = check_inputs(q, k_cache, v_cache, positions, sliding_window=sliding_window, name=name)
    bk = kv_block_size(capacity, block_k)
    if not interpret:
        _check_gpu_shapes(capacity, dh, bk, name)
    num_blocks = capacity // bk
    splits = split_count(num_blocks, b * hkv, 1 if (interpret and kv_splits is None) else kv_splits)
    rows, row_pos = pack_queries(q, positions, hkv)
    r = rows.shape[2]
    normalize = splits == 1
    kernel = functools.partial(
        _attend_kernel,
        block_k=bk,
        blocks_per_split=num_blocks // splits,
        sliding_window=sliding_window,
        scale=dh**-0.5,
        normalize=normalize,
    )
    sq = _SQUEEZED
    in_specs = [
        pl.BlockSpec((sq, sq, r, dh), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((sq, sq, capacity, dh), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((sq, sq, capacity, dh), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((sq, r), lambda i, h, j: (i, 0)),
    ]
    if normalize:
        out_shape = jax.ShapeDtypeStruct((b, hkv, r, dh), q.dtype)
        out_specs = pl.BlockSpec((sq, sq, r, dh), lambda i, h, j: (i, h, 0, 0))
    else:
        out_shape = (
            jax.ShapeDtypeStruct((b, hkv, splits, r, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, r), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, r), jnp.float32),
        )
        out_specs = (
            pl.BlockSpec((sq, sq, sq, r, dh), lambda i, h, j: (i, h, j, 0, 0)),
            pl.BlockSpec((sq, sq, sq, r), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((sq, sq, sq, r), lambda i, h, j: (i, h, j, 0)),
        )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    result = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=compiler_params,
        name=name,
    )(rows, k_cache, v_cache, row_pos)
    out = result if normalize else merge_splits(*result).astype(q.dtype)
    return unpack_rows(out, t, hq)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, **options) -> jax.Array:
    """Kernel 1: one new query per row over the cache.

    Args:
      q: [B, 1, Hq, Dh] rotated queries; k_cache, v_cache: [B, Hkv, S, Dh] (holding the query's own
        key/value); positions: [B, 1] each query's position = its last visible slot.
      options: `sliding_window` and the tuning knobs of `verify_attention`.
    Returns:
      [B, 1, Hq, Dh] in q's dtype.
    """
    if q.ndim == 4 and q.shape[1] != 1:
        raise KernelShapeError(f"decode_attention takes one query per row, got T={q.shape[1]}; use verify_attention")
    return verify_attention(q, k_cache, v_cache, positions, _name="decode_attention", **options)


def verify_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    kv_splits: int | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    _name: str = "verify_attention",
) -> jax.Array:
    """Kernel 2: a block of 1..16 queries per row (drafted tokens under verification) over the cache.

    Args:
      q: [B, T, Hq, Dh] rotated queries; k_cache, v_cache: [B, Hkv, S, Dh] holding the block's own
        keys/values; positions: [B, T]. Query t sees slots <= positions[b, t]: the cached prefix
        and the block's earlier tokens (causal).
      sliding_window: see only the last this-many slots (None: all).
      block_k: KV slots per block (rounded down to a power of two dividing S).
      kv_splits: parts each row's cache is split into (None: 1 when interpreted, else enough to
        fill the GPU).
      interpret: emulate the kernel (None: on CPU/TPU yes, on GPU no).
      num_warps, num_stages: Triton compiler settings (GPU).
    Returns:
      [B, T, Hq, Dh] in q's dtype.
    """
    return _attention_call(
        q, k_cache, v_cache, positions, sliding_window=sliding_window, block_k=block_k, kv_splits=kv_splits,
        interpret=_default_interpret() if interpret is None else interpret, num_warps=num_warps,
        num_stages=num_stages, name=_name,
    )


def decode_attention_reference(q, k_cache, v_cache, positions, *, sliding_window: int | None = None) -> jax.Array:
    """The plain-jnp oracle of `decode_attention` (same checks, then `reference_attention`)."""
    check_inputs(q, k_cache, v_cache, positions, sliding_window=sliding_window, max_queries=1, name="decode_attention")
    return reference_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)


def attention(q, k_cache, v_cache, positions, *, sliding_window: int | None = None) -> jax.Array:
    """The `pallas` implementation of the attention op (signature of `eej.model.attention.reference_attention`):
    on a TPU the Mosaic kernel (`eej.kernels.mosaic_attention`), elsewhere this module's kernels."""
    t = q.shape[1]
    if t <= MAX_QUERIES and jax.default_backend() == "tpu":
        return mosaic_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    if t == 1:
        return decode_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    if t <= MAX_QUERIES:
        return verify_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    return xla_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)


# Under a (data, model) mesh the kernel runs per shard (XLA cannot partition it).
register_impl("pallas", per_shard(attention))
