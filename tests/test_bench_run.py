"""`eej bench` end to end on a tiny random model: schema, exact metrics for plain and a lossy method, outputs.

One bench run (module fixture) serves most tests; the lossy method is a test-only strategy that
always exits after the first two layers, so its avg_layers must come out at exactly 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.bench.contestants import method_contestants
from eej.bench.fidelity import sequence_argmax, teacher_argmax
from eej.bench.metrics import METRIC_KEYS, agreement_count
from eej.bench.quality import reference_rouge_l
from eej.bench.questions import Question
from eej.bench.report import CONTESTANT_KEYS, TOP_LEVEL_KEYS, check_schema, markdown_report
from eej.bench.runner import RunSettings, run_bench
from eej.cli import main
from eej.decoding import methods
from eej.decoding.engine import Engine
from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.model.cache import init_cache
from eej.model.transformer import embed, forward, logits_from_hidden, run_layers
from eej.weights.registry import load_model

EXIT_LAYER = 2
QUESTIONS = [
    {"question_id": 7, "category": "writing", "turns": ["Hi there.", "Again."]},
    {"question_id": 9, "category": "qa", "turns": ["Why?"]},
    {"question_id": 8, "category": "qa", "turns": ["Who?"]},
    {"question_id": 3, "category": "qa", "turns": ["How?"], "reference": ["Like this."]},
    {"question_id": 5, "category": "translation", "turns": ["Hallo."]},
]


@dataclasses.dataclass(frozen=True)
class ShallowExit(Strategy):
    """Test-only lossy early exit: every token from the first EXIT_LAYER layers (deeper KV never read). Every step
    reports a check; it reports an exit where the pending token is even (the counts' bookkeeping, not the compute)."""

    name: ClassVar[str] = "test-shallow"
    lossless: ClassVar[bool] = False

    def step(self, s: StepInputs) -> StepResult:
        x, cache = run_layers(s.params, embed(s.params, s.pending[:, None], s.cfg), s.cache, s.positions, s.cfg, 0, EXIT_LAYER)
        logits = logits_from_hidden(s.params, x[:, 0], s.cfg)
        return StepResult.one_token(s.sample(logits), cache, s.method_state, forwards=0, layers=EXIT_LAYER,
                                    exited=s.pending % 2 == 0, checked=True, logits=logits)


SHALLOW = methods.MethodSpec("test-shallow", load=lambda model, settings: (ShallowExit(), None),
                             random=lambda model, seed: (ShallowExit(), None))


def teacher_logits(model, sequence: list[int]) -> jnp.ndarray:
    """Logits [T, V] of one exact-length full forward over `sequence`."""
    tokens = jnp.asarray([sequence], jnp.int32)
    positions = jnp.arange(len(sequence), dtype=jnp.int32)[None]
    return forward(model.params, tokens, positions, init_cache(model.cfg, 1, len(sequence)), model.cfg)[0][0]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench")
    questions = tmp / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    files = {k: str(tmp / name) for k, name in
             [("out", "r.json"), ("report", "r.md"), ("plot", "r.png"), ("answers", "a.jsonl")]}
    argv = ["bench", "--model", "tiny-llama", "--questions", str(questions), "--methods", "test-shallow,plain",
            "--categories", "mt_bench,qa", "--limit", "2", "--max-new-tokens", "8", "--cache-size", "128",
            "--no-progress", "--note", "shared machine"]
    for k, v in files.items():
        argv += [f"--{k}", v]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(methods._METHODS, "test-shallow", SHALLOW)
        assert main(argv) == 0
    with open(files["out"]) as f:
        doc = json.load(f)
    with open(files["answers"]) as f:
        answers = [json.loads(line) for line in f]
    return {"doc": doc, "answers": answers, "files": files, "questions": str(questions)}


def test_json_schema_is_stable(bench_run):
    doc = bench_run["doc"]
    check_schema(doc)
    assert tuple(doc) == TOP_LEVEL_KEYS
    assert list(doc["methods"]) == ["plain", "test-shallow"] and doc["peers"] == {}
    for c in doc["methods"].values():
        assert tuple(c) == CONTESTANT_KEYS
        assert tuple(c["overall"]) == METRIC_KEYS
        assert list(c["per_category"]) == ["mt_bench", "qa"]
        assert c["compile_seconds"] > 0
    assert doc["model"]["name"] == "tiny-llama" and doc["model"]["num_layers"] == 4
    s = doc["settings"]
    assert s["questions_per_category"] == {"mt_bench": 1, "qa": 2}
    assert s["answers_per_contestant"] == 4 and s["greedy"] is True
    assert s["command"].startswith("eej bench --model tiny-llama") and "--limit 2" in s["command"]
    assert "cpu_count" in doc["machine"] and "load_average_start" in doc["machine"]
    assert doc["machine"]["peak_rss_mib"] > 100  # the process's peak resident memory, read after the run


def test_plain_metrics_are_exact(bench_run):
    o = bench_run["doc"]["methods"]["plain"]["overall"]
    assert o["answers"] == 4
    assert o["mean_accepted_tokens"] == 1.0
    assert o["avg_layers"] == 4.0
    assert o["speedup"] == 1.0 and o["identical_rate"] == 1.0 and o["rouge_l"] == 1.0
    assert o["token_agreement"] == 1.0  # greedy tokens are the model's argmax on their own prefix
    assert o["tokens_per_second"] > 0


def test_lossy_method_metrics(bench_run):
    doc, answers = bench_run["doc"], bench_run["answers"]
    o = doc["methods"]["test-shallow"]["overall"]
    assert o["avg_layers"] == float(EXIT_LAYER)
    assert o["mean_accepted_tokens"] == pytest.approx(o["new_tokens"] / 4)  # only the 4 prefills are full forwards
    assert doc["methods"]["test-shallow"]["info"]["lossless"] is False
    mine = {(a["question_id"], a["turn"]): a for a in answers if a["contestant"] == "test-shallow"}
    plain = {(a["question_id"], a["turn"]): a for a in answers if a["contestant"] == "plain"}
    assert set(mine) == set(plain) == {(7, 1), (7, 2), (3, 1), (8, 1)}
    identical = [mine[k]["tokens"] == plain[k]["tokens"] for k in mine]
    assert o["identical_rate"] == sum(identical) / 4
    assert o["token_agreement"] == sum(a["agreement"] for a in mine.values()) / sum(len(a["tokens"]) for a in mine.values())
    steps = sum(len(a["tokens"]) - 1 for a in mine.values())  # the first token comes from the prefill
    assert o["checked_fraction"] == 1.0 and o["speculated_fraction"] == 0.0
    assert o["exited_fraction"] == sum(t % 2 == 0 for a in mine.values() for t in a["tokens"][:-1]) / steps
    p = doc["methods"]["plain"]["overall"]
    assert p["checked_fraction"] == p["exited_fraction"] == p["speculated_fraction"] == 0.0


def test_reference_metrics_reach_the_document_and_report(bench_run):
    doc, answers = bench_run["doc"], bench_run["answers"]
    for name, c in doc["methods"].items():
        o, qa, mt = c["overall"], c["per_category"]["qa"], c["per_category"]["mt_bench"]
        assert (o["reference_rouge_l_count"], o["reference_skipped"]) == (1, 3)  # only question 3 has a reference
        assert (qa["reference_rouge_l_count"], qa["reference_skipped"]) == (1, 1)
        assert (mt["reference_rouge_l_count"], mt["reference_skipped"], mt["reference_rouge_l"]) == (0, 2, None)
        text = next(a["text"] for a in answers if a["contestant"] == name and a["question_id"] == 3)
        assert o["reference_rouge_l"] == qa["reference_rouge_l"] == reference_rouge_l(text, "Like this.")
        assert (o["reference_perplexity_count"], qa["reference_perplexity_count"], mt["reference_perplexity_count"]) == (1, 1, 0)
        assert o["reference_perplexity"] == qa["reference_perplexity"] and mt["reference_perplexity"] is None
    assert doc["settings"]["reference_perplexity"] is True and doc["settings"]["reference_perplexity_omitted"] == {}
    # plain's: one full forward over the prompt + the reference (as the answer after the chat template's header)
    model = load_model("tiny-llama")
    prompt, ref = model.tokenizer.encode_chat("How?"), model.tokenizer.encode("Like this.")
    assert len(ref) > 8
    ref = ref[:8]  # capped at --max-new-tokens
    logits = teacher_logits(model, prompt + ref)
    nll = -sum(float(jax.nn.log_softmax(logits[len(prompt) - 1 + i])[t]) for i, t in enumerate(ref))
    plain = doc["methods"]["plain"]["overall"]["reference_perplexity"]
    assert plain == pytest.approx(np.exp(nll / len(ref)), rel=1e-4)
    assert doc["methods"]["test-shallow"]["overall"]["reference_perplexity"] != pytest.approx(plain, rel=1e-3)
    scored = [a for a in answers if a["question_id"] == 3]
    assert len(scored) == 2 and all(a["reference_tokens"] == len(ref) for a in scored)
    assert all(a["reference_nll"] is None for a in answers if a["question_id"] != 3)
    with open(bench_run["files"]["report"]) as f:
        report = f.read()
    assert "## Task quality" in report and "reference perplexity" in report


def test_agreement_matches_an_unpadded_forward(bench_run):
    """The bucketed teacher pass gives what one exact-length forward over prompt + answer gives."""
    model = load_model("tiny-llama")
    answer = next(a for a in bench_run["answers"] if a["contestant"] == "test-shallow" and a["turn"] == 2)
    tok = model.tokenizer
    prompt = tok.encode_chat([
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": next(
            a["text"] for a in bench_run["answers"] if a["contestant"] == "test-shallow" and a["question_id"] == 7 and a["turn"] == 1)},
        {"role": "user", "content": "Again."},
    ])
    assert len(prompt) == answer["prompt_length"]  # turn 2 is asked with the method's own turn-1 answer
    seq = prompt + answer["tokens"]
    argmax = np.asarray(teacher_argmax(model.params, jnp.asarray([seq]), model.cfg))[0]  # exact length, no padding
    assert agreement_count(answer["tokens"], argmax, len(prompt)) == answer["agreement"]


