"""Kangaroo: lossless greedy and sampling, per-row drafting, cache rollback, settings and artifacts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eej.cli import main as cli_main
from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.strategy import StepInputs
from eej.decoding.kangaroo import Kangaroo, KangarooSettings, load_kangaroo, random_kangaroo
from eej.decoding.methods import MethodError, build_method
from eej.decoding.sampling import token_keys
from eej.decoding.speculation import adapter_forward, draft_loop, init_adapter
from eej.model.cache import init_cache
from eej.model.transformer import embed, forward, run_layers
from eej.weights.artifacts import ArtifactError, save_artifact
from eej.train.data import token_ranking
from eej.weights.registry import Model

from eej.testing import (agreeable_model, chi_square_p_value, cost_profile, exact_distribution, first_tokens, random_prompts,
                         tiny_model)


def kangaroo_for(model: Model, seed: int, reduced: bool = True, adapter_scale: float | None = None, **fields):
    """An untrained Kangaroo; `reduced`: half-vocabulary draft head; `adapter_scale`: a near-identity
    adapter with this weight scale (its draft is then close to the logit lens at the exit layer)."""
    strategy, method_params = random_kangaroo(model, seed, **fields)
    if not reduced:
        method_params = {"adapter": method_params["adapter"]}
    if adapter_scale is not None:
        adapter = init_adapter(model.cfg, seed, adapter_scale, norm=np.asarray(model.params["final_norm"]))
        method_params = {**method_params, "adapter": jax.tree.map(jnp.asarray, adapter)}
    return strategy, method_params


# ----------------------------------------------------------------------------- lossless greedy


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["tiny-llama", "tiny-gqa", "tiny-qwen2", "tiny-mistral", "tiny-moe"]),
    agreeable=st.booleans(),
    exit_layer=st.integers(0, 5),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    steps=st.integers(1, 6),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    reduced=st.booleans(),
    seed=st.integers(0, 1000),
    adaptive=st.sampled_from([False, 0.0, 0.3, 3.0]),  # fixed K, or step costs 1 + slope k: draft K, some k, mostly 0
    temperature=st.sampled_from([0.0, 0.9]),
)
def test_greedy_and_coupled_sampling_are_token_identical_to_plain(name, agreeable, exit_layer, threshold, steps, lengths,
                                                                   reduced, seed, adaptive, temperature):
    model = (agreeable_model if agreeable else tiny_model)(name, seed % 7)
    exit_layer = exit_layer % model.cfg.num_layers
    strategy, method_params = kangaroo_for(
        model, seed, reduced, 0.01 if agreeable else None, exit_layer=exit_layer, exit_threshold=threshold, max_draft_steps=steps,
        **cost_profile(adaptive, steps),
    )
    prompts = random_prompts(np.random.default_rng(seed), lengths, model.cfg.vocab_size)
    sampling = SamplingConfig(temperature=temperature)  # sampled: coupled draws, the default
    want = Engine(model).generate(prompts, max_new_tokens=21, eos_ids=(), sampling=sampling, seed=seed).tokens
    got = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=21, eos_ids=(), sampling=sampling,
                                                          seed=seed).tokens
    assert got == want


def test_drafts_get_accepted_on_an_agreeable_model():
    """The identity tests above must see multi-token steps, not only rejections."""
    model = agreeable_model("tiny-gqa", 1)
    strategy, method_params = kangaroo_for(model, 0, False, 0.01, exit_layer=3, exit_threshold=0.0, max_draft_steps=5)
    prompts = random_prompts(np.random.default_rng(2), [5, 12, 3], model.cfg.vocab_size)
    out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=40, eos_ids=())
    assert out.tokens == Engine(model).generate(prompts, max_new_tokens=40, eos_ids=()).tokens
    assert sum(out.new_tokens) / sum(out.forwards) > 1.5


def test_stream_equals_generate():
    model = agreeable_model("tiny-llama", 2)
    strategy, method_params = kangaroo_for(model, 1, False, 0.01, exit_layer=2, exit_threshold=0.1)
    engine = Engine(model, strategy, method_params)
    prompts = random_prompts(np.random.default_rng(3), [4, 9], model.cfg.vocab_size)
    stream = engine.stream(prompts, max_new_tokens=17, eos_ids=())
    pieces = list(stream)
    streamed = [sum((p[b] for p in pieces), []) for b in range(2)]
    assert streamed == engine.generate(prompts, max_new_tokens=17, eos_ids=()).tokens == stream.output.tokens


# ----------------------------------------------------------------------------- per-row drafting


def test_draft_loop_stops_each_row_on_its_own():
    """Row b's draft confidences fall below the threshold at a row-specific step."""
    vocab, k = 5, 6
    stop_after = jnp.asarray([1, 3, 6, 2])  # drafts each row makes

    def draft_fn(carry, token, i):
        confident = i + 1 < stop_after  # the (i+1)-th draft is the last one when this is False
        logits = jnp.where(confident[:, None], jnp.asarray([9.0, 0, 0, 0, 0]), jnp.zeros((vocab,)))
        return carry + 1, logits

    calls, result = draft_loop(draft_fn, jnp.zeros((), jnp.int32), jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(0),
                               SamplingConfig(), max_steps=k, exit_threshold=0.5, vocab_size=vocab)
    np.testing.assert_array_equal(result.num_drafted, [1, 3, 6, 2])
    assert int(result.steps) == int(calls) == 6


