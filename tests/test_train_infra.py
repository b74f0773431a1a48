"""Shared training pieces: data files and masks, the resumable loop, artifacts, teacher caches."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from eej.weights.artifacts import ArtifactError, load_artifact, save_artifact
from eej.train.data import DataError, batch_at, load_training_data, read_examples, tokenize_examples
from eej.train.loop import TrainConfig, masked_mean, train
from eej.train.teacher import collect_hidden_states, hidden_states
from eej.model.transformer import forward, logits_from_hidden
from eej.model.cache import init_cache

from eej.testing import tiny_model


def _files(tmp_path):
    gpt = tmp_path / "gpteacher.json"
    gpt.write_text(json.dumps([
        {"instruction": "Say hi", "input": "", "response": "Hi there!"},
        {"instruction": "Add", "input": "2 and 3", "response": "5"},
    ]))
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    txt = tmp_path / "raw.txt"
    txt.write_text("To be or not to be. " * 10)
    return gpt, gsm, txt


def test_readers_and_assistant_only_masks(tmp_path):
    gpt, gsm, txt = _files(tmp_path)
    examples = read_examples(str(gpt))
    assert examples[1].prompt == "Add\n\n2 and 3" and examples[1].response == "5"
    assert read_examples(str(gsm))[0].response.endswith("#### 2")
    assert read_examples(str(txt))[0].prompt is None
    tok = tiny_model().tokenizer
    data = tokenize_examples(examples, tok, seq_len=64)
    for row in range(2):
        ids = data.tokens[row, : data.lengths[row]].tolist()
        masked = [t for t, m in zip(ids, data.loss_mask[row]) if m]
        # the masked tokens are exactly the response and the end-of-turn marker
        assert tok.decode(masked, skip_special_tokens=False).startswith(examples[row].response + "<|im_end|>")
        assert data.loss_mask[row, : len(ids) - len(masked)].sum() == 0


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_examples(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="no prompt field"):
        read_examples(str(bad))


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    gpt, gsm, txt = _files(tmp_path)
    data = load_training_data([str(gpt), str(gsm), str(txt)], tiny_model().tokenizer, seq_len=32)
    a, b = batch_at(data, 7, 2, seed=1), batch_at(data, 7, 2, seed=1)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def _quadratic_problem():
    target = jnp.arange(6.0).reshape(2, 3)

    def loss_fn(params, frozen, batch):
        err = params["w"] * batch["x"][:, None, None] - frozen["target"]
        return jnp.mean(err**2), {"err": jnp.mean(jnp.abs(err))}

    batches = lambda step: {"x": np.full((4,), 1.0 + 0.01 * step, np.float32)}  # noqa: E731
    return loss_fn, {"w": jnp.zeros((2, 3))}, {"target": target}, batches


def test_training_reduces_the_loss_and_resumes_exactly(tmp_path):
    loss_fn, init, frozen, batches = _quadratic_problem()
    cfg = TrainConfig(steps=60, learning_rate=0.5, warmup_steps=2, checkpoint_every_s=1e9)
    straight = train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "a"), progress=False)
    # interrupted after 12 steps (the checkpoint written on exit), then resumed to the end
    train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "b"), progress=False, stop_after=25)
    resumed = train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "b"), progress=False)
    np.testing.assert_allclose(np.asarray(resumed["w"]), np.asarray(straight["w"]), rtol=1e-6)
    first = float(loss_fn(init, frozen, batches(0))[0])
    last = float(loss_fn(straight, frozen, batches(59))[0])
    assert last < 0.05 * first
    assert masked_mean(jnp.asarray([1.0, 3.0, 5.0]), jnp.asarray([1, 1, 0])) == 2.0
    # a shortened run (stop_at) keeps the full schedule: it can be continued to the same end point,
    # and asking it again to stop where it already is only returns its parameters
    short = dataclasses.replace(cfg, stop_at=30)
    stopped = train(loss_fn, init, frozen, batches, short, str(tmp_path / "c"), progress=False)
    assert not np.allclose(np.asarray(stopped["w"]), np.asarray(straight["w"]))
    again = train(loss_fn, init, frozen, batches, short, str(tmp_path / "c"), progress=False)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(stopped["w"]))
    continued = train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "c"), progress=False)
    np.testing.assert_allclose(np.asarray(continued["w"]), np.asarray(straight["w"]), rtol=1e-6)


def test_artifacts_round_trip_and_refuse_another_model(tmp_path):
    model = tiny_model()
    params = {"adapter": {"wq": np.ones((3, 2), np.float32)}, "bias": np.zeros(4, np.float32)}
    path = str(tmp_path / "a.npz")
    save_artifact(path, params, "kangaroo", model.cfg, settings={"exit_layer": 2}, command="eej train ...")
    loaded, header = load_artifact(path, "kangaroo", model.cfg)
    np.testing.assert_array_equal(loaded["adapter"]["wq"], params["adapter"]["wq"])
    assert header["settings"] == {"exit_layer": 2}
    with pytest.raises(ArtifactError, match="not 'specee'"):
        load_artifact(path, "specee", model.cfg)
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(path, "kangaroo", tiny_model("tiny-gqa").cfg)
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(str(tmp_path / "nope.npz"), "kangaroo")


def test_teacher_hidden_states_match_the_model(tmp_path):
    model = tiny_model("tiny-gqa")
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, size=(2, 12)), jnp.int32)
    hs = hidden_states(model.params, tokens, model.cfg, depths=(0, 2, model.cfg.num_layers))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits, _ = forward(model.params, tokens, positions, init_cache(model.cfg, 2, 12), model.cfg)
    np.testing.assert_allclose(
        np.asarray(logits_from_hidden(model.params, hs[model.cfg.num_layers], model.cfg)), np.asarray(logits), atol=1e-5
    )
    gpt, _, _ = _files(tmp_path)
    data = tokenize_examples(read_examples(str(gpt)), model.tokenizer, seq_len=16)
    cached = collect_hidden_states(model.params, model.cfg, data, depths=(2,), batch_size=4, progress=False)
    direct = hidden_states(model.params, jnp.asarray(data.tokens), model.cfg, depths=(2,))[2]
    np.testing.assert_allclose(cached[2], np.asarray(direct), atol=1e-5)


@pytest.mark.parametrize("name", ["kangaroo", "m2r2", "skipdecode", "specee", "moefy"])
def test_the_reproduce_line_parses_back_to_the_same_options(name):
    """`eej train NAME` is generated from the trainer's declared options, and the command line an artifact
    records (every option explicit) gives those options back; out-of-range options are one-line TrainErrors."""
    import shlex

    from eej.cli import build_parser
    from eej.train.data import DataOptions
    from eej.train.trainers import TrainError, flag_name, option_fields, reproduce_command, trainers

    spec = trainers()[name]
    required = {"budget": "2x", "drafter": "runs/kangaroo.npz"}
    options = spec.options(**{f.name: required[f.name] for f in option_fields(spec.options) if f.default is dataclasses.MISSING})
    data, run = DataOptions(["a.json", "b b.jsonl"], seq_len=64), TrainConfig(steps=20, stop_at=5, learning_rate=0.01)
    args = build_parser().parse_args(shlex.split(reproduce_command(name, "tiny-gqa", data, "runs/x y", options, run))[1:])
    assert (args.method, args.model, args.out) == (name, "tiny-gqa", "runs/x y")
    for group in (data, run, options):
        for field in option_fields(group):
            got = getattr(args, flag_name(field).replace("-", "_"))
            assert (tuple(got) if isinstance(got, list) else got) == getattr(group, field.name), field.name
    with pytest.raises(TrainError, match="seq_len must be an integer >= 8, got 4"):
        DataOptions(["a.json"], seq_len=4)
    with pytest.raises(TrainError, match=r"stop_at must be in \[1, steps=20\], got 21"):
        TrainConfig(steps=20, stop_at=21)
