"""Mesh specs, sharding rules, multi-host settings, and (in a subprocess) decoding on 8 fake CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from eej.cli import main
from eej.model.cache import init_cache
from eej.parallel import DecodeSharding, MeshError, make_mesh, parse_mesh_spec
from eej.parallel.distributed import DistributedError, settings_from
from eej.weights.tiny import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def rules(data: int, model: int, name: str = "tiny-gqa", **overrides) -> DecodeSharding:
    return DecodeSharding(AbstractMesh((data, model), ("data", "model")), tiny_config(name, **overrides))


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=8,model=1") == {"data": 8, "model": 1}
    assert parse_mesh_spec("model=2") == {"data": 1, "model": 2}
    for bad, message in [("data=8,pipe=2", "AXIS=SIZE"), ("data", "AXIS=SIZE"), ("data=x", "integer"),
                         ("data=0", ">= 1"), ("data=2,data=4", "twice")]:
        with pytest.raises(MeshError, match=message):
            parse_mesh_spec(bad)


def test_make_mesh_checks_device_count():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(MeshError, match="needs 4 devices"):
        make_mesh(data=2, model=2, devices=jax.devices()[:1])


def test_param_rules_split_heads_ffn_vocab():
    s = rules(4, 2)  # tiny-gqa: 6 query / 2 KV heads of 16, FFN 96
    assert s.param_spec("wq", (64, 96)) == P(None, "model")
    assert s.param_spec("wk", (6, 64, 32)) == P(None, None, "model")  # stacked [L, D, Hkv*Dh]
    assert s.param_spec("bq", (96,)) == P("model")
    assert s.param_spec("wo", (96, 64)) == P("model", None)
    assert s.param_spec("w_up", (64, 96)) == P(None, "model")
    assert s.param_spec("w_down", (96, 64)) == P("model", None)
    assert s.param_spec("lm_head", (64, 256)) == P(None, "model")
    assert s.param_spec("embed", (256, 64)) == P("model", None)
    assert s.param_spec("attn_norm", (64,)) == P()
    assert s.param_spec("something_else", (64, 96)) == P()
    assert s.param_spec("lm_head", (64, 257)) == P()  # does not divide: whole


def test_param_rules_split_every_expert_over_its_width():
    s = rules(4, 2, "tiny-moe", shared_expert_ffn_size=48)  # 8 experts of width 32
    assert s.param_spec("w_gate", (8, 64, 32)) == P(None, None, "model")  # [E, D, Fe]
    assert s.param_spec("w_up", (4, 8, 64, 32)) == P(None, None, None, "model")  # stacked [L, E, D, Fe]
    assert s.param_spec("w_down", (8, 32, 64)) == P(None, "model", None)  # [E, Fe, D]
    assert s.param_spec("shared_w_gate", (64, 48)) == P(None, "model")
    assert s.param_spec("shared_w_down", (48, 64)) == P("model", None)
    assert s.param_spec("router", (64, 8)) == P() and s.param_spec("shared_gate", (64, 1)) == P()


def test_heads_stay_whole_unless_both_head_counts_divide():
    s = rules(2, 4)  # 6 query heads do not split 4 ways
    assert not s.splits_heads
    assert s.param_spec("wq", (64, 96)) == P() and s.param_spec("wo", (96, 64)) == P()
    assert s.param_spec("w_gate", (64, 96)) == P(None, "model")
    assert s.cache_spec((8, 2, 32, 16), 8) == P("data", None, None, None)
    assert rules(4, 1).param_spec("wq", (64, 96)) == P()


def test_state_rules_are_generic_over_pytrees():
    s = rules(4, 2)
    cfg = tiny_config("tiny-gqa")
    method_state = {"hidden": jnp.zeros((8, 3, 64)), "cache": init_cache(cfg, 8, 32, num_layers=2),
                    "scalar": jnp.zeros(()), "table": jnp.zeros((5, 8))}
    shardings = s.state(method_state, batch=8)
    assert shardings["hidden"].spec == P("data", None, None)
    assert shardings["cache"].k[1].spec == P("data", "model", None, None)
    assert shardings["cache"].lengths.spec == P("data")
    assert shardings["scalar"].spec == P() and shardings["table"].spec == P()
    assert s.state({"hidden": jnp.zeros((6, 3))}, batch=6)["hidden"].spec == P()  # 6 rows don't split 4 ways


def test_distributed_settings_from_args_and_env(monkeypatch):
    assert settings_from(None, None, None) is None
    assert settings_from("127.0.0.1:1234", 2, 1) == {"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("EEJ_COORDINATOR", "host:99")
    monkeypatch.setenv("EEJ_NUM_PROCESSES", "4")
    monkeypatch.setenv("EEJ_PROCESS_ID", "3")
    assert settings_from(None, None, None) == {"coordinator": "host:99", "num_processes": 4, "process_id": 3}
    monkeypatch.delenv("EEJ_PROCESS_ID")
    with pytest.raises(DistributedError, match="--process-id"):
        settings_from(None, None, None)
    with pytest.raises(DistributedError, match="not in 0..3"):
        settings_from(None, None, 7)
    with pytest.raises(DistributedError, match="HOST:PORT"):
        settings_from("nohost", 2, 0)
    monkeypatch.delenv("EEJ_NUM_PROCESSES")
    monkeypatch.setenv("EEJ_COORDINATOR", "auto")  # JAX detects the rest
    assert settings_from(None, None, None) == {"coordinator": "auto", "num_processes": None, "process_id": None}


def test_cli_mesh_errors_are_one_line(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--mesh", "data=64"]) == 2
    assert "needs 64 devices" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--mesh", "rows=2"]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--num-processes", "2"]) == 2
    assert "--coordinator" in capsys.readouterr().err


def test_cli_mesh_of_one_device_generates(capsys):
    args = ["generate", "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--mesh", "data=1,model=1"]) == 0
    import json

    sharded = json.loads(capsys.readouterr().out)
    assert sharded["outputs"] == json.loads(plain)["outputs"]
    # a one-device mesh shards nothing: --attention auto picks what it picks without one
    assert sharded["mesh"] == {"data": 1, "model": 1} and sharded["attention"] == json.loads(plain)["attention"]


def test_sharded_decoding_on_8_devices():
    """tests/sharded_cases.py in a fresh interpreter with 8 fake CPU devices (see that file)."""
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "sharded_cases.py")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
