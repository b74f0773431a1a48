"""Plain autoregressive decoding: one full-model forward per token. The baseline every method is measured against."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from eej.decoding.strategy import StepInputs, StepResult, Strategy
from eej.model.transformer import forward


@dataclasses.dataclass(frozen=True)
class Plain(Strategy):
    name: ClassVar[str] = "plain"

    def step(self, s: StepInputs) -> StepResult:
        logits, cache = forward(s.params, s.pending[:, None], s.positions, s.cache, s.cfg)
        logits = logits[:, 0]
        return StepResult.one_token(s.sample(logits), cache, s.method_state,
                                    forwards=1, layers=s.cfg.num_layers, logits=logits)
