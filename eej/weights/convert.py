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
    head = np.asarray(params.get("lm_head", params["embed"]))
    lm_head = np.empty(head.shape[::-1], head.dtype)
    _copy_transposed(lm_head, head)
    return {**params, "layers": layers, "lm_head": lm_head}


def _stack(value: Any, transpose: bool) -> np.ndarray:
    """A stacked [L, ...] array or a list of L arrays -> one contiguous [L, ...] array, last two axes swapped if
    `transpose`."""
    if not transpose:
        return np.stack(value) if isinstance(value, list) else value
    first = np.asarray(value[0])
    out = np.empty((len(value), *first.shape[:-2], first.shape[-1], first.shape[-2]), first.dtype)
    for dst, src in zip(out, value):
        _copy_transposed(dst, np.asarray(src))
    return out


def _copy_transposed(dst: np.ndarray, src: np.ndarray, band: int = 256) -> None:
    """dst = src with its last two axes swapped ([..., a, b] -> [..., b, a]), copied `band` rows of src at a time.

    A whole-matrix transposed copy misses the cache on nearly every element: 0.37 s instead of 0.03 s for
    SmolLM2-135M's [49152, 576] embedding (issue #19, startup time)."""
    for i in range(0, src.shape[-2], band):
        dst[..., i:i + band] = np.swapaxes(src[..., i:i + band, :], -1, -2)


def check_finite(params: Any, where: str) -> None:
    """ValueError naming the first weight of `params` (an array, or a pytree of them) that holds nan or inf:
    a damaged file, refused at load. `where` names the file (and the tensor, for a single array)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "f" and not np.isfinite(leaf).all():
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{where}{f' weight {name}' if name else ''} holds non-finite values (nan or inf); the "
                             "file is damaged — download or convert the model again")
