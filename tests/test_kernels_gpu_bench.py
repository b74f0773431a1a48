"""scripts/gpu_bench.sh end to end in its CPU smoke mode (the real run needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_gpu_bench_cpu_smoke_writes_a_report(tmp_path):
    out = str(tmp_path / "smoke")
    env = {**os.environ, "PYTHON": __import__("sys").executable}
    proc = subprocess.run(
        [os.path.join(ROOT, "scripts", "gpu_bench.sh"), "--cpu-smoke", "--methods", "plain", "--batch-sizes", "1",
         "--rounds", "1", "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(out + ".json"))
    assert report["device"] and report["settings"]["smoke"] is True
    assert {"xla", "pallas", "triton"} == set(report["impls"])
    checks = report["kernel_checks"]
    assert checks and all(c["ok"] for c in checks) and {c["impl"] for c in checks} == {"pallas"}
    assert {r["impl"] for r in report["kernel_timings"] if "ms" in r} >= {"xla", "pallas"}
    decoded = {r["impl"]: r for r in report["decoding"] if "tokens_per_second" in r}
    assert decoded["pallas"]["tokens_equal_xla"] is True
    assert os.path.isfile(out + ".md")
    # The README's GPU section renders this very report (scripts/render_readme_tables.py).
    from test_readme_tables import _renderer

    section = _renderer().render_sections(str(tmp_path))["gpu"]
    assert f"Measured on **{report['device']}" in section and "Decoding" in section and "smoke.json" in section


def test_gpu_bench_refuses_to_run_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": __import__("sys").executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_bench.sh"), "--out", str(tmp_path / "x")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a GPU" in proc.stderr
