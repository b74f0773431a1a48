"""LoRA merge semantics and method preset files."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.model.lora import init_lora, merge_lora
from eej.settings import PresetError, from_settings, method_settings

from eej.testing import tiny_model


def test_zero_initialised_lora_changes_nothing_and_merge_adds_a_times_b():
    model = tiny_model("tiny-gqa")
    lora = init_lora(jax.random.PRNGKey(0), model.cfg, rank=3, targets=("wq", "w_down"))
    same = merge_lora(model.params, lora)
    chex.assert_trees_all_equal(same, model.params)  # same tree structure, every leaf equal
    lora["wq"]["b"] = jnp.ones_like(lora["wq"]["b"])
    merged = merge_lora(model.params, lora, scale=0.5, first_layer=0)
    i = 2
    want = model.params["layers"][i]["wq"] + 0.5 * lora["wq"]["a"][i] @ lora["wq"]["b"][i]
    np.testing.assert_allclose(np.asarray(merged["layers"][i]["wq"]), np.asarray(want), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["layers"][i]["wk"]), np.asarray(model.params["layers"][i]["wk"]))


@dataclasses.dataclass(frozen=True)
class _Settings:
    exit_layer: int = 2
    threshold: float = 0.6
    layers: tuple = ()


def test_presets_resolve_and_unknown_keys_are_named(tmp_path, monkeypatch):
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "demo.yaml").write_text("default: fast\npresets:\n  fast: {exit_layer: 1, layers: [1, 2]}\n  slow: {exit_layer: 3}\n")
    monkeypatch.setenv("EEJ_CONFIG_DIR", str(tmp_path))
    assert method_settings("tiny-llama", "demo", None) == {"exit_layer": 1, "layers": [1, 2]}
    assert method_settings("tiny-llama", "demo", "slow") == {"exit_layer": 3}
    with pytest.raises(PresetError, match="unknown demo preset 'nope'"):
        method_settings("tiny-llama", "demo", "nope")
    with pytest.raises(PresetError, match="no demo settings"):
        method_settings("other-model", "demo", None)
    s = from_settings(_Settings, method_settings("tiny-llama", "demo", None))
    assert s.layers == (1, 2) and hash(s)
    with pytest.raises(PresetError, match="unknown key.*treshold"):
        from_settings(_Settings, {"treshold": 0.5})
    own = tmp_path / "mine.yaml"
    own.write_text("exit_layer: 4\n")
    assert method_settings("tiny-llama", "demo", str(own)) == {"exit_layer": 4}
