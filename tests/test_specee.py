"""SpecEE on tiny random models: features, the exit rule, the batch rule, and both KV variants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.config import SamplingConfig
from eej.decoding.adaptive import ExitEconomics
from eej.decoding.engine import Engine
from eej.decoding.sampling import sample, token_keys
from eej.decoding.strategy import StepInputs
from eej.train.specee import offline_layers, simulate_exits
from eej.decoding.specee import (GAIN_DECAY, GAIN_PRIOR_STEPS, gain_bound, random_specee, speculative_features,
                                 speculative_logits)
from eej.model.cache import init_cache
from eej.model.transformer import embed, final_norm, get_layer, logits_from_hidden, qkv, run_layers

from eej.testing import random_prompts, tiny_model, write_chat_data


def _never_firing(method_params, how: str):
    pred = dict(method_params["predictors"])
    if how == "bias":  # the predictors run but their output is ~0
        pred["b2"] = jnp.full_like(pred["b2"], -1e4)
    return {**method_params, "predictors": pred}


def test_features_match_full_vocab_computation():
    model = tiny_model("tiny-gqa", seed=1)
    params, cfg = model.params, model.cfg
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, cfg.hidden_size)), jnp.float32)
    candidates = jnp.asarray(rng.choice(cfg.vocab_size, (3, 4), replace=False), jnp.int32)
    columns = jnp.moveaxis(jnp.take(params["lm_head"], candidates, axis=1), 0, 1)
    logits = speculative_logits(final_norm(params, h, cfg), columns)
    full = logits_from_hidden(params, h, cfg)
    direct = jnp.take_along_axis(full, candidates, axis=1)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(direct), rtol=1e-5, atol=1e-5)
    last = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), axis=-1)
    features, probs = speculative_features(logits, last)
    want_probs = np.exp(np.asarray(direct) - np.asarray(direct).max(-1, keepdims=True))
    want_probs /= want_probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), want_probs, rtol=1e-5, atol=1e-6)
    want = np.concatenate([np.asarray(direct), want_probs, want_probs - np.asarray(last)], axis=-1)
    np.testing.assert_allclose(np.asarray(features), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kv, how, model_name",
    [("propagate", "bias", "tiny-gqa"), ("drop", "bias", "tiny-llama"), ("drop", "threshold", "tiny-gqa"),
     ("propagate", "unpaying", "tiny-gqa"), ("drop", "unpaying", "tiny-llama")],
)
def test_never_firing_predictor_equals_plain(kv, how, model_name):
    """Predictors that never fire, a threshold of 1, or checks that never pay by the costs (so that the adaptive
    step skips every check and, with kv='propagate', runs the whole stack as a plain step does): plain's tokens."""
    model = tiny_model(model_name, seed=2)
    overrides = {"kv": kv, "threshold": 1.0} if how == "threshold" else {"kv": kv}
    if how == "unpaying":  # a check costs more than the whole step; no probe within the run
        n = model.cfg.num_layers
        overrides.update(step_costs=(float(n), 3.0 * n, 5.0 * n, 9.0 * n), probe_every=64)
    strategy, method_params = random_specee(model, 3, **overrides)
    method_params = _never_firing(method_params, how)
    prompts = random_prompts(np.random.default_rng(4), [5, 12, 1], model.cfg.vocab_size)
    want = Engine(model).generate(prompts, max_new_tokens=16, eos_ids=())
    got = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=16, eos_ids=())
    assert got.tokens == want.tokens
    assert got.layers == [float(model.cfg.num_layers * 15)] * 3  # every decode step ran the full stack


def _step_fn(strategy, cfg):
    return jax.jit(lambda p, mp, cache, st, pending: strategy.step(StepInputs(
        params=p, method_params=mp, cache=cache, method_state=st, pending=pending, key=jax.random.PRNGKey(0),
        active=jnp.ones(pending.shape, bool), sampling=SamplingConfig(), cfg=cfg)))


def _candidates(strategy, params, method_params, cache, state, pending, cfg):
    """The speculative tokens a step will use (the drafter is deterministic)."""
    positions = cache.lengths[:, None]
    x, _ = run_layers(params, embed(params, pending[:, None], cfg), cache, positions, cfg, 0, strategy.first_layer)
    cand, _ = strategy.drafter.propose(params, method_params["drafter"], state["drafter"], x, positions, strategy.num_candidates, cfg)
    return np.asarray(cand[:, 0])


