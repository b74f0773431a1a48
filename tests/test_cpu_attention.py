"""The CPU attention kernel (`--attention cpu`, eej.kernels.cpu_attention): against the jnp reference over GQA
groups, ragged positions, sliding windows and caches whose size is not a multiple of its block; a query's result
independent of the step's other queries; where it hands over to XLA; and lossless methods still giving plain
decoding's tokens with it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.cli.options import resolve_attention
from eej.cli.parser import CliError
from eej.decoding.methods import known_methods
from eej.kernels import cpu_attention
from eej.model.attention import get_impl, reference_attention
from eej.testing import agreeable_model, method_and_plain


def _case(b, t, hq, hkv, s, dh, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, dh), np.float32)
    k = rng.standard_normal((b, hkv, s, dh), np.float32)
    v = rng.standard_normal((b, hkv, s, dh), np.float32)
    starts = rng.integers(0, s - t + 1, size=b)  # ragged rows: each at its own position
    positions = (starts[:, None] + np.arange(t)[None]).astype(np.int32)
    return q, k, v, positions


@pytest.mark.parametrize("b,t,hq,hkv,s,dh", [
    (1, 1, 9, 3, 40, 64), (2, 5, 4, 2, 37, 16), (3, 16, 6, 6, 100, 8), (1, 2, 8, 1, 16, 32), (2, 1, 2, 1, 1, 8),
    (1, 3, 4, 2, 53, 48), (2, 2, 4, 1, 35, 128),  # the vector path's head sizes: 3 and 8 vectors of 16
    (1, 2, 4, 2, 30, 12), (2, 3, 6, 3, 45, 20),  # head sizes no vector divides: the generic path on every CPU
])
@pytest.mark.parametrize("window", [None, 1, 7])
def test_matches_the_reference(b, t, hq, hkv, s, dh, window):
    q, k, v, positions = _case(b, t, hq, hkv, s, dh)
    got = jax.jit(cpu_attention.attention, static_argnames="sliding_window")(q, k, v, positions, sliding_window=window)
    want = reference_attention(q, k, v, positions, sliding_window=window)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dh", [16, 12])  # the vector path and the generic one
def test_a_query_does_not_depend_on_the_others(dh):
    """What makes a verification read what a one-token step reads, to the bit."""
    q, k, v, positions = _case(2, 6, 6, 2, 70, dh, seed=1)
    together = np.asarray(cpu_attention.attention(q, k, v, positions))
    for t in range(6):
        alone = np.asarray(cpu_attention.attention(q[:, t:t + 1], k, v, positions[:, t:t + 1]))
        np.testing.assert_array_equal(alone[:, 0], together[:, t])


def test_positions_past_the_cache_read_every_slot():
    q, k, v, _ = _case(1, 2, 2, 1, 20, 8, seed=2)
    positions = np.array([[19, 25]], np.int32)
    np.testing.assert_allclose(cpu_attention.attention(q, k, v, positions),
                               reference_attention(q, k, v, positions), rtol=2e-5, atol=2e-5)


def test_long_blocks_run_xla_and_other_dtypes_are_refused():
    assert get_impl("cpu") is cpu_attention.attention
    q, k, v, positions = _case(1, cpu_attention.MAX_QUERIES + 1, 2, 1, 40, 8)
    hlo = jax.jit(cpu_attention.attention).lower(q, k, v, positions).as_text()
    assert cpu_attention.TARGET not in hlo
    np.testing.assert_allclose(cpu_attention.attention(q, k, v, positions), reference_attention(q, k, v, positions),
                               rtol=1e-6, atol=1e-6)
    short = (q[:, :2], k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), positions[:, :2])
    with pytest.raises(ValueError, match="float32 caches.*--attention xla"):
        cpu_attention.attention(*short)


@pytest.mark.parametrize("method", known_methods())
def test_lossless_methods_match_plain_greedy_with_the_cpu_kernels(method):
    model = agreeable_model("tiny-gqa", seed=6)
    model = dataclasses.replace(model, cfg=model.cfg.replace(attention_impl="cpu", matmul_impl="cpu"))
    pair = method_and_plain(model, method)
    if pair is None:
        pytest.skip(f"{method} is lossy")
    assert pair[0] == pair[1]


def test_resolving_the_cli_choice():
    assert resolve_attention("auto", "float32") == "cpu"  # this suite runs on the CPU backend
    assert resolve_attention("auto", "bfloat16") == "xla"
    assert resolve_attention("pallas", "float32") == "pallas"
    with pytest.raises(CliError, match="--attention cpu runs float32 models"):
        resolve_attention("cpu", "bfloat16")
    with pytest.raises(CliError, match="unknown attention implementation 'nope'"):
        resolve_attention("nope", "float32")

