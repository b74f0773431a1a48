"""MoEfication (eej.experts.moefy): the split model is the dense model when every expert is active."""

import jax.numpy as jnp
import numpy as np
import pytest

from eej.testing import tiny_model, write_chat_data
from eej.experts.moefy import (
    MoefyError,
    balanced_assign,
    check_split,
    expert_scores,
    moefy_model,
    partition_layer,
)
from eej.model.cache import init_cache
from eej.model.transformer import forward


def _random_split(model, num_experts: int, seed: int = 0):
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    width = cfg.ffn_size // num_experts
    partition = np.stack([rng.permutation(cfg.ffn_size).reshape(num_experts, width) for _ in range(cfg.num_layers)])
    router = rng.standard_normal((cfg.num_layers, cfg.hidden_size, num_experts)).astype(np.float32)
    return partition.astype(np.int32), router


def _logits(model, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(model.params, tokens, positions, init_cache(model.cfg, b, t), model.cfg)[0]


def test_all_experts_active_equals_dense():
    dense = tiny_model("tiny-gqa", seed=1)
    partition, router = _random_split(dense, 4)
    moe = moefy_model(dense, partition, router, experts_per_token=4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(_logits(moe, tokens)), np.asarray(_logits(dense, tokens)), atol=2e-5, rtol=1e-5)
    # a single token (the gathered-experts path) too
    np.testing.assert_allclose(np.asarray(_logits(moe, tokens[:1, :1])), np.asarray(_logits(dense, tokens[:1, :1])), atol=2e-5)


def test_fewer_experts_change_the_output_and_expert_scores():
    dense = tiny_model("tiny-gqa", seed=1)
    partition, router = _random_split(dense, 4)
    moe = moefy_model(dense, partition, router, experts_per_token=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
    assert not np.allclose(np.asarray(_logits(moe, tokens)), np.asarray(_logits(dense, tokens)), atol=1e-3)
    # expert scores are the norms of each expert's share; the shares sum to the dense FFN output
    layer = dense.params["layers"][0]
    h = jnp.asarray(np.random.default_rng(2).standard_normal((5, dense.cfg.hidden_size)), jnp.float32)
    scores = np.asarray(expert_scores(layer["w_gate"], layer["w_up"], layer["w_down"], jnp.asarray(partition[0]), h))
    assert scores.shape == (5, 4) and (scores >= 0).all() and scores.max() > 0


def test_partition_is_balanced_and_groups_coactive_neurons():
    rng = np.random.default_rng(0)
    # 4 groups of 6 neurons; each group fires on its own quarter of the tokens
    tokens, groups, size = 64, 4, 6
    mags = np.abs(rng.standard_normal((tokens, groups * size))) * 0.01
    truth = rng.permutation(groups * size).reshape(groups, size)
    for g in range(groups):
        mags[g * 16 : (g + 1) * 16][:, truth[g]] += 1.0
    part = partition_layer(mags, groups, seed=3)
    assert part.shape == (groups, size)
    assert sorted(part.ravel().tolist()) == list(range(groups * size))
    assert sorted(map(tuple, part.tolist())) == sorted(tuple(sorted(t)) for t in truth.tolist())


def test_balanced_assign_respects_capacity():
    sim = np.random.default_rng(1).standard_normal((12, 3))
    sim[:, 0] += 10  # everyone prefers expert 0
    a = balanced_assign(sim, 4)
    assert np.bincount(a, minlength=3).tolist() == [4, 4, 4]


def test_bad_settings_are_clear():
    dense = tiny_model("tiny-llama")
    with pytest.raises(MoefyError, match="divide the FFN width"):
        check_split(dense.cfg, 5)
    with pytest.raises(MoefyError, match="experts per token"):
        check_split(dense.cfg, 4, 9)
    with pytest.raises(MoefyError, match="already a mixture-of-experts"):
        check_split(tiny_model("tiny-moe").cfg, 4)
    partition, router = _random_split(dense, 4)
    with pytest.raises(MoefyError, match="partition has shape"):
        moefy_model(dense, partition[:2], router, 2)
    with pytest.raises(MoefyError, match="routers have shape"):
        moefy_model(dense, partition, router[:, :3], 2)


@pytest.mark.real_model
def test_shipped_split_with_every_expert_is_the_dense_model(real_model):
    """The shipped artifact on the real model: k = E reproduces dense greedy decoding token for token;
    the artifact's default k runs and its routers pick experts."""
    from eej.decoding.engine import Engine
    from eej.experts.moefy import load_moefied

    prompts = [real_model.tokenizer.encode_chat("Name three primary colors.")]
    dense = Engine(real_model).generate(prompts, max_new_tokens=24, eos_ids=())
    full = load_moefied(real_model, "artifacts/smollm2-135m/moefy.npz", experts_per_token=16)
    assert full.cfg.num_experts == 16 and full.cfg.moe_weighting == "unit"
    assert Engine(full).generate(prompts, max_new_tokens=24, eos_ids=()).tokens == dense.tokens
    default = load_moefied(real_model, "artifacts/smollm2-135m/moefy.npz")
    assert default.cfg.experts_per_token < 16
    assert len(Engine(default).generate(prompts, max_new_tokens=8, eos_ids=()).tokens[0]) == 8


def test_train_moefy_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from eej.cli import main as cli_main
    from eej.experts.moefy import load_moefied
    from eej.weights.artifacts import load_artifact

    data = tmp_path / "chat.jsonl"
    write_chat_data(data)
    out = tmp_path / "run"
    argv = ["train", "moefy", "--model", "tiny-gqa", "--data", str(data), "--out", str(out), "--experts", "4",
            "--top-k", "2", "--steps", "40", "--batch-size", "64", "--lr", "3e-2", "--warmup", "2", "--seq-len", "64",
            "--router-tokens", "512", "--cluster-tokens", "256", "--sweep", "1,4", "--eval-fraction", "0.25", "--no-progress"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    dense = tiny_model("tiny-gqa")
    arrays, header = load_artifact(str(out / "moefy.npz"), "moefy", dense.cfg)
    assert arrays["partition"].shape == (6, 4, 24) and arrays["router"].shape == (6, 64, 4)
    for layer in arrays["partition"]:  # a partition of every layer's neurons
        assert sorted(layer.ravel().tolist()) == list(range(96))
    held = header["held_out"]
    assert held["top1_agreement_by_k"]["4"] == 1.0  # every expert = the dense model
    assert held["router_recall_at_k"] > 0.6  # above chance (0.5 for 2 of 4)
    assert header["reproduce"].startswith("eej train moefy --model tiny-gqa")
    assert load_moefied(dense, str(out / "moefy.npz")).cfg.experts_per_token == 2