def _prefilled(strategy, method_params, model, prompts, capacity=64):
    cfg = model.cfg
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    width = max(len(p) for p in prompts)
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    cache = init_cache(cfg, len(prompts), capacity)
    logits, cache, state = strategy.prefill(model.params, method_params, tokens, lens, cache, cfg)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache, state


def test_exit_decisions_ignore_finished_rows():
    """A batch-level exit needs every *active* row to agree: with predictors that never fire the batch never exits,
    unless no row is active any more (finished rows never block an exit)."""
    model = tiny_model("tiny-gqa", seed=5)
    cfg = model.cfg
    strategy, method_params = random_specee(model, 6, kv="drop", adaptive=False)
    method_params = _never_firing(method_params, "bias")
    pending, cache, state = _prefilled(strategy, method_params, model, random_prompts(np.random.default_rng(7), [6, 9], cfg.vocab_size))
    step = jax.jit(lambda active: strategy.step(StepInputs(
        params=model.params, method_params=method_params, cache=cache, method_state=state, pending=pending,
        key=jax.random.PRNGKey(0), active=active, sampling=SamplingConfig(), cfg=cfg)))
    last = cfg.num_layers - 1
    assert int(step(jnp.asarray([True, True])).method_state["recent_exits"][-1]) == last
    assert int(step(jnp.asarray([True, False])).method_state["recent_exits"][-1]) == last
    assert int(step(jnp.asarray([False, False])).method_state["recent_exits"][-1]) < last


@pytest.mark.parametrize("kv", ["propagate", "drop"])
def test_early_exits_emit_a_speculative_token_that_is_the_exit_layers_argmax(kv):
    model = tiny_model("tiny-gqa", seed=5)
    cfg, params = model.cfg, model.params
    strategy, method_params = random_specee(model, 6, kv=kv, threshold=0.05)
    prompts = random_prompts(np.random.default_rng(7), [6, 9], cfg.vocab_size)
    pending, cache, state = _prefilled(strategy, method_params, model, prompts)
    step = _step_fn(strategy, cfg)
    early = 0
    for _ in range(30):
        candidates = _candidates(strategy, params, method_params, cache, state, pending, cfg)
        result = step(params, method_params, cache, state, pending)
        exit_layer = int(result.method_state["recent_exits"][-1])
        token = np.asarray(result.tokens[:, 0])
        assert np.asarray(result.layers).tolist() == [exit_layer + 1.0] * 2  # one decision for the batch
        if exit_layer < cfg.num_layers - 1:
            early += 1
            assert all(t in c for t, c in zip(token, candidates)), (token, candidates)
            if kv == "propagate":  # every layer holds every token: the plain stack up to the exit is the reference
                positions = cache.lengths[:, None]
                x, _ = run_layers(params, embed(params, pending[:, None], cfg), cache, positions, cfg, 0, exit_layer + 1)
                np.testing.assert_array_equal(token, np.argmax(np.asarray(logits_from_hidden(params, x[:, 0], cfg)), -1))
        pending, cache, state = result.tokens[:, 0], result.cache, result.method_state
    assert 0 < early < 30  # both paths were exercised
    assert int(state["exit_counts"].sum()) == 30


def test_sampled_tokens_are_drawn_from_the_exit_layers_distribution():
    """Under sampling an exit draws its token from the exit layer's logits with the key of the token's position, and a
    step that reaches the last layer from the last layer's."""
    model = tiny_model("tiny-gqa", seed=5)
    cfg, params = model.cfg, model.params
    strategy, method_params = random_specee(model, 6, kv="propagate", threshold=0.05)
    sampling, key, noise = SamplingConfig(temperature=1.0), jax.random.PRNGKey(3), jnp.asarray([5, 6], jnp.uint32)
    pending, cache, state = _prefilled(strategy, method_params, model, random_prompts(np.random.default_rng(7), [6, 9], cfg.vocab_size))
    step = jax.jit(lambda cache, st, pending: strategy.step(StepInputs(
        params=params, method_params=method_params, cache=cache, method_state=st, pending=pending, key=key,
        active=jnp.ones(pending.shape, bool), sampling=sampling, cfg=cfg, noise=noise)))
    depths = set()
    for _ in range(60):  # until both an exit and a full-depth step have been checked
        if depths == {True, False}:
            break
        result = step(cache, state, pending)
        exit_layer = int(result.method_state["recent_exits"][-1])
        depths.add(exit_layer == cfg.num_layers - 1)
        x, _ = run_layers(params, embed(params, pending[:, None], cfg), cache, cache.lengths[:, None], cfg, 0, exit_layer + 1)
        want = sample(logits_from_hidden(params, x[:, 0], cfg), key, sampling, token_keys(noise, cache.lengths + 1))
        np.testing.assert_array_equal(np.asarray(result.tokens[:, 0]), np.asarray(want))
        pending, cache, state = result.tokens[:, 0], result.cache, result.method_state
    assert depths == {True, False}  # exits and full-depth steps both happened


