"""Self-distillation (`eej distill`): the model's own answers, in resumable shards, never on evaluation sets."""

from __future__ import annotations

import json
import os

import pytest

from eej.cli import main
from eej.decoding.engine import Engine
from eej.testing import load_script, tiny_model
from eej.train.distill import DistillOptions, distill
from eej.train.trainers import TrainError

PROMPTS = ["What is two plus two?", "Name a color.", "Say hi.", "Count to three.", "Why is ice cold?"]


def _data(tmp_path) -> str:
    path = tmp_path / "train" / "chat.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "response": "a reference answer"}) + "\n" for p in PROMPTS))
    return str(path)


def _answers(out_dir) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("shard-"):
            rows += [json.loads(line) for line in open(os.path.join(out_dir, name), encoding="utf-8")]
    return rows


def test_distill_answers_every_prompt_greedy_then_sampled_in_shards_and_resumes(tmp_path):
    model = tiny_model("tiny-gqa")
    options = DistillOptions(files=(_data(tmp_path),), max_new_tokens=6, samples=2, batch_size=2, shard_size=3)
    out = tmp_path / "distilled"
    shards = distill(model, options, str(out), progress=False)
    rows = _answers(out)
    assert len(shards) == 4 and len(rows) == 2 * len(PROMPTS)  # 10 answers in shards of 3
    assert sorted((r["prompt"], r["sample"]) for r in rows) == sorted((p, s) for p in PROMPTS for s in (0, 1))
    greedy = {r["prompt"]: r["response"] for r in rows if r["sample"] == 0}
    for prompt, response in greedy.items():  # the model's own greedy answer, as plain decoding gives it
        tokens = Engine(model).generate([model.tokenizer.encode_chat(prompt)], max_new_tokens=6).tokens[0]
        assert response == model.tokenizer.decode(tokens)

    os.remove(shards[-1])  # an interruption: the answers of the last shard are missing; one line is cut short
    with open(shards[-2], "a", encoding="utf-8") as f:
        f.write('{"prompt": "cut sh')
    distill(model, options, str(out), progress=False)
    again = _answers(out)
    assert sorted((r["prompt"], r["sample"]) for r in again) == sorted((p, s) for p in PROMPTS for s in (0, 1))
    assert {r["prompt"]: r["response"] for r in again if r["sample"] == 0} == greedy


def test_distill_refuses_other_settings_in_the_same_directory_and_evaluation_files(tmp_path):
    model = tiny_model("tiny-gqa")
    data = _data(tmp_path)
    distill(model, DistillOptions(files=(data,), max_new_tokens=2, max_prompts=1), str(tmp_path / "d"), progress=False)
    with pytest.raises(TrainError, match="other settings"):
        distill(model, DistillOptions(files=(data,), max_new_tokens=3, max_prompts=1), str(tmp_path / "d"), progress=False)
    evaluation = tmp_path / "eval" / "spec_bench.jsonl"
    evaluation.parent.mkdir()
    evaluation.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(TrainError, match="evaluation file"):
        DistillOptions(files=(str(evaluation),))


def test_distill_command(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "cli"
    argv = ["distill", "--model", "tiny-gqa", "--data", data, "--out", str(out), "--max-new-tokens", "3",
            "--max-prompts", "2", "--no-progress"]
    assert main(argv) == 0
    assert len(_answers(out)) == 2 and "wrote 1 shard(s)" in capsys.readouterr().err
    assert main([*argv[:-1], "--samples", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line


def test_distill_command_keeps_one_choice_of_kernels_per_directory(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "cpu"
    argv = ["distill", "--model", "tiny-gqa", "--data", data, "--out", str(out), "--max-new-tokens", "3",
            "--max-prompts", "2", "--no-progress"]
    assert main([*argv, "--kernels", "cpu"]) == 0
    assert json.loads((out / "distill.json").read_text())["kernels"] == {"attention": "cpu", "matmul": "cpu"}
    capsys.readouterr()
    assert main([*argv, "--kernels", "xla"]) == 2  # XLA's kernels into a directory answered with eej's: refused
    assert "resume it with --kernels cpu" in capsys.readouterr().err
    assert main(argv) == 0  # the default (auto: eej's kernels on a CPU) resumes it
    assert main([*argv, "--kernels", "gpu"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_distill_kernels_script_refuses_bad_arguments_before_loading_the_model(capsys):
    script = load_script("distill_kernels")
    for bad in (["--prompts", "0"], ["--skip", "-1"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as exit_:
            script.main(bad)
        assert exit_.value.code == 2 and "must be" in capsys.readouterr().err
