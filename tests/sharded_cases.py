"""Decoding on 8 (fake CPU) devices, token for token against one device.

Not collected by the normal run (the device count is fixed when JAX starts): tests/test_parallel.py
runs this file in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import gc
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eej.config import SamplingConfig
from eej.decoding.engine import Engine, GenerationError
from eej.decoding.methods import known_methods, random_method
from eej.parallel import make_mesh

from eej.testing import random_prompts, tiny_model
from eej.weights.registry import with_kernels

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run through test_parallel.py)")

MESHES = [(8, 1), (4, 2), (2, 4)]
LENGTHS = [4, 13, 1, 7, 9, 2, 11, 5]


def prompts_for(model, lengths=LENGTHS, seed=5):
    return random_prompts(np.random.default_rng(seed), lengths, model.cfg.vocab_size)


@pytest.mark.parametrize("data,model_size", MESHES)
def test_plain_sharded_matches_single_device(data, model_size):
    # 6 query / 2 KV heads: model=2 splits heads, model=4 only the FFN; 264 = 8 * 33 tokens split the vocabulary
    model = tiny_model("tiny-gqa", seed=4, vocab_size=264)
    prompts = prompts_for(model)
    samplings = [SamplingConfig()] + ([SamplingConfig(temperature=0.8, top_p=0.9)] if model_size == 2 else [])
    for sampling in samplings:
        want = Engine(model).generate(prompts, max_new_tokens=12, sampling=sampling, seed=3, eos_ids=()).tokens
        mesh = make_mesh(data=data, model=model_size)
        got = Engine(model, mesh=mesh).generate(prompts, max_new_tokens=12, sampling=sampling, seed=3, eos_ids=()).tokens
        assert got == want


@pytest.mark.parametrize("data,model_size,shared", [(4, 2, 0), (2, 4, 48)])
def test_moe_sharded_matches_single_device(data, model_size, shared):
    # 8 experts of width 32 split over `model` inside each expert; model=2 also splits the 4/2 heads
    model = tiny_model("tiny-moe", seed=4, vocab_size=264, shared_expert_ffn_size=shared)
    prompts = prompts_for(model)
    want = Engine(model).generate(prompts, max_new_tokens=12, eos_ids=()).tokens
    engine = Engine(model, mesh=make_mesh(data=data, model=model_size))
    layer = engine.model.params["layers"][0]
    assert layer["w_gate"].sharding.spec == P(None, None, "model") and layer["w_down"].sharding.spec == P(None, "model", None)
    assert engine.generate(prompts, max_new_tokens=12, eos_ids=()).tokens == want


@pytest.mark.parametrize("method", known_methods())
def test_every_method_sharded_matches_single_device(method):
    model = tiny_model("tiny-gqa", seed=6, vocab_size=264)
    strategy, method_params = random_method(model, method, seed=2)
    prompts = prompts_for(model, seed=7)
    want = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=16, eos_ids=()).tokens
    mesh = make_mesh(data=4, model=2)
    got = Engine(model, strategy, method_params, mesh=mesh).generate(prompts, max_new_tokens=16, eos_ids=()).tokens
    assert got == want


def test_the_cpu_kernels_on_a_mesh_are_a_clear_error():
    model = with_kernels(tiny_model("tiny-gqa"), "cpu")  # what load_model("...") gives on a CPU
    with pytest.raises(GenerationError, match="kernels='xla'"):
        Engine(model, mesh=make_mesh(data=8))
    Engine(model, mesh=make_mesh(data=1))  # a mesh of one device shards nothing: the kernels run


def test_params_and_state_are_actually_sharded():
    model = tiny_model("tiny-gqa", seed=1, vocab_size=264)
    engine = Engine(model, mesh=make_mesh(data=4, model=2))
    assert engine.model.params["lm_head"].sharding.spec == P(None, "model")
    assert engine.model.params["embed"].sharding.spec == P("model", None)
    layer = engine.model.params["layers"][0]
    assert layer["wq"].sharding.spec == P(None, "model")
    assert layer["wo"].sharding.spec == P("model", None)
    assert layer["w_down"].sharding.spec == P("model", None)
    assert layer["attn_norm"].sharding.spec == P()
    assert len(layer["wq"].addressable_shards) == 8 and layer["wq"].addressable_shards[0].data.shape[1] == 48
    prompts = prompts_for(model)
    state, static, _, _ = engine._prefill(prompts, 8, SamplingConfig(), 0, ())
    assert state.cache.k[0].sharding.spec == P("data", "model", None, None)
    assert state.cache.k[0].addressable_shards[0].data.shape[:2] == (2, 1)
    assert state.output.sharding.spec == P("data", None)
    assert state.pending.sharding.spec == P("data")
    # the compiled loop keeps the state where it was
    loop, _ = engine._get("loop", __import__("eej.decoding.engine", fromlist=["_decode_loop"])._decode_loop,
                          static, (engine.model.params, engine.method_params, state), (2,), batch=len(prompts))
    out = loop(engine.model.params, engine.method_params, state)
    assert out.cache.k[0].sharding.spec == P("data", "model", None, None)
    assert out.output.sharding.spec == P("data", None)


def test_batch_that_does_not_divide_runs_replicated():
    model = tiny_model("tiny-llama", seed=2)
    prompts = prompts_for(model, lengths=[3, 8, 5])
    want = Engine(model).generate(prompts, max_new_tokens=10, eos_ids=()).tokens
    assert Engine(model, mesh=make_mesh(data=4, model=2)).generate(prompts, max_new_tokens=10, eos_ids=()).tokens == want


def test_a_queue_on_a_mesh_is_a_clear_error():
    model = tiny_model("tiny-llama", seed=2)
    engine = Engine(model, mesh=make_mesh(data=4, model=2))
    with pytest.raises(GenerationError, match="off a mesh"):
        engine.generate(prompts_for(model, lengths=[3, 8, 5]), max_new_tokens=6, batch_size=2)


def test_stream_sharded_matches_generate():
    model = tiny_model("tiny-gqa", seed=3)
    prompts = prompts_for(model, lengths=[6, 2, 9, 4])
    engine = Engine(model, mesh=make_mesh(data=4, model=2))
    stream = engine.stream(prompts, max_new_tokens=8, eos_ids=())
    pieces = [[] for _ in prompts]
    for new in stream:
        for row, toks in zip(pieces, new):
            row.extend(toks)
    assert pieces == stream.output.tokens == Engine(model).generate(prompts, max_new_tokens=8, eos_ids=()).tokens


def test_pallas_kernel_per_shard_matches_xla():
    model = tiny_model("tiny-mistral", seed=2)  # sliding window 16, 4 query / 2 KV heads
    prompts = prompts_for(model, lengths=[5, 18, 2, 9])
    want = Engine(model).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    kernel_model = type(model)(cfg=model.cfg.replace(attention_impl="pallas"), params=model.params, tokenizer=model.tokenizer)
    got = Engine(kernel_model, mesh=make_mesh(data=4, model=2)).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    assert got == want


def _resident_bytes() -> int:
    """Bytes of all live jax arrays, counting every device's shard (a replicated array once per device)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize * len(a.sharding.device_set)
               for a in jax.live_arrays() if not a.is_deleted())


