"""The notebook API (eej.api): generate, engine reuse, compare / benchmark reports, plots, input errors."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import eej
from eej.api import engine
from eej.bench.report import BenchReport
from eej.bench.report import check_schema
from eej.decoding.engine import Engine
from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.model.transformer import embed, logits_from_hidden, run_layers

from eej.testing import tiny_model


@dataclasses.dataclass(frozen=True)
class FirstLayerExit(Strategy):
    """Test-only lossy strategy: every token from layer 0 alone."""

    name: ClassVar[str] = "first-layer"
    lossless: ClassVar[bool] = False

    def step(self, s: StepInputs) -> StepResult:
        x, cache = run_layers(s.params, embed(s.params, s.pending[:, None], s.cfg), s.cache, s.positions, s.cfg, 0, 1)
        return StepResult.one_token(s.sample(logits_from_hidden(s.params, x[:, 0], s.cfg)), cache,
                                    s.method_state, forwards=0, layers=1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-llama", seed=2)


def test_generate_text_batch_and_token_ids(model):
    one = eej.generate(model, "hello", max_new_tokens=6)
    assert len(one.texts) == 1 and one.text == model.tokenizer.decode(one.tokens[0]) and len(one.tokens[0]) <= 6
    batch = eej.generate(model, ["hello", "a much longer prompt"], max_new_tokens=6)
    assert batch.texts[0] == one.text  # batching doesn't change a row
    ids = model.tokenizer.encode_chat("hello")
    assert eej.generate(model, ids, max_new_tokens=6).tokens == one.tokens
    assert one.tokens_per_second > 0 and "tokens/s" in one._repr_markdown_() and "hello" in one._repr_markdown_()


def test_engines_are_reused_per_model_and_method(model):
    e = engine(model, "plain")
    assert engine(model, "plain") is e
    assert engine(model, "plain", cache_size=64) is not e
    other = tiny_model("tiny-llama", seed=2)
    assert engine(other, "plain") is not e
    strategy = FirstLayerExit()
    assert engine(model, strategy) is engine(model, strategy)
    params_a, params_b = {"x": jnp.zeros(1)}, {"x": jnp.zeros(1)}
    assert engine(model, (strategy, params_a)) is not engine(model, (strategy, params_b))
    eej.generate(model, "hi", max_new_tokens=4)
    again = eej.generate(model, "hi", max_new_tokens=4)
    assert again.output.compile_seconds == 0.0  # same shapes: the compiled code is reused


@pytest.mark.real_model
def test_a_method_by_name_is_built_once_per_model(real_model):
    """A spec's engine, add-ons and all, is built on the first call only (each call built them anew before)."""
    first = engine(real_model, "kangaroo")
    assert first.method_params is not None and engine(real_model, "kangaroo") is first


def test_generate_with_a_strategy_matches_the_engine(model):
    strategy = FirstLayerExit()
    got = eej.generate(model, ["ab", "cdef"], method=strategy, max_new_tokens=5)
    prompts = [model.tokenizer.encode_chat(p) for p in ["ab", "cdef"]]
    assert got.tokens == Engine(model, strategy).generate(prompts, 5).tokens
    assert got.method == "first-layer"


def test_compare_report(model, tmp_path):
    report = eej.compare(model, {"greeting": ["hello", "hi there"], "question": ["why?"]},
                         {"plain": "plain", "shallow": FirstLayerExit()}, max_new_tokens=6)
    doc = report.doc
    check_schema(doc)
    assert list(doc["methods"]) == ["plain", "shallow"] and doc["settings"]["categories"] == ["greeting", "question"]
    rows = {r["contestant"]: r for r in report.rows()}
    assert rows["plain"]["avg_layers"] == 4.0 and rows["shallow"]["avg_layers"] == 1.0
    assert rows["plain"]["identical_rate"] == 1.0 and rows["plain"]["token_agreement"] == 1.0
    assert report.rows("question")[0]["answers"] == 1
    assert "`shallow`" in report.table() and "greeting" in report.table(per_category=True)
    assert "eej bench: tiny-llama" in report._repr_markdown_()
    assert doc["settings"]["command"].startswith("eej.compare(eej.load_model('tiny-llama')")
    figure = report.plot()
    assert len(figure.axes) == 2
    paths = report.save(str(tmp_path / "r"))
    assert BenchReport.load(paths[0]).doc == json.loads(json.dumps(doc))
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.md").read_text().startswith("# eej bench")


