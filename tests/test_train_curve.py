"""scripts/train_curve.py: window means of a training log by hand, a resumed run's repeated steps counted once, and
bad input exits 2 before anything is written."""

from __future__ import annotations

import json
import os

import pytest

from eej.testing import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("train_curve")


def write_log(run_dir, records):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train_log.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")


def test_window_means_by_hand_and_a_resumed_step_counted_once(script, tmp_path):
    records = [{"step": s, "time": 100.0 + s, "loss": float(10 - s), "accept": s / 10} for s in (10, 20, 30, 40, 50)]
    records.insert(3, {"step": 30, "time": 999.0, "loss": 0.0, "accept": 0.0})  # resumed: step 30 logged again
    write_log(tmp_path / "run", records)
    got = script.windows(script.read_records(str(tmp_path / "run")), 20)
    assert [r["step"] for r in got] == [20, 40, 50]
    assert got[0]["loss"] == pytest.approx((0 + -10) / 2) and got[0]["records"] == 2
    assert got[1]["loss"] == pytest.approx((0.0 + -30) / 2)  # the later record of step 30 counts
    assert got[2]["accept"] == pytest.approx(5.0)


def test_writes_json_markdown_and_a_plot(script, tmp_path):
    write_log(tmp_path / "run", [{"step": s, "time": 0.0, "loss": 1.0 / s, "lr": 0.01} for s in range(1, 31)])
    assert script.main([str(tmp_path / "run"), "--window", "10", "--out", str(tmp_path / "curve")]) == 0
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert [r["step"] for r in doc["rows"]] == [10, 20, 30]
    assert "| steps up to | loss | lr |" in (tmp_path / "curve.md").read_text()
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [["{missing}", "--out", "{out}"], ["{run}", "--window", "0", "--out", "{out}"],
                                  ["{empty}", "--out", "{out}"]])
def test_bad_input_exits_2_and_writes_nothing(script, tmp_path, argv):
    write_log(tmp_path / "run", [{"step": 1, "time": 0.0, "loss": 1.0}])
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "train_log.jsonl").write_text("")
    paths = {"missing": str(tmp_path / "nowhere"), "run": str(tmp_path / "run"), "empty": str(tmp_path / "empty"),
             "out": str(tmp_path / "curve")}
    with pytest.raises(SystemExit) as ended:
        script.main([a.format(**paths) for a in argv])
    assert ended.value.code == 2
    assert not list(tmp_path.glob("curve*"))
