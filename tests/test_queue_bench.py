"""scripts/queue_bench.py on a tiny model: both schedules answer alike, the queue takes no more loop steps than the
batches, and bad arguments end with status 2."""

from __future__ import annotations

import json

import pytest

from eej.testing import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("queue_bench")


def write_questions(path) -> None:
    lines = [{"question_id": i, "category": category, "turns": [f"{category} question number {i}" + " more" * (i % 4)]}
             for i, category in enumerate(["qa", "qa", "qa", "math", "math", "math", "math"])]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_a_tiny_run_writes_both_schedules(script, tmp_path):
    questions = tmp_path / "questions.jsonl"
    write_questions(questions)
    out = tmp_path / "queue"
    assert script.main(["--model", "tiny-gqa", "--questions", str(questions), "--methods", "plain,again=plain",
                        "--batch-size", "2", "--max-new-tokens", "6", "--rounds", "2",
                        "--out", str(out)]) == 0
    doc = json.loads((tmp_path / "queue.json").read_text())
    assert doc["prompts"] == 7 and doc["machine"]["load_average_start"] is not None
    rows = {(r["schedule"], r["contestant"]): r for r in doc["rows"]}
    assert set(rows) == {(s, c) for s in ("batches", "queue") for c in ("plain", "again")}
    assert all(r["identical_rate"] == 1.0 and len(r["speedups"]) == 2 for r in rows.values())
    # greedy: both schedules decode the same tokens, the queue in no more loop steps
    assert rows[("queue", "plain")]["new_tokens"] == rows[("batches", "plain")]["new_tokens"]
    assert rows[("queue", "plain")]["loop_steps"] <= rows[("batches", "plain")]["loop_steps"]
    assert "| queue | again |" in (tmp_path / "queue.md").read_text()


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--methods", "kangaroo"], ["--batch-size", "0"]])
def test_bad_arguments_end_with_status_2(script, argv, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv + ["--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
