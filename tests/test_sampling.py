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
