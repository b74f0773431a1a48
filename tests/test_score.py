"""`Engine.score`: teacher-forced log-probabilities of references under each method's own compute path."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.decoding.engine import Engine, ScoringError
from eej.decoding.kangaroo import random_kangaroo
from eej.decoding.m2r2 import random_exit
from eej.decoding.skipdecode import SkipDecode, SkipSchedule
from eej.decoding.specee import random_specee
from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.model.cache import init_cache
from eej.model.transformer import embed, forward, logits_from_hidden, run_layers
from eej.testing import random_prompts, tiny_model


def full_forward_logprobs(model, prompt: list[int], reference: list[int]) -> np.ndarray:
    """Independent: one forward of the whole model over prompt + reference, log-softmax at each reference token."""
    seq = jnp.asarray([prompt + reference], jnp.int32)
    positions = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
    logits, _ = forward(model.params, seq, positions, init_cache(model.cfg, 1, seq.shape[1]), model.cfg)
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
    p = len(prompt)
    return np.asarray([logp[p - 1 + i, t] for i, t in enumerate(reference)])


def test_plain_score_equals_one_full_forward_and_ragged_batches_equal_rows_alone():
    model = tiny_model("tiny-gqa", seed=1)
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, [5, 11, 2], model.cfg.vocab_size)
    refs = random_prompts(rng, [7, 3, 0], model.cfg.vocab_size)
    engine = Engine(model)
    out = engine.score(prompts, refs)
    assert out.strategy == "plain" and out.tokens == [7, 3, 0]
    for prompt, ref, got in zip(prompts, refs, out.logprobs):
        np.testing.assert_allclose(got, full_forward_logprobs(model, prompt, ref), rtol=1e-4, atol=1e-5)
        alone = engine.score([prompt], [ref], max_new_tokens=8)
        np.testing.assert_allclose(alone.logprobs[0], got, rtol=1e-5, atol=1e-6)
    total = sum(out.nll) / sum(out.tokens)
    assert out.perplexity == pytest.approx(np.exp(total))


def test_skipdecode_scores_by_its_schedule_of_answer_positions():
    model = tiny_model("tiny-llama", seed=2)
    cfg = model.cfg
    strategy = SkipDecode(SkipSchedule(1, (4, 3, 2)))
    rng = np.random.default_rng(1)
    prompt, ref = random_prompts(rng, [6, 5], cfg.vocab_size)
    got = Engine(model, strategy).score([prompt], [ref]).logprobs[0]
    # By hand: full-depth prompt scores token 0; reference token i - 1 runs n(i - 1) layers and scores token i.
    cache = init_cache(cfg, 1, 32)
    tokens, lens = jnp.asarray([prompt]), jnp.asarray([len(prompt)])
    logits, cache, _ = strategy.prefill(model.params, None, tokens, lens, cache, cfg)
    want = [jax.nn.log_softmax(logits[0])[ref[0]]]
    for t in range(len(ref) - 1):
        logits, cache, n = strategy.decode_logits(model.params, None, cache, jnp.int32(t), jnp.asarray([ref[t]]), cfg)
        assert int(n) == strategy.schedule.layers_at(t)
        cache = cache.with_lengths(cache.lengths + 1)
        want.append(jax.nn.log_softmax(logits[0])[ref[t + 1]])
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    plain = full_forward_logprobs(model, prompt, ref)
    assert got[0] == pytest.approx(plain[0], rel=1e-4)  # the prompt runs at full depth
    assert not np.allclose(got[1:], plain[1:], rtol=1e-3)  # the skipped layers change the rest


@pytest.mark.parametrize("method", ["skipdecode", "specee", "m2r2-exit"])
def test_teacher_forcing_a_methods_own_greedy_answer_chooses_it_at_every_position(method):
    """The logits a step returns are the ones it decides by: forced along its own greedy answer, the method's
    choice at every position is the token it generated there (exits and all)."""
    model = tiny_model("tiny-llama", seed=3)
    if method == "skipdecode":
        strategy, method_params = SkipDecode(SkipSchedule.linear(1, 4, 2, horizon=6)), None
    elif method == "specee":
        strategy, method_params = random_specee(model, 0)
    else:
        strategy, method_params = random_exit(model, 0, adaptive=False)  # attempts every step
    engine = Engine(model, strategy, method_params)
    prompts = random_prompts(np.random.default_rng(2), [4, 9], model.cfg.vocab_size)
    gen = engine.generate(prompts, max_new_tokens=12, eos_ids=())
    if method != "skipdecode":
        assert sum(gen.exited_steps) > 0  # the exits are exercised
    out = engine.score(prompts, gen.tokens, max_new_tokens=12)
    assert out.strategy == method and out.choices == gen.tokens
    plain = Engine(model).score(prompts, gen.tokens, max_new_tokens=12)
    assert not np.allclose(np.asarray(out.logprobs), np.asarray(plain.logprobs), rtol=1e-3)


def test_a_lossless_method_is_scored_by_plain():
    model = tiny_model("tiny-llama", seed=4)
    strategy, method_params = random_kangaroo(model, 0)
    prompts = random_prompts(np.random.default_rng(3), [5, 3], model.cfg.vocab_size)
    refs = random_prompts(np.random.default_rng(4), [4, 6], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).score(prompts, refs)
    assert out.strategy == "plain"
    assert out.logprobs == Engine(model).score(prompts, refs).logprobs


@dataclasses.dataclass(frozen=True)
class NoLogits(Strategy):
    """A lossy one-token method of one's own whose steps return no logits."""

    name: ClassVar[str] = "test-no-logits"
    lossless: ClassVar[bool] = False

    def step(self, s: StepInputs) -> StepResult:
        x, cache = run_layers(s.params, embed(s.params, s.pending[:, None], s.cfg), s.cache, s.positions, s.cfg, 0, 1)
        return StepResult.one_token(s.sample(logits_from_hidden(s.params, x[:, 0], s.cfg)), cache,
                                    s.method_state, forwards=0, layers=1)


