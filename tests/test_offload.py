"""Expert offloading (eej.experts): the LRU cache, the offloaded executor and the transfer-time model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eej.testing import random_prompts, tiny_model
from eej.api import engine
from eej.decoding.m2r2 import random_method_params
from eej.experts.cache import CacheCapacityError, ExpertCache
from eej.experts.offload import OffloadedDecoder
from eej.experts.timeline import Costs, simulate


def _plain(model, prompts, n):
    out = engine(model, "plain").generate(prompts, max_new_tokens=n, eos_ids=())
    return np.array([row[:n] for row in out.tokens])


@pytest.mark.parametrize("capacity,prefetch", [(4, "none"), (4, "m2r2"), (5, "next-layer"), (6, "m2r2"), (8, "none")])
def test_offloaded_output_equals_in_memory_model(capacity, prefetch):
    """Prefetching changes what is loaded when, never the output."""
    model = tiny_model("tiny-moe", seed=3)  # 8 experts, top-2
    prompts = random_prompts(np.random.default_rng(0), [6, 3], model.cfg.vocab_size)
    fast = random_method_params(model, 1, num_fast=2, targets=("wq", "wk", "wv", "wo"), reduced=False) if prefetch == "m2r2" else None
    dec = OffloadedDecoder(model, capacity=capacity, prefetch=prefetch, fast=fast, record_slow=True)
    got = dec.generate(prompts, 10)
    np.testing.assert_array_equal(got, _plain(model, prompts, 10))
    stats = dec.cache.stats
    assert stats.needed == sum(len(n) for r in dec.records for n in r.needed)
    assert (stats.prefetch_loads > 0) == (prefetch != "none")
    rec = dec.records[-1]
    assert rec.slow_predictions.shape == (4, 4, 2, 2)
    # a layer's own router on its own residual is exactly its routing
    for layer in range(4):
        np.testing.assert_array_equal(rec.slow_predictions[layer, layer], rec.routed[layer])


def test_slots_always_hold_the_expert_the_cache_names():
    model = tiny_model("tiny-moe", seed=4)
    fast = random_method_params(model, 2, num_fast=1, targets=("wq", "wk", "wv", "wo"), reduced=False)
    dec = OffloadedDecoder(model, capacity=3, prefetch="m2r2", fast=fast)
    prompts = random_prompts(np.random.default_rng(1), [4], model.cfg.vocab_size)
    dec.generate(prompts, 12)
    checked = 0
    for layer in range(model.cfg.num_layers):
        for slot, expert in enumerate(dec.cache.resident(layer)):
            if expert < 0:
                continue
            for i, name in enumerate(("w_gate", "w_up", "w_down")):
                want = np.asarray(model.params["layers"][layer][name][expert])
                np.testing.assert_array_equal(np.asarray(dec.slots[layer][slot][i]), want)
                assert dec.slots[layer][slot][i].sharding.memory_kind in (None, "device")
            checked += 1
    assert checked == model.cfg.num_layers * 3  # every slot filled after 12 steps
    assert dec.host_memory == "pinned_host"  # JAX's CPU device offers it too
    assert dec.host_experts[0][0][0].sharding.memory_kind == "pinned_host"


def test_dense_model_and_small_cache_are_refused():
    with pytest.raises(ValueError, match="dense model"):
        OffloadedDecoder(tiny_model("tiny-llama"), capacity=2)
    model = tiny_model("tiny-moe")
    dec = OffloadedDecoder(model, capacity=2)  # top-2: one row fits, four rows need more distinct experts
    prompts = random_prompts(np.random.default_rng(2), [3, 3, 3, 3], model.cfg.vocab_size)
    with pytest.raises(CacheCapacityError, match="raise the capacity"):
        dec.generate(prompts, 4)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 5),
    requests=st.lists(
        st.tuples(st.integers(0, 1), st.lists(st.integers(0, 5), min_size=1, max_size=5), st.sampled_from(["demand", "prefetch"])),
        max_size=40,
    ),
)
def test_cache_matches_a_reference_lru(capacity, requests):
    cache = ExpertCache(num_layers=2, num_experts=6, capacity=capacity)
    ref = [dict() for _ in range(2)]  # expert -> last use, per layer
    clock = 0
    for layer, experts, kind in requests:
        wanted = list(dict.fromkeys(experts))
        if len(wanted) > capacity:
            with pytest.raises(CacheCapacityError):
                cache.request(layer, experts, kind)
            continue
        loads = cache.request(layer, experts, kind)
        assert [ld.expert for ld in loads] == [e for e in wanted if e not in ref[layer]]
        for e in wanted:
            clock += 1
            if e in ref[layer]:
                if kind == "demand":
                    ref[layer][e] = clock
                continue
            if len(ref[layer]) == capacity:
                victim = min((x for x in ref[layer] if x not in wanted), key=lambda x: ref[layer][x])
                del ref[layer][victim]
            ref[layer][e] = clock
        for e in wanted:  # everything requested is resident, in a distinct slot
            assert cache.slot_of(layer, e) >= 0
        resident = [e for e in cache.resident(layer) if e >= 0]
        assert sorted(resident) == sorted(ref[layer]) and len(set(resident)) == len(resident) <= capacity
    s = cache.stats
    assert s.loads == s.demand_loads + s.prefetch_loads and s.wasted_prefetches <= s.prefetch_loads


def _record(needed, loads):
    from eej.experts.cache import Load
    from eej.experts.offload import StepRecord

    return StepRecord(needed=needed, predicted=[[] for _ in needed], loads=[Load(*ld) for ld in loads], routed=np.zeros((len(needed), 1, 1)))


def test_timeline_model():
    costs = Costs(attn_s=1.0, experts_s=2.0, other_s=0.5, fast_s=0.0, bandwidth=10.0, expert_bytes=10)  # 1 s per expert
    # no loads: pure compute
    assert simulate([_record([[0], [1]], [])], costs) == [2 * 3.0 + 0.5]
    # on demand: layer 0 waits 2 transfers after its router
    rec = _record([[0, 1], [2]], [(0, 0, 0, "demand"), (0, 1, 1, "demand")])
    assert simulate([rec], costs) == [(1 + 2 + 2) + (1 + 2) + 0.5]
    # ahead of time: the prefetch of layer 1's expert runs during layer 0 and is ready in time
    fast = Costs(attn_s=1.0, experts_s=2.0, other_s=0.5, fast_s=1.0, bandwidth=10.0, expert_bytes=10)
    rec = _record([[0], [2]], [(1, 2, 0, "prefetch")])
    assert simulate([rec], fast) == [1.0 + 3 + 3 + 0.5]
    # one layer ahead: issued at layer 0's router (t=1), arrives at t=2, before layer 1 needs it (t=4)
    rec = _record([[0], [2]], [(1, 2, 0, "prefetch", 0)])
    assert simulate([rec], costs) == [3 + 3 + 0.5]
    # the same expert on demand would have cost its transfer
    rec = _record([[0], [2]], [(1, 2, 0, "demand")])
    assert simulate([rec], costs) == [3 + (1 + 1 + 2) + 0.5]
