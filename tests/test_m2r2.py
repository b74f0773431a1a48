"""M2R2: lossless self-speculation (greedy and sampling), shared-KV bookkeeping, zero adapters, the
training form of the fast stream, ARLA, early exit, settings and artifacts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.strategy import StepInputs
from eej.decoding.m2r2 import (
    M2R2Exit,
    M2R2Spec,
    arla_logits,
    fast_layers_from_lora,
    fast_trajectory,
    init_arla,
    random_method_params,
    target_depth,
)
from eej.decoding.methods import build_method
from eej.model.cache import init_cache
from eej.model.lora import init_lora
from eej.model.transformer import embed, forward
from eej.weights.artifacts import ArtifactError, save_artifact
from eej.train.m2r2 import fast_stream_teacher_forced, m2r2_loss
from eej.train.teacher import hidden_states

from eej.decoding.adaptive import TEST_STEP_COSTS
from eej.testing import (agreeable_model, chi_square_p_value, cost_profile, exact_distribution, first_tokens, plain_tokens,
                         random_prompts, tiny_model)


def spec_for(model, seed: int, adapter_scale: float = 0.5, reduced: bool = True, **fields):
    """An untrained M2R2Spec: random adapters of `adapter_scale` (0: zero adapters, the fast stream is the
    slow one, so drafts are the logit lens at layer K), half-vocabulary draft head if `reduced`."""
    fields = {"fast_layers": min(2, model.cfg.num_layers), "exit_threshold": 0.02, "max_draft_steps": 4, **fields}
    fields.setdefault("step_costs", TEST_STEP_COSTS[: fields["max_draft_steps"] + 1])
    method_params = random_method_params(model, seed, fields["fast_layers"], adapter_scale=adapter_scale, reduced=reduced)
    method_params.pop("arla")
    return M2R2Spec(**fields), method_params


# ----------------------------------------------------------------------------- lossless greedy


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-mistral", "tiny-moe"]),
    agreeable=st.booleans(),
    fast_layers=st.integers(1, 6),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    steps=st.integers(1, 6),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    reduced=st.booleans(),
    seed=st.integers(0, 1000),
    adaptive=st.sampled_from([False, 0.0, 0.3, 3.0]),  # fixed K, or step costs 1 + slope k (see eej.testing.cost_profile)
)
def test_spec_greedy_is_token_identical_to_plain(name, agreeable, fast_layers, threshold, steps, lengths, reduced, seed, adaptive):
    model = (agreeable_model if agreeable else tiny_model)(name, seed % 7)
    strategy, method_params = spec_for(
        model, seed, 0.02 if agreeable else 0.5, reduced,
        fast_layers=min(fast_layers, model.cfg.num_layers), exit_threshold=threshold, max_draft_steps=steps,
        **cost_profile(adaptive, steps),
    )
    prompts = random_prompts(np.random.default_rng(seed), lengths, model.cfg.vocab_size)
    got = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=21, eos_ids=()).tokens
    assert got == plain_tokens(model, prompts, 21)


def test_spec_drafts_get_accepted_on_an_agreeable_model():
    """The identity tests must see multi-token steps (accepted fast-stream drafts), not only rejections."""
    model = agreeable_model("tiny-gqa", 1)
    strategy, method_params = spec_for(model, 0, 0.02, False, fast_layers=4, exit_threshold=0.0, max_draft_steps=5)
    prompts = random_prompts(np.random.default_rng(2), [5, 12, 3], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40, eos_ids=())
    assert out.tokens == plain_tokens(model, prompts, 40)
    assert sum(out.new_tokens) / sum(out.forwards) > 1.5


# ----------------------------------------------------------------------------- lossless sampling


@pytest.mark.parametrize(
    "sampling,agreeable",
    [(SamplingConfig(temperature=1.0), False), (SamplingConfig(temperature=0.7, top_k=4, top_p=0.9), True),
     (SamplingConfig(temperature=0.7, top_k=4, top_p=0.9, coupled=False), True)],
)
def test_spec_sampling_is_lossless(sampling, agreeable):
    """The first three new tokens under M2R2 self-speculative sampling follow plain sampling's exact
    distribution (Pearson's test, as for Kangaroo: tokens 2-3 come from one speculative step; the same
    test rejects plain sampling at 1.25x the temperature)."""
    vocab, n_tokens, n_samples = 6, 3, 4000
    model = (agreeable_model if agreeable else tiny_model)("tiny-llama", 3, vocab_size=vocab)
    model = dataclasses.replace(model, params={**model.params, "lm_head": model.params["lm_head"] * 0.2})
    strategy, method_params = spec_for(model, 5, 0.02 if agreeable else 0.5, True, fast_layers=2, exit_threshold=0.0, max_draft_steps=3)
    assert method_params["draft_ids"].shape[0] == vocab // 2  # q is zero on half the vocabulary
    prompt = [3, 5, 1, 4]
    exact = exact_distribution(model, prompt, n_tokens, sampling)
    counts, out = first_tokens(Engine(model, strategy, method_params), prompt, n_samples, n_tokens, sampling)
    assert chi_square_p_value(counts, exact, n_samples) > 1e-4
    assert sum(out.forwards) < n_samples * n_tokens  # accepted drafts: the acceptance path ran
    hotter = dataclasses.replace(sampling, temperature=sampling.temperature * 1.25)
    wrong, _ = first_tokens(Engine(model), prompt, n_samples, n_tokens, hotter)
    assert chi_square_p_value(wrong, exact, n_samples) < 1e-4


# ----------------------------------------------------------------------------- shared KV


def _steps(strategy, method_params, model, prompts, num_steps, capacity=48):
    """Prefill + `num_steps` greedy strategy steps under one jit -> (pending, cache, committed per step)."""
    cfg = model.cfg
    batch, width = len(prompts), 16
    tokens = np.zeros((batch, width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @jax.jit
    def run(params, method_params, tokens, lens):
        cache = init_cache(cfg, batch, capacity)
        logits, cache, state = strategy.prefill(params, method_params, tokens, lens, cache, cfg)
        pending = jnp.argmax(logits, -1).astype(jnp.int32)
        committed = [pending]
        for _ in range(num_steps):
            result = strategy.step(StepInputs(params=params, method_params=method_params, cache=cache, method_state=state, pending=pending,
                                              key=jax.random.PRNGKey(0), active=jnp.ones(pending.shape, bool), sampling=SamplingConfig(), cfg=cfg))
            cache, state = result.cache, result.method_state
            pending = jnp.take_along_axis(result.tokens, (result.counts - 1)[:, None], axis=1)[:, 0]
            committed.append((result.tokens, result.counts))
        return pending, cache, committed

    return run(model.params, method_params, jnp.asarray(tokens), lens)


@pytest.mark.parametrize("name,fast_layers", [("tiny-gqa", 2), ("tiny-llama", 1), ("tiny-mistral", 4)])
def test_shared_kv_after_rollbacks_is_the_slow_streams_kv_of_committed_tokens(name, fast_layers):
    """Drafts write fast K/V into the shared cache; after verification and rollback, every layer holds
    exactly the slow stream's K/V of the committed tokens, and `lengths` counts them."""
    model = agreeable_model(name, 4)
    cfg = model.cfg
    strategy, method_params = spec_for(model, 2, 0.3, False, fast_layers=fast_layers, exit_threshold=0.0, max_draft_steps=4)
    prompts = random_prompts(np.random.default_rng(8), [6, 11, 3], cfg.vocab_size)
    pending, cache, committed = _steps(strategy, method_params, model, prompts, 3)
    assert any(int(c.max()) > 1 for _, c in committed[1:])  # accepted drafts: their KV was kept
    assert any(int(c.min()) < 5 for _, c in committed[1:])  # rejected drafts: their KV was rolled back
    for b, p in enumerate(prompts):
        seq = list(p) + [int(committed[0][b])]
        for toks, counts in committed[1:]:
            seq += np.asarray(toks[b, : counts[b]]).tolist()
        assert seq[-1] == int(pending[b])
        held = seq[:-1]
        n = len(held)
        assert int(cache.lengths[b]) == n
        _, ref = forward(model.params, jnp.asarray([held]), jnp.arange(n)[None], init_cache(cfg, 1, n), cfg)
        for layer in range(cfg.num_layers):
            np.testing.assert_allclose(cache.k[layer][b, :, :n], ref.k[layer][0], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(cache.v[layer][b, :, :n], ref.v[layer][0], atol=2e-5, rtol=1e-4)


def test_zero_adapters_make_the_fast_stream_the_slow_stream_layer_for_layer():
    model = tiny_model("tiny-gqa", 3)
    cfg = model.cfg
    k = cfg.num_layers
    lora = init_lora(jax.random.PRNGKey(0), cfg, 4, num_layers=k)  # B = 0
    method_params = {"fast_layers": fast_layers_from_lora(model.params, lora, k), "norm": model.params["final_norm"]}
    tokens = jnp.asarray(random_prompts(np.random.default_rng(1), [9, 9], cfg.vocab_size))
    positions = jnp.broadcast_to(jnp.arange(9), tokens.shape)
    slow = hidden_states(model.params, tokens, cfg, range(k + 1))
    fast, _ = fast_trajectory(model.params, method_params, embed(model.params, tokens, cfg), init_cache(cfg, 2, 9), positions, cfg)
    forced = fast_stream_teacher_forced(method_params["fast_layers"], method_params["fast_layers"], slow[0],
                                        [slow[j] for j in range(k)], positions, cfg)
    for j in range(k):
        np.testing.assert_allclose(fast[j], slow[j + 1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(forced[j], slow[j + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mistral"])
def test_training_form_equals_decoding_with_a_shared_cache(name):
    """What training computes for token t (slow K/V of earlier tokens, its own fast K/V) is what
    decoding computes for the first token of a step: the fast layers over the shared slow cache."""
    model = tiny_model(name, 5)
    cfg = model.cfg
    k, t = 3, 12
    method_params = random_method_params(model, 7, k, adapter_scale=0.5, reduced=False)
    base = tuple(model.params["layers"])[:k]
    tokens = jnp.asarray(random_prompts(np.random.default_rng(4), [t], cfg.vocab_size))
    positions = jnp.arange(t)[None]
    slow = hidden_states(model.params, tokens, cfg, range(k))
    forced = fast_stream_teacher_forced(method_params["fast_layers"], base, slow[0], [slow[j] for j in range(k)], positions, cfg)
    for pos in (0, 5, t - 1):
        _, cache = forward(model.params, tokens[:, :pos], jnp.arange(pos)[None], init_cache(cfg, 1, t), cfg) if pos else (None, init_cache(cfg, 1, t))
        states, _ = fast_trajectory(model.params, method_params, embed(model.params, tokens[:, pos : pos + 1], cfg),
                                    cache.with_lengths(jnp.asarray([pos])), jnp.asarray([[pos]]), cfg)
        for j in range(k):
            np.testing.assert_allclose(states[j][0, 0], forced[j][0, pos], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- ARLA, rate, early exit


def test_arla_is_causal_over_the_trajectory_and_target_depths_follow_the_rate():
    cfg = tiny_model("tiny-gqa", 0).cfg
    arla = jax.tree.map(jnp.asarray, init_arla(cfg, 4, dim=8, hidden=16, seed=1))
    traj = jax.random.normal(jax.random.PRNGKey(0), (3, 4, cfg.hidden_size))
    full = arla_logits(arla, traj, cfg)
    changed = arla_logits(arla, traj.at[:, 3].add(1.0), cfg)
    np.testing.assert_allclose(full[:, :3], changed[:, :3], rtol=1e-6)  # exit k reads only f_1..f_k
    assert not np.allclose(full[:, 3], changed[:, 3])
    np.testing.assert_allclose(arla_logits(arla, traj[:, :2], cfg), full[:, :2], rtol=1e-5, atol=1e-6)
    assert [target_depth(k, 5.0, 30) for k in range(1, 7)] == [5, 10, 15, 20, 25, 30]
    assert target_depth(4, 2.5, 8) == 8 and target_depth(1, 1.0, 8) == 1


def _exit_with_bias(model, bias: float, **fields):
    # attempt every step, as the method is described (adaptive attempts would depend on timings measured here)
    fields = {"fast_layers": 3, "exit_threshold": 0.5, "min_exit_layer": 2, "adaptive": False, **fields}
    method_params = random_method_params(model, 3, fields["fast_layers"], reduced=False)
    arla = dict(method_params["arla"])
    arla["w2"] = jnp.zeros_like(arla["w2"])
    arla["bias"] = jnp.full_like(arla["bias"], bias)
    return M2R2Exit(**fields), {**method_params, "arla": arla}


def test_exit_that_never_fires_is_plain_decoding_and_always_fires_at_min_exit_layer():
    model = tiny_model("tiny-gqa", 2)
    prompts = random_prompts(np.random.default_rng(3), [4, 9], model.cfg.vocab_size)
    never = Engine(model, *_exit_with_bias(model, -30.0)).generate(prompts, max_new_tokens=12, eos_ids=())
    assert never.tokens == plain_tokens(model, prompts, 12)
    assert never.row_steps == never.checked_steps == [11, 11] and never.exited_steps == [0, 0]  # each step attempts
    engine = Engine(model, *_exit_with_bias(model, 30.0))
    always = engine.generate(prompts, max_new_tokens=12, eos_ids=())
    assert all(layers == 2 * 11 for layers in always.layers)  # 11 steps after the prefill, each exits after 2 fast layers
    assert all(f == 1 for f in always.forwards)  # the prefill only
    assert always.checked_steps == always.exited_steps == [11, 11]
    queued = engine.generate(prompts, max_new_tokens=12, eos_ids=(), batch_size=1)  # a queue counts the same per prompt
    assert queued.checked_steps == queued.exited_steps == queued.row_steps == [11, 11]
    # the exit layer matters (a random model's fast states at layers 2 and 3 predict differently)
    later = Engine(model, *_exit_with_bias(model, 30.0, min_exit_layer=3)).generate(prompts, max_new_tokens=12, eos_ids=())
    assert later.tokens != always.tokens


def test_a_later_exit_generation_starts_from_the_rates_the_last_one_learnt():
    """Costs (plain 10, failed attempt 12, exit at layer K 4) under which an attempt pays at the prior's exit rate (1/2)
    and stops paying below 0.22: with an ARLA that never fires, the first generation attempts until the prior fades,
    the next one starts from the rate the first ended with and does not attempt (no probe is due within 24 tokens);
    `forget` starts afresh."""
    model = tiny_model("tiny-gqa", 2)
    n, k = model.cfg.num_layers, 3
    strategy, method_params = _exit_with_bias(model, -30.0, adaptive=True, step_costs=(10.0, 12.0, 4.0), probe_every=64)
    prompts = random_prompts(np.random.default_rng(3), [4, 9], model.cfg.vocab_size)
    engine = Engine(model, strategy, method_params)

    def attempts(out) -> int:  # a failed attempt runs the K fast layers and then every layer
        assert out.checked_steps == [(layers - n * steps) // k for layers, steps in zip(out.layers, out.row_steps)]
        return out.checked_steps[0]

    first, second = (engine.generate(prompts, max_new_tokens=24, eos_ids=()) for _ in range(2))
    assert first.tokens == second.tokens == plain_tokens(model, prompts, 24)
    assert attempts(first) >= 3 and attempts(second) == 0
    np.testing.assert_allclose(strategy.learned(strategy.start_from(second.method_state, strategy.learned(first.method_state))),
                               strategy.learned(first.method_state), rtol=1e-6)
    engine.forget()
    assert attempts(engine.generate(prompts, max_new_tokens=24, eos_ids=())) == attempts(first)


def test_exit_decisions_ignore_finished_rows():
    """A batch-level exit needs every *active* row's ARLA to agree: finished rows never block it."""
    model = tiny_model("tiny-gqa", 2)
    cfg = model.cfg
    strategy, method_params = _exit_with_bias(model, -1.0)  # p_exit = sigmoid(-1) < 0.5 for every row
    tokens = np.zeros((2, 16), np.int32)
    for b, p in enumerate(random_prompts(np.random.default_rng(3), [4, 9], cfg.vocab_size)):
        tokens[b, : len(p)] = p
    cache = init_cache(cfg, 2, 32)
    _, cache, state = strategy.prefill(model.params, method_params, jnp.asarray(tokens), jnp.asarray([4, 9]), cache, cfg)
    step = jax.jit(lambda active: strategy.step(StepInputs(params=model.params, method_params=method_params, cache=cache, method_state=state,
                                                           pending=jnp.asarray([5, 6]), key=jax.random.PRNGKey(0), active=active,
                                                           sampling=SamplingConfig(), cfg=cfg)))
    assert float(step(jnp.asarray([True, False])).layers[0]) == 3 + cfg.num_layers  # the active row does not exit
    assert float(step(jnp.asarray([False, False])).layers[0]) == 2  # finished rows do not block: exit at min_exit_layer


# ----------------------------------------------------------------------------- training loss


def test_training_loss_starts_at_the_logit_lens_and_decreases():
    """With zero adapters the K-layer draft is the logit lens at layer K; a few optimiser steps on one
    batch lower the loss (the gradients reach the adapters, the norm and ARLA)."""
    import optax

    model = tiny_model("tiny-gqa", 1)
    cfg = model.cfg
    k, b, t = 2, 2, 10
    targets = tuple(target_depth(i, 2.0, cfg.num_layers) for i in range(1, k + 1))
    tokens = jnp.asarray(random_prompts(np.random.default_rng(0), [t, t], cfg.vocab_size))
    states = hidden_states(model.params, tokens, cfg, sorted({1, *targets, cfg.num_layers}))
    logits = forward(model.params, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), init_cache(cfg, b, t), cfg)[0]
    bi, ti = np.nonzero(np.ones((b, t - 1)))
    batch = {"tokens": tokens, "real": jnp.ones((b, t)), "b": jnp.asarray(bi), "t": jnp.asarray(ti), "weight": jnp.ones(len(bi)),
             "h_final": states[cfg.num_layers][bi, ti], "lse": jax.nn.logsumexp(logits, -1)[bi, ti]}
    batch.update({f"h{d}": states[d] for d in {1, *targets}})
    frozen = {"layers": tuple(model.params["layers"])[:k], "embed": model.params["embed"], "head": model.params["lm_head"],
              "final_norm": model.params["final_norm"]}
    trainable = {"lora": init_lora(jax.random.PRNGKey(1), cfg, 4, num_layers=k), "norm": model.params["final_norm"],
                 "arla": jax.tree.map(jnp.asarray, init_arla(cfg, k, dim=8, hidden=16))}
    loss_fn = jax.jit(lambda p: m2r2_loss(p, frozen, batch, cfg=cfg, num_fast=k, targets=targets, lora_scale=1.0,
                                          align_weight=1.0, mid_weight=0.5, arla_weight=1.0))
    loss0, metrics0 = loss_fn(trainable)
    lens = jnp.argmax(forward({**model.params, "layers": tuple(model.params["layers"])[:k]}, tokens,
                              jnp.broadcast_to(jnp.arange(t), (b, t)), init_cache(cfg, b, t, num_layers=k), cfg)[0], -1)
    np.testing.assert_allclose(float(metrics0["top1"]), float(np.mean(lens[bi, ti] == jnp.argmax(logits, -1)[bi, ti])), atol=1e-6)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    grad_fn = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))
    for _ in range(30):
        grads = grad_fn(trainable)
        updates, state = opt.update(grads, state)
        trainable = optax.apply_updates(trainable, updates)
    assert float(loss_fn(trainable)[0]) < 0.8 * float(loss0)
    assert float(jnp.abs(trainable["lora"]["wq"]["b"]).max()) > 0


# ----------------------------------------------------------------------------- settings, artifacts, errors


def test_bad_settings_are_clear_errors():
    model = tiny_model("tiny-gqa", 0)
    n = model.cfg.num_layers
    _, method_params = spec_for(model, 0)
    with pytest.raises(ValueError, match=f"fast_layers {n + 1} exceeds the model's {n} layers"):
        Engine(model, M2R2Spec(fast_layers=n + 1), method_params)
    with pytest.raises(ValueError, match="settings ask for 3 fast layers, method_params hold 2"):
        Engine(model, M2R2Spec(fast_layers=3), method_params)
    with pytest.raises(ValueError, match=r"exit_threshold must be in \[0, 1\]"):
        M2R2Spec(exit_threshold=1.5)
    with pytest.raises(ValueError, match="max_draft_steps must be an integer >= 1"):
        M2R2Spec(max_draft_steps=0)
    with pytest.raises(ValueError, match=r"min_exit_layer must be an integer in \[1, fast_layers=2\]"):
        M2R2Exit(fast_layers=2, min_exit_layer=3)
    with pytest.raises(ValueError, match="needs method_params"):
        Engine(model, M2R2Spec(), None)
    with pytest.raises(ValueError, match="m2r2-exit needs method_params\\['arla'\\]"):
        Engine(model, M2R2Exit(fast_layers=2), method_params)


def _save(path, model, num_fast=2, rank=4):
    cfg = model.cfg
    lora = init_lora(jax.random.PRNGKey(0), cfg, rank, num_layers=num_fast)
    lora = jax.tree.map(lambda a: np.asarray(a) + 0.01, lora)
    arrays = {"lora": lora, "norm": np.asarray(model.params["final_norm"]), "arla": init_arla(cfg, num_fast, dim=8, hidden=16),
              "vocab_rank": np.arange(cfg.vocab_size - 1, -1, -1, dtype=np.int32)}
    save_artifact(str(path), arrays, "m2r2", cfg, settings={"fast_layers": num_fast, "rate": 2.0, "rank": rank, "lora_scale": 1.0},
                  reproduce="eej train m2r2 ...")


def test_artifacts_build_both_methods_and_mismatches_are_clear_errors(tmp_path):
    model = tiny_model("tiny-gqa", 0)
    _save(tmp_path / "m.npz", model)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({"adapter": str(tmp_path / "m.npz"), "exit_threshold": 0.0, "max_draft_steps": 3, "draft_vocab_size": 40}))
    strategy, method_params = build_method(model, f"m2r2-spec:{spec_file}")
    assert strategy.fast_layers == 2 and method_params["draft_ids"].shape == (40,)
    prompts = random_prompts(np.random.default_rng(1), [5, 8], model.cfg.vocab_size)
    assert Engine(model, strategy, method_params).generate(prompts, max_new_tokens=10, eos_ids=()).tokens == plain_tokens(model, prompts, 10)
    exit_file = tmp_path / "exit.yaml"
    exit_file.write_text(json.dumps({"adapter": str(tmp_path / "m.npz"), "exit_threshold": 0.9}))
    strategy, method_params = build_method(model, f"m2r2-exit:{exit_file}")
    assert isinstance(strategy, M2R2Exit) and len(Engine(model, strategy, method_params).generate(prompts, max_new_tokens=6).tokens) == 2
    too_big = tmp_path / "big.yaml"
    too_big.write_text(json.dumps({"adapter": str(tmp_path / "m.npz"), "draft_vocab_size": 10**6}))
    with pytest.raises(ValueError, match="draft_vocab_size 1000000 exceeds"):
        build_method(model, f"m2r2-spec:{too_big}")
    with pytest.raises(ArtifactError):
        build_method(tiny_model("tiny-llama", 0), f"m2r2-spec:{spec_file}")
