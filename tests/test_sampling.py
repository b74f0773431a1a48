"""Sampling semantics: greedy, temperature, top-k and top-p against direct numpy definitions; the two ways to draw
(coupled exponential races keyed by position, and one uniform per row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.sampling import probabilities, race_sample, row_streams, sample, token_keys, warped_log_probs


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
    assert sample(logits, jax.random.PRNGKey(0), SamplingConfig(), None).tolist() == [1, 0]
    np.testing.assert_array_equal(np.asarray(probabilities(logits, SamplingConfig())), [[0, 1, 0], [1, 0, 0]])


def test_samples_follow_the_distribution():
    s = SamplingConfig(temperature=1.0, top_k=3, coupled=False)
    logits = jnp.asarray([2.0, 1.0, 0.5, -1.0, -2.0])
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, s, None))(keys))
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
    s = SamplingConfig(temperature=0.8, top_p=0.8, coupled=False)
    logits = jnp.asarray([1.5, 1.0, 0.2, -0.5, -3.0, 0.9])
    keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, s, None))(keys))
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


# ----------------------------------------------------------------------------- coupled draws


def _keys(n: int, seed: int = 0) -> jax.Array:
    """n token keys: row 0 of a generation seeded `seed`, positions 0..n-1."""
    return token_keys(row_streams(jax.random.PRNGKey(seed), 1), jnp.arange(n)[None])[0]


@pytest.mark.parametrize("s", [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0, top_k=3),
                               SamplingConfig(temperature=0.8, top_p=0.8)])
def test_coupled_draws_follow_the_distribution_across_blocks(s):
    from eej.decoding.sampling import _BLOCK

    vocab = 2 * _BLOCK + 9  # three blocks, the last padded
    logits = np.random.default_rng(1).standard_normal(vocab).astype(np.float32) * 2
    logits[:6] += 4.0  # some mass worth counting one by one
    draws = np.asarray(race_sample(jnp.broadcast_to(jnp.asarray(logits), (40_000, vocab)), _keys(40_000), s))
    want = _reference(logits, s)
    freq = np.bincount(draws, minlength=vocab) / len(draws)
    np.testing.assert_allclose(freq[:6], want[:6], atol=0.012)
    for b in range(3):  # the blocks' shares: the first round of the race
        np.testing.assert_allclose(freq[b * _BLOCK:(b + 1) * _BLOCK].sum(), want[b * _BLOCK:(b + 1) * _BLOCK].sum(), atol=0.012)
    assert np.all(want[draws] > 0)


def test_a_coupled_draw_over_a_subset_is_the_full_draw_with_the_rest_masked():
    vocab, n = 700, 4000
    logits = jnp.asarray(np.random.default_rng(2).standard_normal(vocab).astype(np.float32) * 2)
    ids = jnp.asarray(np.random.default_rng(3).choice(vocab, 120, replace=False).astype(np.int32))
    s = SamplingConfig(temperature=0.9)
    keys = _keys(n, seed=4)
    subset = race_sample(jnp.broadcast_to(logits[ids], (n, 120)), keys, s, ids, vocab)
    masked = race_sample(jnp.broadcast_to(jnp.full(vocab, -jnp.inf).at[ids].set(logits[ids]), (n, vocab)), keys, s)
    np.testing.assert_array_equal(np.asarray(subset), np.asarray(masked))
    assert len(set(np.asarray(subset).tolist())) > 20


def test_two_distributions_drawn_with_one_key_agree_often_where_they_are_close():
    """The coupling speculative decoding relies on: the same key draws the same token from nearby distributions."""
    vocab, n = 300, 20_000
    rng = np.random.default_rng(5)
    p_logits = rng.standard_normal(vocab).astype(np.float32) * 2
    q_logits = p_logits + rng.standard_normal(vocab).astype(np.float32) * 0.3
    s = SamplingConfig(temperature=1.0)
    keys = _keys(n, seed=6)
    a = np.asarray(race_sample(jnp.broadcast_to(jnp.asarray(p_logits), (n, vocab)), keys, s))
    b = np.asarray(race_sample(jnp.broadcast_to(jnp.asarray(q_logits), (n, vocab)), keys, s))
    p, q = _reference(p_logits, s), _reference(q_logits, s)
    overlap = np.minimum(p, q).sum()  # no coupling agrees more often than this
    # A one-round race (Gumbel-max) agrees at least overlap / (2 - overlap) of the time (Daliri et al. 2024).
    assert overlap / (2 - overlap) < np.mean(a == b) <= overlap + 0.01


def test_coupled_sampling_needs_the_keys_and_rows_keep_their_streams_in_any_batch():
    with pytest.raises(ValueError, match="keys"):
        sample(jnp.zeros((2, 5)), jax.random.PRNGKey(0), SamplingConfig(temperature=1.0), None)
    key = jax.random.PRNGKey(9)
    np.testing.assert_array_equal(row_streams(key, 2), row_streams(key, 5)[:2])
    keys = np.asarray(token_keys(row_streams(key, 3), jnp.asarray([[4, 5], [4, 5], [4, 5]])))
    assert len(set(keys.ravel().tolist())) == 6  # every row and position its own key
