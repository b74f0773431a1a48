"""KV cache writes and rollback (property-based, on a tiny model)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from eej.model.cache import init_cache, write_block
from eej.model.transformer import forward

from conftest import tiny_model

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
