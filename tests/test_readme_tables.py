"""scripts/render_readme_tables.py: the generated sections of the README and of benchmarks/RESULTS.md match the
committed results and the method registry (a forgotten regeneration fails here), and the renderer itself (the
result sections: eej.bench.results) says what the files say."""

from __future__ import annotations

import json
import os

import pytest

from eej.bench.metrics import RUN_NOISE_SD, run_interval
from eej.bench.results import ResultsError
from eej.testing import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _renderer():
    return load_script("render_readme_tables")


@pytest.fixture(scope="module")
def render():
    return _renderer()


@pytest.mark.parametrize("page", ["README.md", "benchmarks/RESULTS.md"])
def test_pages_are_up_to_date_with_committed_results(render, page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    regenerate = render.render_readme if page == "README.md" else render.render_results_page
    regenerated = regenerate(text, os.path.join(ROOT, "benchmarks", "results"))
    assert regenerated == text, f"{page} is out of date: run python scripts/render_readme_tables.py"


def _bench_doc(name: str, device: str, speedup: float, batch: int = 1, questions: str = "q/spec_bench.jsonl") -> dict:
    metrics = {"answers": 4, "new_tokens": 100, "seconds": 2.0, "tokens_per_second": 50.0, "speedup": 1.0,
               "mean_accepted_tokens": 1.0, "avg_layers": 30.0, "identical_rate": 1.0, "token_agreement": 1.0,
               "rouge_l": 1.0}
    fast = {**metrics, "tokens_per_second": 50.0 * speedup, "speedup": speedup, "mean_accepted_tokens": 2.5}
    return {
        "schema_version": 1, "model": {"name": name, "num_layers": 30, "dtype": "float32", "attention": "xla", "eos_ids": [2]},
        "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "jax": "0.10.2", "jax_backend": device.split(":")[0],
                    "devices": [device], "load_average_start": [3.5, 3, 3], "load_average_end": [4.25, 3, 3]},
        "settings": {"command": "eej bench --model x", "note": "machine shared", "questions": questions,
                     "categories": ["qa"], "questions_per_category": {"qa": 4}, "answers_per_contestant": 4,
                     "max_new_tokens": 64, "batch_size": batch, "greedy": True, "date": "2026-11-26 01:00:00 UTC"},
        "methods": {
            "plain": {"info": {"kind": "method"}, "compile_seconds": 1.0, "overall": metrics, "per_category": {"qa": metrics}},
            "kangaroo": {"info": {"kind": "method"}, "compile_seconds": 2.0, "overall": fast, "per_category": {"qa": fast}},
        },
        "peers": {},
    }


def _page(sections) -> str:
    return "intro\n" + "".join(f"<!-- generated:{k} -->\nold {k}\n<!-- /generated:{k} -->\n" for k in sections)


