"""The mixture-of-experts MLP (eej.model.moe) and how the rest of eej meets a MoE model.

Routing and the two expert paths by hand on tiny inputs; a dense FFN split into experts; LoRA, M2R2,
artifacts and the GGUF loader refusing what they cannot do on a mixture of experts. (Decoding on tiny-moe
is in the engine's and every method's generic tests; checkpoints against transformers in test_parity_hf.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.model import moe
from eej.model.lora import default_targets, init_lora, parse_targets
from eej.model.transformer import mlp
from eej.weights.tiny import random_params, tiny_config

from eej.testing import random_prompts, tiny_model


def _layer(cfg, seed: int = 0, index: int = 1) -> dict[str, jax.Array]:
    """Layer `index` of a random model of `cfg` (per-layer arrays, float32)."""
    return {k: jnp.asarray(v[index]) for k, v in random_params(cfg, seed)["layers"].items()}


def test_routing_weights_by_hand():
    logits = jnp.asarray([[2.0, 0.0, 1.0, -1.0]])
    cfg = tiny_config("tiny-moe", num_experts=4, experts_per_token=2)
    total = np.exp(2.0) + 1.0 + np.exp(1.0) + np.exp(-1.0)
    want = {
        (False, "softmax"): [np.exp(2.0) / total, np.exp(1.0) / total],
        (True, "softmax"): [np.exp(2.0) / (np.exp(2.0) + np.exp(1.0)), np.exp(1.0) / (np.exp(2.0) + np.exp(1.0))],
        (True, "unit"): [1.0, 1.0],
    }
    for (norm, weighting), weights in want.items():
        ids, got = moe.route(logits, cfg.replace(moe_norm_topk=norm, moe_weighting=weighting))
        assert ids.tolist() == [[0, 2]]
        np.testing.assert_allclose(np.asarray(got), [weights], rtol=1e-6)


@pytest.mark.parametrize("shared", [0, 24])
def test_gathered_and_dense_expert_paths_agree(shared):
    cfg = tiny_config("tiny-moe", shared_expert_ffn_size=shared)
    layer = _layer(cfg)
    h = jnp.asarray(np.random.default_rng(0).standard_normal((6, cfg.hidden_size)), jnp.float32)
    ids, weights = moe.route(moe.router_logits(layer, h), cfg)
    gathered = moe.experts_gathered(layer["w_gate"], layer["w_up"], layer["w_down"], h, ids, weights)
    combine = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts) * weights[..., None], axis=-2)  # [N, E]
    dense = moe.experts_dense(layer["w_gate"], layer["w_up"], layer["w_down"], h, combine)
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(dense), atol=1e-5, rtol=1e-5)
    # moe_ffn picks the path by size: one token is gathered, six tokens (3*6*2 > 8 experts) are dense
    one = jnp.stack([moe.moe_ffn(layer, h[i][None, None], cfg)[0][0, 0] for i in range(6)])
    batch, batch_ids = moe.moe_ffn(layer, h[:, None], cfg)
    assert batch_ids[:, 0].tolist() == ids.tolist()
    np.testing.assert_allclose(np.asarray(one), np.asarray(batch[:, 0]), atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(batch))) > 1e-2  # not trivially zero


def test_all_experts_of_a_split_dense_ffn_with_unit_weights_is_the_dense_mlp():
    dense_cfg = tiny_config("tiny-llama")
    d, f, e = dense_cfg.hidden_size, dense_cfg.ffn_size, 4
    dense = _layer(dense_cfg, seed=3)
    moe_cfg = dense_cfg.replace(num_experts=e, experts_per_token=e, moe_ffn_size=f // e, moe_weighting="unit")
    split = {
        **dense,
        "router": jnp.asarray(np.random.default_rng(1).standard_normal((d, e)), jnp.float32),
        "w_gate": dense["w_gate"].reshape(d, e, f // e).transpose(1, 0, 2),
        "w_up": dense["w_up"].reshape(d, e, f // e).transpose(1, 0, 2),
        "w_down": dense["w_down"].reshape(e, f // e, d),
    }
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, d)), jnp.float32)
    want = mlp(dense, x, dense_cfg)
    np.testing.assert_allclose(np.asarray(mlp(split, x, moe_cfg)), np.asarray(want), atol=1e-5, rtol=1e-5)
    h = x.reshape(10, d)  # the gathered path over all E experts (moe_ffn never picks it when k = E)
    ids = jnp.tile(jnp.arange(e, dtype=jnp.int32), (10, 1))
    gathered = moe.experts_gathered(split["w_gate"], split["w_up"], split["w_down"], h, ids, jnp.ones((10, e)))
    direct = (jax.nn.silu(h @ dense["w_gate"]) * (h @ dense["w_up"])) @ dense["w_down"]
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(direct), atol=1e-5, rtol=1e-5)


def test_methods_the_generic_tests_skip_run_on_tiny_moe():
    """Lossy methods that decide per batch (SpecEE, M2R2 early exit) skip both generic checks on tiny-moe."""
    from eej.decoding.engine import Engine
    from eej.decoding.methods import known_methods, random_method

    model = tiny_model("tiny-moe", seed=2)
    prompts = random_prompts(np.random.default_rng(4), [5, 12], model.cfg.vocab_size)
    ran = []
    for method in known_methods():
        strategy, method_params = random_method(model, method, seed=1)
        if strategy.lossless or strategy.batch_invariant:
            continue
        out = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=10, eos_ids=())
        assert [len(t) for t in out.tokens] == [10, 10]
        ran.append(method)
    assert "specee" in ran


# ----------------------------------------------------------------------------- what does not apply to experts


def test_lora_on_moe_targets_attention_and_names_the_fix_for_mlp_targets():
    cfg = tiny_config("tiny-moe")
    assert default_targets(cfg) == ("wq", "wk", "wv", "wo") == parse_targets(cfg, None)
    assert "w_down" in default_targets(tiny_config("tiny-llama"))
    assert set(init_lora(jax.random.PRNGKey(0), cfg, rank=2)) == {"wq", "wk", "wv", "wo"}
    for bad in ("w_gate", "w_up", "w_down"):
        with pytest.raises(ValueError, match="mixture-of-experts.*attention-only LoRA targets wq,wk,wv,wo"):
            init_lora(jax.random.PRNGKey(0), cfg, rank=2, targets=("wq", bad))
        with pytest.raises(ValueError, match="attention-only"):
            parse_targets(cfg, f"wq,{bad}")
    with pytest.raises(ValueError, match="unknown LoRA targets nope"):
        parse_targets(cfg, "wq,nope")


def test_m2r2_with_mlp_targets_on_moe_is_a_clear_error():
    from eej.decoding.m2r2 import random_method_params

    model = tiny_model("tiny-moe")
    with pytest.raises(ValueError, match="attention-only LoRA targets"):
        random_method_params(model, seed=0, num_fast=2, targets=("wq", "w_up"))


def test_train_cli_rejects_mlp_lora_targets_on_moe(capsys, tmp_path):
    from eej.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}\n')
    for method, extra in (("m2r2", ["--fast-layers", "2"]), ("skipdecode", ["--budget", "x"])):
        argv = ["train", method, "--model", "tiny-moe", "--data", str(data), "--out", str(tmp_path / method),
                "--targets", "wq,w_gate", *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "attention-only LoRA targets wq,wk,wv,wo" in err and len(err.strip().splitlines()) == 1


def test_artifact_for_a_dense_model_does_not_fit_a_moe_model_of_the_same_shape(tmp_path):
    from eej.weights.artifacts import ArtifactError, load_artifact, save_artifact

    dense, sparse = tiny_config("tiny-llama"), tiny_config("tiny-llama", num_experts=4, experts_per_token=2, moe_ffn_size=32)
    path = str(tmp_path / "a.npz")
    for saved, loaded in ((dense, sparse), (sparse, dense)):
        save_artifact(path, {"x": np.zeros(2)}, "m", saved, reproduce="test")
        with pytest.raises(ArtifactError, match="num_experts"):
            load_artifact(path, "m", loaded)
    load_artifact(path, "m", sparse)


def test_moe_gguf_is_rejected_clearly(tmp_path):
    gguf = pytest.importorskip("gguf")
    from eej.weights.gguf_file import GGUFError, read_gguf

    path = str(tmp_path / "moe.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="mixture-of-experts GGUF files \\(8 experts\\) are not supported"):
        read_gguf(path)
