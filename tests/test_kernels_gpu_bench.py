"""The GPU benchmark's phases (eej.bench.gpu, eej.bench.attention) in their CPU smoke mode: Pallas interpreted,
tiny shapes (the real run needs a GPU: scripts/gpu_bench.sh)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from eej.bench.attention import check_kernels, implementations, time_kernels
from eej.bench.gpu import RANDOM, GpuSettings, gpu_markdown, gpu_report, prefix_agreement
from eej.bench.report import write_result
from eej.bench.results import results_markdown
from eej.weights.artifacts import ArtifactError
from eej.weights.registry import load_model

PROMPTS = ["Why is the sky blue?", "Name three planets."]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-gqa", dtype="float32")


def test_gpu_bench_cpu_smoke_writes_a_report(model, tmp_path):
    settings = GpuSettings.cpu_smoke(methods=("plain",), batch_sizes=(1,), rounds=1)
    updates = []
    report = gpu_report(model, PROMPTS, settings, on_update=lambda r: updates.append(len(r["decoding"])))
    write_result(report, gpu_markdown(report), str(tmp_path / "smoke"))
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["device"] and report["settings"]["smoke"] is True
    assert {"xla", "pallas", "triton"} == set(report["impls"])
    checks = report["kernel_checks"]
    assert checks and all(c["ok"] for c in checks) and {c["impl"] for c in checks} == {"pallas"}
    assert {r["impl"] for r in report["kernel_timings"] if "ms" in r} >= {"xla", "pallas"}
    decoded = {r["impl"]: r for r in report["decoding"] if "tokens_per_second" in r}
    assert decoded["pallas"]["tokens_equal_xla"] is True
    assert (tmp_path / "smoke.md").is_file() and updates  # written as it goes
    identity = {r["impl"]: r for r in report["identity_float32"] if r["method"] == "plain"}
    assert identity["pallas"]["tokens_equal_xla"] is True and "skipped" in identity["triton"]
    # The README's GPU section renders this very report (scripts/render_readme_tables.py).
    section = results_markdown(str(tmp_path))["gpu"]
    assert f"Measured on **{report['device']}" in section and "Decoding" in section and "smoke.json" in section


def test_gpu_bench_refuses_to_run_without_a_gpu(model):
    with pytest.raises(ValueError, match="not a GPU"):
        gpu_report(model, PROMPTS, GpuSettings())


def test_missing_addons_stop_the_run_and_random_ones_are_labelled(model, tmp_path):
    settings_file = tmp_path / "kangaroo.yaml"
    settings_file.write_text(f"adapter: {tmp_path / 'missing.npz'}\nexit_layer: 1\n")
    settings = GpuSettings.cpu_smoke(phases=("decoding",), decode_impls=("xla",), impls=("xla",),
                                     methods=("plain", f"kangaroo:{settings_file}"), batch_sizes=(1,), rounds=1)
    updates = []
    with pytest.raises(ArtifactError, match="kangaroo artifact not found"):  # no random adapter in its place
        gpu_report(model, PROMPTS, settings, on_update=updates.append)
    assert not updates  # refused before any phase
    report = gpu_report(model, PROMPTS, dataclasses.replace(settings, random_addons=True))
    rows = {r["method"].split(":")[0]: r for r in report["decoding"]}
    assert rows["kangaroo"]["addons"] == RANDOM and rows["plain"]["addons"] == "none"
    assert rows["kangaroo"]["tokens_per_second"] > 0 and report["settings"]["random_addons"] is True
    markdown = gpu_markdown(report)
    assert f"| kangaroo:{settings_file} (random add-ons) | 1 |" in markdown and "| plain | 1 |" in markdown


def test_kernel_checks_catch_a_wrong_kernel():
    impls = implementations(["pallas"])
    assert set(impls) == {"xla", "pallas"}
    impls["broken"] = lambda q, k, v, pos, sliding_window=None: impls["pallas"](q, k, v, pos, sliding_window=sliding_window) + 1.0
    records = check_kernels(impls, [("tiny", 4, 2, 16)], 64, 2, np.random.default_rng(0), smoke=True)
    by_impl = {impl: [r["ok"] for r in records if r["impl"] == impl] for impl in ("pallas", "broken")}
    assert all(by_impl["pallas"]) and not any(by_impl["broken"]) and len(by_impl["broken"]) == 8
    times = time_kernels({"xla": impls["xla"], "gone": "needs a GPU"}, [("tiny", 4, 2, 16)], 64, [1], [1], jnp.float32, 1,
                         np.random.default_rng(0))
    assert times[0]["ms"] > 0 and times[1] == {**times[1], "skipped": "needs a GPU"}
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        implementations(["nope"])


def test_prefix_agreement():
    assert prefix_agreement([[1, 2, 3], [1, 2]], [[1, 2, 4], [1, 2]]) == pytest.approx((2 / 3 + 1) / 2)