def test_known_mismatch_gives_exact_agreement_fraction():
    model = load_model("tiny-llama")
    prompt = model.tokenizer.encode_chat("Hello.")
    greedy = Engine(model).generate([prompt], 12, eos_ids=()).tokens[0]
    assert agreement_count(greedy, sequence_argmax(model, prompt + greedy), len(prompt)) == 12
    wrong = greedy[:-1] + [(greedy[-1] + 1) % model.cfg.vocab_size]
    assert agreement_count(wrong, sequence_argmax(model, prompt + wrong), len(prompt)) == 11


def test_report_and_plot_are_written(bench_run):
    files = bench_run["files"]
    with open(files["report"]) as f:
        report = f.read()
    assert bench_run["doc"]["settings"]["command"] in report
    assert "## Per category" in report and "| mt_bench | `test-shallow` |" in report
    assert "**Note:** shared machine" in report
    assert f"- peak_rss_mib: {bench_run['doc']['machine']['peak_rss_mib']}" in report
    assert "| exited early | checked exit | row speedup |" in report
    with open(files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    old = json.loads(json.dumps(bench_run["doc"]))  # a document written before the checks were counted
    for c in old["methods"].values():
        for metrics in (c["overall"], *c["per_category"].values()):
            metrics["checked_fraction"] = None
    assert "| exited early | row speedup |" in markdown_report(old).split("## Definitions")[0]


@pytest.mark.parametrize("residual", [False, True])
def test_sampling_reports_an_identical_rate_only_where_the_draws_are_coupled(tmp_path, capsys, residual):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[1]) + "\n")
    out = tmp_path / "r.json"
    argv = ["bench", "--model", "tiny-llama", "--questions", str(questions), "--max-new-tokens", "8", "--cache-size", "128",
            "--temperature", "0.8", "--no-progress", "--no-agreement", "--out", str(out), "--methods", "plain,again=plain"]
    assert main(argv + ["--residual-sampling"] * residual) == 0
    doc = json.loads(out.read_text())
    o = doc["methods"]["plain"]["overall"]
    assert o["token_agreement"] is None and o["rouge_l"] == 1.0
    assert doc["settings"]["greedy"] is False and doc["settings"]["coupled"] is not residual
    assert ("--residual-sampling" in doc["settings"]["command"]) is residual
    again = doc["methods"]["again"]["overall"]["identical_rate"]
    assert (o["identical_rate"], again) == ((None, None) if residual else (1.0, 1.0))
    assert "| `plain` | method |" in capsys.readouterr().out


