"""The engine on tiny random models: batching, streaming, sampling determinism, stopping."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.engine import Engine, GenerationError, length_bucket
from eej.decoding.plain import Plain

from eej.testing import random_prompts, tiny_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-mistral", "tiny-moe"])
def test_batched_equals_one_by_one_for_ragged_prompts(name):
    model = tiny_model(name)
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, [3, 17, 9, 1, 30], model.cfg.vocab_size)
    engine = Engine(model)
    batched = engine.generate(prompts, max_new_tokens=24, eos_ids=())
    for prompt, tokens in zip(prompts, batched.tokens):
        alone = engine.generate([prompt], max_new_tokens=24, eos_ids=())
        assert alone.tokens[0] == tokens
    assert all(n == 24 for n in batched.new_tokens)


def test_stream_yields_the_same_tokens_as_generate():
    model = tiny_model("tiny-gqa")
    prompts = random_prompts(np.random.default_rng(1), [5, 12], model.cfg.vocab_size)
    engine = Engine(model)
    sampling = SamplingConfig(temperature=0.8, top_k=50)
    whole = engine.generate(prompts, max_new_tokens=16, sampling=sampling, seed=3, eos_ids=())
    stream = engine.stream(prompts, max_new_tokens=16, sampling=sampling, seed=3, eos_ids=())
    pieces = [[], []]
    for step in stream:
        for row, new in enumerate(step):
            pieces[row].extend(new)
    assert pieces == whole.tokens
    assert stream.output is not None and stream.output.tokens == whole.tokens


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds():
    model = tiny_model()
    prompts = random_prompts(np.random.default_rng(2), [6, 6, 6, 6], model.cfg.vocab_size)
    engine = Engine(model)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    a = engine.generate(prompts, 20, sampling, seed=7, eos_ids=()).tokens
    b = engine.generate(prompts, 20, sampling, seed=7, eos_ids=()).tokens
    c = engine.generate(prompts, 20, sampling, seed=8, eos_ids=()).tokens
    assert a == b
    assert a != c


def test_each_row_stops_at_its_own_eos():
    model = tiny_model()
    prompts = random_prompts(np.random.default_rng(3), [4, 9, 2], model.cfg.vocab_size)
    engine = Engine(model)
    free = engine.generate(prompts, 30, eos_ids=()).tokens
    # Declare as EOS a token that row 0 produces at its 6th step; rows stop right after its first occurrence.
    eos = free[0][5]
    stopped = engine.generate(prompts, 30, eos_ids=(eos,)).tokens
    for full, cut in zip(free, stopped):
        if eos in full:
            end = full.index(eos) + 1
            assert cut == full[:end]
        else:
            assert cut == full


def test_max_new_tokens_and_the_forward_count():
    model = tiny_model()
    out = Engine(model).generate([[5, 6, 7]], max_new_tokens=9, eos_ids=())
    assert out.new_tokens == [9]
    assert out.forwards == [9]  # prefill + 8 decode steps
    assert out.layers == [8 * model.cfg.num_layers]


@dataclasses.dataclass(frozen=True)
class RemembersBudgets(Plain):
    """Plain decoding that keeps the `remaining` budget of every step it took: method state (steps, seen [B, 16])."""

    def prefill(self, params, method_params, tokens, prompt_lens, cache, cfg):
        logits, cache, _ = super().prefill(params, method_params, tokens, prompt_lens, cache, cfg)
        return logits, cache, (jnp.zeros((), jnp.int32), jnp.full((tokens.shape[0], 16), -1, jnp.int32))

    def step(self, s):
        steps, seen = s.method_state
        result = super().step(s)
        return result.replace(method_state=(steps + 1, seen.at[:, steps].set(s.remaining)))


def test_a_step_is_told_each_rows_remaining_budget():
    model = tiny_model()
    prompts = random_prompts(np.random.default_rng(3), [4, 9, 2], model.cfg.vocab_size)
    free = Engine(model).generate(prompts, 7, eos_ids=()).tokens
    eos = free[0][2]  # row 0 ends at its 3rd token; rows that produce it later end there too
    out = Engine(model, RemembersBudgets()).generate(prompts, 7, eos_ids=(eos,))
    steps, seen = out.method_state
    assert int(steps) == out.steps and out.steps == max(len(t) for t in out.tokens) - 1
    for row, tokens in zip(np.asarray(seen), out.tokens):
        # the prefill made token 1 of 7; decode step j (from 0) has 6 - j to go while the row generates
        assert row[: len(tokens) - 1].tolist() == [6 - j for j in range(len(tokens) - 1)]


def list_schedule(durations: list[int], rows: int) -> int:
    """The steps `rows` rows take for jobs of `durations` steps, each job in order taking the first row to free up."""
    free = [0] * rows
    for d in durations:
        free[free.index(min(free))] += d
    return max(free)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=40)], ids=["greedy", "sampled"])
def test_a_queue_of_prompts_decodes_what_one_batch_of_them_decodes(sampling, monkeypatch):
    """Engine.generate(..., batch_size=3) for 7 ragged prompts whose answers end at different lengths: each prompt takes
    the first row to free up (prefilled ahead of need, with its own stream of coupled draws, into the first positions of
    the row's cache when its prompts need fewer), so the tokens and every row's counts are one batch's, and the loop
    runs the steps of a list schedule — no row idles while a prompt waits."""
    model = tiny_model("tiny-gqa")
    prompts = random_prompts(np.random.default_rng(8), [3, 17, 9, 1, 30, 6, 12], model.cfg.vocab_size)
    engine = Engine(model)
    free = engine.generate(prompts, 20, sampling, seed=3, eos_ids=()).tokens
    eos = (free[0][4], free[3][9])
    whole = engine.generate(prompts, 20, sampling, seed=3, eos_ids=eos)
    capacities, prefill = [], engine._prefill  # each prefill's cache: a refill of shorter prompts gets a smaller one

    def spy(*args, **kwargs):
        out = prefill(*args, **kwargs)
        capacities.append(out[0].cache.capacity)
        return out

    monkeypatch.setattr(engine, "_prefill", spy)
    queued = engine.generate(prompts, 20, sampling, seed=3, eos_ids=eos, batch_size=3)
    monkeypatch.undo()
    assert capacities == [64, 64, 32]  # the queue's cache (30 + 20 tokens), then prompts [1, 30, 6] and [12]
    assert len({len(t) for t in whole.tokens}) > 2  # the rows free up at different steps
    assert queued.tokens == whole.tokens
    assert (queued.row_steps, queued.forwards, queued.prompt_lengths) == (whole.row_steps, whole.forwards, whole.prompt_lengths)
    assert queued.steps == list_schedule(whole.row_steps, 3) < sum(list_schedule(whole.row_steps[i : i + 3], 3)
                                                                   for i in range(0, 7, 3))
    assert engine.generate(prompts, 20, sampling, seed=3, eos_ids=eos, batch_size=7).tokens == whole.tokens


def test_a_prompt_that_ends_in_its_prefill_frees_its_row_at_once():
    model = tiny_model()
    prompts = random_prompts(np.random.default_rng(4), [5, 8, 3, 6, 2], model.cfg.vocab_size)
    engine = Engine(model)
    firsts = [t[0] for t in engine.generate(prompts, 1, eos_ids=()).tokens]
    eos = (firsts[2], firsts[3])  # prompts 2 and 3 end at their first token, while 0 or 1 still decode
    whole = engine.generate(prompts, 10, eos_ids=eos)
    queued = engine.generate(prompts, 10, eos_ids=eos, batch_size=2)
    assert queued.tokens == whole.tokens and [len(whole.tokens[i]) for i in (2, 3)] == [1, 1]
    assert queued.steps == list_schedule(whole.row_steps, 2)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    engine = Engine(model, cache_size=32)
    with pytest.raises(GenerationError, match="exceeds the cache"):
        engine.generate([[5] * 30], max_new_tokens=8)
    with pytest.raises(GenerationError, match="empty"):
        engine.generate([[]], max_new_tokens=8)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.generate([[10_000]], max_new_tokens=8)
    with pytest.raises(GenerationError, match="context"):
        Engine(model).generate([[5] * 2000], max_new_tokens=100)
    with pytest.raises(GenerationError, match="batch_size must be >= 1"):
        engine.generate([[5, 6]], max_new_tokens=8, batch_size=0)
    with pytest.raises(GenerationError, match="exceeds the cache"):  # every queued prompt is checked before any decodes
        engine.generate([[5, 6], [7], [5] * 30], max_new_tokens=8, batch_size=1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)


def test_length_buckets_bound_recompiles():
    assert [length_bucket(n) for n in (1, 16, 17, 100, 512, 513, 1100)] == [16, 16, 32, 128, 512, 1024, 1536]


def test_bfloat16_option_runs_close_to_float32():
    import jax.numpy as jnp

    from eej.model.cache import init_cache
    from eej.model.transformer import forward

    f32 = tiny_model("tiny-gqa")
    bf16 = tiny_model("tiny-gqa", dtype="bfloat16")
    assert bf16.params["layers"][0]["wq"].dtype == jnp.bfloat16
    tokens = jnp.asarray(random_prompts(np.random.default_rng(4), [12], f32.cfg.vocab_size), jnp.int32)
    positions = jnp.arange(12)[None]
    a, _ = forward(f32.params, tokens, positions, init_cache(f32.cfg, 1, 16), f32.cfg)
    b, cache = forward(bf16.params, tokens, positions, init_cache(bf16.cfg, 1, 16), bf16.cfg)
    assert cache.k[0].dtype == jnp.bfloat16 and b.dtype == jnp.float32
    scale = float(jnp.abs(a).max())
    assert float(jnp.abs(a - b).max()) < 0.05 * scale
    out = Engine(bf16).generate([tokens[0].tolist()], max_new_tokens=8, eos_ids=())
    assert out.new_tokens == [8]
