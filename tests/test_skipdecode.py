"""SkipDecode: schedule properties, training forward == incremental skip decoding, LoRA, presets, trainer."""

from __future__ import annotations

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.decoding.skipdecode import (
    IMPLEMENTATIONS,
    ScheduleError,
    SkipDecode,
    SkipDecodeSettings,
    SkipSchedule,
)
from eej.model.cache import init_cache
from eej.model.lora import PROJECTIONS, init_lora, merge_lora
from eej.model.transformer import linear, logits_from_hidden
from eej.settings import REPO_ROOT, PresetError
from eej.model.transformer import canonical_layout
from eej.train.skipdecode import distillation_loss, prompt_lengths, response_window, skip_hidden, skip_hidden_above
from eej.train.teacher import hidden_states

from eej.testing import random_prompts, tiny_model

# ----------------------------------------------------------------------------- schedule


@st.composite
def linear_schedules(draw):
    n = draw(st.integers(1, 40))
    warmup = draw(st.integers(0, n - 1))
    min_layers = draw(st.integers(warmup + 1, n))
    max_layers = draw(st.integers(min_layers, n))
    horizon = draw(st.integers(1, 300))
    return n, SkipSchedule.linear(warmup, max_layers, min_layers, horizon), horizon


@settings(max_examples=200, deadline=None)
@given(linear_schedules(), st.integers(0, 400))
def test_linear_schedule_is_monotone_bounded_and_keeps_the_kv_invariant(case, t):
    n, s, horizon = case
    s.check_model(n)
    counts = [s.layers_at(u) for u in range(t + 2)]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert s.layers_at(0) == s.max_layers and s.layers_at(horizon) == s.min_layers == s.layers_at(horizon + t)
    assert s.min_layers <= s.layers_at(t) <= s.max_layers <= n
    # the paper's formula, verbatim
    want = min(max(s.max_layers - math.floor((s.max_layers - s.min_layers) * t / horizon), s.min_layers), s.max_layers)
    assert s.layers_at(t) == want
    now, later = s.active_layers(t, n), s.active_layers(t + 1, n)
    assert len(now) == s.layers_at(t) and now[-1] == n - 1 and set(now) >= set(later)
    assert now[: s.warmup_layers] == tuple(range(s.warmup_layers))


@settings(max_examples=40, deadline=None)
@given(linear_schedules())
def test_traced_mask_equals_the_python_schedule_and_prompts_run_every_layer(case):
    n, s, horizon = case
    t = np.arange(-3, 304)  # one shape for every example: covers the prompt, the decay and the tail
    mask = np.asarray(s.active_mask(jnp.asarray(t), n))
    for row, u in zip(mask, t):
        want = range(n) if u < 0 else s.active_layers(int(u), n)
        assert np.nonzero(row)[0].tolist() == list(want)
    # KV invariant over the whole sequence: a layer a token runs was run by every earlier token
    assert np.all(mask[:-1] >= mask[1:])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=2, max_size=20))
def test_explicit_tables_must_not_increase(counts):
    increasing = any(b > a for a, b in zip(counts, counts[1:]))
    if increasing:
        with pytest.raises(ScheduleError, match="never increase"):
            SkipSchedule(0, tuple(counts))
    else:
        assert SkipSchedule(0, tuple(counts)).layer_counts == tuple(counts)


def test_invalid_schedules_give_clear_errors():
    with pytest.raises(ScheduleError, match="max_layers .* < min_layers"):
        SkipSchedule.linear(1, 4, 6, 10)
    with pytest.raises(ScheduleError, match="warmup_layers \\(4\\) must be below the smallest layer count \\(4\\)"):
        SkipSchedule.linear(4, 8, 4, 10)
    with pytest.raises(ScheduleError, match="horizon"):
        SkipSchedule.linear(1, 8, 4, 0)
    with pytest.raises(ScheduleError, match="up to 31 layers but the model has 30"):
        SkipSchedule.linear(2, 31, 10, 10).check_model(30)
    with pytest.raises(ScheduleError, match="warmup_layers must be >= 0"):
        SkipSchedule(-1, (3,))
    with pytest.raises(ScheduleError, match="either layer_counts or"):
        SkipDecodeSettings(layer_counts=(4, 3), max_layers=4).schedule()
    with pytest.raises(ScheduleError, match="needs max_layers, min_layers and horizon"):
        SkipDecodeSettings(max_layers=4).schedule()
    model = tiny_model("tiny-llama")
    with pytest.raises(ScheduleError, match="model has 4"):
        Engine(model, SkipDecode(SkipSchedule.linear(1, 6, 2, 5)))


