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
    with pytest.raises(DataError, match="bad.jsonl:1: no prompt field"):
        read_examples(str(bad))
    for line, kind in (("[1, 2]", "list"), ("7", "int"), ('"text"', "str")):
        bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n\n" + line + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:3: expected a JSON object .*got {kind}"):
            read_examples(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"instruction": "i", "response": "r"}, ["not", "an", "object"]]))
    with pytest.raises(DataError, match="list.json: record 1: expected a JSON object"):
        read_examples(str(listed))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "a long question " * 20, "answer": "an answer"}) + "\n")
    with pytest.raises(DataError, match="no training example keeps an answer token within seq_len=16.*--seq-len"):
        load_training_data([str(long)], tiny_model().tokenizer, seq_len=16)


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


# ----------------------------------------------------------------------------- reliability (issue #19)


def test_non_finite_or_out_of_range_hyper_parameters_are_refused_up_front(tmp_path, capsys):
    from eej.cli import main as cli_main
    from eej.train.trainers import TrainError

    for bad, message in [({"learning_rate": float("nan")}, "learning_rate must be a finite number, got nan"),
                         ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
                         ({"learning_rate": 0.0}, "learning_rate must be > 0"),
                         ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
                         ({"seed": -3}, "seed must be an integer >= 0"),
                         ({"grad_clip": float("nan")}, "grad_clip must be a finite number")]:
        with pytest.raises(TrainError, match=message):
            TrainConfig(**bad)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    code = cli_main(["train", "kangaroo", "--model", "tiny-gqa", "--data", str(data), "--out", str(tmp_path / "run"),
                     "--lr", "nan", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "learning_rate must be a finite number, got nan" in err


def test_a_non_finite_loss_stops_the_run_naming_the_step_before_anything_is_saved(tmp_path):
    from eej.train.trainers import TrainError

    loss_fn, init, frozen, batches = _quadratic_problem()
    poisoned = lambda step: {"x": np.full((4,), np.nan if step == 4 else 1.0, np.float32)}  # noqa: E731
    cfg = TrainConfig(steps=10, learning_rate=0.1, warmup_steps=1, checkpoint_every_s=0)
    with pytest.raises(TrainError, match="diverged at step 5: loss nan.*nothing saved past step 4"):
        train(loss_fn, init, frozen, poisoned, cfg, str(tmp_path / "run"), progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]


def test_resume_refuses_other_settings_unless_restart(tmp_path, capsys):
    """A run resumed with other settings (the trainer's, the data's digest, the optimiser's) is an error naming what
    differs; --steps may grow (the run continues), not shrink; restart discards the old run."""
    from eej.train.trainers import TrainError

    loss_fn, init, frozen, batches = _quadratic_problem()
    cfg = TrainConfig(steps=20, learning_rate=0.5, warmup_steps=2, checkpoint_every_s=1e9)
    out = str(tmp_path / "run")
    train(loss_fn, init, frozen, batches, cfg, out, progress=False, stop_after=5, settings={"exit_layer": 2})
    with pytest.raises(TrainError, match=r"other settings \(exit_layer 2 -> 4\): pass --restart"):
        train(loss_fn, init, frozen, batches, cfg, out, progress=False, settings={"exit_layer": 4})
    with pytest.raises(TrainError, match=r"learning_rate 0.5 -> 0.1"):
        train(loss_fn, init, frozen, batches, dataclasses.replace(cfg, learning_rate=0.1), out, progress=False,
              settings={"exit_layer": 2})
    with pytest.raises(TrainError, match="run of 20 steps; resuming, --steps may only grow"):
        train(loss_fn, init, frozen, batches, dataclasses.replace(cfg, steps=10), out, progress=False,
              settings={"exit_layer": 2})
    # the cadence and stop_at may change; so may steps, upwards
    longer = dataclasses.replace(cfg, steps=30, checkpoint_every_s=5.0, stop_at=25)
    train(loss_fn, init, frozen, batches, longer, out, progress=False, settings={"exit_layer": 2})
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "train_log.jsonl")][-1] == 25
    (tmp_path / "run" / "run.json").unlink()  # a run of an older eej: resumed with a warning
    train(loss_fn, init, frozen, batches, longer, out, progress=False, settings={"exit_layer": 2})
    assert "no run.json (an older eej)" in capsys.readouterr().err
    restarted = train(loss_fn, init, frozen, batches, dataclasses.replace(cfg, restart=True), out, progress=False,
                      settings={"exit_layer": 4})
    fresh = train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "fresh"), progress=False)
    np.testing.assert_array_equal(np.asarray(restarted["w"]), np.asarray(fresh["w"]))
    assert json.loads(open(tmp_path / "run" / "train_log.jsonl").readline())["step"] == 10  # the old log went too


