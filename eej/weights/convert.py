"""Between Hugging Face's tensor layout and eej's (see eej.model.transformer for the latter)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Matrices stored [..., out, in] by Hugging Face and [..., in, out] by eej (see eej.model.moe for the MoE ones).
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
               "router", "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate")


def from_hf_layout(params: dict[str, Any]) -> dict[str, Any]:
    """Params with HF-layout projections ([L, out, in], experts [L, E, out, in]; "lm_head" [V, D] or absent
    when tied) -> eej layout.

    Projections become [L, in, out] (experts [L, E, in, out]) and "lm_head" [D, V] (copied from "embed" when tied).
    """
    layers = {k: (np.ascontiguousarray(np.swapaxes(v, -1, -2)) if k in PROJECTIONS else v) for k, v in params["layers"].items()}
    head = params.get("lm_head", params["embed"])
    return {**params, "layers": layers, "lm_head": np.ascontiguousarray(head.T)}