def test_a_gated_draft_loop_lets_the_first_drafts_decide_how_many_follow():
    """`then` sees which first drafts reached the threshold and answers how many drafts to make: 0 drops them."""
    vocab, k = 5, 6
    stop_after = jnp.asarray([1, 3, 6, 2])  # rows 1-3's first drafts are confident, row 0's is not

    def draft_fn(carry, token, i):
        confident = i + 1 < stop_after
        return carry + 1, jnp.where(confident[:, None], jnp.asarray([9.0, 0, 0, 0, 0]), jnp.zeros((vocab,)))

    seen = []

    def then(answer):
        def decide(confident):
            seen.append(confident)
            return jnp.asarray(answer, jnp.int32)
        return decide

    pending, key = jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(0)
    calls, four = draft_loop(draft_fn, jnp.zeros((), jnp.int32), pending, key, SamplingConfig(), max_steps=k,
                             exit_threshold=0.5, vocab_size=vocab, then=then(4))
    np.testing.assert_array_equal(four.confident, [False, True, True, True])
    np.testing.assert_array_equal(four.num_drafted, [1, 3, 4, 2])  # the confidence stop still ends each row
    assert int(four.steps) == int(calls) == 4 and int(four.asked) == 4 and not bool(four.dropped)
    calls, none = draft_loop(draft_fn, jnp.zeros((), jnp.int32), pending, key, SamplingConfig(), max_steps=k,
                             exit_threshold=0.5, vocab_size=vocab, then=then(0))
    np.testing.assert_array_equal(none.num_drafted, [0, 0, 0, 0])
    assert int(calls) == 1 and int(none.steps) == 0 and int(none.asked) == 0 and bool(none.dropped)
    np.testing.assert_allclose(none.first_logits[1], [9.0, 0, 0, 0, 0])  # the dropped drafts' logits: a probe's guess
    # a finished row (asked for no drafts) makes none and counts as not confident
    _, finished = draft_loop(draft_fn, jnp.zeros((), jnp.int32), pending, key, SamplingConfig(), max_steps=k,
                             exit_threshold=0.5, vocab_size=vocab, num_steps=jnp.asarray([2, 2, 0, 2]), then=then(3))
    np.testing.assert_array_equal(finished.confident, [False, True, False, True])
    np.testing.assert_array_equal(finished.num_drafted, [1, 3, 0, 2])