# ----------------------------------------------------------------------------- training forward == decoding


def _lora_params(model, seed):
    lora = init_lora(jax.random.PRNGKey(seed), model.cfg, rank=2)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(lora))
    lora = {k: {**ab, "b": 0.1 * jax.random.normal(key, ab["b"].shape)} for (k, ab), key in zip(lora.items(), keys)}
    return merge_lora(model.params, lora)


def _decode_logits_teacher_forced(strategy, model, method_params, prompts, continuations):
    """Prefill + one `decode_logits` call per continuation token, as the engine's steps run them.

    Returns logits [B, G, V]: row b, step g = after feeding continuation token g (generation index g).
    """
    cfg = model.cfg
    batch, width = len(prompts), max(map(len, prompts))
    tokens = np.zeros((batch, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache = init_cache(cfg, batch, width + continuations.shape[1] + 1)
    _, cache, t = strategy.prefill(model.params, method_params, jnp.asarray(tokens), lens, cache, cfg)
    step = jax.jit(strategy.decode_logits, static_argnames="cfg")
    out = []
    for g in range(continuations.shape[1]):
        logits, cache, _ = step(model.params, method_params, cache, t, jnp.asarray(continuations[:, g]), cfg=cfg)
        cache, t = cache.with_lengths(cache.lengths + 1), t + 1
        out.append(logits)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gqa", "tiny-moe"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_training_forward_equals_incremental_skip_decoding(model_name, implementation):
    model = tiny_model(model_name, seed=3)
    n = model.cfg.num_layers
    params = _lora_params(model, seed=1)
    schedule = SkipSchedule.linear(1, n, 2, horizon=5)  # every count from n down to 2 within the sequence
    strategy = SkipDecode(schedule, implementation)
    method_params = {"layers": params["layers"]}
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, [3, 9, 5], model.cfg.vocab_size)
    steps = 9
    continuation = rng.integers(3, model.cfg.vocab_size, size=(len(prompts), steps)).astype(np.int32)
    got = _decode_logits_teacher_forced(strategy, model, method_params, prompts, continuation)

    # The same sequences, right-padded, through the training forward.
    width = max(map(len, prompts)) + steps
    seqs = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        seqs[i, : len(p) + steps] = list(p) + continuation[i].tolist()
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    hidden = skip_hidden(params, jnp.asarray(seqs), lens, schedule, model.cfg)
    want = logits_from_hidden(params, hidden, model.cfg)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want[i, len(p) : len(p) + steps]), atol=2e-4, rtol=2e-4)
    # and skipping changes the result (the test can fail): full depth differs from the skip model
    full = SkipDecode(SkipSchedule(1, (n,)), implementation)
    other = _decode_logits_teacher_forced(full, model, method_params, prompts, continuation)
    assert np.max(np.abs(np.asarray(other[:, 3:]) - np.asarray(got[:, 3:]))) > 1e-2


def test_engine_greedy_tokens_are_the_training_forwards_argmax():
    model = tiny_model("tiny-gqa", seed=5)
    params = _lora_params(model, seed=2)
    schedule = SkipSchedule.linear(2, 6, 3, horizon=6)
    prompts = random_prompts(np.random.default_rng(1), [4, 11], model.cfg.vocab_size)
    out = Engine(model, SkipDecode(schedule), {"layers": params["layers"]}).generate(prompts, max_new_tokens=12, eos_ids=())
    for prompt, tokens in zip(prompts, out.tokens):
        seq = jnp.asarray([list(prompt) + tokens], jnp.int32)
        hidden = skip_hidden(params, seq, jnp.asarray([len(prompt)]), schedule, model.cfg)
        argmax = np.asarray(jnp.argmax(logits_from_hidden(params, hidden, model.cfg), -1))[0]
        assert argmax[len(prompt) - 1 : -1].tolist() == tokens
    assert out.layers[0] == sum(schedule.layers_at(t) for t in range(11))


def test_prompt_lengths_come_from_the_assistant_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], jnp.float32)
    assert prompt_lengths(mask).tolist() == [2, 5, 0]


# ----------------------------------------------------------------------------- LoRA


