"""Sampling semantics: greedy, temperature, top-k and top-p against direct numpy definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.sampling import probabilities, sample, warped_log_probs


def _reference(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    z = logits / s.temperature
    keep = np.ones_like(z, bool)
    if s.top_k:
        keep &= z >= np.sort(z)[::-1][s.top_k - 1]
    z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept = order[before < s.top_p]
        mask = np.zeros_like(p, bool)
        mask[kept] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "s",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.5, top_k=5),
        SamplingConfig(temperature=1.3, top_p=0.7),
        SamplingConfig(temperature=0.9, top_k=10, top_p=0.5),
        SamplingConfig(temperature=2.0, top_k=1),
    ],
)
def test_warped_distribution_matches_definition(s):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 40)).astype(np.float32) * 3
    got = np.asarray(jnp.exp(warped_log_probs(jnp.asarray(logits), s)))
    for row in range(4):
        np.testing.assert_allclose(got[row], _reference(logits[row], s), atol=1e-6)


def test_greedy_is_argmax_and_one_hot():
    logits = jnp.asarray([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]])
    assert sample(logits, jax.random.PRNGKey(0), SamplingConfig()).tolist() == [1, 0]
    np.testing.assert_array_equal(np.asarray(probabilities(logits, SamplingConfig())), [[0, 1, 0], [1, 0, 0]])


def test_samples_follow_the_distribution():
    s = SamplingConfig(temperature=1.0, top_k=3)
    logits = jnp.asarray([2.0, 1.0, 0.5, -1.0, -2.0])
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, s))(keys))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, _reference(np.asarray(logits), s), atol=0.015)
    assert freq[3] == 0 and freq[4] == 0


def test_inverse_cdf_picks_the_interval_holding_u_and_never_a_zero_weight_id():
    from eej.decoding.sampling import inverse_cdf

    weights = jnp.asarray([0.0, 2.0, 0.0, 1.0, 0.0])  # cumulative 0, 2, 2, 3, 3
    u = jnp.asarray([0.0, 0.5, 0.66, 0.67, 0.999, 1.0])  # 1.0 stands for u * total rounding up to the total
    got = inverse_cdf(jnp.broadcast_to(weights, (6, 5)), u)
    assert got.tolist() == [1, 1, 1, 3, 3, 3]


def test_sample_from_probs_follows_unnormalised_weights():
    from eej.decoding.sampling import sample_from_probs

    weights = jnp.asarray([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 0.5])
    keys = jax.random.split(jax.random.PRNGKey(1), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample_from_probs(weights, k))(keys))
    freq = np.bincount(draws, minlength=7) / len(draws)
    np.testing.assert_allclose(freq, np.asarray(weights) / 5.0, atol=0.015)
    assert freq[0] == freq[2] == freq[5] == 0


def test_top_p_samples_follow_the_distribution():
    s = SamplingConfig(temperature=0.8, top_p=0.8)
    logits = jnp.asarray([1.5, 1.0, 0.2, -0.5, -3.0, 0.9])
    keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, s))(keys))
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, _reference(np.asarray(logits), s), atol=0.015)


def test_inverse_cdf_across_blocks_matches_a_direct_search():
    from eej.decoding.sampling import _BLOCK, inverse_cdf

    rng = np.random.default_rng(3)
    vocab = 3 * _BLOCK + 17  # the last block is padded
    weights = rng.random((4, vocab)).astype(np.float32) * (rng.random((4, vocab)) < 0.3)
    weights[1, : 2 * _BLOCK] = 0.0  # whole blocks without weight are skipped
    u = rng.random((4, 200)).astype(np.float32)
    got = np.asarray(jax.vmap(inverse_cdf, in_axes=(None, 1), out_axes=1)(jnp.asarray(weights), jnp.asarray(u)))
    cdf = np.cumsum(weights.astype(np.float64), axis=-1)
    for row in range(4):
        want = np.searchsorted(cdf[row], u[row] * cdf[row, -1], side="right")
        near = np.abs(cdf[row][np.minimum(want, vocab - 1)] - u[row] * cdf[row, -1]) < 1e-4  # float32 rounding
        assert np.all((got[row] == want) | near)
        assert np.all(weights[row, got[row]] > 0)
