"""Pallas attention kernels (interpret mode on CPU) against the jnp reference, the impl switch, and the TPU
(Mosaic) variant in Pallas' TPU interpret mode and lowered for a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.kernels import pallas_attention as pa
from eej.kernels.mosaic_attention import mosaic_attention
from eej.kernels.layout import KernelShapeError, kv_block_size, merge_splits
from eej.model.attention import available_impls, get_impl, reference_attention

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_inputs(seed, b, t, hq, hkv, s, dh, dtype, positions, *, block_k, window=None):
    """Random q/k/v; cache slots no query may read hold garbage: large values inside a KV block the kernel
    loads, NaN in blocks it must skip (past every row's furthest position, or before its window)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, dh)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, dh)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, dh)).astype(np.float32)
    clean_k, clean_v = k.copy(), v.copy()
    pos = np.asarray(positions, np.int32).reshape(b, t)
    bk = kv_block_size(s, block_k)
    for row in range(b):
        hi = pos[row].max()
        lo = 0 if window is None else max(pos[row].min() - window + 1, 0)
        slots = np.arange(s)
        loaded = (slots < -(-(hi + 1) // bk) * bk) & (slots >= lo // bk * bk)
        unseen = (slots > hi) | (slots < lo)
        for arr in (k, v):
            arr[row, :, unseen & loaded] = 1e3
            arr[row, :, ~loaded] = np.nan
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(clean_k), cast(clean_v), jnp.asarray(pos)


def check(kernel, seed, b, t, hq, hkv, s, dh, dtype, positions, *, window=None, block_k=16, kv_splits=None):
    q, k, v, ck, cv, pos = make_inputs(seed, b, t, hq, hkv, s, dh, dtype, positions, block_k=block_k, window=window)
    got = kernel(q, k, v, pos, sliding_window=window, block_k=block_k, kv_splits=kv_splits, interpret=True)
    want = reference_attention(q, ck, cv, pos, sliding_window=window)
    assert got.shape == (b, t, hq, dh) and got.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


DTYPES = [jnp.float32, jnp.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hq,hkv", [(9, 3), (4, 4), (8, 2)], ids=["gqa9-3", "mha4", "gqa8-2"]
)
def test_decode_matches_reference_ragged(dtype, hq, hkv):
    # ragged rows: length 1 (position 0), mid-block, a block boundary, the full cache
    positions = [[0], [22], [31], [63]]
    check(pa.decode_attention, 1, 4, 1, hq, hkv, 64, 16, dtype, positions)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_with_kv_splits(dtype):
    # splits that see nothing (row 0), partial splits, and the full cache; merged exactly
    positions = [[3], [40], [127]]
    check(pa.decode_attention, 2, 3, 1, 6, 2, 128, 32, dtype, positions, kv_splits=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_verify_block_matches_reference(dtype, t):
    # each row's block starts at its own length; the last row's block ends at the last slot
    lengths = [0, 9, 64 - t]
    positions = [[n + i for i in range(t)] for n in lengths]
    check(pa.verify_attention, 3 + t, 3, t, 9, 3, 64, 16, dtype, positions)


def test_verify_with_kv_splits_odd_heads():
    positions = [[5, 6, 7], [60, 61, 62]]
    check(pa.verify_attention, 4, 2, 3, 3, 1, 96, 8, jnp.float32, positions, kv_splits=3)


@pytest.mark.parametrize("t", [1, 4])
def test_sliding_window(t):
    positions = [[n + i for i in range(t)] for n in (2, 30, 60 - t)]
    check(pa.verify_attention, 7, 3, t, 4, 2, 64, 16, jnp.float32, positions, window=10)
    check(pa.verify_attention, 8, 3, t, 4, 2, 64, 16, jnp.float32, positions, window=10, kv_splits=4)


def test_float32_queries_over_a_bfloat16_cache():
    q, k, v, ck, cv, pos = make_inputs(12, 2, 3, 6, 2, 32, 16, jnp.bfloat16, [[3, 4, 5], [29, 30, 31]], block_k=16)
    q32 = q.astype(jnp.float32) * 1.37  # values bfloat16 cannot hold
    got = pa.verify_attention(q32, k, v, pos, block_k=16, interpret=True)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference_attention(q32, ck, cv, pos), atol=2e-5, rtol=2e-5)


def test_odd_capacity_uses_a_dividing_block():
    # S = 24: blocks of 8 tile it exactly (interpret mode allows it; the GPU path asks for multiples of 16)
    assert kv_block_size(24, 128) == 8
    check(pa.decode_attention, 9, 2, 1, 2, 1, 24, 16, jnp.float32, [[0], [23]], block_k=128)


def test_merge_splits_ignores_empty_splits():
    acc = jnp.array([[[[[2.0]], [[0.0]]]]])  # [1, 1, 2 splits, 1 row, 1 dim]
    row_max = jnp.array([[[[0.0], [-1e30]]]])
    denom = jnp.array([[[[4.0], [0.0]]]])
    assert float(merge_splits(acc, row_max, denom)[0, 0, 0, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v, p: (q[0], k, v, p), "q must be"),
        (lambda q, k, v, p: (q, k[..., :8], v[..., :8], p), "head dim"),
        (lambda q, k, v, p: (q, k, v[:, :, :8], p), "v_cache shape"),
        (lambda q, k, v, p: (q[:, :, :5], k, v, p), "not a multiple"),
        (lambda q, k, v, p: (q, k, v, p[:, None]), "positions must be"),
        (lambda q, k, v, p: (q, k, v, p.astype(jnp.float32)), "integers"),
        (lambda q, k, v, p: (q.astype(jnp.float16), k, v, p), "not supported"),
        (lambda q, k, v, p: (q, k[:1], v[:1], p), "batch"),
    ],
)
def test_bad_shapes_raise_clear_errors(change, message):
    q = jnp.zeros((2, 2, 6, 16))
    k = jnp.zeros((2, 3, 32, 16))
    p = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(KernelShapeError, match=message):
        pa.verify_attention(*change(q, k, k, p), interpret=True)


def test_query_count_limits():
    k = jnp.zeros((1, 1, 32, 16))
    with pytest.raises(KernelShapeError, match="1..16 queries"):
        pa.verify_attention(jnp.zeros((1, 17, 1, 16)), k, k, jnp.zeros((1, 17), jnp.int32), interpret=True)
    with pytest.raises(KernelShapeError, match="one query per row"):
        pa.decode_attention(jnp.zeros((1, 2, 1, 16)), k, k, jnp.zeros((1, 2), jnp.int32), interpret=True)
    with pytest.raises(KernelShapeError, match="sliding_window"):
        pa.decode_attention(jnp.zeros((1, 1, 1, 16)), k, k, jnp.zeros((1, 1), jnp.int32), sliding_window=0)


def test_references_check_shapes_too():
    k = jnp.zeros((1, 1, 32, 16))
    with pytest.raises(KernelShapeError, match="1..1 queries"):
        pa.decode_attention_reference(jnp.zeros((1, 2, 1, 16)), k, k, jnp.zeros((1, 2), jnp.int32))


def test_gpu_only_shape_rules():
    k = jnp.zeros((1, 1, 32, 24))
    with pytest.raises(KernelShapeError, match="power of two"):
        pa.decode_attention(jnp.zeros((1, 1, 1, 24)), k, k, jnp.zeros((1, 1), jnp.int32), interpret=False)


def test_impl_switch_lists_kernels_and_long_blocks_fall_back():
    assert {"xla", "pallas", "triton"} <= set(available_impls())
    assert get_impl("pallas").__wrapped__ is pa.attention
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        get_impl("nope")
    q, k, v, ck, cv, pos = make_inputs(11, 1, 20, 2, 1, 32, 16, jnp.float32, [list(range(20))], block_k=16)
    np.testing.assert_allclose(pa.attention(q, ck, cv, pos), reference_attention(q, ck, cv, pos), atol=1e-6)


def test_engine_with_pallas_attention_matches_xla():
    from eej.testing import random_prompts, tiny_model

    from eej.decoding.engine import Engine

    model = tiny_model("tiny-mistral", seed=3)  # GQA 4/2 with a sliding window of 16
    prompts = random_prompts(np.random.default_rng(0), [5, 19], model.cfg.vocab_size)
    want = Engine(model).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    kernel_model = type(model)(cfg=model.cfg.replace(attention_impl="pallas"), params=model.params, tokenizer=model.tokenizer)
    got = Engine(kernel_model).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    assert got == want


# ----------------------------------------------------------------------------- the TPU (Mosaic) variant

def _mosaic(q, k, v, pos, *, sliding_window, block_k, kv_splits, interpret):
    assert kv_splits is None  # the Mosaic kernel streams blocks along the grid; it has no splits
    return mosaic_attention(q, k, v, pos, sliding_window=sliding_window, block_k=block_k, interpret=interpret)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 5, 16])
def test_mosaic_matches_reference_in_tpu_interpret_mode(dtype, t):
    # ragged rows (a block boundary, mid-block, the full cache) with GQA; blocks a row cannot see hold NaN
    lengths = [0, 15, 64 - t]
    check(_mosaic, 20 + t, 3, t, 8, 2, 64, 16, dtype, [[n + i for i in range(t)] for n in lengths])


@pytest.mark.parametrize("t", [1, 4])
def test_mosaic_sliding_window(t):
    positions = [[n + i for i in range(t)] for n in (2, 30, 60 - t)]
    check(_mosaic, 30 + t, 3, t, 4, 2, 64, 8, jnp.float32, positions, window=10, block_k=8)


def test_mosaic_kernel_lowers_for_a_tpu():
    q, k, v, _, _, pos = make_inputs(40, 2, 1, 8, 2, 256, 64, jnp.bfloat16, [[5], [200]], block_k=128)
    lowered = jax.jit(mosaic_attention).trace(q, k, v, pos).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()  # a Mosaic kernel, not an emulation
