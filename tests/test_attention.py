"""The "xla" attention implementation: long blocks run as a loop over query chunks, with the reference's values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eej.model.attention as attention
from eej.decoding.engine import Engine
from eej.decoding.methods import random_method
from eej.model.attention import get_impl, reference_attention, xla_attention
from eej.testing import random_prompts, tiny_model


def inputs(b=3, t=37, hq=6, hkv=2, s=48, dh=16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, t, hq, dh))
    k = jax.random.normal(kk, (b, hkv, s, dh))
    v = jax.random.normal(kv, (b, hkv, s, dh))
    positions = jnp.arange(t, dtype=jnp.int32)[None] + jnp.array([[0], [5], [11]], jnp.int32)[:b]  # ragged rows
    return q, k, v, positions


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("budget", [1, 6 * 48 * 4 * 3 * 5, 6 * 48 * 4 * 3 * 37 - 1])
def test_chunked_queries_match_the_reference(window, budget):
    # budgets: one query per chunk; 5 per chunk (37 does not divide: padded); 36 per chunk (one chunk plus one)
    q, k, v, positions = inputs()
    want = reference_attention(q, k, v, positions, sliding_window=window)
    got = xla_attention(q, k, v, positions, sliding_window=window, max_score_bytes=budget)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def loops(fn, *args) -> int:
    """How many loop primitives (while / scan) the traced function holds."""
    jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))  # a new function each time: no cached trace
    return jaxpr.count("while[") + jaxpr.count("scan[")


def test_only_blocks_over_the_budget_are_chunked():
    q, k, v, positions = inputs()
    whole = 3 * 6 * 48 * 4 * 37  # the block's score bytes
    assert loops(lambda *a: xla_attention(*a, max_score_bytes=whole), q, k, v, positions) == 0
    assert loops(lambda *a: xla_attention(*a, max_score_bytes=None), q, k, v, positions) == 0
    assert loops(lambda *a: xla_attention(*a, max_score_bytes=whole - 1), q, k, v, positions) == 1
    # decode and verification steps (up to 16 queries) are never chunked, whatever the budget
    for t in (1, attention.MAX_WHOLE_QUERIES):
        assert loops(lambda *a: xla_attention(*a, max_score_bytes=1), q[:, :t], k, v, positions[:, :t]) == 0


def test_the_xla_impl_is_chunked_on_cpu_only_when_large(monkeypatch):
    assert get_impl("xla") is xla_attention
    assert attention.score_budget() == attention.CPU_SCORE_BYTES  # the suite runs on CPU
    q, k, v, positions = inputs(b=1, t=17)
    monkeypatch.setattr(attention, "CPU_SCORE_BYTES", 1)
    assert loops(get_impl("xla"), q, k, v, positions) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.score_budget() is None and loops(get_impl("xla"), q, k, v, positions) == 0


@pytest.mark.parametrize("method", ["plain", "kangaroo", "m2r2-spec"])
def test_decoding_with_chunked_prefill_matches_unchunked(method, monkeypatch):
    model = tiny_model("tiny-gqa", seed=3)
    prompts = random_prompts(np.random.default_rng(2), [23, 9, 30], model.cfg.vocab_size)
    want = Engine(model).generate(prompts, max_new_tokens=10, eos_ids=()).tokens
    monkeypatch.setattr(attention, "CPU_SCORE_BYTES", 1)  # every prefill one query at a time
    engine = Engine(model, *random_method(model, method, seed=1))
    assert engine.generate(prompts, max_new_tokens=10, eos_ids=()).tokens == want
