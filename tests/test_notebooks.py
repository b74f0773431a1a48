"""The notebooks in notebooks/ run from top to bottom (nbclient, a kernel of this test's own Python) and are
committed without outputs.

Each notebook reads its settings from environment variables; here they point at tiny random models,
a few tokens or training steps, and data files written by the test, so every notebook runs in seconds
and CI needs neither the real model nor ../shared/data.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
KERNEL = "eej-notebook-test"
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about the sea.", "Shorter."]},
    {"question_id": 2, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 3, "category": "qa", "turns": ["What is two plus two?"]},
]
CHATS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."} for a in range(6) for b in range(4)]


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, tiny settings and tiny data for the notebooks."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eej (test)", "language": "python",
    }))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    settings = {
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "EEJ_NOTEBOOK_MODEL": "tiny-llama",
        "EEJ_NOTEBOOK_TOKENS": "6",
        "EEJ_NOTEBOOK_LIMIT": "1",
        "EEJ_QUESTIONS": str(questions),
        "EEJ_TRAIN_DATA": str(chats),
        "EEJ_NOTEBOOK_EXIT_LAYER": "2",
        "EEJ_NOTEBOOK_STEPS": "12",
        "EEJ_NOTEBOOK_EXAMPLES": "24",
        "EEJ_NOTEBOOK_OUT": str(tmp_path / "run"),
        "MPLBACKEND": "agg",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def test_there_are_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    for stem in ("quickstart", "methods_compared", "train_your_own_adapter", "compose_with_your_own_model"):
        assert any(stem in n for n in names), f"no notebook named *{stem}*"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=240, resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    with open(path) as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{os.path.basename(path)} holds outputs: run python scripts/strip_notebooks.py")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
