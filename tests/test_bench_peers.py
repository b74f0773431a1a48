"""The transformers peers (`--peers hf,hf-early-exit`) on a tiny random Llama checkpoint written by transformers."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from eej.bench.peers import load_peers  # noqa: E402
from eej.cli import main  # noqa: E402
from eej.config import SamplingConfig  # noqa: E402
from eej.weights.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer  # noqa: E402
from eej.weights.registry import load_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama_ckpt")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights, so that logits are not all near zero (no argmax ties)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(path)
    byte_tokenizer().hf.save_pretrained(path)
    return str(path)


def test_peers_are_reported_against_eej_plain(checkpoint, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi."]}) + "\n"
        + json.dumps({"question_id": 2, "category": "writing", "turns": ["Go.", "More."]}) + "\n"
    )
    out, answers = tmp_path / "r.json", tmp_path / "a.jsonl"
    argv = ["bench", "--model", checkpoint, "--questions", str(questions), "--peers", "hf,hf-early-exit",
            "--early-exit-layer", "1", "--max-new-tokens", "8", "--cache-size", "128", "--no-progress",
            "--no-agreement", "--out", str(out), "--answers", str(answers)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert list(doc["peers"]) == ["hf", "hf-early-exit"]
    assert doc["peers"]["hf-early-exit"]["info"]["assistant_early_exit"] == 1
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    by = {(r["contestant"], r["question_id"], r["turn"]): r["tokens"] for r in records}
    for peer in ("hf", "hf-early-exit"):
        o = doc["peers"][peer]["overall"]
        assert o["answers"] == 3 and o["speedup"] > 0 and o["tokens_per_second"] > 0
        assert o["mean_accepted_tokens"] is None and o["avg_layers"] is None
        # greedy transformers on the same weights and prompt ids: the same tokens as eej plain
        for key in [(1, 1), (2, 1), (2, 2)]:
            assert by[(peer, *key)] == by[("plain", *key)]
        assert o["identical_rate"] == 1.0


def test_bad_early_exit_layer(checkpoint, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi."]}) + "\n")
    argv = ["bench", "--model", checkpoint, "--questions", str(questions), "--peers", "hf-early-exit",
            "--early-exit-layer", "3", "--no-progress"]
    assert main(argv) == 2
    assert "--early-exit-layer must be in 1..2" in capsys.readouterr().err


def test_peer_ignores_eos_like_eej(checkpoint, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi."]}) + "\n")
    out, answers = tmp_path / "r.json", tmp_path / "a.jsonl"
    argv = ["bench", "--model", checkpoint, "--questions", str(questions), "--peers", "hf", "--ignore-eos",
            "--max-new-tokens", "24", "--cache-size", "128", "--no-progress", "--no-agreement", "--out", str(out),
            "--answers", str(answers)]
    assert main(argv) == 0
    records = {r["contestant"]: r["tokens"] for r in map(json.loads, answers.read_text().splitlines())}
    assert len(records["hf"]) == 24 and records["hf"] == records["plain"]


def test_peer_generation_ignores_eos(checkpoint):
    model = load_model(checkpoint)
    (peer,) = load_peers(["hf"], checkpoint, model)
    prompt = model.tokenizer.encode_chat("Hi.")
    first = peer.generate([prompt], 1, SamplingConfig(), 0).tokens[0][0]
    peer.eos_ids = [first]  # the first answer token now ends the row, unless EOS is ignored
    assert peer.generate([prompt], 6, SamplingConfig(), 0).tokens == [[first]]
    assert len(peer.generate([prompt], 6, SamplingConfig(), 0, ignore_eos=True).tokens[0]) == 6
