"""scripts/verify_width_cost.py: it times every width of both programs, and rejects bad arguments before measuring."""

from __future__ import annotations

import pytest

from eej.testing import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("verify_width_cost")


def test_it_times_each_width_of_the_forward_and_the_head(script):
    out = script.measure("tiny-llama", max_width=3, steps=2, rounds=1)
    assert set(out) == {"forward", "head"}
    for kind in out:
        assert sorted(out[kind]) == [1, 2, 3] and all(ms > 0 for ms in out[kind].values())


@pytest.mark.parametrize("argv", [["--variants", "default,nope"], ["--max-width", "0"], ["--rounds", "0"],
                                  ["--capacity", "100"], ["--batch", "0"]])
def test_bad_arguments_end_with_status_2_before_measuring(script, argv, capsys, tmp_path):
    assert script.main(argv + ["--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("verify_width_cost: error: ")
    assert not list(tmp_path.iterdir())


def test_the_kernel_variant_times_the_cpu_matmul(script):
    assert script.VARIANTS["cpu-kernel"] == ("", "cpu", "xla") and script.VARIANTS["cpu-kernels"] == ("", "cpu", "cpu")
    out = script.measure("tiny-llama", max_width=2, steps=2, rounds=1, matmul="cpu", attention="cpu", capacity=200)
    assert sorted(out["forward"]) == [1, 2] and all(ms > 0 for ms in out["head"].values())
    batched = script.measure("tiny-llama", max_width=2, steps=2, rounds=1, matmul="cpu", attention="cpu", batch=3)
    assert sorted(batched["forward"]) == [1, 2] and all(ms > 0 for ms in batched["forward"].values())