def test_lora_merge_equals_unmerged_application_in_values_and_gradients():
    model = tiny_model("tiny-gqa", seed=1)
    cfg = model.cfg
    lora = init_lora(jax.random.PRNGKey(0), cfg, rank=3)
    lora = jax.tree.map(lambda a: a + 0.05, lora)  # nonzero B
    scale = 0.7
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg.ffn_size))
    layers = (0, cfg.num_layers - 1)

    def merged_outs(lora):
        merged = merge_lora(model.params, lora, scale)["layers"]
        return [linear(x[..., : merged[i][name].shape[0]], merged[i][name]) for name in PROJECTIONS for i in layers]

    def unmerged_outs(lora):
        out = []
        for name in PROJECTIONS:
            for i in layers:
                w = model.params["layers"][i][name]
                h = x[..., : w.shape[0]]
                out.append(linear(h, w) + scale * (h @ lora[name]["a"][i]) @ lora[name]["b"][i])
        return out

    for a, b in zip(merged_outs(lora), unmerged_outs(lora)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    weights = jnp.arange(1.0, 1.0 + len(PROJECTIONS) * len(layers))
    loss = lambda outs: sum(w * jnp.sum(o**2) for w, o in zip(weights, outs))  # noqa: E731
    g_merged = jax.jit(jax.grad(lambda l: loss(merged_outs(l))))(lora)
    g_unmerged = jax.jit(jax.grad(lambda l: loss(unmerged_outs(l))))(lora)
    chex.assert_trees_all_close(g_merged, g_unmerged, atol=1e-4, rtol=1e-4)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_merged))


@pytest.mark.parametrize("first_layer", [1, 2, 3])
def test_forward_from_base_states_equals_the_whole_masked_forward(first_layer):
    """Adapters on layers >= first_layer only: starting from the base model's states is exact."""
    model = tiny_model("tiny-gqa", seed=7)
    cfg = model.cfg
    schedule = SkipSchedule.linear(1, 4, 2, horizon=4)  # band starts at layer 3
    lora = init_lora(jax.random.PRNGKey(3), cfg, rank=2, num_layers=cfg.num_layers - first_layer)
    lora = jax.tree.map(lambda a: a + 0.05, lora)
    student = merge_lora(model.params, lora, first_layer=first_layer)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (2, 14)), jnp.int32)
    lens = jnp.asarray([3, 7], jnp.int32)
    want = skip_hidden(student, tokens, lens, schedule, cfg)
    states = hidden_states(model.params, tokens, cfg, (1, first_layer))
    got = skip_hidden_above(student, states, lens, schedule, cfg, first_layer)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="first_layer must be in \\[1, 3\\]"):
        skip_hidden_above(student, states, lens, schedule, cfg, 4)


def test_distillation_loss_is_zero_at_full_depth_and_positive_when_skipping():
    model = tiny_model("tiny-gqa", seed=2)
    cfg = model.cfg
    frozen = {"params": canonical_layout(model.params)}
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16)), jnp.int32)
    mask = jnp.zeros((2, 16)).at[0, 5:14].set(1.0).at[1, 9:].set(1.0)
    batch = {"tokens": tokens, "loss_mask": mask}
    common = dict(cfg=cfg, lora_scale=1.0, response_len=8)
    full = SkipSchedule(1, (cfg.num_layers,))
    lora = {"lora": init_lora(jax.random.PRNGKey(0), cfg, rank=2, num_layers=cfg.num_layers - 1)}
    loss, m = distillation_loss(lora, frozen, batch, schedule=full, first_layer=1, ce_weight=0.0, **common)
    assert abs(float(loss)) < 1e-5 and float(m["agree"]) == 1.0
    skip = SkipSchedule.linear(1, 4, 2, 3)  # band starts at layer 3
    for first in (0, 3):  # whole masked forward, and the shortcut from the base model's states
        lora = {"lora": init_lora(jax.random.PRNGKey(0), cfg, rank=2, num_layers=cfg.num_layers - first)}
        loss, m = distillation_loss(lora, frozen, batch, schedule=skip, first_layer=first, ce_weight=0.5, **common)
        assert float(m["kl"]) > 1e-3 and float(loss) == pytest.approx(float(m["kl"]) + 0.5 * float(m["ce"]), rel=1e-5)
        if first == 0:
            kl_whole = float(m["kl"])
    assert float(m["kl"]) == pytest.approx(kl_whole, rel=1e-4)  # zero-initialised adapters: the same skip model


def test_response_window_picks_positions_after_each_prompt():
    values = jnp.arange(12).reshape(2, 6)
    got = response_window(values, jnp.asarray([1, 4]), 3, offset=-1)
    assert got.tolist() == [[0, 1, 2], [9, 10, 11]]


# ----------------------------------------------------------------------------- presets, artifacts, trainer


def _presets():
    with open(f"{REPO_ROOT}/configs/smollm2-135m/skipdecode.yaml") as f:
        return yaml.safe_load(f)