def test_mesh_engine_holds_one_copy_of_the_params_per_device():
    """Placing params on a data=8 mesh makes the 8 replicas (real copies on CPU devices) and nothing more: once
    the caller drops its unplaced model (as `eej generate` does), no other copy of the weights stays alive."""
    gc.collect()
    before = _resident_bytes()
    model = tiny_model("tiny-llama", seed=4)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    engine = Engine(model, mesh=make_mesh(data=8))
    del model
    gc.collect()
    assert _resident_bytes() - before <= 8 * params_bytes
    out = engine.generate(prompts_for(engine.model), max_new_tokens=4, eos_ids=())
    del out
    gc.collect()
    assert _resident_bytes() - before <= 8 * params_bytes + 64 * 1024  # + the prompts' and state's small arrays


def test_chunked_prefill_sharded_matches_single_device(monkeypatch):
    import eej.model.attention as attention

    monkeypatch.setattr(attention, "CPU_SCORE_BYTES", 1)  # every prefill one query at a time
    model = tiny_model("tiny-gqa", seed=4, vocab_size=264)
    prompts = prompts_for(model, lengths=[20, 13, 31, 7, 19, 2, 25, 18])
    want = Engine(model).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    got = Engine(model, mesh=make_mesh(data=4, model=2)).generate(prompts, max_new_tokens=8, eos_ids=()).tokens
    assert got == want