def test_propagation_fills_exactly_the_skipped_layers():
    model = tiny_model("tiny-gqa", seed=8)
    cfg, params = model.cfg, model.params
    n = cfg.num_layers
    strategy, method_params = random_specee(model, 9, kv="propagate", threshold=0.05)
    prompts = random_prompts(np.random.default_rng(10), [7, 4], cfg.vocab_size)
    pending, cache, state = _prefilled(strategy, method_params, model, prompts)
    step = _step_fn(strategy, cfg)
    seen_exit = False
    for _ in range(12):
        result = step(params, method_params, cache, state, pending)
        exit_layer = int(result.method_state["recent_exits"][-1])
        positions = cache.lengths[:, None]
        rows = np.arange(2)
        pos = np.asarray(cache.lengths)
        # What the layers up to the exit compute for the pending token, and its exited state.
        x, full = run_layers(params, embed(params, pending[:, None], cfg), cache, positions, cfg, 0, exit_layer + 1)
        for layer in range(n):
            before_k, after_k = np.asarray(cache.k[layer]), np.asarray(result.cache.k[layer])
            before_v, after_v = np.asarray(cache.v[layer]), np.asarray(result.cache.v[layer])
            other = np.ones(after_k.shape[2], bool)
            for b in rows:  # every other slot untouched
                keep = other.copy()
                keep[pos[b]] = False
                np.testing.assert_array_equal(after_k[b][:, keep], before_k[b][:, keep])
                np.testing.assert_array_equal(after_v[b][:, keep], before_v[b][:, keep])
            if layer <= exit_layer:  # ran: the layer's own K/V
                want_k = np.stack([np.asarray(full.k[layer])[b][:, pos[b]] for b in rows])
                want_v = np.stack([np.asarray(full.v[layer])[b][:, pos[b]] for b in rows])
            else:  # skipped: the K/V projections of the exited state
                _, k, v = qkv(get_layer(params["layers"], layer), x, positions, cfg)
                want_k, want_v = np.asarray(k)[:, 0], np.asarray(v)[:, 0]
                seen_exit = True
            for b in rows:
                np.testing.assert_allclose(after_k[b][:, pos[b]], want_k[b], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(after_v[b][:, pos[b]], want_v[b], rtol=1e-5, atol=1e-5)
        pending, cache, state = result.tokens[:, 0], result.cache, result.method_state
    assert seen_exit



def _economics(n, p, enter, check, head, fires, exits, trials=1e6):
    """ExitEconomics with one layer's compute = 1 (a plain step costs n), the given per-step costs and observed rates,
    each from `trials` observations (by default so many that the rule's upper bound on a rate is the rate)."""
    costs = (float(n), n + enter + check, n + enter + check * p, n + enter + (check + head) * p)
    econ = ExitEconomics.start(2 * n, costs)
    rates = jnp.concatenate([jnp.asarray(fires, jnp.float32), jnp.asarray(exits, jnp.float32)])
    return econ.replace(hits=rates * trials, trials=jnp.full(2 * n, trials, jnp.float32))


def test_a_rarely_firing_layer_is_not_written_off_after_a_dry_run():
    """A layer whose exits would pay when it fires, seen firing on none of its last few checks, is still checked (its
    firing rate's upper bound after 9 dry checks: 1/10); after many it is not. With c_layer = 1, c_check = 0.1,
    c_head = 3 and every firing exiting, layer 1 of 6 gains f * 4 - 0.1: 0.3 at f = 1/10."""
    model = tiny_model("tiny-gqa", seed=1)
    n = model.cfg.num_layers
    strategy, _ = random_specee(model, 0)
    p, layer_1 = len(strategy.predictor_layers(model.cfg)), jnp.arange(n) == 1

    def checked(trials):
        econ = _economics(n, p, 0.0, 0.1, 3.0, np.zeros(n), np.ones(n), trials)
        return bool(np.asarray(strategy._checked_layers(econ, layer_1, model.cfg))[1])

    assert checked(9.0) and not checked(1e4)


def test_a_layer_is_checked_where_its_exits_save_more_than_its_wasted_heads_cost():
    """The adaptive rule f (x (N - 1 - i) c_layer - (1 - x) c_head) - c_check > 0 against a hand calculation: with
    c_layer = 1, c_check = 0.1, c_head = 3, nothing to enter the checking path and predictors that always fire, a layer
    that always exits pays below the last layer but one; one that exits half the time pays where
    (N - 1 - i) / 2 - 1.5 > 0.1, i.e. i < N - 4.2."""
    model = tiny_model("tiny-gqa", seed=1)
    n = model.cfg.num_layers
    strategy, _ = random_specee(model, 0)
    p, everywhere = len(strategy.predictor_layers(model.cfg)), jnp.ones((n,), bool)

    def checked(exits):
        econ = _economics(n, p, 0.0, 0.1, 3.0, np.ones(n), exits)
        return np.asarray(strategy._checked_layers(econ, everywhere, model.cfg)).tolist()

    assert checked(np.ones(n)) == [i < n - 1 for i in range(n)]
    assert checked(np.full(n, 0.5)) == [i < n - 4.2 for i in range(n)]
    assert not any(checked(np.zeros(n)))  # firings that never exit only cost
    scheduled = jnp.arange(n) % 2 == 1
    assert np.asarray(strategy._checked_layers(_economics(n, p, 0.0, 0.1, 3.0, np.ones(n), np.ones(n)), scheduled,
                                               model.cfg)).tolist() == [i % 2 == 1 and i < n - 1 for i in range(n)]


def test_checking_pays_only_when_the_chosen_layers_save_more_than_entering_the_checking_path_costs():
    """tiny-gqa: N = 6 layers, predictors at layers 1..4 (p = 4), c_layer = 1, c_check = 0.1, c_head = 0.2,
    predictors that always fire, exits half the time at layers 1 and 2 and never above. Layer 1's check gains
    0.5 * 4 - 0.5 * 0.2 - 0.1 = 1.8, layer 2's 0.5 * 3 - 0.1 - 0.1 = 1.3 but is reached only when layer 1 did not
    exit (1/2): together 2.45 (not 3.1), so the step checks layers 1 and 2 when entering the path costs 2.4 and
    nothing when it costs 2.5."""
    model = tiny_model("tiny-gqa", seed=1)
    n = model.cfg.num_layers
    strategy, _ = random_specee(model, 0)
    p = len(strategy.predictor_layers(model.cfg))
    assert (n, strategy.first_layer, p) == (6, 1, 4)
    exits = [0.0, 0.5, 0.5, 0.0, 0.0, 0.0]

    def checked(enter):
        econ = _economics(n, p, enter, 0.1, 0.2, np.ones(n), exits)
        return np.asarray(strategy._checked_layers(econ, jnp.ones((n,), bool), model.cfg)).tolist()

    assert checked(2.4) == [False, True, True, False, False, False]
    assert not any(checked(2.5))


def test_a_checking_steps_realized_gain_against_a_hand_calculation():
    """tiny-gqa (N = 6, predictors at 1..4), c_layer = 1, c_check = 0.1, c_enter = 0.5, c_head = 3: a step that checked
    layers 1 and 2, both fired and the token left at 2 saved layers 3..5 (3) and paid two checks, entering and layer 1's
    wasted head: 3 - 3.7 = -0.7; a step that checked four layers and never fired paid 0.9."""
    model = tiny_model("tiny-gqa", seed=1)
    n = model.cfg.num_layers
    strategy, _ = random_specee(model, 0)
    econ = _economics(n, 4, 0.5, 0.1, 3.0, np.ones(n), np.ones(n))
    mask = lambda layers: jnp.isin(jnp.arange(n), jnp.asarray(layers))
    exited = strategy.realized_gain(econ, mask([1, 2]), mask([1, 2]), jnp.asarray(2), jnp.asarray(True), model.cfg)
    none = strategy.realized_gain(econ, mask([1, 2, 3, 4]), mask([]), jnp.asarray(n - 1), jnp.asarray(False), model.cfg)
    np.testing.assert_allclose([float(exited), float(none)], [-0.7, -0.9], rtol=1e-5)
    # the bound: mean -1.5, E[g^2] 3 over 4 steps -> variance 0.75, standard error sqrt(0.75 / 4), two of them above
    np.testing.assert_allclose(float(gain_bound(jnp.asarray([-6.0, 12.0, 4.0]))), -1.5 + 2 * np.sqrt(0.75 / 4), rtol=1e-5)


def test_a_batch_whose_checks_never_pay_stops_checking_where_one_row_keeps_to_the_rule():
    """Predictors that never fire with an exit prior of 0.95: each layer's upper-bound rule keeps checking (a firing
    rate bound of ~1/11, exits that would pay), and every check only costs. In a batch of three rows the realized gain's
    bound closes the checking path; a lone row keeps checking as its per-layer rule says (its discounted count of
    checking steps is what checking on every step gives, and it reports every step checked)."""
    model = tiny_model("tiny-gqa", seed=1)
    strategy, method_params = random_specee(model, 0, exit_prior=(0.95,) * 4, probe_every=64)
    method_params = _never_firing(method_params, "bias")
    prompts = random_prompts(np.random.default_rng(3), [5, 9, 3], model.cfg.vocab_size)
    steps = 40
    every_step = GAIN_PRIOR_STEPS * GAIN_DECAY ** steps + (1 - GAIN_DECAY ** steps) / (1 - GAIN_DECAY)
    engine = Engine(model, strategy, method_params)

    def generate(prompts):
        out = engine.generate(prompts, max_new_tokens=steps + 1, eos_ids=())
        assert out.steps == steps and out.row_steps == [steps] * len(prompts) and sum(out.exited_steps) == 0
        return out.method_state["check_gain"], out.checked_steps

    alone, checked = generate(prompts[:1])
    np.testing.assert_allclose(float(alone[2]), every_step, rtol=1e-4)
    assert checked == [steps]
    batch, checked = generate(prompts)  # each checking step loses 0.7 layers: the bound reaches 0 after about 24 of them
    assert float(gain_bound(batch)) < 0 and float(batch[2]) < 0.8 * every_step
    assert checked == [checked[0]] * 3 and 20 <= checked[0] < 0.8 * steps  # one decision for the batch


def test_a_generation_starts_from_the_predictors_held_out_precision():
    """The artifact header's per-layer precision becomes the prior of each predictor layer's exit rate x_i (worth
    the two observations every prior is worth); firing rates and the layers without a predictor start at 1/2."""
    from eej.decoding.specee import _held_out_precision

    model = tiny_model("tiny-gqa", seed=1)
    n = model.cfg.num_layers
    header = {"held_out": {"per_layer": [{"layer": i, "precision": 0.2 * i - 0.1} for i in range(1, n - 1)]}}
    prior = _held_out_precision(header, 1, n)
    np.testing.assert_allclose(prior, [0.1, 0.3, 0.5, 0.7])
    assert _held_out_precision({"held_out": {"per_layer": header["held_out"]["per_layer"][:-1]}}, 1, n) is None
    assert _held_out_precision({}, 1, n) is None
    strategy, method_params = random_specee(model, 0, exit_prior=prior)
    _, _, state = _prefilled(strategy, method_params, model, random_prompts(np.random.default_rng(0), [5], model.cfg.vocab_size))
    econ = state["economics"]
    np.testing.assert_allclose(np.asarray(econ.rate), [0.5] * n + [0.5, 0.1, 0.3, 0.5, 0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(econ.trials), 2.0)
    assert strategy.learned(state) is None  # every generation starts there, not from the last one's rates (exit_v33)
    with pytest.raises(ValueError, match="exit_prior has 3 rates; the settings need one per predictor layer"):
        strategy_, params_ = random_specee(model, 0, exit_prior=prior[:3])
        strategy_.validate(model.cfg, params_)
    with pytest.raises(ValueError, match="exit_prior must hold rates in"):
        random_specee(model, 0, exit_prior=(1.5, 0.1, 0.1, 0.1))


def test_step_costs_must_be_the_four_measured_points():
    with pytest.raises(ValueError, match="specee step_costs must be 4 positive times"):
        random_specee(tiny_model("tiny-gqa", seed=1), 0, step_costs=(6.0, 7.0, 30.0))


def test_offline_layers_rule():
    # exits at layers 3 (50), 5 (30), 4 (15), 2 (5); the last layer (no exit) is ignored
    hist = [0, 0, 5, 50, 15, 30, 999]
    assert offline_layers(hist, 7, 0.5) == [3]
    assert offline_layers(hist, 7, 0.8) == [3, 5]
    assert offline_layers(hist, 7, 0.9) == [3, 4, 5]
    assert offline_layers(hist, 7, 1.0) == [2, 3, 4, 5]
    assert offline_layers([0, 0, 0, 9], 4, 0.9) == []


def test_simulated_exits_follow_the_decoders_rule():
    fire = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]], bool)
    in_set = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0]], bool)
    labels = np.array([[0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]], bool)
    sim = simulate_exits(fire, in_set, labels, num_layers=5, first_layer=1)
    # row 0 exits at layer 2 (wrong), row 1 at 3 (right), row 2 never (last layer 4), row 3 at 1 (wrong)
    assert sim["histogram"] == [0, 1, 1, 1, 1]
    assert sim["early_exit_rate"] == 0.75 and sim["agreement"] == 0.5
    assert sim["mean_layers"] == (3 + 4 + 5 + 2) / 4


