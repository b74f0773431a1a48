"""Properties every registered method must have, checked with its random (untrained) test instance.

A method joins these tests by registering `random_instance` in eej.decoding.methods.
"""

from __future__ import annotations

import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import known_methods, random_method

from eej.testing import agreeable_model, method_and_plain, random_prompts, tiny_model

METHODS = known_methods()
MODELS = ["tiny-llama", "tiny-gqa", "tiny-moe"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_batched_equals_one_by_one(method, model_name):
    model = tiny_model(model_name, seed=4)
    strategy, method_params = random_method(model, method, seed=1)
    if not strategy.batch_invariant:
        pytest.skip(f"{method} decides per batch")
    engine = Engine(model, strategy, method_params)
    prompts = random_prompts(np.random.default_rng(5), [4, 13, 1, 7], model.cfg.vocab_size)
    batched = engine.generate(prompts, max_new_tokens=20, eos_ids=())
    for prompt, tokens in zip(prompts, batched.tokens):
        assert engine.generate([prompt], max_new_tokens=20, eos_ids=()).tokens[0] == tokens


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", MODELS)
def test_lossless_methods_match_plain_greedy(method, model_name):
    pair = method_and_plain(tiny_model(model_name, seed=6), method)
    if pair is None:
        pytest.skip(f"{method} is lossy")
    got, want = pair
    assert got == want


@pytest.mark.parametrize("method", METHODS)
def test_lossless_methods_match_plain_coupled_sampling(method):
    """Coupled sampling (the default) draws every token with its position's key, drafts included: a lossless method's
    sampled text is plain decoding's for the same seed, token for token (on a model whose drafts get accepted)."""
    sampling = SamplingConfig(temperature=0.8, top_k=40)
    pair = method_and_plain(agreeable_model("tiny-gqa", 6), method, sampling)
    if pair is None:
        pytest.skip(f"{method} is lossy")
    got, want = pair
    assert got == want
    assert want != method_and_plain(agreeable_model("tiny-gqa", 6), "plain")[1]  # sampled, not the greedy text


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.8, top_k=40)], ids=["greedy", "sampled"])
def test_a_queue_decodes_what_one_batch_decodes(method, sampling):
    """Engine.generate with a batch_size below the number of prompts (a queue: each prompt takes the first row to free
    up, and the adaptive rule weighs the batch's throughput): a lossless method's tokens are still plain decoding's,
    greedy and under coupled sampling; a batch-invariant method's are its own in one batch; any other's fill every
    prompt's budget."""
    model = agreeable_model("tiny-gqa", 6)
    strategy, method_params = random_method(model, method, seed=2)
    prompts = random_prompts(np.random.default_rng(9), [3, 11, 6, 2, 9], model.cfg.vocab_size)
    engine = Engine(model, strategy, method_params)
    queued = engine.generate(prompts, 24, sampling, seed=5, eos_ids=(), batch_size=2)
    if not (strategy.lossless or strategy.batch_invariant) or (not strategy.lossless and not sampling.greedy):
        assert [len(t) for t in queued.tokens] == [24] * 5  # its tokens depend on its batch, or on its draws
        return
    want = Engine(model) if strategy.lossless else engine
    assert queued.tokens == want.generate(prompts, 24, sampling, seed=5, eos_ids=()).tokens


@pytest.mark.parametrize("method", [m for m in METHODS if m != "plain"])
def test_conditionals_compiled_either_way_decode_alike(method, monkeypatch):
    """eej.model.control's two implementations (in-place loops, lax.cond/switch), the second with an adaptive step
    branching once between speculating and a step with nothing to draft (as on a GPU), give the same tokens.
    Sampled: the draws go through the same conditionals as greedy decoding; a mismatch in any branch changes them."""
    model = tiny_model("tiny-gqa", seed=10)
    strategy, method_params = random_method(model, method, seed=2)
    prompts = random_prompts(np.random.default_rng(11), [6, 3], model.cfg.vocab_size)
    runs = {}
    for way, whole_step in (("loops", "0"), ("lax", "1")):  # this CPU's defaults; those of a GPU
        monkeypatch.setenv("EEJ_CONDITIONALS", way)
        monkeypatch.setenv("EEJ_BRANCH_STEP", whole_step)
        engine = Engine(model, strategy, method_params)
        runs[way] = engine.generate(prompts, max_new_tokens=16, eos_ids=(), sampling=SamplingConfig(temperature=0.8), seed=3).tokens
    assert runs["lax"] == runs["loops"]


@pytest.mark.parametrize("method", METHODS)
def test_outputs_respect_budget_and_eos(method):
    model = tiny_model("tiny-gqa", seed=8)
    strategy, method_params = random_method(model, method, seed=3)
    engine = Engine(model, strategy, method_params)
    # one row: EOS must only truncate (with several rows a batch-level method may react to a row ending)
    prompts = random_prompts(np.random.default_rng(9), [5] if not strategy.batch_invariant else [5, 8], model.cfg.vocab_size)
    free = engine.generate(prompts, max_new_tokens=15, eos_ids=(), sampling=SamplingConfig()).tokens
    assert all(len(t) == 15 for t in free)
    eos = free[0][3]
    cut = engine.generate(prompts, max_new_tokens=15, eos_ids=(eos,)).tokens
    for full, got in zip(free, cut):
        assert got == (full[: full.index(eos) + 1] if eos in full else full)
