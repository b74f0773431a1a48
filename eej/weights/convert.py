"""Weights read from files into eej: the change from Hugging Face's tensor layout to eej's (see
eej.model.transformer for the latter), and the check that every value is finite."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# Matrices stored [..., out, in] by Hugging Face and [..., in, out] by eej (see eej.model.moe for the MoE ones).
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
               "router", "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate")


def from_hf_layout(params: dict[str, Any]) -> dict[str, Any]:
    """Params with HF-layout projections ([L, out, in], experts [L, E, out, in]; "lm_head" [V, D] or absent
    when tied) -> eej layout.

    Projections become [L, in, out] (experts [L, E, in, out]) and "lm_head" [D, V] (copied from "embed" when tied).
    A layer entry may also be a list of the L per-layer arrays: it is stacked and transposed in one copy (a loader
    that reads layer by layer then never holds a stacked HF-layout copy too).
    """
    layers = {k: _stack(v, transpose=k in PROJECTIONS) for k, v in params["layers"].items()}
    head = params.get("lm_head", params["embed"])
    return {**params, "layers": layers, "lm_head": np.ascontiguousarray(head.T)}


def _stack(value: Any, transpose: bool) -> np.ndarray:
    """A stacked [L, ...] array or a list of L arrays -> one contiguous [L, ...] array, last two axes swapped if
    `transpose`."""
    if isinstance(value, list):
        return np.stack([np.swapaxes(v, -1, -2) if transpose else v for v in value])
    return np.ascontiguousarray(np.swapaxes(value, -1, -2)) if transpose else value


def check_finite(params: Any, where: str) -> None:
    """ValueError naming the first weight of `params` (an array, or a pytree of them) that holds nan or inf:
    a damaged file, refused at load. `where` names the file (and the tensor, for a single array)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "f" and not np.isfinite(leaf).all():
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{where}{f' weight {name}' if name else ''} holds non-finite values (nan or inf); the "
                             "file is damaged — download or convert the model again")
