"""The documentation stays true: docs/engine.md's code runs, every docs page is indexed, and the
relative links of the README and the docs point at files that exist."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_engine_page_code_runs():
    with open(os.path.join(ROOT, "docs", "engine.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 4
    from eej.decoding import methods

    namespace: dict = {}
    try:
        for block in blocks:  # in order, in one namespace, as a reader would run them
            exec(compile(block, "docs/engine.md", "exec", dont_inherit=True), namespace)
    finally:
        methods._METHODS.pop("confidence-exit", None)


def test_every_docs_page_is_linked():
    """Method pages from the README's generated Methods table, every other page from docs/index.md."""
    from eej.decoding.methods import known_methods

    with open(os.path.join(ROOT, "docs", "index.md")) as f:
        index = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for page in PAGES:
        name = os.path.basename(page)
        if name == "index.md":
            continue
        if name[:-3] in {m.split("-", 1)[0] for m in known_methods()}:  # m2r2-spec, m2r2-exit -> m2r2.md
            assert f"(docs/{name})" in readme, f"the README's Methods table does not link docs/{name}"
        else:
            assert f"({name})" in index, f"docs/index.md does not link {name}"


@pytest.mark.parametrize("path", [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "RESULTS.md"), *PAGES], ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_exist(path):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[\w-]+\]:\s*(\S+)", text, re.M)
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target = os.path.normpath(os.path.join(os.path.dirname(path), link.split("#")[0]))
        assert os.path.exists(target), f"{os.path.relpath(path, ROOT)} links {link}, which does not exist"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's notebook examples (the first two python blocks), on a tiny random model and a tiny
    questions file instead of SmolLM2 and Spec-Bench; the third block is a sketch with `...`."""
    import json

    import matplotlib

    matplotlib.use("agg")
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]}) + "\n")
    code = "\n".join(blocks[:2])
    for real, tiny in [('"smollm2-135m"', '"tiny-llama"'), ("../shared/data/eval/spec_bench.jsonl", str(questions))]:
        assert real in code
        code = code.replace(real, tiny)
    monkeypatch.chdir(ROOT)  # the committed results path is relative to the repository root
    exec(compile(code, "README.md", "exec"), {})
