"""KV cache writes and rollback (property-based, on a tiny model)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from eej.model.cache import init_cache, write_block
from eej.model.transformer import forward

from eej.testing import tiny_model

MODEL = tiny_model("tiny-gqa")
CAPACITY = 48


def _run(cache, tokens, start):
    """Feed tokens [B, T] at positions start[b] + t; returns (logits, cache with lengths advanced)."""
    positions = jnp.asarray(start)[:, None] + jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(MODEL.params, jnp.asarray(tokens), positions, cache, MODEL.cfg)
    return np.asarray(logits), cache.with_lengths(cache.lengths + tokens.shape[1])


@settings(max_examples=12, deadline=None)
@given(
    prefix=st.integers(1, 12),
    junk=st.integers(1, 10),
    keep=st.integers(0, 10),
    cont=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_rollback_then_continue_equals_never_having_written(prefix, junk, keep, cont, seed):
    keep = min(keep, junk)
    rng = np.random.default_rng(seed)
    vocab = MODEL.cfg.vocab_size
    p = rng.integers(3, vocab, size=(2, prefix))
    j = rng.integers(3, vocab, size=(2, junk))
    c = rng.integers(3, vocab, size=(2, cont))
    start = np.zeros(2, np.int32)

    cache = init_cache(MODEL.cfg, 2, CAPACITY)
    _, cache = _run(cache, p, start)
    _, cache = _run(cache, j, start + prefix)
    cache = cache.with_lengths(np.full(2, prefix + keep, np.int32))  # roll back: keep `keep` junk tokens
    got, _ = _run(cache, c, start + prefix + keep)

    fresh = init_cache(MODEL.cfg, 2, CAPACITY)
    _, fresh = _run(fresh, np.concatenate([p, j[:, :keep]], axis=1), start)
    want, _ = _run(fresh, c, start + prefix + keep)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), t=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_write_block_touches_exactly_the_given_slots(batch, t, seed):
    rng = np.random.default_rng(seed)
    cache = jnp.asarray(rng.standard_normal((batch, 2, 16, 4)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((batch, t, 2, 4)), jnp.float32)
    starts = rng.integers(0, 20, size=batch)  # some blocks run past the end: those slots are dropped
    positions = jnp.asarray(starts[:, None] + np.arange(t)[None], jnp.int32)
    out = np.asarray(write_block(cache, new, positions))
    want = np.asarray(cache).copy()
    for b in range(batch):
        for i in range(t):
            s = starts[b] + i
            if s < 16:
                want[b, :, s] = np.asarray(new)[b, i]
    np.testing.assert_array_equal(out, want)


def test_propagate_kv_fills_exactly_the_skipped_layers():
    from eej.model.transformer import embed, get_layer, propagate_kv, qkv, run_layers

    cfg = MODEL.cfg
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(3, 4)), jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8], [2, 3, 4, 5]], jnp.int32)
    cache = init_cache(cfg, 3, 16)
    x = embed(MODEL.params, tokens, cfg)
    x, cache = run_layers(MODEL.params, x, cache, positions, cfg, 0, 2)
    first = jnp.asarray([2, 4, 6], jnp.int32)  # row 2 exits after the last layer: nothing to fill
    filled = propagate_kv(MODEL.params, x, cache, positions, cfg, first)
    for layer in range(cfg.num_layers):
        _, k, v = qkv(get_layer(MODEL.params["layers"], layer), x, positions, cfg)
        for row in range(3):
            got_k = np.asarray(filled.k[layer][row])
            if layer >= int(first[row]):
                want = np.asarray(k[row]).swapaxes(0, 1)  # [Hkv, T, Dh]
                np.testing.assert_allclose(got_k[:, np.asarray(positions[row])], want, atol=1e-6)
            else:
                np.testing.assert_array_equal(got_k, np.asarray(cache.k[layer][row]))
