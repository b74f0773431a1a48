"""Every method's decode loop lowers for a TPU (and a GPU) on this CPU-only machine, and what a loop holds."""

from __future__ import annotations

import numpy as np
import pytest

from eej.decoding.engine import Engine
from eej.decoding.methods import known_methods, random_method
from eej.testing import random_prompts, tiny_model


@pytest.mark.parametrize("method", known_methods())
def test_every_decode_loop_lowers_for_tpu_and_gpu(method):
    model = tiny_model("tiny-gqa", 0)
    engine = Engine(model, *random_method(model, method, seed=0))
    prompts = random_prompts(np.random.default_rng(0), [5, 9], model.cfg.vocab_size)
    for platform in ("tpu", "cuda"):
        text = engine.lower(prompts, max_new_tokens=8, platforms=(platform,)).as_text()
        assert "stablehlo.while" in text  # the whole generation is one loop on the device