def test_reduced_vocabulary_drafts_map_to_token_ids():
    ids = jnp.asarray([7, 3, 11], jnp.int32)

    def draft_fn(carry, token, i):
        return carry, jnp.asarray([[0.0, 5.0, 0.0]])

    _, greedy = draft_loop(draft_fn, (), jnp.zeros((1,), jnp.int32), jax.random.PRNGKey(0), SamplingConfig(),
                           max_steps=2, exit_threshold=0.0, vocab_size=12, vocab_ids=ids)
    assert greedy.tokens.tolist() == [[3, 3]]
    _, sampled = draft_loop(draft_fn, (), jnp.zeros((1,), jnp.int32), jax.random.PRNGKey(0),
                            SamplingConfig(temperature=1.0, coupled=False), max_steps=2, exit_threshold=0.0, vocab_size=12,
                            vocab_ids=ids)
    probs = np.asarray(sampled.probs[0, 0])
    assert probs.shape == (12,) and abs(probs.sum() - 1) < 1e-5
    assert set(np.nonzero(probs)[0]) == {3, 7, 11}
    assert set(np.asarray(sampled.tokens).ravel()) <= {3, 7, 11}
    keys = token_keys(jnp.arange(64, dtype=jnp.uint32), jnp.zeros((64, 2), jnp.int32))  # 64 rows' keys
    _, coupled = draft_loop(lambda c, t, i: (c, jnp.zeros((64, 3))), (),  # uniform over the three ids
                            jnp.zeros((64,), jnp.int32), jax.random.PRNGKey(0), SamplingConfig(temperature=1.0),
                            max_steps=2, exit_threshold=0.0, vocab_size=12, vocab_ids=ids, keys=keys)
    assert coupled.probs is None and set(np.asarray(coupled.tokens).ravel()) == {3, 7, 11}


# ----------------------------------------------------------------------------- lossless sampling


@pytest.mark.parametrize(
    "sampling,agreeable",
    [(SamplingConfig(temperature=1.0), False), (SamplingConfig(temperature=0.7, top_k=4, top_p=0.9), True),
     (SamplingConfig(temperature=1.0, coupled=False), False),
     (SamplingConfig(temperature=0.7, top_k=4, top_p=0.9, coupled=False), True)],
)
def test_sampling_is_lossless(sampling, agreeable):
    """The first three new tokens under Kangaroo sampling follow plain sampling's exact distribution.

    Tokens 2 and 3 come from one speculative step (coupled: drafts accepted where they equal the target's own draw;
    residual: accepted with min(1, p/q) or resampled).
    The model's head is scaled down so that the distribution spreads over many sequences. Pearson's
    test at p > 1e-4 with 4000 samples and a fixed seed (deterministic); the same test rejects plain
    sampling at a slightly different temperature, so it has the power to catch a wrong rule.
    """
    vocab, n_tokens, n_samples = 6, 3, 4000
    model = (agreeable_model if agreeable else tiny_model)("tiny-llama", 3, vocab_size=vocab)
    model = dataclasses.replace(model, params={**model.params, "lm_head": model.params["lm_head"] * 0.2})
    strategy, method_params = kangaroo_for(model, 5, True, 0.01 if agreeable else None, exit_layer=1, exit_threshold=0.0, max_draft_steps=3)
    assert method_params["draft_ids"].shape[0] == vocab // 2  # q is zero on half the vocabulary
    prompt = [3, 5, 1, 4]
    exact = exact_distribution(model, prompt, n_tokens, sampling)
    assert sum(p * n_samples >= 5 for p in exact.values()) >= 30  # a spread-out distribution
    counts, out = first_tokens(Engine(model, strategy, method_params), prompt, n_samples, n_tokens, sampling)
    assert chi_square_p_value(counts, exact, n_samples) > 1e-4
    # some steps committed several tokens: the acceptance path was exercised, not only the resampling one
    assert sum(out.forwards) < n_samples * n_tokens
    hotter = dataclasses.replace(sampling, temperature=sampling.temperature * 1.25)
    wrong, _ = first_tokens(Engine(model), prompt, n_samples, n_tokens, hotter)
    assert chi_square_p_value(wrong, exact, n_samples) < 1e-4


# ----------------------------------------------------------------------------- cache rollback