def test_a_method_without_logits_cannot_score():
    model = tiny_model("tiny-llama")
    engine = Engine(model, NoLogits())
    assert len(engine.generate([[5, 6]], 3).tokens[0]) >= 1  # it decodes fine
    with pytest.raises(ScoringError, match=r"NoLogits.step returned no logits"):
        engine.score([[5, 6]], [[7, 8, 9]])


def test_the_bench_scores_answers_with_a_reference_and_names_a_method_that_cannot():
    from types import SimpleNamespace

    from eej.bench.metrics import AnswerRecord, reference_metrics
    from eej.bench.questions import Question, references_by_answer
    from eej.bench.runner import RunSettings
    from eej.bench.session import add_reference_perplexity, reference_tokens
    from eej.weights.registry import load_model

    model = load_model("tiny-llama")
    questions = [Question(1, "qa", ("Why?",), references=("Because it is so.",)), Question(2, "qa", ("Who?",))]
    contestants = [SimpleNamespace(name=name, kind="method", engine=Engine(model, strategy))
                   for name, strategy in (("plain", None), ("mine", NoLogits()))]
    records = [AnswerRecord(contestant=c.name, question_id=q.question_id, category="qa", turn=1,
                            prompt_tokens=model.tokenizer.encode_chat(q.turns[0]), tokens=[5], seconds=1.0)
               for c in contestants for q in questions]
    settings = RunSettings(max_new_tokens=4, batch_size=2)
    _, omitted = add_reference_perplexity(model, contestants, questions, records, settings, progress=False)
    assert list(omitted) == ["mine"] and "returned no logits" in omitted["mine"]
    ref = reference_tokens(model, "Because it is so.", 4)
    assert ref == model.tokenizer.encode("Because it is so.")[:4] and len(ref) == 4  # capped at max_new_tokens
    plain = Engine(model).score([records[0].prompt_tokens], [ref])
    assert records[0].reference_nll == pytest.approx(plain.nll[0]) and records[0].reference_tokens == 4
    assert records[1].reference_nll is None  # no reference
    refs = references_by_answer(questions)
    got = reference_metrics(records[:2], refs)
    assert (got["reference_perplexity_count"], got["reference_skipped"]) == (1, 1)
    assert got["reference_perplexity"] == pytest.approx(np.exp(plain.nll[0] / 4))
    mine = reference_metrics(records[2:], refs)
    assert (mine["reference_perplexity"], mine["reference_perplexity_count"], mine["reference_skipped"]) == (None, 0, 1)