def test_a_method_named_twice_in_one_comparison_runs_on_an_engine_of_its_own(model):
    """An A/A control ({"plain": "plain", "again": "plain"}) times two engines compiled apart, as `eej bench` does; the
    first keeps the cached engine, the second is neither cached nor shared."""
    from eej.api import _contestants

    strategy = FirstLayerExit()
    first, again, shallow, shallow_again = _contestants(
        model, {"plain": "plain", "again": "plain", "shallow": strategy, "deeper": strategy}, None)
    assert first.engine is engine(model, "plain") and again.engine is not first.engine
    assert shallow.engine is engine(model, strategy) and shallow_again.engine is not shallow.engine
    assert again.engine._private is not None and engine(model, "plain") is first.engine
    report = eej.compare(model, ["hello"], {"plain": "plain", "again": "plain"}, max_new_tokens=4)
    assert report.rows()[1]["identical_rate"] == 1.0


def test_benchmark_from_a_questions_file(model, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 1, "category": "qa", "turns": ["Who?", "And then?"]},
        {"question_id": 2, "category": "qa", "turns": ["Why?"]},
        {"question_id": 3, "category": "rag", "turns": ["Where?"]},
    ]))
    report = eej.benchmark(model, str(path), ["plain"], categories=["qa"], limit=1, max_new_tokens=5, progress=False)
    s = report.doc["settings"]
    assert s["categories"] == ["qa"] and s["answers_per_contestant"] == 2 and s["questions"] == str(path)
    assert report.rows()[0]["answers"] == 2


def test_input_errors(model):
    with pytest.raises(TypeError, match="spec string"):
        eej.generate(model, "hi", method=42)
    with pytest.raises(ValueError, match="listed twice"):
        eej.compare(model, ["hi"], [FirstLayerExit(), FirstLayerExit()])
    with pytest.raises(TypeError, match="list of strings"):
        eej.compare(model, "hi", ["plain"])
    with pytest.raises(ValueError, match="unknown method"):
        eej.generate(model, "hi", method="no-such-method")


def test_token_ids_as_arrays_and_lists_of_them(model):
    ids = model.tokenizer.encode_chat("hello")
    want = eej.generate(model, ids, max_new_tokens=4).tokens[0]
    for prompt in (np.array(ids), jnp.array(ids, jnp.int32), tuple(ids), [np.int64(t) for t in ids]):
        assert eej.generate(model, prompt, max_new_tokens=4).tokens == [want]
    other = model.tokenizer.encode_chat("bye")
    batch = eej.generate(model, [np.array(ids), jnp.array(other)], max_new_tokens=4)
    assert batch.tokens[0] == want and batch.prompts == [ids, other]
    square = np.array([ids, ids])  # 2-D: one row per prompt
    assert eej.generate(model, square, max_new_tokens=4).tokens == [want, want]
    assert eej.generate(model, jnp.asarray(square), max_new_tokens=4).tokens == [want, want]


@pytest.mark.parametrize("prompts, message", [
    ({"prompt": "hi"}, "prompts: expected a string, token ids .*; got dict"),
    (b"hi", "got bytes \\(decode bytes to a string first\\)"),
    (True, "got bool"),
    (np.array([1.0, 2.0]), "1-D integer token ids, got float64"),
    (np.array([True, False]), "1-D integer token ids, got bool"),
    (np.zeros((2, 3), np.float32), "2-D array must be integer token ids"),
    (np.zeros((1, 1, 3), np.int32), "shape \\(1, 1, 3\\)"),
    ([1, True], "element 1 is bool"),
    ([1, 2.0], "element 1 is float"),
    (["hi", {"prompt": "x"}], "prompt 1: expected a string or token ids.*got dict"),
    (["hi", b"x"], "prompt 1: .*got bytes"),
    ([np.array([1.5])], "prompt 0: an array prompt must be 1-D integer"),
])
def test_prompts_of_the_wrong_type_are_refused(model, prompts, message):
    with pytest.raises(TypeError, match=message):
        eej.generate(model, prompts, max_new_tokens=2)
