"""The attention kernel written directly in Triton and called through jax-triton (`--attention triton`, GPU only).

Same algorithm and data layout as the Pallas kernel (`eej.kernels.pallas_attention`): grid
(B, Hkv, splits), packed grouped-query rows (`eej.kernels.layout`), an online softmax over the
KV blocks of the program's part of the cache, the loop ending at the furthest visible slot of its
rows (read in-kernel from the row positions). It always writes per-split partials, merged in jnp.
Reference: `eej.model.attention.reference_attention`.

Needs `triton` and `jax-triton` (`pip install 'eej[gpu]'`) and a CUDA/ROCm JAX backend; importing
this module without Triton raises ImportError with that hint. The kernel itself runs under
Triton's CPU interpreter (TRITON_INTERPRET=1) with torch tensors, which is how it is checked on
machines without a GPU (tests/test_kernels_triton.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "the triton attention kernel needs Triton and jax-triton on a GPU machine: pip install 'eej[gpu]'"
    ) from e

from eej.kernels.layout import (
    MAX_QUERIES,
    NEG_INF,
    KernelShapeError,
    check_inputs,
    kv_block_size,
    merge_splits,
    pack_queries,
    packed_rows,
    split_count,
    unpack_rows,
)
from eej.model.attention import reference_attention, register_impl, xla_attention
from eej.parallel.sharding import per_shard

DEFAULT_BLOCK_K = 64
# Compiled Triton (>= 3.2) refuses plain Python globals inside a kernel; a constexpr global is allowed.
# (Triton's CPU interpreter does not check this, which hid it until the first GPU run.)
MASKED_SCORE = tl.constexpr(NEG_INF)


@triton.jit
def attend_kernel(
    q_ptr,  # [B, Hkv, R, Dh] packed query rows
    k_ptr,  # [B, Hkv, S, Dh]
    v_ptr,  # [B, Hkv, S, Dh]
    pos_ptr,  # [B, R] int32 row positions
    acc_ptr,  # out [B, Hkv, P, R, Dh] float32
    max_ptr,  # out [B, Hkv, P, R] float32
    denom_ptr,  # out [B, Hkv, P, R] float32
    NUM_KV_HEADS: tl.constexpr,
    CAPACITY: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    SPLITS: tl.constexpr,
    WINDOW: tl.constexpr,  # 0 = no sliding window
    SCALE: tl.constexpr,
    EXACT_FP32: tl.constexpr,  # fp32 inputs: IEEE products, not TF32
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_K)
    head = (b * NUM_KV_HEADS + h).to(tl.int64)
    q = tl.load(q_ptr + (head * ROWS + rows)[:, None] * HEAD_DIM + dims[None, :])
    pos = tl.load(pos_ptr + b * ROWS + rows)
    first = split * BLOCKS_PER_SPLIT
    end = tl.minimum(first + BLOCKS_PER_SPLIT, (tl.max(pos, axis=0) + BLOCK_K) // BLOCK_K)
    if WINDOW > 0:
        first = tl.maximum(first, tl.maximum(tl.min(pos, axis=0) - WINDOW + 1, 0) // BLOCK_K)
    row_max = tl.full((ROWS,), MASKED_SCORE, tl.float32)
    denom = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    cache_base = head * CAPACITY * HEAD_DIM
    for i in range(first, end):
        slots = i * BLOCK_K + cols
        offsets = cache_base + slots[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + offsets)
        v = tl.load(v_ptr + offsets)
        if EXACT_FP32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * SCALE
        visible = slots[None, :] <= pos[:, None]
        if WINDOW > 0:
            visible = visible & (slots[None, :] > pos[:, None] - WINDOW)
        scores = tl.where(visible, scores, MASKED_SCORE)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        probs = tl.where(visible, tl.exp(scores - new_max[:, None]), 0.0)
        rescale = tl.exp(row_max - new_max)
        denom = denom * rescale + tl.sum(probs, axis=1)
        if EXACT_FP32:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        row_max = new_max
    part = (head * SPLITS + split) * ROWS + rows
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc)
    tl.store(max_ptr + part, row_max)
    tl.store(denom_ptr + part, denom)


def launch_settings(
    q_shape: tuple[int, ...], capacity: int, num_kv_heads: int, *, sliding_window: int | None, block_k: int,
    kv_splits: int | None,
) -> tuple[tuple[int, int, int], dict]:
    """(grid, constexpr metaparameters) of `attend_kernel` for packed rows of a [B, T, Hq, Dh] query."""
    b, t, hq, dh = q_shape
    if dh < 16 or dh & (dh - 1):
        raise KernelShapeError(f"triton attention: the head dim must be a power of two >= 16, got {dh}")
    bk = kv_block_size(capacity, block_k)
    if bk < 16:
        raise KernelShapeError(f"triton attention: the KV capacity must be a multiple of 16, got {capacity}")
    num_blocks = capacity // bk
    splits = split_count(num_blocks, b * num_kv_heads, kv_splits)
    rows = packed_rows(t, hq // num_kv_heads)
    meta = dict(
        NUM_KV_HEADS=num_kv_heads, CAPACITY=capacity, ROWS=rows, HEAD_DIM=dh, BLOCK_K=bk,
        BLOCKS_PER_SPLIT=num_blocks // splits, SPLITS=splits, WINDOW=sliding_window or 0, SCALE=dh**-0.5,
    )
    return (b, num_kv_heads, splits), meta


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_k", "kv_splits", "num_warps", "num_stages"))
def triton_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Attention of 1..16 queries per row over the cache (shapes as in `reference_attention`), on a GPU."""
    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        raise ValueError(
            f"the triton attention kernel runs on GPUs only (JAX backend here: {jax.default_backend()}); "
            "use --attention xla or pallas"
        )
    import jax_triton

    b, t, hq, hkv, capacity, dh = check_inputs(q, k_cache, v_cache, positions, sliding_window=sliding_window,
                                               name="triton attention")
    grid, meta = launch_settings(q.shape, capacity, hkv, sliding_window=sliding_window, block_k=block_k,
                                 kv_splits=kv_splits)
    # Mixed q/cache dtypes compute in float32 (tl.dot wants equal operand types).
    dtype = q.dtype if q.dtype == k_cache.dtype == v_cache.dtype else jnp.float32
    rows, row_pos = pack_queries(q.astype(dtype), positions, hkv)
    k_cache, v_cache = k_cache.astype(dtype), v_cache.astype(dtype)
    splits, r = grid[2], meta["ROWS"]
    acc, row_max, denom = jax_triton.triton_call(
        rows, k_cache, v_cache, row_pos,
        kernel=attend_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, hkv, splits, r, dh), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, r), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, r), jnp.float32),
        ),
        grid=grid,
        num_warps=num_warps,
        num_stages=num_stages,
        EXACT_FP32=dtype == jnp.float32,
        **meta,
    )
    return unpack_rows(merge_splits(acc, row_max, denom).astype(q.dtype), t, hq)


def attention(q, k_cache, v_cache, positions, *, sliding_window: int | None = None) -> jax.Array:
    """The `triton` implementation of the attention op; blocks longer than 16 queries (prefill) use the `xla` one."""
    if q.shape[1] <= MAX_QUERIES:
        return triton_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    return xla_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)


# Under a (data, model) mesh the kernel runs per shard (XLA cannot partition it).
register_impl("triton", per_shard(attention))
