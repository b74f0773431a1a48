"""Two local processes (2 CPU devices each) decode one batch together through `jax.distributed` + gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPTS = ["the quick brown fox", "a", "jumps over the lazy dog again", "hello world", "0123456789", "xyz!",
           "multi host decoding", "eej"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_args(batch_file: str) -> list[str]:
    return [sys.executable, "-m", "eej.cli", "generate", "--model", "tiny-gqa", "--batch-file", batch_file,
            "--batch-size", "8", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "4", "--json"]


def env_with(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EEJ_")}
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)
    return env


@pytest.fixture
def batch_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def test_two_processes_generate_the_single_process_batch(batch_file):
    single = subprocess.run(generate_args(batch_file), cwd=ROOT, env=env_with(1), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    want = [r["token_ids"] for r in json.loads(single.stdout)["outputs"]]

    port = free_port()
    procs = []
    for pid in range(2):
        # process 0 takes its settings from options, process 1 from environment variables
        args = generate_args(batch_file) + ["--mesh", "data=2,model=2"]
        extra = {}
        if pid == 0:
            args += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
        else:
            extra = dict(EEJ_COORDINATOR=f"127.0.0.1:{port}", EEJ_NUM_PROCESSES="2", EEJ_PROCESS_ID="1")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env_with(2, **extra), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # gloo itself prints "[Gloo] Rank 0 is connected ..." lines on stdout; the JSON report is the last line
    lead = json.loads(outs[0][0].strip().splitlines()[-1])
    assert lead["processes"] == 2 and lead["mesh"] == {"data": 2, "model": 2}
    assert [r["token_ids"] for r in lead["outputs"]] == want
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # only process 0 reports