def test_smollm2_presets_are_valid_and_meet_their_layer_budgets():
    data = _presets()
    n = 30
    budget_steps = data["budget_steps"]
    names = set(data["presets"])
    for k in ("2x", "3x", "4x", "5x"):
        assert {k, f"{k}-untuned"} <= names
    for name, preset in data["presets"].items():
        settings = SkipDecodeSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()})
        schedule = settings.schedule()
        schedule.check_model(n)
        factor = float(settings.budget.rstrip("x"))
        assert schedule.average_layers(budget_steps) <= n / factor, name
        assert schedule.average_layers(budget_steps) > n / factor - 1, name  # and uses the budget
        if settings.lora:  # shipped with the repository: the preset works with no set-up
            assert os.path.isfile(os.path.join(REPO_ROOT, settings.lora)), name


def _write_chat_data(tmp_path):
    rows = [{"instruction": f"Count to {i}", "input": "", "response": " ".join(str(j) for j in range(i + 3))} for i in range(6)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    return path


def test_train_cli_writes_an_artifact_that_the_method_loads(tmp_path, capsys, monkeypatch):
    from eej.cli import main
    from eej.weights.artifacts import ArtifactError

    data = _write_chat_data(tmp_path)
    settings_file = tmp_path / "sched.yaml"
    settings_file.write_text(yaml.safe_dump({"warmup_layers": 1, "max_layers": 6, "min_layers": 2, "horizon": 8}))
    out = tmp_path / "run"
    code = main([
        "train", "skipdecode", "--model", "tiny-gqa", "--budget", str(settings_file), "--data", str(data),
        "--out", str(out), "--steps", "12", "--batch-size", "2", "--seq-len", "48", "--lr", "1e-2", "--warmup", "1",
        "--rank", "2", "--no-progress",
    ])
    assert code == 0
    artifact = out / "skipdecode-sched.npz"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["kl"] < log[0]["kl"]

    model = tiny_model("tiny-gqa")  # load_model("tiny-gqa") is the same seed-0 model
    with_lora = tmp_path / "with_lora.yaml"
    with_lora.write_text(yaml.safe_dump({"warmup_layers": 1, "max_layers": 6, "min_layers": 2, "horizon": 8, "lora": str(artifact)}))
    strategy, method_params = build_method(model, f"skipdecode:{with_lora}")
    assert strategy.schedule == SkipSchedule.linear(1, 6, 2, 8)
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(method_params["layers"]), jax.tree.leaves(model.params["layers"]))]
    assert any(changed)
    Engine(model, strategy, method_params).generate([[5, 6, 7]], max_new_tokens=4)

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"warmup_layers": 1, "max_layers": 5, "min_layers": 2, "horizon": 8, "lora": str(artifact)}))
    with pytest.raises(ArtifactError, match="trained for schedule"):
        build_method(model, f"skipdecode:{other}")
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"warmup_layers": 1, "max_layers": 4, "min_layers": 2, "horizon": 8, "lora": str(artifact)}))
    with pytest.raises(ArtifactError, match="does not match"):
        build_method(tiny_model("tiny-llama"), f"skipdecode:{small}")


def test_bad_settings_name_the_problem(tmp_path):
    model = tiny_model("tiny-gqa")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"warmup_layers": 3, "max_layers": 6, "min_layers": 3, "horizon": 8}))
    with pytest.raises(PresetError, match="warmup_layers \\(3\\) must be below"):
        build_method(model, f"skipdecode:{bad}")
    bad.write_text(yaml.safe_dump({"warmup_layers": 1, "max_layers": 9, "min_layers": 3, "horizon": 8}))
    with pytest.raises(PresetError, match="model has 6"):
        build_method(model, f"skipdecode:{bad}")
    bad.write_text(yaml.safe_dump({"warmup": 1}))
    with pytest.raises(PresetError, match="unknown key.*warmup"):
        build_method(model, f"skipdecode:{bad}")


@pytest.mark.real_model
def test_real_model_presets_generate_within_their_schedule(real_model):
    prompts = [real_model.tokenizer.encode_chat(p) for p in ("Name a colour.", "What is 2+2? Answer briefly.")]
    for preset in ("2x", "3x-untuned"):
        strategy, method_params = build_method(real_model, f"skipdecode:{preset}")
        out = Engine(real_model, strategy, method_params).generate(prompts, max_new_tokens=8, eos_ids=())
        assert out.layers == [float(sum(strategy.schedule.layers_at(t) for t in range(7)))] * 2
        assert all(len(t) == 8 for t in out.tokens)
