"""`eej bench --checkpoint FILE`: an interrupted run continues where it stopped, with the same answers."""

from __future__ import annotations

import json

import pytest

from eej.bench import runner
from eej.cli import main

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["Why?", "And then?"]},
    {"question_id": 2, "category": "qa", "turns": ["Who?"]},
    {"question_id": 3, "category": "rag", "turns": ["Where?"]},
]


@pytest.fixture
def setup(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    argv = ["bench", "--model", "tiny-llama", "--questions", str(questions), "--max-new-tokens", "5",
            "--cache-size", "128", "--no-progress", "--checkpoint", str(tmp_path / "ckpt.jsonl")]
    return tmp_path, argv


def _answers(path) -> list[tuple]:
    with open(path) as f:
        return sorted((a["contestant"], a["question_id"], a["turn"], tuple(a["tokens"])) for a in map(json.loads, f))


def test_an_interrupted_run_resumes_from_its_checkpoint(setup, monkeypatch, capsys):
    tmp, argv = setup
    full = [*argv, "--answers", str(tmp / "full.jsonl"), "--out", str(tmp / "full.json")]
    ckpt = tmp / "ckpt.jsonl"
    assert main(full) == 0
    assert json.loads((tmp / "full.json").read_text())["settings"]["resumed_batches"] == 0
    ckpt.unlink()

    # Interrupt the run after its second batch (of three), mid-way through writing the third.
    original = runner._answer_batch
    calls = {"n": 0}

    def interrupted(contestant, batch, *args):
        calls["n"] += 1
        if calls["n"] > 2:  # plain alone: one call per batch
            with open(ckpt, "a") as f:
                f.write('{"batch": 2, "record": {"contestant": "pla')  # a line cut off
            raise KeyboardInterrupt
        return original(contestant, batch, *args)

    monkeypatch.setattr(runner, "_answer_batch", interrupted)
    assert main([*argv, "--out", str(tmp / "first.json")]) == 130
    assert not (tmp / "first.json").exists()
    monkeypatch.setattr(runner, "_answer_batch", original)

    resumed = [*argv, "--answers", str(tmp / "resumed.jsonl"), "--out", str(tmp / "resumed.json")]
    assert main(resumed) == 0
    doc = json.loads((tmp / "resumed.json").read_text())
    assert doc["settings"]["resumed_batches"] == 2
    assert _answers(tmp / "resumed.jsonl") == _answers(tmp / "full.jsonl")
    assert doc["methods"]["plain"]["overall"]["answers"] == 4
    with open(ckpt) as f:
        assert [json.loads(line).get("batch_done") for line in f if "batch_done" in line] == [0, 1, 2]

    # Everything is in the checkpoint now: a rerun answers nothing again.
    monkeypatch.setattr(runner, "_answer_batch", lambda *a: pytest.fail("answered a finished batch again"))
    assert main([*argv, "--no-agreement"]) == 0
    capsys.readouterr()


def test_a_checkpoint_of_another_run_is_refused(setup, capsys):
    tmp, argv = setup
    assert main([*argv, "--limit", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--limit", "1", "--max-new-tokens", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eej: error:") and "belongs to another run (max_new_tokens differ)" in err
    assert main(argv) == 2  # more questions than the checkpointed run
    assert "questions_chosen" in capsys.readouterr().err
    (tmp / "other.jsonl").write_text('{"something": "else"}\n')
    assert main([*argv[:-1], str(tmp / "other.jsonl")]) == 2
    assert "is not an eej bench checkpoint" in capsys.readouterr().err


def test_a_damaged_checkpoint_names_its_line(setup, capsys):
    tmp, argv = setup
    assert main([*argv, "--limit", "1"]) == 0
    ckpt = tmp / "ckpt.jsonl"
    lines = ckpt.read_text().splitlines()
    for bad, message in [({"batch": 0, "record": {"nonsense": 1}}, "ckpt.jsonl:2: not an answer record"),
                         ([1, 2], "ckpt.jsonl:2: not a checkpoint line")]:
        ckpt.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
        capsys.readouterr()
        assert main([*argv, "--limit", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eej: error:") and message in err and len(err.splitlines()) == 1
    # bytes that are not UTF-8 at the end: a line cut off by an interruption, answered again
    ckpt.write_bytes(("\n".join(lines) + "\n").encode() + b'{"batch": 1, "rec\xff')
    assert main([*argv, "--limit", "1"]) == 0