@pytest.mark.parametrize("name,exit_layer", [("tiny-gqa", 2), ("tiny-llama", 0), ("tiny-mistral", 3)])
def test_rollback_leaves_caches_as_if_only_committed_tokens_were_processed(name, exit_layer):
    model = agreeable_model(name, 4)
    cfg = model.cfg
    strategy, method_params = kangaroo_for(model, 2, False, 0.01, exit_layer=exit_layer, exit_threshold=0.0, max_draft_steps=4)
    prompts = random_prompts(np.random.default_rng(8), [6, 11, 3], cfg.vocab_size)
    batch, width, capacity = len(prompts), 16, 48
    tokens = np.zeros((batch, width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @jax.jit
    def prefill_and_steps(params, method_params, tokens, lens):
        cache = init_cache(cfg, batch, capacity)
        logits, cache, state = strategy.prefill(params, method_params, tokens, lens, cache, cfg)
        pending = jnp.argmax(logits, -1).astype(jnp.int32)
        committed = []
        for _ in range(2):
            result = strategy.step(StepInputs(params=params, method_params=method_params, cache=cache, method_state=state, pending=pending,
                                              key=jax.random.PRNGKey(0), active=jnp.ones((batch,), bool), sampling=SamplingConfig(), cfg=cfg))
            cache, state = result.cache, result.method_state
            pending = jnp.take_along_axis(result.tokens, (result.counts - 1)[:, None], axis=1)[:, 0]
            committed.append((result.tokens, result.counts))
        return pending, cache, state["drafter"], committed

    pending, cache, adapter_cache, committed = prefill_and_steps(model.params, method_params, jnp.asarray(tokens), lens)
    assert any(int(c.max()) > 1 for _, c in committed)  # drafts were accepted, so drafted KV was kept
    # The sequences the caches should hold: prompt, first token, then each step's committed tokens minus the newest.
    first = jnp.argmax(forward(model.params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(width), (batch, width)),
                               init_cache(cfg, batch, width), cfg)[0], -1)
    for b, p in enumerate(prompts):
        seq = list(p) + [int(first[b, len(p) - 1])]
        for toks, counts in committed:
            seq += np.asarray(toks[b, : counts[b]]).tolist()
        assert seq[-1] == int(pending[b])
        held = seq[:-1]
        n = len(held)
        assert int(cache.lengths[b]) == int(adapter_cache.lengths[b]) == n
        ids = jnp.asarray([held])
        positions = jnp.arange(n)[None]
        ref_cache = init_cache(cfg, 1, n)
        hidden, ref_cache = run_layers(model.params, embed(model.params, ids, cfg), ref_cache, positions, cfg, 0, exit_layer)
        _, ref_adapter = adapter_forward(method_params["adapter"], hidden, init_cache(cfg, 1, n, num_layers=1), positions, cfg)
        _, ref_cache = run_layers(model.params, hidden, ref_cache, positions, cfg, exit_layer)
        for layer in range(cfg.num_layers):
            np.testing.assert_allclose(cache.k[layer][b, :, :n], ref_cache.k[layer][0], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(cache.v[layer][b, :, :n], ref_cache.v[layer][0], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(adapter_cache.k[0][b, :, :n], ref_adapter.k[0][0], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(adapter_cache.v[0][b, :, :n], ref_adapter.v[0][0], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- settings, artifacts, errors


def test_bad_settings_are_clear_errors():
    model = tiny_model("tiny-gqa", 0)
    n = model.cfg.num_layers
    _, method_params = random_kangaroo(model, 0)
    with pytest.raises(ValueError, match="exit_layer 6 must be below the model's 6 layers"):
        Engine(model, Kangaroo(exit_layer=n), method_params)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"exit_threshold must be in \[0, 1\]"):
            Kangaroo(exit_threshold=bad)
    with pytest.raises(ValueError, match="max_draft_steps must be an integer >= 1"):
        Kangaroo(max_draft_steps=0)
    with pytest.raises(ValueError, match="exit_layer must be an integer >= 0"):
        Kangaroo(exit_layer=-1)
    with pytest.raises(ValueError, match="needs method_params"):
        Engine(model, Kangaroo(), None)
    other = random_kangaroo(tiny_model("tiny-llama", 0), 0)[1]
    with pytest.raises(ValueError, match=r"adapter wq has shape \(64, 64\), the model needs \(64, 96\)"):
        Engine(model, Kangaroo(exit_layer=1), other)


def _save_adapter(path, model: Model, exit_layer: int):
    adapter = init_adapter(model.cfg, 0, norm=np.asarray(model.params["final_norm"]))
    ranking = np.arange(model.cfg.vocab_size - 1, -1, -1, dtype=np.int32)
    save_artifact(str(path), {"adapter": adapter, "vocab_rank": ranking}, "kangaroo", model.cfg,
                  settings={"exit_layer": exit_layer, "draft_vocab": 0}, reproduce="test")


def test_artifacts_load_and_mismatches_are_clear_errors(tmp_path):
    model = tiny_model("tiny-gqa", 0)
    path = tmp_path / "adapter.npz"
    _save_adapter(path, model, exit_layer=2)
    strategy, method_params = load_kangaroo(model, KangarooSettings(str(path), exit_layer=2, draft_vocab_size=100))
    assert strategy == Kangaroo(2, 0.6, 6) and method_params["draft_head"].shape == (64, 100)
    assert method_params["draft_ids"].tolist()[:2] == [258, 257]
    with pytest.raises(MethodError, match="trained for exit_layer 2"):
        load_kangaroo(model, KangarooSettings(str(path), exit_layer=3))
    with pytest.raises(MethodError, match="exceeds the 259 ranked tokens"):
        load_kangaroo(model, KangarooSettings(str(path), exit_layer=2, draft_vocab_size=300))
    with pytest.raises(ArtifactError, match="trained for model 'tiny-gqa'"):
        load_kangaroo(tiny_model("tiny-llama", 0), KangarooSettings(str(path), exit_layer=2))
    with pytest.raises(ArtifactError, match="not found"):
        load_kangaroo(model, KangarooSettings(str(tmp_path / "missing.npz"), exit_layer=2))


def test_method_spec_from_a_settings_file_and_cli_errors(tmp_path, capsys):
    model = tiny_model("tiny-gqa", 0)
    _save_adapter(tmp_path / "a.npz", model, exit_layer=1)
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps({"adapter": str(tmp_path / "a.npz"), "exit_layer": 1, "max_draft_steps": 3, "draft_vocab_size": 64}))
    strategy, _ = build_method(model, f"kangaroo:{good}")
    assert strategy.max_draft_steps == 3 and strategy.max_step_tokens == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"adapter": str(tmp_path / "a.npz"), "exit_layer": 1, "exit_threshold": 2.0}))
    code = cli_main(["generate", "--model", "tiny-gqa", "--method", f"kangaroo:{bad}", "--prompt", "hi", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "exit_threshold must be in [0, 1]" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text(json.dumps({"adapter": "x.npz", "exit_layer": 1, "treshold": 0.5}))
    code = cli_main(["generate", "--model", "tiny-gqa", "--method", f"kangaroo:{typo}", "--prompt", "hi"])
    assert code == 2 and "unknown key(s) treshold" in capsys.readouterr().err


def test_token_ranking_orders_by_frequency_with_eos_first():
    tokens = np.asarray([[5, 5, 5, 9, 9, 1, 7], [7, 7, 7, 7, 0, 0, 0]])
    mask = np.asarray([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], np.float32)
    assert token_ranking(tokens, mask, always=(2,)).tolist() == [2, 7, 5, 9, 1]


def _counting_chat(tmp_path):
    """A chat JSONL of 12 "count to i" prompts and their answers, for the training tests."""
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"count to {i}", "response": " ".join(str(j) for j in range(i))})
                              for i in range(2, 14)))
    return data


