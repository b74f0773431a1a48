"""The model's arithmetic does not depend on how many rows share a step: RMSNorm's row sum in one fixed order, and
(with the CPU kernels) a verification block's logits bit-identical to one-token steps' — what keeps a lossless
method's tokens plain decoding's where two tokens nearly tie."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.model import attention
from eej.model.cache import init_cache
from eej.model.packed import pack_projections
from eej.model.transformer import forward, rms_norm, row_sum
from eej.testing import random_prompts, tiny_model
from eej.weights.registry import with_kernels

WIDTHS = [1, 7, 48, 64, 100, 576]  # one column, fewer than a lane group, exactly one, several and a padded tail


@pytest.mark.parametrize("width", WIDTHS)
def test_row_sum_is_the_sum(width):
    x = np.random.default_rng(width).standard_normal((5, width)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(row_sum(jnp.asarray(x))), x.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_rows_norm_does_not_depend_on_the_rows_beside_it(width):
    """XLA's own `jnp.mean` here rounded a row of width 576 differently among 8 or more rows than among 5 (a CPU,
    jax 0.10.2): every row count from 1 to 40, and a [batch, tokens] block against each of its rows alone."""
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.standard_normal((40, width)).astype(np.float32) * 3)
    weight = jnp.asarray(rng.standard_normal(width).astype(np.float32))
    norm = jax.jit(lambda x: rms_norm(x, weight, 1e-5))
    alone = np.asarray(norm(x[:1]))[0]
    for rows in range(2, 41):
        np.testing.assert_array_equal(np.asarray(norm(x[:rows]))[0], alone, err_msg=f"{rows} rows")
    block = np.asarray(norm(x[:20].reshape(4, 5, width)))
    for b in range(4):
        for t in range(5):
            np.testing.assert_array_equal(block[b, t], np.asarray(norm(x[5 * b + t][None, None]))[0, 0])
    reference = np.asarray(x[:3], np.float64)
    reference = reference / np.sqrt((reference ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(weight)
    np.testing.assert_allclose(np.asarray(norm(x[:3])), reference, rtol=1e-5, atol=1e-5)


def _blocks_against_steps(model, prompts, steps):
    """(logits of `steps` one-token steps [steps][B, V], logits of the same tokens fed as one block of each width
    2..steps {width: [B, width, V]}) after a ragged batch's prefill, greedy continuations."""
    cfg = model.cfg
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    # the weights as an argument (as constants every program would hold its own copy), packed once as an engine does
    params = pack_projections(model.params) if cfg.matmul_impl == "cpu" else model.params
    forward_fn = jax.jit(lambda params, t, pos, cache: forward(params, t, pos, cache, cfg))

    def run(t, pos, cache):
        return forward_fn(params, t, pos, cache)

    logits, prefilled = run(jnp.asarray(tokens), jnp.tile(jnp.arange(tokens.shape[1]), (len(prompts), 1)),
                            init_cache(cfg, len(prompts), 256))
    fed = [np.asarray(jnp.argmax(logits[np.arange(len(prompts)), lengths - 1], -1))]
    one_by_one, cache = [], prefilled
    for j in range(steps):
        step_logits, cache = run(jnp.asarray(fed[-1])[:, None], jnp.asarray(lengths + j)[:, None], cache)
        one_by_one.append(np.asarray(step_logits[:, 0]))
        fed.append(one_by_one[-1].argmax(-1))
    block = np.stack(fed[:steps], 1)
    return one_by_one, {w: np.asarray(run(jnp.asarray(block[:, :w]), jnp.asarray(lengths[:, None] + np.arange(w)),
                                          prefilled)[0]) for w in range(2, steps + 1)}


def _assert_bit_identical(one_by_one, blocks):
    for width, logits in blocks.items():
        for j in range(width):
            np.testing.assert_array_equal(logits[:, j], one_by_one[j], err_msg=f"width {width}, token {j}")


def test_a_verification_block_gives_one_token_steps_logits_with_the_cpu_kernels():
    model = with_kernels(tiny_model("tiny-gqa"), "cpu")
    prompts = random_prompts(np.random.default_rng(3), [5, 12, 8, 3], model.cfg.vocab_size)
    _assert_bit_identical(*_blocks_against_steps(model, prompts, 5))


@pytest.mark.real_model
def test_a_batch_4_verification_block_gives_one_token_steps_logits_on_the_real_model(real_model):
    """A batch of 4 feeding 2-5 tokens a row (8-20 rows of every product and norm) against 4-row one-token steps;
    before `row_sum` the logits differed by up to 1e-4 here."""
    model = with_kernels(real_model, "cpu")
    tok = model.tokenizer
    prompts = [tok.encode_chat(text) for text in (
        "Write a short poem about the sea.", "List three prime numbers and say why each one is prime, briefly.",
        "Explain how a bicycle gear works to a child in two sentences, with an example.", "Hi!")]
    _assert_bit_identical(*_blocks_against_steps(model, prompts, 5))


def test_a_stack_of_equally_shaped_layers_is_traced_once():
    """`run_layers` calls one nested program per layer shape (`traced_once`): an N-layer forward holds N calls that share
    one jaxpr, so building an engine traces and lowers each layer shape once (docs/engine.md)."""
    model = tiny_model("tiny-gqa", seed=1)
    cache = init_cache(model.cfg, 2, 16)
    tokens = jnp.zeros((2, 3), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t, c: forward(p, t, t, c, model.cfg))(model.params, tokens, cache)
    calls = [e.params["jaxpr"] for e in jaxpr.jaxpr.eqns if e.params.get("name") == "_keyed_block"]
    assert len(calls) == model.cfg.num_layers > 1
    assert all(c is calls[0] for c in calls)


def test_a_layer_is_traced_again_under_other_trace_settings(monkeypatch):
    """`traced_once` keeps a layer's trace per `trace_settings()` too: with a smaller attention score budget the same
    prefill is traced again, chunked (a trace kept from before would silently ignore the new budget)."""
    model = tiny_model("tiny-gqa", seed=1)
    cache = init_cache(model.cfg, 2, 32)
    tokens = jnp.zeros((2, 30), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(30), (2, 30))

    def loops() -> int:
        text = str(jax.make_jaxpr(lambda p, t, c: forward(p, t, positions, c, model.cfg))(model.params, tokens, cache))
        return text.count("while[") + text.count("scan[")

    assert loops() == 0
    monkeypatch.setattr(attention, "CPU_SCORE_BYTES", 1)  # every prefill one query at a time
    assert loops() == 1  # one nested program, now with its loop over query chunks
    monkeypatch.undo()
    assert loops() == 0
