"""eej's compile cache (eej.local_cache): a second process loads its programs, a corrupt entry changes nothing,
`EEJ_CACHE_DIR=` keeps nothing; and eej prints only its own output (no advisory lines from its libraries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _generate(cache: str, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, "EEJ_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-m", "eej", "generate", "--model", "tiny-gqa", "--prompt", "hello",
                           "--max-new-tokens", "6", *extra], env=env, capture_output=True, text=True, check=True)
    return (json.loads(proc.stdout) if "--json" in extra else {}), proc.stderr


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    first, _ = _generate(cache, "--json")
    second, _ = _generate(cache, "--json")
    return cache, first, second


def test_a_second_process_loads_its_programs(warm):
    cache, first, second = warm
    assert first["compile_cache_hits"] == 0 and second["compile_cache_hits"] > 0
    assert second["outputs"][0]["token_ids"] == first["outputs"][0]["token_ids"]
    assert os.listdir(os.path.join(cache, "xla"))
    _, stderr = _generate(cache)
    assert "programs from the compile cache" in stderr  # the verbose line says so


def test_corrupt_entries_are_compiled_again_with_the_same_answer(warm):
    cache, first, _ = warm
    for name in os.listdir(os.path.join(cache, "xla")):
        with open(os.path.join(cache, "xla", name), "wb") as f:
            f.write(b"not an executable")
    again, _ = _generate(cache, "--json")
    assert again["outputs"][0]["token_ids"] == first["outputs"][0]["token_ids"]


def test_an_empty_cache_dir_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, _ = _generate("", "--json")
    assert out["compile_cache_hits"] == 0 and os.listdir(tmp_path) == []


def test_eej_prints_only_its_own_output(tmp_path):
    for _ in range(2):  # compiling, then loading from the cache
        _, stderr = _generate(str(tmp_path))
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("[") and "tokens/s" in lines[0], stderr
    # transformers' own switch for advisory messages (what said "PyTorch was not found") is on; its warnings are not muted
    code = ("import eej, os, logging, io; from transformers.utils import logging as tl; "
            "h = io.StringIO(); lg = tl.get_logger('eej-test'); lg.addHandler(logging.StreamHandler(h)); "
            "lg.warning_advice('advice'); lg.warning('real'); "
            "print(os.environ['TRANSFORMERS_NO_ADVISORY_WARNINGS'], repr(h.getvalue()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "1" and "advice" not in out[1] and "real" in out[1]