def test_tempered_teacher_distribution():
    """p_τ ∝ p^(1/τ): exactly softmax(log p / τ) when the draft vocabulary holds all of p's mass; with mass
    outside it, that mass takes its share of the normaliser (p_τ sums to 1 minus the outside token's part);
    τ = 1 leaves p as it is."""
    from eej.train.kangaroo import tempered

    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 12)) * 3
    whole = jax.nn.log_softmax(logits, axis=-1)
    for tau in (0.5, 0.7, 1.5):
        np.testing.assert_allclose(tempered(whole, tau), jax.nn.softmax(logits / tau, axis=-1), rtol=1e-5, atol=1e-6)
    part = whole[:, :8]  # 4 of 12 tokens outside the draft vocabulary
    outside = 1 - jnp.exp(part).sum(-1)
    got = tempered(part, 0.7)
    want = jnp.exp(part / 0.7) / (jnp.exp(part / 0.7).sum(-1) + outside ** (1 / 0.7))[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.all(np.asarray(got.sum(-1)) < 1)
    np.testing.assert_array_equal(tempered(part, 1.0), jnp.exp(part))


def test_train_objectives_and_loss_temperature(tmp_path, capsys):
    """--objective tvd trains on the rejection probability (its held-out loss is 1 - its acceptance) and
    --loss-temperature reaches the loss; a temperature of 0 is a one-line error."""
    from eej.weights.artifacts import load_artifact

    data = _counting_chat(tmp_path)
    argv = ["train", "kangaroo", "--model", "tiny-gqa", "--data", str(data), "--exit-layer", "1", "--steps", "3",
            "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--positions", "16", "--eval-fraction", "0.2",
            "--no-progress", "--teacher-cache", str(tmp_path / "teacher")]
    held = {}
    for objective, tau in (("kl", "1.0"), ("kl", "0.7"), ("tvd", "0.7")):
        out = tmp_path / f"{objective}{tau}"
        assert cli_main([*argv, "--out", str(out), "--objective", objective, "--loss-temperature", tau]) == 0
        _, header = load_artifact(str(out / "kangaroo.npz"), "kangaroo")
        words = header["reproduce"].split()
        assert words[words.index("--objective") + 1] == objective
        assert float(words[words.index("--loss-temperature") + 1]) == float(tau)
        held[objective, tau] = header["held_out"]
    assert held["tvd", "0.7"]["loss"] == pytest.approx(1 - held["tvd", "0.7"]["accept"], abs=1e-5)
    assert held["kl", "0.7"]["accept"] != held["kl", "1.0"]["accept"]
    capsys.readouterr()
    assert cli_main([*argv, "--out", str(tmp_path / "bad"), "--loss-temperature", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eej: error: ") and "loss_temperature must be above 0" in err[-1]


def test_train_command_end_to_end_stop_at_and_resume(tmp_path, capsys):
    """`eej train kangaroo` on a tiny registry model: a shortened run (--stop-at) writes an artifact that
    loads for decoding; continuing the same run to --steps changes it; the reproduce line starts with
    --data-command and does not repeat it."""
    from eej.weights.artifacts import load_artifact

    data = _counting_chat(tmp_path)
    out, artifact = tmp_path / "run", tmp_path / "k.npz"
    argv = ["train", "kangaroo", "--model", "tiny-gqa", "--data", str(data), "--out", str(out), "--exit-layer", "1",
            "--steps", "6", "--warmup", "2", "--batch-size", "2", "--seq-len", "32", "--positions", "16",
            "--eval-fraction", "0.2", "--no-progress", "--artifact", str(artifact), "--data-command", "make data"]
    assert cli_main([*argv, "--stop-at", "3"]) == 0
    arrays, header = load_artifact(str(artifact), "kangaroo")
    assert header["reproduce"].startswith("make data && eej train kangaroo --model tiny-gqa")
    assert "--data-command" not in header["reproduce"] and "--stop-at 3" in header["reproduce"]
    assert header["train"]["stop_at"] == 3 and set(header["held_out"]) == {"loss", "accept", "top1"}
    model = tiny_model("tiny-gqa", 0)
    strategy, _ = load_kangaroo(model, KangarooSettings(str(artifact), exit_layer=1, draft_vocab_size=len(arrays["vocab_rank"])))
    assert strategy.exit_layer == 1
    # the same --out with other settings, or with other data of the same line count, is refused (one line, exit 2)
    capsys.readouterr()
    code = cli_main([*argv, "--exit-layer", "2", "--teacher-cache", str(tmp_path / "teacher2")])
    err = capsys.readouterr().err.strip().splitlines()  # after the teacher pass's notes
    assert code == 2 and err[-1].startswith("eej: error: ") and "exit_layer 1 -> 2" in err[-1]
    assert "--restart" in err[-1]
    assert err[-1].count("eej: error") == 1 and not any("Traceback" in line for line in err)
    original = data.read_text()
    data.write_text(original.replace("count to", "count at"))
    code = cli_main(argv)
    assert code == 2 and "other settings (files " in capsys.readouterr().err
    data.write_text(original)
    assert cli_main(argv) == 0  # continues from step 3 to 6
    resumed, _ = load_artifact(str(artifact), "kangaroo")
    assert not np.allclose(resumed["adapter"]["wq"], arrays["adapter"]["wq"])
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()][-1] == 6
    assert "--restart" not in load_artifact(str(artifact), "kangaroo")[1]["reproduce"]
    assert cli_main([*argv, "--exit-layer", "2", "--restart"]) == 0  # discards the run; the teacher cache is kept
    assert load_artifact(str(artifact), "kangaroo")[1]["settings"]["exit_layer"] == 2
