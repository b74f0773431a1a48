"""Weights in column tiles (eej.model.packed): the layout's round trip, products and column gathers that agree
with the unpacked weight, which params get packed, an engine on the CPU matmul packing its own, and engines on one
model sharing one packed copy."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.decoding.engine import Engine
from eej.model.packed import TILE, PackedWeight, pack, pack_projections, pack_shared, product, take_columns
from eej.model.transformer import get_layer, linear, stack_layers
from eej.testing import agreeable_model


@pytest.mark.parametrize("shape", [(5, 1), (7, TILE), (3, TILE + 1), (2, 4, 70)])
def test_pack_round_trip_and_shape(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    packed = pack(w)
    count = -(-shape[-1] // TILE)
    assert packed.tiles.shape == (*shape[:-2], count, shape[-2], TILE)
    assert packed.shape == shape and packed.ndim == len(shape) and packed.dtype == jnp.float32
    np.testing.assert_array_equal(packed.unpacked(), w)
    np.testing.assert_array_equal(packed.tiles[..., -1, :, shape[-1] - (count - 1) * TILE:], 0)  # zero padding
    assert pack(packed) is packed


def test_product_columns_and_layer_slicing_agree_with_the_plain_weight():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 2, 24), np.float32), rng.standard_normal((24, 75), np.float32)
    np.testing.assert_allclose(product(x, pack(w)), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x, pack(w), impl="xla"), x @ w, rtol=1e-5, atol=1e-5)
    ids = jnp.asarray([[0, 74], [33, 31]])
    np.testing.assert_array_equal(take_columns(pack(w), ids), jnp.take(w, ids, axis=1))
    np.testing.assert_array_equal(take_columns(w, ids), jnp.take(w, ids, axis=1))
    stacked = stack_layers(({"wq": pack(w)}, {"wq": pack(2 * w)}))
    assert isinstance(stacked["wq"], PackedWeight) and stacked["wq"].shape == (2, 24, 75)
    np.testing.assert_array_equal(get_layer(stacked, 1)["wq"].unpacked(), 2 * w)


def test_pack_projections_packs_projections_only():
    f32 = np.ones((4, 6), np.float32)
    tree = {"embed": f32, "lm_head": f32, "final_norm": np.ones(4, np.float32),
            "layers": ({"wq": f32, "attn_norm": np.ones(4, np.float32), "bq": np.ones(6, np.float32)},
                       {"w_up": f32.astype(np.float16), "router": f32, "w_gate": np.ones((2, 4, 6), np.float32)}),
            "adapter": {"wo": f32}, "draft_head": f32, "draft_ids": np.arange(6)}
    out = pack_projections(tree)
    packed = {path for path, leaf in jax.tree_util.tree_flatten_with_path(
        out, is_leaf=lambda a: isinstance(a, PackedWeight))[0] if isinstance(leaf, PackedWeight)}
    assert {jax.tree_util.keystr(p) for p in packed} == {
        "['lm_head']", "['layers'][0]['wq']", "['adapter']['wo']", "['draft_head']"}
    assert isinstance(out["layers"], tuple) and out["embed"] is tree["embed"]
    assert pack_projections(out)["lm_head"] is out["lm_head"]  # packing twice changes nothing


def test_an_engine_on_the_cpu_matmul_packs_its_weights_once():
    model = agreeable_model("tiny-gqa", seed=2)
    on_cpu = Engine(dataclasses.replace(model, cfg=model.cfg.replace(matmul_impl="cpu")))
    assert isinstance(on_cpu.model.params["lm_head"], PackedWeight)
    assert not isinstance(Engine(model).model.params["lm_head"], PackedWeight)
    assert not isinstance(model.params["lm_head"], PackedWeight)  # the caller's model is left alone
    prompts = [[1, 2, 3], [4, 5]]
    assert on_cpu.generate(prompts, 6).tokens == Engine(model).generate(prompts, 6).tokens


def test_engines_on_one_model_share_one_packed_copy_while_one_holds_it():
    model = agreeable_model("tiny-gqa", seed=2)
    on_cpu = dataclasses.replace(model, cfg=model.cfg.replace(matmul_impl="cpu"))
    first, second = Engine(on_cpu), Engine(on_cpu)
    assert second.model.params["lm_head"] is first.model.params["lm_head"]
    assert second.model.params["layers"][0]["wq"] is first.model.params["layers"][0]["wq"]
    other = agreeable_model("tiny-gqa", seed=3)
    other_engine = Engine(dataclasses.replace(other, cfg=other.cfg.replace(matmul_impl="cpu")))
    assert other_engine.model.params["lm_head"] is not first.model.params["lm_head"]
    np.testing.assert_array_equal(other_engine.model.params["lm_head"].unpacked(), other.params["lm_head"])

    copy = weakref.ref(first.model.params["lm_head"])
    del first, second
    gc.collect()
    assert copy() is None  # the packed copy leaves with the engines that held it; the model keeps only its own weights
    again = Engine(on_cpu)  # and a new engine packs afresh
    np.testing.assert_array_equal(again.model.params["lm_head"].unpacked(), model.params["lm_head"])
    prompts = [[1, 2, 3], [4, 5]]
    assert again.generate(prompts, 6).tokens == Engine(model).generate(prompts, 6).tokens


def test_traced_weights_are_packed_afresh():
    w = jnp.arange(2 * 40, dtype=jnp.float32).reshape(2, 40)
    tiles = jax.jit(lambda w: pack_shared(w).tiles)(w)
    np.testing.assert_array_equal(tiles, pack(w).tiles)
    assert pack_shared(w) is pack_shared(w)

