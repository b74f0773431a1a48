"""Timing an engine's compiled decode loop directly, step by step, for scripts that compare step costs.

The engine's own calibration (eej.decoding.calibration.time_loop) times one loop under several method-state edits;
these scripts compare the loops of several engines (plain decoding, each method, each variant), interleaved round by
round so that drift on a shared machine hits them alike.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from eej.config import SamplingConfig
from eej.decoding.engine import Engine, _decode_loop


def decode_loop_timer(engine: Engine, prompts: list[list[int]], max_new_tokens: int, steps: int, sampling: SamplingConfig,
                      edit: Callable[[Any], Any] | None = None) -> tuple[Callable[[], float], Any]:
    """(run, compiled loop): run() runs `steps` (< max_new_tokens) decode steps of `engine`'s compiled loop after
    `prompts` (B token lists), the method state first changed by `edit` (e.g. a calibration point), and returns
    milliseconds per step. The prefill and compilation happen here; every run starts from a copy of the same state."""
    state, static, _, _ = engine._prefill(prompts, max_new_tokens, sampling, 0, ())
    loop, _ = engine._get("loop", _decode_loop, static, (engine.model.params, engine.method_params, state), donate=(2,),
                          batch=len(prompts))

    def run() -> float:
        s = jax.tree.map(jnp.copy, state)
        s = s.replace(steps=jnp.full((), max_new_tokens - steps, jnp.int32))
        if edit is not None:
            s = s.replace(method_state=edit(s.method_state))
        start = time.perf_counter()
        jax.block_until_ready(loop(engine.model.params, engine.method_params, s))
        return 1e3 * (time.perf_counter() - start) / steps

    return run, loop
