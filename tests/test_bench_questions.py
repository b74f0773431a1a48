"""Questions files (Spec-Bench schema), selection, batching, and the multi-turn / interleaving protocol.

No model is compiled here: the protocol runs with scripted contestants that record what they are asked.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from eej.bench.contestants import Generation
from eej.bench.metrics import AnswerRecord
from eej.bench.questions import (
    MT_BENCH,
    MT_BENCH_CATEGORIES,
    Question,
    QuestionsError,
    load_questions,
    mt_bench_questions,
    references_by_answer,
    select_questions,
    with_draws,
)
from eej.bench.runner import RunSettings, combine_rounds, plan_batches, run_bench
from eej.cli import main
from eej.config import SamplingConfig
from eej.weights.byte_tokenizer import byte_tokenizer


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


MIXED = [
    {"question_id": 12, "category": "writing", "turns": ["w12 one", "w12 two"]},
    {"question_id": 11, "category": "roleplay", "turns": ["r11 one", "r11 two"]},
    {"question_id": 30, "category": "qa", "turns": ["q30"]},
    {"question_id": 21, "category": "qa", "turns": ["q21"]},
    {"question_id": 25, "category": "qa", "turns": ["q25"]},
    {"question_id": 40, "category": "translation", "turns": ["t40"]},
]


def test_spec_bench_style_file_merges_mt_bench_categories(tmp_path):
    qs = load_questions(write_jsonl(tmp_path / "q.jsonl", MIXED))
    assert [q.category for q in qs] == [MT_BENCH, MT_BENCH, "qa", "qa", "qa", "translation"]
    assert qs[0].turns == ("w12 one", "w12 two")
    kept = load_questions(str(tmp_path / "q.jsonl"), "keep")
    assert kept[0].category == "writing"


def test_mt_bench_only_file_keeps_its_categories_unless_asked(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", MIXED[:2])
    assert [q.category for q in load_questions(path)] == ["writing", "roleplay"]
    assert [q.category for q in load_questions(path, "merge")] == [MT_BENCH, MT_BENCH]


def test_limit_takes_the_first_n_by_question_id_per_category(tmp_path):
    qs = load_questions(write_jsonl(tmp_path / "q.jsonl", MIXED))
    chosen = select_questions(qs, None, 2)
    assert [(q.category, q.question_id) for q in chosen] == [
        (MT_BENCH, 11), (MT_BENCH, 12), ("qa", 21), ("qa", 25), ("translation", 40)
    ]
    chosen = select_questions(qs, ["translation", "qa"], 1)
    assert [q.question_id for q in chosen] == [40, 21]
    assert len(select_questions(qs)) == len(MIXED)
    # the same file and arguments select the same questions, whatever the line order
    shuffled = load_questions(write_jsonl(tmp_path / "s.jsonl", list(reversed(MIXED))))
    assert [q.question_id for q in select_questions(shuffled, ["qa"], 2)] == [21, 25]


def test_string_ids_sort_after_integers():
    qs = [Question("b", "x", ("t",)), Question(3, "x", ("t",)), Question("a", "x", ("t",))]
    assert [q.question_id for q in select_questions(qs)] == [3, "a", "b"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"question_id": 1, "category": "qa", "turns": ["x"]}', "{not json"], r":2: not valid JSON"),
        ([{"question_id": 1, "turns": ["x"]}], r":1: missing field\(s\) category"),
        ([{"category": "qa"}], r"missing field\(s\) question_id, turns"),
        ([{"question_id": 1, "category": "qa", "turns": []}], "turns must be a non-empty list"),
        ([{"question_id": 1, "category": "qa", "turns": "hello"}], "turns must be a non-empty list"),
        ([{"question_id": 1.5, "category": "qa", "turns": ["x"]}], "question_id must be"),
        ([{"question_id": 1, "category": "", "turns": ["x"]}], "category must be"),
        (["[1, 2]"], "expected a JSON object"),
        ([{"question_id": 1, "category": "qa", "turns": ["x"]}] * 2, "already used on line 1"),
        ([""], "holds no questions"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, rows, message):
    with pytest.raises(QuestionsError, match=message):
        load_questions(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_references_per_turn(tmp_path):
    rows = [
        {"question_id": 1, "category": "translation", "turns": ["t1"], "reference": ["Hello"]},
        {"question_id": 2, "category": "rag", "turns": ["r2"], "reference": [["Paris", " ", "the city of Paris"]]},
        {"question_id": 3, "category": "stem", "turns": ["s3 one", "s3 two"], "reference": ["first", ""]},
        {"question_id": 4, "category": "qa", "turns": ["q4"]},
        {"question_id": 5, "category": "rag", "turns": ["r5 one", "r5 two"], "reference": [[], None]},
    ]
    qs = load_questions(write_jsonl(tmp_path / "q.jsonl", rows), "keep")
    assert [q.references for q in qs] == [
        ("Hello",), (("Paris", "the city of Paris"),), ("first", None), (), (None, None)]
    assert references_by_answer(qs) == {(1, 1): "Hello", (2, 1): ("Paris", "the city of Paris"), (3, 1): "first"}


@pytest.mark.parametrize(
    "reference, message",
    [
        (["a"], "reference must be a list with one entry per turn \\(2\\)"),
        ("a", "reference must be a list with one entry per turn"),
        (["a", 3], "each reference must be a string, a list of strings or null, got 3"),
        (["a", ["b", 4]], "each reference must be a string, a list of strings or null"),
    ],
)
def test_bad_references_give_clear_errors(tmp_path, reference, message):
    row = {"question_id": 1, "category": "qa", "turns": ["one", "two"], "reference": reference}
    with pytest.raises(QuestionsError, match="bad.jsonl:1: " + message):
        load_questions(write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_bad_selection_errors(tmp_path):
    qs = load_questions(write_jsonl(tmp_path / "q.jsonl", MIXED))
    with pytest.raises(QuestionsError, match="unknown category poetry; the file has: mt_bench, qa, translation"):
        select_questions(qs, ["qa", "poetry"])
    with pytest.raises(QuestionsError, match="--limit must be >= 1"):
        select_questions(qs, None, 0)
    with pytest.raises(QuestionsError, match="file not found"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_draws_repeat_each_question_under_its_own_name_with_its_references():
    qs = [Question(81, "mt_bench", ("a",), references=("ref",)), Question("x", "qa", ("b", "c"))]
    drawn = with_draws(qs, 3, greedy=False)
    assert [q.question_id for q in drawn] == [81, "81#2", "81#3", "x", "x#2", "x#3"]
    assert all(q.turns == qs[0].turns and q.references == ("ref",) for q in drawn[:3])
    assert references_by_answer(drawn)[("81#3", 1)] == "ref"
    assert with_draws(qs, 1, greedy=True) == qs
    with pytest.raises(QuestionsError, match="--draws 2 repeats greedy answers exactly"):
        with_draws(qs, 2, greedy=True)
    with pytest.raises(QuestionsError, match="--draws must be >= 1"):
        with_draws(qs, 0, greedy=False)
    with pytest.raises(QuestionsError, match="question_id '81#2' is taken"):
        with_draws([*qs, Question("81#2", "qa", ("d",))], 2, greedy=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--questions", "{missing}"], "questions file not found"),
        (["--questions", "{good}", "--draws", "2"], "--draws 2 repeats greedy answers exactly"),
        (["--questions", "{bad}"], "not valid JSON"),
        (["--questions", "{good}", "--categories", "poetry"], "unknown category poetry"),
        (["--questions", "{good}", "--limit", "0"], "--limit must be >= 1"),
        (["--questions", "{good}", "--peers", "vllm"], "unknown peer 'vllm'"),
        (["--questions", "{good}", "--peers", "hf-early-exit", "--batch-size", "2"], "batch size 1 only"),
        (["--questions", "{good}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--questions", "{good}", "--methods", "plain,nosuch"], "unknown method 'nosuch'"),
        (["--questions", "{good}", "--peers", "hf"], "peers run transformers on a real checkpoint"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    paths = {
        "missing": str(tmp_path / "missing.jsonl"),
        "bad": write_jsonl(tmp_path / "bad.jsonl", ["{oops"]),
        "good": write_jsonl(tmp_path / "good.jsonl", MIXED),
    }
    argv = ["bench", "--model", "tiny-llama", "--no-progress"] + [a.format(**paths) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eej: error: ") and message in err
    assert err.count("\n") == 1, err


def test_batches_never_mix_categories_and_sort_by_length():
    tok = byte_tokenizer()
    qs = [Question(1, "a", ("long question " * 5,)), Question(2, "a", ("short",)), Question(3, "a", ("mid length",)),
          Question(4, "b", ("x",))]
    assert [[q.question_id for q in b] for b in plan_batches(qs, 2, tok)] == [[2, 3], [1], [4]]
    assert [[q.question_id for q in b] for b in plan_batches(qs, 1, tok)] == [[1], [2], [3], [4]]


class Scripted:
    """A contestant that answers with fixed tokens and records every call."""

    kind = "method"

    def __init__(self, name: str, answer: str, log: list):
        self.name, self.answer, self.log = name, answer, log
        self.tok = byte_tokenizer()

    def generate(self, prompts, max_new_tokens, sampling, seed, ignore_eos=False):
        self.log.append((self.name, [self.tok.decode(p, skip_special_tokens=False) for p in prompts], seed))
        ids = self.tok.encode(f" {self.answer} ") + [self.tok.eos_ids[0]]
        return Generation(tokens=[ids for _ in prompts], seconds=0.5 * len(prompts), compile_seconds=1.0,
                          forwards=[len(ids)] * len(prompts), layers=[0.0] * len(prompts))

    def describe(self):
        return {"kind": self.kind}


def test_multi_turn_uses_each_contestants_own_answer_and_methods_interleave():
    tok = byte_tokenizer()
    log: list = []
    contestants = [Scripted("plain", "P-answer", log), Scripted("m", "M-answer", log)]
    qs = [Question(1, "mt_bench", ("first?", "second?")), Question(2, "qa", ("only?",))]
    records, compile_s = run_bench(contestants, qs, tok, RunSettings(max_new_tokens=8, batch_size=1, seed=7))
    # warm-up: each once on the first question, then per question both contestants, order rotating
    assert [name for name, _, _ in log] == ["plain", "m", "plain", "plain", "m", "m", "m", "plain"]
    assert compile_s == {"plain": 4.0, "m": 4.0}
    turn2 = {name: prompts[0] for name, prompts, _ in log[2:6] if "second?" in prompts[0]}
    expected = tok.chat_prompt([
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "M-answer"},
        {"role": "user", "content": "second?"},
    ])
    assert turn2["m"] == expected
    assert "P-answer" in turn2["plain"] and "M-answer" not in turn2["plain"]
    # both contestants get the same seed for the same batch and turn
    seeds = {(name, "second?" in prompts[0], "only?" in prompts[0]): seed for name, prompts, seed in log[2:]}
    assert seeds[("plain", True, False)] == seeds[("m", True, False)] != seeds[("plain", False, True)]
    assert [(r.contestant, r.question_id, r.turn) for r in records] == [
        ("plain", 1, 1), ("plain", 1, 2), ("m", 1, 1), ("m", 1, 2), ("m", 2, 1), ("plain", 2, 1)
    ]
    assert records[0].text == "P-answer" and records[0].seconds == 0.5


def test_a_batch_shares_its_time_among_rows():
    tok = byte_tokenizer()
    contestants = [Scripted("plain", "a", [])]
    qs = [Question(i, "qa", (f"q{i}",)) for i in range(3)]
    records, _ = run_bench(contestants, qs, tok, RunSettings(batch_size=2, sampling=SamplingConfig(), warmup=False))
    assert sorted(r.seconds for r in records) == [0.5, 0.5, 0.5]


def test_limit_on_a_merged_category_covers_every_original_category(tmp_path):
    import json as _json

    from eej.bench.questions import MT_BENCH_CATEGORIES, load_questions, select_questions

    path = tmp_path / "mix.jsonl"
    rows = []
    qid = 1
    for cat in MT_BENCH_CATEGORIES:
        for _ in range(3):
            rows.append({"question_id": qid, "category": cat, "turns": [f"q{qid}"]})
            qid += 1
    rows.append({"question_id": qid, "category": "qa", "turns": ["other"]})
    path.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    chosen = select_questions(load_questions(str(path)), categories=["mt_bench"], limit=10)
    assert len(chosen) == 10
    assert {q.source_category for q in chosen} == set(MT_BENCH_CATEGORIES)
    assert [q.question_id for q in chosen] == sorted(q.question_id for q in chosen)
    assert select_questions(load_questions(str(path)), categories=["mt_bench"], limit=10) == chosen


def test_rounds_repeat_the_whole_interleaved_run():
    tok = byte_tokenizer()
    log: list = []
    contestants = [Scripted("plain", "P-answer", log), Scripted("m", "M-answer", log)]
    qs = [Question(1, "mt_bench", ("first?", "second?")), Question(2, "qa", ("only?",))]
    once, _ = run_bench(contestants, qs, tok, RunSettings(max_new_tokens=8, seed=7, warmup=False))
    first_round = list(log)
    log.clear()
    thrice, compile_s = run_bench(contestants, qs, tok, RunSettings(max_new_tokens=8, seed=7, warmup=False, rounds=3))
    assert len(first_round) == 6 and len(log) == 3 * 6  # every contestant, batch and turn, once per round
    assert sorted(log) == sorted(first_round * 3)  # the same prompts and seeds in every round
    assert compile_s == {"plain": 9.0, "m": 9.0}
    assert [(r.contestant, r.key, r.tokens, r.seconds) for r in thrice] == [(r.contestant, r.key, r.tokens, r.seconds) for r in once]
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        run_bench(contestants, qs, tok, RunSettings(rounds=0))


def test_combined_rounds_keep_the_first_tokens_and_the_mean_time():
    def record(seconds, tokens, decode=None):
        return AnswerRecord("m", 1, "qa", 1, [5], tokens, seconds, decode_seconds=decode,
                            row_decode_seconds=None if decode is None else decode / 2)

    (combined,) = combine_rounds([record(1.0, [1, 2], 0.5), record(2.0, [1, 3], 1.0), record(6.0, [1, 2], 1.5)])
    assert combined.tokens == [1, 2] and combined.seconds == 3.0 and combined.decode_seconds == 1.0
    assert combined.row_decode_seconds == 0.5
    (peer,) = combine_rounds([record(1.0, [1]), record(3.0, [1])])
    assert peer.seconds == 2.0 and peer.decode_seconds is None and peer.row_decode_seconds is None


def test_a_row_is_charged_the_loop_time_of_the_steps_it_took_part_in():
    class Ragged(Scripted):
        """Rows that generate for 8, 2 and 0 decode steps of a 2 s loop (the last one's first token ended it)."""

        def generate(self, prompts, max_new_tokens, sampling, seed, ignore_eos=False):
            gen = super().generate(prompts, max_new_tokens, sampling, seed, ignore_eos)
            return dataclasses.replace(gen, decode_seconds=2.0, steps=[8, 2, 0], speculated_steps=[0] * 3,
                                       exited_steps=[0] * 3)

    qs = [Question(i, "qa", (f"q{i}?",)) for i in range(3)]
    records, _ = run_bench([Ragged("plain", "A", [])], qs, byte_tokenizer(), RunSettings(max_new_tokens=8, batch_size=3))
    assert sorted(r.row_decode_seconds for r in records) == [0.0, 0.5, 2.0]
    assert all(r.decode_seconds == pytest.approx(2.0 / 3) for r in records)


def test_each_answer_records_the_batch_it_was_generated_in():
    tok = byte_tokenizer()
    qs = [Question(1, "qa", ("a?",)), Question(2, "qa", ("bb?",)), Question(3, "qa", ("ccc?",)),
          Question(4, "mt_bench", ("d?", "e?"))]
    settings = RunSettings(max_new_tokens=8, batch_size=2, warmup=False, rounds=2)
    records, _ = run_bench([Scripted("plain", "P", []), Scripted("m", "M", [])], qs, tok, settings)
    plan = plan_batches(qs, 2, tok)
    where = {q.question_id: b for b, batch in enumerate(plan) for q in batch}
    assert len(records) == 2 * 5 and all(r.batch == where[r.question_id] for r in records)
    assert {r.call for r in records} == {(0, 1), (1, 1), (2, 1), (2, 2)}


def test_mt_bench_questions_take_one_of_each_category_in_turn(tmp_path):
    rows = [{"question_id": 100 + 10 * i + j, "category": c, "turns": [f"{c} {j}?", "More."]}
            for i, c in enumerate(MT_BENCH_CATEGORIES) for j in range(2)]
    path = write_jsonl(tmp_path / "mt.jsonl", rows)  # only MT-Bench's categories, as mt_bench.jsonl
    chosen = mt_bench_questions(path, 9)
    assert [q.question_id for q in chosen] == [100, 101, *(100 + 10 * i for i in range(1, 8))]  # the 9th: writing's second
    assert {q.category for q in chosen} == {"mt_bench"} and all(len(q.turns) == 2 for q in chosen)
