"""scripts/cpu_attention_probe.py: it times the kernel and writes JSON and markdown, and rejects bad arguments
(status 2) before measuring."""

from __future__ import annotations

import json

import pytest

from eej.testing import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("cpu_attention_probe")


def test_it_times_each_case_and_writes_json_and_markdown(script, tmp_path):
    out = tmp_path / "probe"
    script.main(["--batches", "1,2", "--queries", "2", "--positions", "20", "--capacity", "64", "--layers", "2",
                 "--repeats", "2", "--out", str(out)])
    doc = json.loads((tmp_path / "probe.json").read_text())
    assert [(r["batch"], r["queries"], r["position"]) for r in doc["rows"]] == [(1, 2, 20), (2, 2, 20)]
    assert all(0 < r["min_ms"] <= r["median_ms"] for r in doc["rows"])
    assert doc["machine"]["cpu_count"] and "load_average_end" in doc["machine"]
    assert "| 2 | 2 | 20 |" in (tmp_path / "probe.md").read_text()


@pytest.mark.parametrize("argv", [["--batches", "x"], ["--queries", "0"], ["--positions", "100", "--capacity", "64"],
                                  ["--layers", "0"]])
def test_bad_arguments_end_with_status_2_before_measuring(script, argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as ended:
        script.main(argv + ["--out", str(tmp_path / "r")])
    assert ended.value.code == 2
    assert "error: " in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