def test_draws_answer_each_question_again_with_draws_of_its_own(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[1]) + "\n" + json.dumps(QUESTIONS[2]) + "\n")
    out, answers = tmp_path / "r.json", tmp_path / "a.jsonl"
    argv = ["bench", "--model", "tiny-llama", "--questions", str(questions), "--max-new-tokens", "12", "--cache-size", "128",
            "--temperature", "1.0", "--draws", "3", "--batch-size", "2", "--no-progress", "--no-agreement",
            "--out", str(out), "--answers", str(answers)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["draws"] == 3 and doc["settings"]["questions_per_category"] == {"qa": 6}
    assert "--draws 3" in doc["settings"]["command"]
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    by_id = {r["question_id"]: r["tokens"] for r in rows if r["contestant"] == "plain"}
    assert sorted(map(str, by_id)) == ["8", "8#2", "8#3", "9", "9#2", "9#3"]
    # Each copy of a question is sampled anew (a byte-level random model at temperature 1: 12 equal tokens by chance
    # is out of the question).
    assert len({tuple(by_id[q]) for q in (9, "9#2", "9#3")}) == 3


def test_ignore_eos_makes_every_answer_full_length():
    model = load_model("tiny-llama")
    prompt = model.tokenizer.encode_chat("Why?")
    first = Engine(model).generate([prompt], 1).tokens[0][0]
    model = dataclasses.replace(model, cfg=model.cfg.replace(eos_ids=(first,)))  # the first answer token ends a row
    questions = [Question(1, "qa", ("Why?",))]
    contestants = method_contestants(model, ["plain"], cache_size=128)
    stopped, _ = run_bench(contestants, questions, model.tokenizer, RunSettings(max_new_tokens=8, warmup=False))
    assert stopped[0].tokens == [first]
    full, _ = run_bench(contestants, questions, model.tokenizer, RunSettings(max_new_tokens=8, warmup=False, ignore_eos=True))
    assert len(full[0].tokens) == 8 and full[0].tokens == Engine(model).generate([prompt], 8, eos_ids=()).tokens[0]
    assert full[0].decode_seconds is not None and 0 < full[0].decode_seconds <= full[0].seconds


def test_fixed_length_rounds_and_attention_implementations(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps(QUESTIONS[1]) + "\n")
    out, answers = tmp_path / "r.json", tmp_path / "a.jsonl"
    argv = ["bench", "--model", "tiny-llama", "--questions", str(questions), "--max-new-tokens", "6", "--cache-size", "128",
            "--ignore-eos", "--rounds", "2", "--run-noise-sd", "0.05", "--attention", "xla,pallas", "--no-progress",
            "--out", str(out),
            "--answers", str(answers)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    check_schema(doc)
    assert tuple(doc) == TOP_LEVEL_KEYS and list(doc["methods"]) == ["plain", "plain@pallas"]
    assert [c["info"]["attention"] for c in doc["methods"].values()] == ["xla", "pallas"]
    s = doc["settings"]
    assert s["ignore_eos"] is True and s["rounds"] == 2 and s["attention"] == ["xla", "pallas"]
    assert s["answers_per_contestant"] == 3 and doc["model"]["attention"] == "xla"
    assert "--ignore-eos --rounds 2 --run-noise-sd 0.05 --attention xla,pallas" in s["command"]
    assert s["run_noise_sd"] == 0.05
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(records) == 6 and all(len(r["tokens"]) == 6 for r in records)  # one record per answer, not per round
    o = doc["methods"]["plain@pallas"]["overall"]
    assert o["new_tokens"] == 18 and o["identical_rate"] == 1.0  # the Pallas kernel decodes plain's tokens


def test_matmul_implementations_run_side_by_side(tmp_path):
    """`--matmul cpu,xla`: every method once with the CPU kernel (the reference) and once with XLA's matmuls."""
    out = tmp_path / "r.json"
    assert main([*_bench_argv(tmp_path, "--methods", "plain", "--matmul", "cpu,xla"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["methods"]) == ["plain", "plain@matmul-xla"]
    assert [c["info"]["matmul"] for c in doc["methods"].values()] == ["cpu", "xla"]
    assert doc["settings"]["matmul"] == ["cpu", "xla"] and doc["model"]["matmul"] == "cpu"
    assert "--matmul cpu,xla" in doc["settings"]["command"]


def test_a_labelled_second_plain_is_an_a_a_control(tmp_path, monkeypatch):
    """`again=plain` runs plain decoding a second time on its own engine, under its own name, compiled apart (its
    code placement is part of the noise it reads): same tokens as the baseline, a speedup that reads the run's
    noise; a label keeps its spec's method and preset."""
    monkeypatch.setitem(methods._METHODS, "test-shallow", SHALLOW)
    out = tmp_path / "r.json"
    assert main([*_bench_argv(tmp_path, "--methods", "again=plain,plain,exit2=test-shallow"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["methods"]) == ["plain", "again", "exit2"]
    again = doc["methods"]["again"]
    assert again["info"]["method"] == "plain" and again["overall"]["identical_rate"] == 1.0
    assert again["compile_seconds"] > 0 and doc["methods"]["plain"]["compile_seconds"] > 0
    assert again["overall"]["new_tokens"] == doc["methods"]["plain"]["overall"]["new_tokens"]
    assert doc["methods"]["exit2"]["info"]["method"] == "test-shallow"
    model = load_model("tiny-llama")
    engines = [c.engine for c in method_contestants(model, ["plain", "again=plain"], cache_size=64)]
    assert engines[0] is not engines[1]


@pytest.mark.parametrize("flags,message", [
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--run-noise-sd", "-0.1"], "--run-noise-sd must be >= 0, got -0.1"),
    (["--run-noise-sd", "nan"], "--run-noise-sd must be >= 0, got nan"),
    (["--attention", "xla,xla"], "'xla' is listed twice in --attention"),
    (["--attention", "xla,nope"], "unknown attention implementation 'nope'"),
    (["--matmul", "cpu,nope"], "--matmul: unknown implementation 'nope'"),
    (["--matmul", "auto,cpu"], "'cpu' is listed twice in --matmul"),
    (["--methods", "a=plain,a=plain"], "'a=plain' is listed twice in --methods"),
    (["--methods", "a=plain,a=plain:x"], "contestant 'a' is named twice in --methods"),
    (["--methods", "plain=test-shallow"], "the name 'plain' is the baseline's; give 'test-shallow' another name"),
    (["--methods", "again="], "'again=' in --methods names no method after '='"),
])
def test_bench_option_errors(tmp_path, capsys, flags, message):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[1]) + "\n")
    assert main(["bench", "--model", "tiny-llama", "--questions", str(questions), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eej: error: ") and message in err and len(err.strip().splitlines()) == 1


def _bench_argv(tmp_path, *flags) -> list[str]:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[1]) + "\n")
    return ["bench", "--model", "tiny-llama", "--questions", str(questions), "--max-new-tokens", "4",
            "--cache-size", "64", "--no-progress", "--no-agreement", *flags]


@pytest.mark.parametrize("flags,message", [
    (["--cache-size", "100000"], "--cache-size must be in [1, 2048]"),
    (["--max-new-tokens", "100000000000000000000"], "--max-new-tokens must be in [1, 63]"),
])
def test_bench_lengths_beyond_the_context_are_refused(tmp_path, capsys, flags, message):
    assert main([*_bench_argv(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eej: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("outputs,message", [
    (lambda tmp: ["--report", str(tmp / "r.md"), "--out", str(tmp / "a_file" / "r.json")], "r.json can't be written"),
    (lambda tmp: ["--plot", str(tmp)], "is a directory"),
    (lambda tmp: ["--out", str(tmp / "r.json"), "--report", str(tmp / "r.json")], "is given twice"),
])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch, outputs, message):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr("eej.cli.bench.load_questions", lambda *a: pytest.fail("the run started"))
    assert main(_bench_argv(tmp_path, *outputs(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("eej: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys, monkeypatch, flag):
    from eej.files import exclusive

    path = str(tmp_path / "shared.json")
    monkeypatch.setattr("eej.cli.bench.load_questions", lambda *a: pytest.fail("the run started"))
    with exclusive([path]):  # what a first run holds while it works
        assert main(_bench_argv(tmp_path, flag, path)) == 2
    err = capsys.readouterr().err
    assert f"is writing {path}" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(path)


def test_outputs_are_written_atomically_json_last(tmp_path, monkeypatch, capsys):
    import eej.files

    written = []
    real = eej.files.write_atomic
    monkeypatch.setattr("eej.bench.report.write_atomic", lambda path, data: (written.append(path), real(path, data)))
    files = [tmp_path / name for name in ("r.json", "r.md", "a.jsonl")]
    argv = _bench_argv(tmp_path, "--out", str(files[0]), "--report", str(files[1]), "--answers", str(files[2]))
    assert main(argv) == 0
    assert sorted(written) == sorted(map(str, files)) and written[-1] == str(files[0])
    check_schema(json.loads(files[0].read_text()))
    assert sorted(os.listdir(tmp_path)) == sorted([".r.json.lock", "a.jsonl", "q.jsonl", "r.json", "r.md"])


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    from eej.files import write_atomic

    path = tmp_path / "r.json"
    write_atomic(str(path), "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        write_atomic(str(path), "new and longer")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_a_question_too_long_for_the_cache_is_refused_before_any_answer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("eej.cli.bench.bench_document", lambda *a, **k: pytest.fail("the run started"))
    long = {"question_id": 11, "category": "qa", "turns": ["Hi.", "x" * 60]}
    argv = _bench_argv(tmp_path)
    (tmp_path / "q.jsonl").write_text(json.dumps(QUESTIONS[1]) + "\n" + json.dumps(long) + "\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "question 11 turn 2: prompt of" in err and "exceeds the 64 positions" in err
    assert len(err.strip().splitlines()) == 1
