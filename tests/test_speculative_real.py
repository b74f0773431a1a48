"""Lossless self-speculation on SmolLM2-135M with the shipped add-ons: token-identical to plain decoding,
drafts accepted (Kangaroo's adapter, M2R2's fast stream) — drafting every step as the papers do, and with
the draft length chosen each step from the measured costs (the default presets); with XLA's matmuls and attention,
and with the CPU kernels (`--matmul cpu`, `--attention cpu`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.decoding.speculation import init_adapter


def _prompts(model):
    tok = model.tokenizer
    return [
        tok.encode_chat("What is the capital of France? Answer in two sentences."),
        tok.encode_chat("Write a Python function that returns the sum of a list of numbers."),
    ]


@pytest.mark.real_model
@pytest.mark.parametrize("matmul, attention", [("xla", "xla"), ("cpu", "cpu")])  # each kernel alone: tests/test_cpu_*.py
@pytest.mark.parametrize("method", ["kangaroo:fixed", "m2r2-spec:fixed"])
def test_shipped_addons_are_lossless_and_accept_drafts(real_model, method, matmul, attention):
    # as `--matmul` and `--attention`
    model = dataclasses.replace(real_model, cfg=real_model.cfg.replace(matmul_impl=matmul, attention_impl=attention))
    strategy, method_params = build_method(model, method)  # a shipped preset, no set-up
    prompts = _prompts(model)
    plain = Engine(model).generate(prompts, max_new_tokens=40)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40)
    assert out.tokens == plain.tokens
    # the trained drafts get accepted: fewer full-model forwards than tokens
    assert sum(out.new_tokens) / sum(out.forwards) > 1.2


@pytest.mark.real_model
def test_a_step_branched_once_is_lossless_on_the_real_model(real_model, monkeypatch):
    """A GPU's default on this CPU (`EEJ_BRANCH_STEP=1`: each step one conditional between speculating and a step with
    nothing to draft), with step costs given (no calibration) under which drafting pays at the controller's prior
    acceptance (1/2) and stops paying once a draft is rejected: every generation's first step drafts, whatever the
    weights. With the shipped adapter, drafts are accepted through the branch; with an untrained one (same shapes,
    so the same compiled programs), every draft is rejected, so the controller falls back to plain steps."""
    monkeypatch.setenv("EEJ_BRANCH_STEP", "1")
    strategy, method_params = build_method(real_model, "kangaroo")
    # one draft: 1.5 expected tokens at the prior for 1.45 of a plain step; after a rejection 1.33 (module docstring)
    strategy = dataclasses.replace(strategy, step_costs=tuple(1.0 + 0.45 * k for k in range(strategy.max_draft_steps + 1)))
    prompts = _prompts(real_model)
    plain = Engine(real_model).generate(prompts, max_new_tokens=40).tokens
    untrained = {**method_params, "adapter": {
        name: jnp.asarray(value) for name, value in
        init_adapter(real_model.cfg, 0, norm=np.asarray(real_model.params["final_norm"])).items()}}
    for params in (method_params, untrained):
        out = Engine(real_model, strategy, params).generate(prompts, max_new_tokens=40)
        assert out.tokens == plain
        assert all(s > 0 for s in out.speculated_steps), out.speculated_steps
        if params is untrained:
            assert sum(out.speculated_steps) < sum(out.row_steps), (out.speculated_steps, out.row_steps)
            assert sum(out.new_tokens) < 1.1 * sum(out.forwards)  # nothing accepted but chance agreements
        else:
            assert sum(out.new_tokens) > sum(out.forwards)  # drafts accepted through the branch


@pytest.mark.real_model
def test_adaptive_m2r2_is_lossless_on_the_real_model(real_model, tmp_path, monkeypatch):
    """The default (adaptive) M2R2; the default Kangaroo's: the queue's test below."""
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))  # the step costs are measured here, on this machine
    strategy, method_params = build_method(real_model, "m2r2-spec")
    assert strategy.adaptive
    prompts = _prompts(real_model)
    out = Engine(real_model, strategy, method_params).generate(prompts, max_new_tokens=40)
    assert out.tokens == Engine(real_model).generate(prompts, max_new_tokens=40).tokens
    assert sum(out.speculated_steps) <= sum(out.row_steps)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["kangaroo:fixed", "m2r2-spec:fixed"])
def test_coupled_sampling_draws_plain_decodings_text_on_the_real_model(real_model, method):
    """At temperature 0.7 (coupled draws, the default) the shipped add-ons' drafts are accepted and the sampled text is
    plain decoding's for the same seed, token for token; another seed draws other text."""
    strategy, method_params = build_method(real_model, method)
    prompts, sampling = _prompts(real_model), SamplingConfig(temperature=0.7)
    plain = Engine(real_model).generate(prompts, max_new_tokens=40, sampling=sampling, seed=4)
    out = Engine(real_model, strategy, method_params).generate(prompts, max_new_tokens=40, sampling=sampling, seed=4)
    assert out.tokens == plain.tokens
    assert sum(out.new_tokens) / sum(out.forwards) > 1.1
    assert Engine(real_model).generate(prompts, max_new_tokens=40, sampling=sampling, seed=5).tokens != plain.tokens


@pytest.mark.real_model
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7)], ids=["greedy", "sampled"])
def test_a_queue_of_prompts_is_lossless_on_the_real_model(real_model, sampling, tmp_path, monkeypatch):
    """Three prompts queued for two rows (Engine.generate's batch_size: the third takes the first row to free up, and
    the adaptive rule weighs the batch's throughput while it waits): the shipped Kangaroo decodes plain decoding's
    tokens, greedy and under coupled sampling, and its drafts get accepted."""
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))  # the step costs are measured here, on this machine
    strategy, method_params = build_method(real_model, "kangaroo")
    prompts = _prompts(real_model) + [real_model.tokenizer.encode_chat("List three prime numbers, then explain why.")]
    plain = Engine(real_model).generate(prompts, max_new_tokens=32, sampling=sampling, seed=4)
    out = Engine(real_model, strategy, method_params).generate(prompts, max_new_tokens=32, sampling=sampling, seed=4,
                                                                batch_size=2)
    assert out.tokens == plain.tokens
    assert sum(out.new_tokens) > sum(out.forwards)  # drafts accepted
