"""Lossless self-speculation on SmolLM2-135M with the shipped add-ons: token-identical to plain decoding,
drafts accepted (Kangaroo's adapter, M2R2's fast stream)."""

from __future__ import annotations

import pytest

from eej.decoding.engine import Engine
from eej.decoding.methods import build_method


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["kangaroo", "m2r2-spec"])
def test_shipped_addons_are_lossless_and_accept_drafts(real_model, method):
    strategy, method_params = build_method(real_model, method)  # the default preset, no set-up
    tok = real_model.tokenizer
    prompts = [
        tok.encode_chat("What is the capital of France? Answer in two sentences."),
        tok.encode_chat("Write a Python function that returns the sum of a list of numbers."),
    ]
    plain = Engine(real_model).generate(prompts, max_new_tokens=40)
    out = Engine(real_model, strategy, method_params).generate(prompts, max_new_tokens=40)
    assert out.tokens == plain.tokens
    # the trained drafts get accepted: fewer full-model forwards than tokens
    assert sum(out.new_tokens) / sum(out.forwards) > 1.2
