"""scripts/draft_acceptance.py: its acceptance arithmetic against hand calculations, and bad arguments end with
status 2 before any model loads."""

from __future__ import annotations

import os

import numpy as np
import pytest

from eej.testing import load_script
from eej.train.distill import SHIPPED_FILES


@pytest.fixture(scope="module")
def script():
    return load_script("draft_acceptance")


def close(actual, expected):
    """Equal up to float32 rounding: the script's probabilities are decoding's (eej.decoding.sampling), in float32."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_a_draft_with_the_targets_distribution_is_always_accepted(script):
    logits = np.random.default_rng(0).normal(size=(5, 11))
    close(script.acceptance(logits, logits, None, 0.7, 0.7), 1.0)
    close(script.ceiling(logits, None, 0.7), 1.0)


def test_overlap_and_greedy_drafts_by_hand(script):
    target = np.log(np.array([[0.5, 0.3, 0.2]]))
    draft = np.log(np.array([[0.2, 0.8]]))  # a head over tokens 1 and 2 only
    ids = np.array([1, 2])
    # Σ min(p, q) over the head's tokens: min(0.3, 0.2) + min(0.2, 0.8)
    close(script.acceptance(target, draft, ids, 1.0, 1.0), [0.4])
    close(script.acceptance(target, draft, ids, 1.0, 0.0), [0.2])  # p(argmax q = token 2)
    close(script.ceiling(target, ids, 1.0), [0.5])
    # A greedy target accepts a draft only where it is the target's argmax (token 0: outside this head).
    close(script.acceptance(target, draft, ids, 0.0, 0.0), [0.0])
    close(script.ceiling(target, ids, 0.0), [0.0])
    # A sharper draft moves its mass onto token 2, where the target has less: lower acceptance here.
    assert script.acceptance(target, draft, ids, 1.0, 0.5)[0] < 0.4


def test_the_interval_brackets_the_pooled_rate(script):
    sums, counts = [3.0, 5.0, 1.0, 4.0], [10, 10, 5, 8]
    low, high = script.interval_over_prompts(sums, counts)
    assert low <= sum(sums) / sum(counts) <= high


def test_a_paired_difference_interval_brackets_its_pooled_difference(script):
    mine, base, counts = np.array([3.0, 6.0, 1.0, 5.0]), np.array([2.0, 5.5, 1.5, 4.0]), [10, 10, 5, 8]
    low, high = script.interval_over_prompts(mine - base, counts)
    assert low <= (mine - base).sum() / sum(counts) <= high


@pytest.mark.parametrize("argv", [["--method", "plain"], ["--method", ":x"], ["--method", "kangaroo", "--method", "plain"],
                                  ["--method", "kangaroo", "--method", "kangaroo"], ["--draft-temperatures", "-1"],
                                  ["--draft-temperatures", "a"], ["--draft-vocab", "1.5"], ["--prompts", "0"],
                                  ["--temperature", "-0.1"]])
def test_bad_arguments_end_with_status_2_before_loading_a_model(script, argv, monkeypatch):
    import eej.weights.registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(eej.weights.registry, "load_model", refuse)
    with pytest.raises(SystemExit) as ended:
        script.main(argv)
    assert ended.value.code == 2


def test_held_out_prompts_follow_the_shipped_distillations_file_order(script):
    """The shuffle permutes the files' concatenation: the held-out prompts are those after the training ones only in
    the order docs/kangaroo.md's `eej distill --data` gave the files."""
    docs = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "kangaroo.md"), encoding="utf-8").read()
    command = docs[docs.index("eej distill --model smollm2-135m"):].split("--out")[0]
    named = [os.path.basename(word) for word in command.replace("\\", " ").split() if word.startswith("../shared/data/train/")]
    assert tuple(named) == SHIPPED_FILES


def test_coupled_agreement_by_hand_and_against_the_race_itself(script):
    import jax
    import jax.numpy as jnp

    from eej.config import SamplingConfig
    from eej.decoding.sampling import _BLOCK, race_sample, row_streams, token_keys

    # One block, two tokens: s = 0 needs E_1 > E_0 max(0.4/0.6, 0.6/0.4), so 1 / (1 + 1.5) each: 0.8 in all.
    close(script.coupled_agreement(np.array([[0.6, 0.4]]), np.array([[0.4, 0.6]])), [0.8])
    p = np.random.default_rng(1).dirichlet(np.ones(11), size=3)
    close(script.coupled_agreement(p, p), 1.0)
    # Three blocks, q zero off a draft head: the closed form against the agreement of race_sample's own draws.
    vocab, n = 2 * _BLOCK + 40, 20_000
    rng = np.random.default_rng(2)
    logits = rng.normal(size=vocab) * 2.5
    head = rng.choice(vocab, 150, replace=False)
    draft = logits[head] + rng.normal(size=150) * 0.8
    sampling = SamplingConfig(temperature=1.0)
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float64)
    q = np.zeros(vocab)
    q[head] = np.asarray(jax.nn.softmax(jnp.asarray(draft)), np.float64)
    keys = token_keys(row_streams(jax.random.PRNGKey(0), 1), jnp.arange(n)[None])[0]
    a = race_sample(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, vocab)), keys, sampling)
    b = race_sample(jnp.broadcast_to(jnp.asarray(draft, jnp.float32), (n, 150)), keys, sampling, jnp.asarray(head), vocab)
    agree = float(jnp.mean(a == b))
    closed = float(script.coupled_agreement(p[None], q[None])[0])
    assert abs(closed - agree) < 0.015 and closed <= np.minimum(p, q).sum()
