"""The process-wide store of compiled programs keeps the process under the kernel's memory-map limit by releasing
least recently used programs, and tells the user what to do when it cannot (eej.decoding.compiled_programs)."""

import gc

import numpy as np
import pytest

import eej.decoding.engine as engine_module
from eej.decoding.compiled_programs import (HEADROOM, CompiledPrograms, ProgramMemoryError, map_count, map_limit, new_owner,
                                           reserve_for)
from eej.decoding.engine import Engine
from eej.model import attention
from eej.testing import plain_tokens, random_prompts, tiny_model


def fake_store(base: int, per_program: int, limit: int) -> CompiledPrograms:
    """A store whose process holds `base` maps plus `per_program` for each program it keeps."""
    store = CompiledPrograms(count=lambda: base + per_program * len(store), limit=lambda: limit)
    return store


def test_least_recently_used_programs_go_first_until_under_the_line():
    limit = 40_000  # reserve 5000: the line is at 35000
    assert reserve_for(limit) == 5000
    store = fake_store(base=30_000, per_program=1000, limit=limit)
    for k in range(8):
        store.put(0, k, f"program {k}")
    store.get(0, 0)  # used again: now the most recent
    assert store.make_room() == 3  # 38000 maps -> 35000
    assert store.released == 3
    assert [store.get(0, k) for k in range(8)] == ["program 0", None, None, None, "program 4", "program 5",
                                                   "program 6", "program 7"]
    assert store.make_room() == 0  # at the line, not above it


def test_nothing_is_released_below_the_line_or_where_maps_are_not_counted():
    store = fake_store(base=100, per_program=10, limit=65530)
    store.put(0, "a", "program")
    assert store.make_room() == 0 and len(store) == 1
    blind = CompiledPrograms(count=lambda: None, limit=lambda: None)
    blind.put(0, "a", "program")
    assert blind.make_room() == 0 and len(blind) == 1


def test_a_program_goes_with_the_last_owner_that_uses_it():
    store = CompiledPrograms()
    a, b = new_owner(), new_owner()
    assert a != b
    for key in "xyz":
        store.put(a, key, key.upper())
    assert store.get(b, "x") == "X" and store.get(b, "w") is None
    store.forget(a)  # y and z go; x is still b's
    assert len(store) == 1 and store.get(b, "x") == "X"
    store.forget(b)
    assert len(store) == 0 and store.get(a, "x") is None


def test_engines_of_the_same_model_method_and_shapes_share_their_programs(own_programs):
    """A program is kept by what it is, not by the engine that compiled it: a second engine of the same model,
    method and shapes, built while the first lives, compiles nothing; other settings, shapes, a changed trace
    setting (the attention score budget) or an engine built with share_programs=False compile their own, every
    engine decodes what it decoded before, and the programs go with the last engine that used them."""
    model = tiny_model("tiny-llama", 0)
    prompts = random_prompts(np.random.default_rng(3), [20, 9], model.cfg.vocab_size)
    engine = Engine(model)
    first = engine.generate(prompts, max_new_tokens=8, eos_ids=())
    held = len(own_programs)
    assert first.compile_seconds > 0 and held == 2  # its prefill and decode loop
    again = Engine(model).generate(prompts, max_new_tokens=8, eos_ids=())
    assert again.compile_seconds == 0 and again.tokens == first.tokens and len(own_programs) == held
    other_weights = tiny_model("tiny-llama", 1)  # same shapes, other values: the same programs, other tokens
    assert Engine(other_weights).generate(prompts, max_new_tokens=8, eos_ids=()).compile_seconds == 0
    private = Engine(model, share_programs=False)
    assert private.generate(prompts, max_new_tokens=8, eos_ids=()).compile_seconds > 0
    assert len(own_programs) == 2 * held
    del private
    gc.collect()
    assert len(own_programs) == held
    longer = Engine(model).generate(prompts, max_new_tokens=20, eos_ids=())
    assert longer.compile_seconds > 0 and longer.tokens[0][:8] == first.tokens[0][:8]
    gc.collect()
    assert len(own_programs) == held  # the longer engine's programs went with it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "CPU_SCORE_BYTES", 1)  # read while tracing: its programs are not the others'
        chunked = Engine(model).generate(prompts, max_new_tokens=8, eos_ids=())
    assert chunked.compile_seconds > 0 and chunked.tokens == first.tokens
    del engine
    gc.collect()
    assert len(own_programs) == 0


def test_maps_held_by_others_give_a_clear_error():
    store = fake_store(base=64_000, per_program=10, limit=65530)
    store.put(0, "a", "program")
    with pytest.raises(ProgramMemoryError, match=r"64000 memory maps of the kernel's limit of 65530 \(vm.max_map_count\).*sysctl"):
        store.make_room()
    assert len(store) == 0 and store.released == 1  # it let go of what it had before giving up
    assert isinstance(ProgramMemoryError("x"), OSError)  # the CLI's one-line error, exit status 2
    still_room = fake_store(base=65530 - HEADROOM, per_program=10, limit=65530)  # above the line, yet one compile fits
    still_room.put(0, "a", "program")
    assert still_room.make_room() == 1


def test_an_engine_near_the_limit_releases_programs_and_decodes_the_same(monkeypatch):
    """Real map counts: the limit is set just above what the process holds now, so the prompt-length buckets'
    programs (~390 maps each on a tiny model) cannot all stay; older ones are released and compiled again."""
    if map_count() is None or map_limit() is None:
        pytest.skip("no /proc here to count memory maps")
    model = tiny_model("tiny-llama", 0)
    prompts = [random_prompts(np.random.default_rng(n), [n], model.cfg.vocab_size) for n in (3, 20, 40, 70)]
    expected = [plain_tokens(model, p, 8) for p in prompts]
    base = map_count()
    store = CompiledPrograms(limit=lambda: base + 4096 + 600)  # the line: 600 maps above today's count
    monkeypatch.setattr(engine_module, "PROGRAMS", store)
    engine = Engine(model)
    got = [engine.generate(p, max_new_tokens=8, eos_ids=()).tokens for p in prompts]
    assert got == expected
    assert store.released > 0
    assert map_count() < base + 600 + 1200  # under the line but for the last compile's own maps
    assert engine.generate(prompts[0], max_new_tokens=8, eos_ids=()).tokens == expected[0]  # compiled again
