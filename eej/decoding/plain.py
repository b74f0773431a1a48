"""Plain autoregressive decoding: one full-model forward per token. The baseline every method is measured against."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from eej.config import ModelConfig, SamplingConfig
from eej.decoding.sampling import sample
from eej.decoding.strategy import StepResult, Strategy
from eej.model.cache import KVCache
from eej.model.transformer import Params, forward


@dataclasses.dataclass(frozen=True)
class Plain(Strategy):
    name: ClassVar[str] = "plain"

    def step(
        self,
        params: Params,
        method_params: Any,
        cache: KVCache,
        method_state: Any,
        pending: jax.Array,
        key: jax.Array,
        sampling: SamplingConfig,
        cfg: ModelConfig,
    ) -> StepResult:
        logits, cache = forward(params, pending[:, None], cache.lengths[:, None], cache, cfg)
        batch = pending.shape[0]
        return StepResult(
            tokens=sample(logits[:, 0], key, sampling)[:, None],
            counts=jnp.ones((batch,), jnp.int32),
            cache=cache.with_lengths(cache.lengths + 1),
            method_state=method_state,
            forwards=jnp.ones((batch,), jnp.int32),
            layers=jnp.full((batch,), cfg.num_layers, jnp.float32),
        )