def test_train_specee_end_to_end_on_a_tiny_model(tmp_path, capsys):
    import json

    from eej.cli import main as cli_main
    from eej.decoding.speculation import init_adapter
    from eej.decoding.methods import build_method
    from eej.weights.artifacts import load_artifact, save_artifact

    model = tiny_model("tiny-gqa", 0)
    adapter = init_adapter(model.cfg, 0, norm=np.asarray(model.params["final_norm"]))
    ranking = np.arange(model.cfg.vocab_size, dtype=np.int32)
    save_artifact(str(tmp_path / "kangaroo.npz"), {"adapter": adapter, "vocab_rank": ranking}, "kangaroo", model.cfg,
                  settings={"exit_layer": 1, "draft_vocab": 0}, reproduce="test")
    data = tmp_path / "chat.jsonl"
    write_chat_data(data)
    out = tmp_path / "run"
    argv = ["train", "specee", "--model", "tiny-gqa", "--data", str(data), "--out", str(out),
            "--drafter", str(tmp_path / "kangaroo.npz"), "--steps", "30", "--batch-size", "64", "--seq-len", "64",
            "--hidden", "16", "--label-batch-size", "4", "--label-positions", "32", "--eval-fraction", "0.25",
            "--threshold", "0.3", "--no-progress"]
    code = cli_main(argv)
    assert code == 0, capsys.readouterr().err
    arrays, header = load_artifact(str(out / "specee.npz"), "specee", model.cfg)
    assert arrays["predictors"]["w1"].shape == (4, 12, 16)  # layers 1..4 of 6, 3k features
    assert header["reproduce"].startswith("eej train specee --model tiny-gqa")
    assert len(header["held_out"]["per_layer"]) == 4
    assert sum(header["held_out"]["exit_simulation"]["histogram"]) > 0
    assert set(header["settings"]["offline_layers"]) <= {1, 2, 3, 4}
    settings = tmp_path / "specee.yaml"
    settings.write_text(json.dumps({"predictors": str(out / "specee.npz"), "threshold": 0.3}))
    strategy, method_params = build_method(model, f"specee:{settings}")
    assert strategy.offline_layers == tuple(header["settings"]["offline_layers"]) and strategy.first_layer == 1
    out_tokens = Engine(model, strategy, method_params).generate([[5, 6, 7]], max_new_tokens=6, eos_ids=()).tokens
    assert len(out_tokens[0]) == 6
    # a damaged label cache (an interrupted write) is labelled again; a threshold may change on a finished run
    labels = out / "labels.npz"
    labels.write_bytes(labels.read_bytes()[:100])
    assert cli_main([*argv[:-3], "--threshold", "0.4", "--no-progress"]) == 0, capsys.readouterr().err
    assert np.load(labels)["labels"].shape[1] == 4
    # predictors trained with another drafter are refused
    save_artifact(str(tmp_path / "kangaroo.npz"), {"adapter": {**adapter, "wq": adapter["wq"] + 1}, "vocab_rank": ranking},
                  "kangaroo", model.cfg, settings={"exit_layer": 1, "draft_vocab": 0}, reproduce="test")
    with pytest.raises(ValueError, match="another drafter"):
        build_method(model, f"specee:{settings}")