def test_data_fingerprints_follow_the_content_not_the_line_count(tmp_path):
    """A teacher cache (and a run) built from a data file is stale once the file's bytes change, even with the same
    number of lines; a copy of the same bytes elsewhere is the same data."""
    from eej.train.data import DataOptions, file_digests
    from eej.train.teacher import data_fingerprint

    model = tiny_model()
    a, b = tmp_path / "a.jsonl", tmp_path / "copy.jsonl"
    a.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    b.write_bytes(a.read_bytes())
    before = data_fingerprint(model, DataOptions([str(a)]), 0, 1)
    assert before == data_fingerprint(model, DataOptions([str(b)]), 0, 1)
    a.write_text(json.dumps({"question": "1+2?", "answer": "3"}) + "\n")
    assert data_fingerprint(model, DataOptions([str(a)]), 0, 1) != before
    assert file_digests([str(a)]) != file_digests([str(b)])


def test_an_interrupted_teacher_cache_rewrite_is_not_taken_for_the_old_cache(tmp_path, monkeypatch):
    import eej.train.teacher as teacher

    model = tiny_model("tiny-gqa")
    gpt, _, _ = _files(tmp_path)
    data = tokenize_examples(read_examples(str(gpt)), model.tokenizer, seq_len=16)
    cache = str(tmp_path / "t")
    first = np.array(teacher.teacher_cache(model, data, [1], cache, 4, {"data": "a"}, progress=False)["h1"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(teacher, "length_batches", interrupted)
        with pytest.raises(KeyboardInterrupt):
            teacher.teacher_cache(model, data, [1], cache, 4, {"data": "b"}, progress=False)
    again = teacher.teacher_cache(model, data, [1], cache, 4, {"data": "a"}, progress=False)
    np.testing.assert_array_equal(np.asarray(again["h1"]), first)


def _flip_bytes(directory):
    """Invert every byte of the array-data files under `directory` (an orbax checkpoint)."""
    for path in [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]:
        path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))


def test_a_damaged_checkpoint_falls_back_to_the_older_one(tmp_path, capsys):
    """checkpoint_every_s=0 saves every step, the last one included (no collision with the final save); a damaged
    newest checkpoint is skipped with one warning line and the older one resumes exactly; none intact: one error."""
    from eej.train.trainers import TrainError

    loss_fn, init, frozen, batches = _quadratic_problem()
    cfg = TrainConfig(steps=12, learning_rate=0.5, warmup_steps=2, checkpoint_every_s=0)
    straight = train(loss_fn, init, frozen, batches, cfg, str(tmp_path / "a"), progress=False)
    run = tmp_path / "b"
    train(loss_fn, init, frozen, batches, cfg, str(run), progress=False, stop_after=6)
    _flip_bytes(run / "checkpoints" / "6")
    capsys.readouterr()
    resumed = train(loss_fn, init, frozen, batches, cfg, str(run), progress=False)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trying step 5" in err
    assert f"checkpoint {run / 'checkpoints' / '6'} is damaged" in err
    np.testing.assert_allclose(np.asarray(resumed["w"]), np.asarray(straight["w"]), rtol=1e-6)
    for step in (11, 12):
        _flip_bytes(run / "checkpoints" / str(step))
    with pytest.raises(TrainError, match=r"no checkpoint in .* restores .*pass --restart"):
        train(loss_fn, init, frozen, batches, dataclasses.replace(cfg, steps=14), str(run), progress=False)


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, capsys):
    import fcntl

    from eej.cli import main as cli_main
    from eej.train.trainers import TrainError

    out = tmp_path / "run"
    out.mkdir()
    with open(out / "train.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        loss_fn, init, frozen, batches = _quadratic_problem()
        with pytest.raises(TrainError, match="in use by another training run .*train.lock held by process 4242"):
            train(loss_fn, init, frozen, batches, TrainConfig(steps=2), str(out), progress=False)
        data = tmp_path / "chat.jsonl"
        data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
        code = cli_main(["train", "kangaroo", "--model", "tiny-gqa", "--data", str(data), "--out", str(out),
                         "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and str(out / "train.lock") in err
    train(loss_fn, init, frozen, batches, TrainConfig(steps=2, warmup_steps=1), str(out), progress=False)  # released


def test_a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksum(tmp_path, capsys):
    """Orbax reads a large array with a flipped bit without complaint; the checksum recorded in run.json catches it."""
    def loss_fn(params, frozen, batch):
        return jnp.mean((params["w"] - frozen) ** 2), {}

    init, frozen = {"w": jnp.zeros(4096)}, jnp.linspace(0.0, 1.0, 4096)
    cfg = TrainConfig(steps=8, learning_rate=0.1, warmup_steps=1, checkpoint_every_s=0)
    straight = train(loss_fn, init, frozen, lambda step: {}, cfg, str(tmp_path / "a"), progress=False)
    run = tmp_path / "b"
    train(loss_fn, init, frozen, lambda step: {}, cfg, str(run), progress=False, stop_after=4)
    files = [p for p in (run / "checkpoints" / "4").rglob("*") if p.is_file() and p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = train(loss_fn, init, frozen, lambda step: {}, cfg, str(run), progress=False)
    assert "checkpoints/4 is damaged (checksum mismatch); trying step 3" in capsys.readouterr().err
    np.testing.assert_allclose(np.asarray(resumed["w"]), np.asarray(straight["w"]), rtol=1e-6)
