"""scripts/render_readme_tables.py: the README's generated sections match the committed results and the
method registry (a forgotten regeneration fails here), and the renderer itself (the result sections:
eej.bench.results) says what the files say."""

from __future__ import annotations

import json
import os

import pytest

from eej.bench.results import ResultsError
from eej.testing import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _renderer():
    return load_script("render_readme_tables")


@pytest.fixture(scope="module")
def render():
    return _renderer()


def test_readme_is_up_to_date_with_committed_results(render):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    regenerated = render.render_readme(text, os.path.join(ROOT, "benchmarks", "results"))
    assert regenerated == text, "README.md is out of date: run python scripts/render_readme_tables.py"


def _bench_doc(name: str, device: str, speedup: float) -> dict:
    metrics = {"answers": 4, "new_tokens": 100, "seconds": 2.0, "tokens_per_second": 50.0, "speedup": 1.0,
               "mean_accepted_tokens": 1.0, "avg_layers": 30.0, "identical_rate": 1.0, "token_agreement": 1.0,
               "rouge_l": 1.0}
    fast = {**metrics, "tokens_per_second": 50.0 * speedup, "speedup": speedup, "mean_accepted_tokens": 2.5}
    return {
        "schema_version": 1, "model": {"name": name, "num_layers": 30, "dtype": "float32", "attention": "xla", "eos_ids": [2]},
        "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "jax": "0.10.2", "jax_backend": device.split(":")[0],
                    "devices": [device], "load_average_start": [3.5, 3, 3], "load_average_end": [4.25, 3, 3]},
        "settings": {"command": "eej bench --model x", "note": "machine shared", "questions": "q/spec_bench.jsonl",
                     "categories": ["qa"], "questions_per_category": {"qa": 4}, "answers_per_contestant": 4,
                     "max_new_tokens": 64, "batch_size": 1, "greedy": True, "date": "2026-11-26 01:00:00 UTC"},
        "methods": {
            "plain": {"info": {"kind": "method"}, "compile_seconds": 1.0, "overall": metrics, "per_category": {"qa": metrics}},
            "kangaroo": {"info": {"kind": "method"}, "compile_seconds": 2.0, "overall": fast, "per_category": {"qa": fast}},
        },
        "peers": {},
    }


def _readme(render) -> str:
    return "intro\n" + "".join(f"<!-- generated:{k} -->\nold {k}\n<!-- /generated:{k} -->\n" for k in render.SECTIONS)


def test_rendered_tables_say_what_the_files_say(render, tmp_path):
    (tmp_path / "specbench_cpu.json").write_text(json.dumps(_bench_doc("smollm2-135m", "cpu:cpu", 1.68)))
    (tmp_path / "specbench_gpu.json").write_text(json.dumps(_bench_doc("smollm2-135m", "gpu:NVIDIA H200", 2.5)))
    (tmp_path / "tradeoff.json").write_text(json.dumps({"benchmark": "a method's own sweep", "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "jax_backend": "cpu"}}))
    (tmp_path / "tradeoff.md").write_text("# sweep\n")
    (tmp_path / "notes.txt").write_text("not json: ignored")
    out = render.render_readme(_readme(render), str(tmp_path))
    assert out.startswith("intro\n") and "old specbench" not in out and "old other" not in out
    assert out.count("| `kangaroo` | method |") == 2
    assert "1.68x" in out and "2.50x" in out and "2.50 |" in out  # speedup and mean accepted tokens
    assert "CPU (Test CPU 9000, 2 cores)" in out and "gpu:NVIDIA H200 (host: Test CPU 9000, 2 cores)" in out
    assert "Load average (1 min) 3.5 at the start, 4.2 at the end" in out and "Note: machine shared" in out
    assert "a method's own sweep" in out and "tradeoff.md" in out and "notes.txt" not in out
    assert "No plain-decoding results" in out and "No GPU results" in out
    assert render.render_readme(out, str(tmp_path)) == out  # regenerating is stable


def test_renderer_errors(render, tmp_path):
    with pytest.raises(render.ReadmeError, match="lacks the markers of section"):
        render.render_readme("no markers here\n", str(tmp_path))
    broken = _bench_doc("m", "cpu:cpu", 1.0)
    del broken["settings"]["questions_per_category"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ResultsError, match="broken.json: cannot render it as a specbench result"):
        render.render_readme(_readme(render), str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        render.render_readme(_readme(render), str(tmp_path))


def test_check_mode_exit_status(render, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(_readme(render))
    results = tmp_path / "results"
    results.mkdir()
    assert render.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert render.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert render.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0


def test_method_tables_follow_the_registry(render, monkeypatch):
    """The Methods table and eej's column of the comparison claim exactly the registered methods."""
    import dataclasses
    from typing import ClassVar

    from eej.decoding import methods
    from eej.decoding.plain import Plain

    @dataclasses.dataclass(frozen=True)
    class Exact(Plain):
        name: ClassVar[str] = "test-exact"
        lossless: ClassVar[bool] = True

    @dataclasses.dataclass(frozen=True)
    class Lossy(Plain):
        name: ClassVar[str] = "test-lossy"
        lossless: ClassVar[bool] = False
        batch_invariant: ClassVar[bool] = False

    for cls in (Exact, Lossy):
        monkeypatch.setitem(methods._METHODS, cls.name, methods.MethodSpec(
            cls.name, load=lambda model, settings, cls=cls: (cls(), None), random=lambda model, seed=0, cls=cls: (cls(), None)))
    infos = [m for m in render.method_infos() if m.name.startswith("test-")]
    assert [(m.name, m.lossless, m.batch_invariant) for m in infos] == [
        ("test-exact", True, True), ("test-lossy", False, False)]
    table = render.render_methods(infos)
    assert "| `test-exact` | - | yes | yes | - | - | - |" in table
    assert "| `test-lossy` | - | no | no (one decision per batch) | - | - | - |" in table
    eej = render.eej_cells(infos)
    assert eej["lossless"] == "`test-exact`: yes (tested token-identical to plain decoding); `test-lossy`: no (fidelity measured by `eej bench`)"
    assert "`test-exact`, `test-lossy`" in eej["methods"] and "none merged" not in eej["methods"]
    comparison = render.render_comparison(infos)
    rows = [r for r in comparison.splitlines() if r.startswith("| **")]
    assert len(rows) == len(render.PEER_CELLS) and "[medusa-66]: https://" in comparison
    assert all(r.count(" | ") == len(render.PEERS) + 1 for r in rows)  # every cell filled, none split
    assert "(none merged yet)" in render.eej_cells([])["methods"]
