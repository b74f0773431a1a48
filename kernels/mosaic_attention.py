"""Pallas TPU (Mosaic) attention over the static KV cache: decode (T = 1) and verification (T <= 16).

The same op as `eej.kernels.pallas_attention` (q [B, T, Hq, Dh], caches [B, Hkv, S, Dh], positions [B, T];
grouped heads packed into R rows by `eej.kernels.layout`), written the way a TPU wants it:

- grid (B, Hkv, S / block_k): the KV blocks are a grid axis, so Pallas' pipeline streams block j + 1
  from HBM into VMEM while block j is computed; the online-softmax state (running max, denominator,
  accumulator) lives in VMEM scratch across that axis and the output is written at the last block.
- each row's first and last visible block are scalar-prefetched into SMEM and the K/V index maps
  clamp the block index to them, so blocks past a row's length (or before its sliding window) are
  never fetched — a repeated block index is not copied again — and `pl.when` skips their compute.
- row positions are a [R, 1] column and the statistics are [R, 1]: 2-D tiles whose trailing
  dimensions are whole array dimensions, as Mosaic requires.

On this CPU-only machine it is checked in Pallas' TPU interpret mode (`interpret=True` here means
`pltpu.InterpretParams()`, which emulates the TPU's memory spaces and DMAs) against the jnp reference,
and lowered for the TPU platform without running (tests/test_kernels.py). It has not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from eej.kernels.layout import NEG_INF, check_inputs, kv_block_size, pack_queries, unpack_rows

DEFAULT_BLOCK_K = 128


def _kernel(first_ref, last_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, max_sc, denom_sc, acc_sc, *,
            block_k: int, sliding_window: int | None, scale: float):
    """Program (b, h, j). first_ref/last_ref [B] (SMEM): each row's visible block range; q_ref [R, Dh];
    k_ref/v_ref [block_k, Dh]: block j clamped to that range; pos_ref [R, 1]; o_ref [R, Dh]."""
    b, j = pl.program_id(0), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        max_sc[...] = jnp.full(max_sc.shape, NEG_INF, jnp.float32)
        denom_sc[...] = jnp.zeros(denom_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= first_ref[b]) & (j <= last_ref[b]))
    def _block():
        dtype = q_ref.dtype if q_ref.dtype == k_ref.dtype else jnp.float32
        precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
        q, k, v = q_ref[...].astype(dtype), k_ref[...].astype(dtype), v_ref[...].astype(dtype)
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                 precision=precision) * scale  # [R, block_k]
        pos = pos_ref[...]  # [R, 1]
        slots = j * block_k + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        visible = slots <= pos
        if sliding_window is not None:
            visible &= slots > pos - sliding_window
        scores = jnp.where(visible, scores, NEG_INF)
        row_max = max_sc[...]
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
        rescale = jnp.exp(row_max - new_max)
        denom_sc[...] = denom_sc[...] * rescale + jnp.sum(probs, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * rescale + jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                                      precision=precision)
        max_sc[...] = new_max

    @pl.when(j == pl.num_programs(2) - 1)
    def _write():
        denom = denom_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_k", "interpret"))
def mosaic_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    sliding_window: int | None = None,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: bool = False,
) -> jax.Array:
    """Attention of 1..16 queries per row over the cache, as a Mosaic kernel.

    Args:
      q: [B, T, Hq, Dh] rotated queries; k_cache, v_cache: [B, Hkv, S, Dh] holding the queries' own keys and
        values; positions: [B, T], query t sees slots <= positions[b, t] (and > positions - sliding_window).
      block_k: KV slots per block (rounded down to a power of two dividing S; a TPU wants a multiple of 8).
      interpret: run in Pallas' TPU interpret mode (how it is tested off a TPU).
    Returns:
      [B, T, Hq, Dh] in q's dtype.
    """
    b, t, hq, hkv, capacity, dh = check_inputs(q, k_cache, v_cache, positions, sliding_window=sliding_window,
                                               name="mosaic_attention")
    bk = kv_block_size(capacity, block_k)
    rows, row_pos = pack_queries(q, positions, hkv)  # [B, Hkv, R, Dh], [B, R]
    r = rows.shape[2]
    last = jnp.max(row_pos, axis=1) // bk
    first = (jnp.zeros_like(last) if sliding_window is None
             else jnp.maximum(jnp.min(row_pos, axis=1) - sliding_window + 1, 0) // bk)

    def kv_block(i, h, j, first, last):
        return i, h, jnp.clip(j, first[i], last[i]), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, capacity // bk),
        in_specs=[
            pl.BlockSpec((None, None, r, dh), lambda i, h, j, first, last: (i, h, 0, 0)),
            pl.BlockSpec((None, None, bk, dh), kv_block),
            pl.BlockSpec((None, None, bk, dh), kv_block),
            pl.BlockSpec((None, r, 1), lambda i, h, j, first, last: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, r, dh), lambda i, h, j, first, last: (i, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32),
                        pltpu.VMEM((r, dh), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, sliding_window=sliding_window, scale=dh**-0.5),
        out_shape=jax.ShapeDtypeStruct((b, hkv, r, dh), q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="mosaic_attention",
    )(first.astype(jnp.int32), last.astype(jnp.int32), rows, k_cache, v_cache, row_pos[:, :, None])
    return unpack_rows(out, t, hq)