def test_rendered_tables_say_what_the_files_say(render, tmp_path):
    (tmp_path / "specbench_cpu.json").write_text(json.dumps(_bench_doc("smollm2-135m", "cpu:cpu", 1.68)))
    (tmp_path / "specbench_gpu.json").write_text(json.dumps(_bench_doc("smollm2-135m", "gpu:NVIDIA H200", 2.5)))
    (tmp_path / "tradeoff.json").write_text(json.dumps({"benchmark": "a method's own sweep", "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "jax_backend": "cpu"}}))
    (tmp_path / "tradeoff.md").write_text("# sweep\n")
    (tmp_path / "notes.txt").write_text("not json: ignored")
    readme = render.render_readme(_page(render.README_SECTIONS), str(tmp_path))
    page = render.render_results_page(_page(render.RESULTS_PAGE_SECTIONS), str(tmp_path))
    assert page.startswith("intro\n") and "old specbench" not in page and "old other" not in page
    assert page.count("| `kangaroo` | method |") == 2 and "| `kangaroo` | method |" not in readme
    assert "1.68x" in page and "2.50x" in page and "2.50 |" in page  # speedup and mean accepted tokens
    assert "CPU (Test CPU 9000, 2 cores)" in page and "gpu:NVIDIA H200 (host: Test CPU 9000, 2 cores)" in page
    assert "Load average (1 min) 3.5 at the start, 4.2 at the end" in page and "Note: machine shared" in page
    assert "a method's own sweep" in page and "tradeoff.md" in page and "notes.txt" not in page
    page_folder = os.path.join(render.ROOT, "benchmarks")  # the page links from its own folder
    assert f"]({os.path.relpath(tmp_path / 'tradeoff.json', page_folder)})" in page
    assert "No plain-decoding results" in readme and "No GPU results" in readme
    assert f"No results of the series {', '.join(render.STATUS_SERIES)} are committed" in readme
    assert render.render_readme(readme, str(tmp_path)) == readme  # regenerating is stable
    assert render.render_results_page(page, str(tmp_path)) == page


def test_the_status_table_holds_one_column_per_run_of_the_series(render, tmp_path):
    """Every SERIES_*.json `eej bench` run becomes a column (ordered by question set, greedy first, batch size), every
    contestant a row, each cell its speedup with the run's interval where it has one, widened by noise between runs where the run has that
    (plain decoding's: its pace), each
    column linked to the run's report where there is one; other files stay out."""
    from eej.bench.results import status_markdown

    runs = {"s_spec_bench_t0_b4": (4, "q/spec_bench.jsonl", 1.5), "s_spec_bench_t0_b1": (1, "q/spec_bench.jsonl", 1.2),
            "s_mt_bench_t0_b1": (1, "q/mt_bench.jsonl", 0.9), "other_spec_bench_t0_b1": (1, "q/spec_bench.jsonl", 3.0)}
    for name, (batch, questions, speedup) in runs.items():
        doc = _bench_doc("m", "cpu:cpu", speedup, batch, questions)
        if batch == 4:
            doc["methods"]["kangaroo"]["overall"].update(speedup_ci_low=1.25, speedup_ci_high=1.75)
        if questions == "q/mt_bench.jsonl":  # a run that allowed for no noise between runs
            doc["methods"]["kangaroo"]["overall"].update(speedup_ci_low=0.85, speedup_ci_high=0.95)
            doc["settings"]["run_noise_sd"] = 0.0
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    table = status_markdown(str(tmp_path), "s", str(tmp_path))
    header = next(line for line in table.splitlines() if line.startswith("| contestant"))
    assert header == ("| contestant | [mt-bench, greedy, batch 1](s_mt_bench_t0_b1.json) | [spec-bench, greedy, batch 1]"
                      "(s_spec_bench_t0_b1.json) | [spec-bench, greedy, batch 4](s_spec_bench_t0_b4.json) |")
    assert "| `plain` | 50.0 tokens/s | 50.0 tokens/s | 50.0 tokens/s |" in table
    low, high = run_interval(1.5, 1.25, 1.75, RUN_NOISE_SD)  # runs from before run_noise_sd was recorded
    assert f"| `kangaroo` | 0.90x (0.85–0.95) | 1.20x | 1.50x ({low:.2f}–{high:.2f}) |" in table and "3.00x" not in table
    assert low < 1.25 and high > 1.75
    (tmp_path / "s_mt_bench_t0_b1.md").write_text("the run's report")
    assert "[mt-bench, greedy, batch 1](s_mt_bench_t0_b1.md)" in status_markdown(str(tmp_path), "s", str(tmp_path))
    (tmp_path / "s_notes.json").write_text(json.dumps({"benchmark": "a sweep"}))
    with pytest.raises(ResultsError, match="s_notes.json: not an `eej bench` result"):
        status_markdown(str(tmp_path), "s", str(tmp_path))


def test_the_status_table_reads_each_entry_from_the_latest_run_of_its_cell_that_ran_it(tmp_path):
    """Series listed oldest first: a column per cell (set, temperature, batch size) over all of them, its header linking
    the cell's latest run; an entry that run left out comes from the cell's latest earlier run that has it, numbered,
    and the numbers resolve under the table to those runs; a cell only an older series ran keeps its reading."""
    from eej.bench.results import status_markdown

    def write(name: str, batch: int, speedup: float, temperature: float | None = None, date: str = "", **more) -> None:
        doc = _bench_doc("m", "cpu:cpu", speedup, batch)
        if temperature is not None:
            doc["settings"].update(greedy=False, temperature=temperature)
        doc["settings"]["date"] = date or doc["settings"]["date"]
        for contestant, x in more.items():
            doc["methods"][contestant] = {**doc["methods"]["kangaroo"],
                                          "overall": {**doc["methods"]["kangaroo"]["overall"], "speedup": x}}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))

    write("old_spec_bench_t0_b1", 1, 1.1, specee=0.9)
    write("old_spec_bench_t0.7_b4", 4, 1.3, 0.7, specee=0.8)
    write("new_spec_bench_t0_b1", 1, 1.2, date="2026-11-27 01:00:00 UTC")  # plain and kangaroo again, not specee
    table = status_markdown(str(tmp_path), ["old", "new"], str(tmp_path))
    header = next(line for line in table.splitlines() if line.startswith("| contestant"))
    assert header == ("| contestant | [spec-bench, greedy, batch 1](new_spec_bench_t0_b1.json) | [spec-bench, T 0.7, "
                      "batch 4](old_spec_bench_t0.7_b4.json) |")
    assert "| `kangaroo` | 1.20x | 1.30x |" in table and "| `specee` | 0.90x <sup>1</sup> | 0.80x |" in table
    assert table.endswith("\n\n1. [old_spec_bench_t0_b1](old_spec_bench_t0_b1.json), 2026-11-26 01:00:00 UTC")
    assert "2026-11-26 01:00:00 UTC to 2026-11-27 01:00:00 UTC" in table
    assert "<sup>" not in status_markdown(str(tmp_path), ["new", "old"], str(tmp_path))  # the order says which is latest
    assert status_markdown(str(tmp_path), ["none"], str(tmp_path)) == "_No results of the series none are committed._"


def test_renderer_errors(render, tmp_path):
    with pytest.raises(render.ReadmeError, match="lacks the markers of section"):
        render.render_readme("no markers here\n", str(tmp_path))
    with pytest.raises(render.ReadmeError, match="unknown results section"):  # the runs' tables live on RESULTS.md
        render.render_readme(_page(render.SECTIONS), str(tmp_path))
    broken = _bench_doc("m", "cpu:cpu", 1.0)
    del broken["settings"]["questions_per_category"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ResultsError, match="broken.json: cannot render it as a specbench result"):
        render.render_results_page(_page(render.RESULTS_PAGE_SECTIONS), str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        render.render_results_page(_page(render.RESULTS_PAGE_SECTIONS), str(tmp_path))


def test_check_mode_exit_status(render, tmp_path):
    readme, page = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(_page(render.README_SECTIONS))
    page.write_text(_page(render.RESULTS_PAGE_SECTIONS))
    results = tmp_path / "results"
    results.mkdir()
    paths = ["--readme", str(readme), "--results-page", str(page), "--results", str(results)]
    assert render.main([*paths, "--check"]) == 1
    assert render.main(paths) == 0
    assert render.main([*paths, "--check"]) == 0
    page.write_text(_page(render.RESULTS_PAGE_SECTIONS))
    assert render.main([*paths, "--check"]) == 1  # either page out of date


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
