"""The shared acceptance rule: greedy prefix matching and lossless speculative sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import SamplingConfig
from eej.decoding.verify import verify_greedy, verify_sampling


def _logits_with_argmax(targets, vocab=7):
    out = np.zeros((len(targets), len(targets[0]), vocab), np.float32)
    for b, row in enumerate(targets):
        for i, t in enumerate(row):
            out[b, i, t] = 5.0
    return jnp.asarray(out)


def test_greedy_accepts_the_longest_matching_prefix_plus_one():
    target = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 0, 1]]
    drafts = jnp.asarray([[1, 2, 3], [1, 9, 3], [1, 2, 3], [5, 6, 0]], jnp.int32)
    num_drafted = jnp.asarray([3, 3, 1, 2], jnp.int32)
    tokens, counts = verify_greedy(drafts, num_drafted, _logits_with_argmax(target))
    assert counts.tolist() == [4, 2, 2, 3]
    assert tokens.tolist() == target  # the committed prefix always equals the target's argmax


def test_sampling_with_temperature_zero_is_greedy():
    target = [[1, 2, 3], [4, 4, 4]]
    drafts = jnp.asarray([[1, 0], [4, 4]], jnp.int32)
    q = jnp.full((2, 2, 7), 1 / 7)
    tokens, counts = verify_sampling(drafts, jnp.asarray([2, 2]), q, _logits_with_argmax(target), jax.random.PRNGKey(0), SamplingConfig())
    assert counts.tolist() == [2, 3]


def test_speculative_sampling_is_lossless():
    """Token 0 ~ p0, and token 1 given that draft 0 was accepted ~ p1, for any draft distribution q."""
    vocab, k, n = 6, 3, 60_000
    rng = np.random.default_rng(0)
    p_logits = rng.standard_normal((k + 1, vocab)).astype(np.float32) * 1.5
    q = rng.dirichlet(np.ones(vocab) * 0.7, size=k).astype(np.float32)
    sampling = SamplingConfig(temperature=0.8, top_k=5)

    def one(key):
        kd, kv = jax.random.split(key)
        drafts = jax.random.categorical(kd, jnp.log(jnp.asarray(q)), axis=-1)  # [k]
        tokens, count = verify_sampling(
            drafts[None], jnp.asarray([k]), jnp.asarray(q)[None], jnp.asarray(p_logits)[None], kv, sampling
        )
        return tokens[0], count[0]

    tokens, counts = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(1), n))
    tokens, counts = np.asarray(tokens), np.asarray(counts)

    z = p_logits / sampling.temperature
    p = []
    for row in z:
        row = np.where(row >= np.sort(row)[::-1][sampling.top_k - 1], row, -np.inf)
        e = np.exp(row - row.max())
        p.append(e / e.sum())
    # Binomial standard error at n=60k is <= 0.002; 0.01 is > 4 sigma.
    np.testing.assert_allclose(np.bincount(tokens[:, 0], minlength=vocab) / n, p[0], atol=0.01)
    second = tokens[counts >= 2, 1]
    assert len(second) > 5_000
    np.testing.assert_allclose(np.bincount(second, minlength=vocab) / len(second), p[1], atol=0.02)
    assert np.all((counts >= 1) & (counts <= k + 1))
