"""scripts/cloud_job.sh end to end on a tiny model: results and logs in the job directory, and a restart
skips what finished (no reinstall, no second benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from eej.bench.report import check_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "cloud_job.sh")


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def test_job_runs_unattended_and_a_restart_skips_finished_steps(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Why?"]}) + "\n")
    config = tmp_path / "bench.yaml"
    config.write_text(f"model: tiny-llama\nquestions: {questions}\nmethods: plain\nmax_new_tokens: 4\n")
    env = {**os.environ, "EEJ_INSTALL": "0", "EEJ_PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    job = tmp_path / "job"

    first = _run(str(job), str(config), env=env)
    assert first.returncode == 0, first.stderr
    results = job / "results"
    with open(results / "bench.json") as f:
        doc = json.load(f)
    check_schema(doc)
    assert doc["model"]["name"] == "tiny-llama" and doc["settings"]["max_new_tokens"] == 4
    assert (results / "bench.md").read_text().startswith("# eej bench")
    assert (results / "bench.png").stat().st_size > 0 and (results / "answers.jsonl").exists()
    assert (job / "logs" / "bench.log").exists()
    assert "job complete" in (job / "job.log").read_text()

    stamp = os.path.getmtime(results / "bench.json")
    second = _run(str(job), str(config), env=env)
    assert second.returncode == 0, second.stderr
    assert "bench: done before" in second.stderr and os.path.getmtime(results / "bench.json") == stamp


def test_bad_arguments_stop_before_any_work(tmp_path):
    env = {**os.environ, "EEJ_INSTALL": "0", "EEJ_PYTHON": sys.executable}
    assert _run(env=env).returncode == 2
    missing = _run(str(tmp_path / "job"), str(tmp_path / "nope.yaml"), env=env)
    assert missing.returncode == 2 and "bench config not found" in missing.stderr
    config = tmp_path / "bench.yaml"
    config.write_text("model: tiny-llama\n")
    bad = _run(str(tmp_path / "job"), str(config), "kangaroo=/no/such.yaml", env=env)
    assert bad.returncode == 2 and "METHOD=CONFIG" in bad.stderr
