"""Weights read from files into eej: the change from Hugging Face's tensor layout to eej's (see
eej.model.transformer for the latter), and the check that every value is finite."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

# Matrices stored [..., out, in] by Hugging Face and [..., in, out] by eej (see eej.model.moe for the MoE ones).
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
               "router", "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate")


def from_hf_layout(params: dict[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """Params with HF-layout projections ([L, out, in], experts [L, E, out, in]; "lm_head" [V, D] or absent
    when tied) -> eej layout.

    Projections become [L, in, out] (experts [L, E, in, out]) and "lm_head" [D, V] (copied from "embed" when tied).
    A layer entry may also be the L per-layer arrays — a list, or a generator when `num_layers` is given: they are
    stacked as they come (`stack_layer_arrays`), so a loader that reads layer by layer never holds them all.
    """

    def stack(key: str, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray) and key not in PROJECTIONS:
            return value
        return stack_layer_arrays(value, num_layers or len(value), transpose=key in PROJECTIONS)

    layers = {k: stack(k, v) for k, v in params["layers"].items()}
    return {**params, "layers": layers, "lm_head": transposed(params.get("lm_head", params["embed"]))}


def stack_layer_arrays(layers: Iterable[np.ndarray], count: int, transpose: bool) -> np.ndarray:
    """`count` per-layer arrays -> one [count, ...] array (`empty_aligned`), each one's last two axes swapped if
    `transpose` (HF's [out, in] projections -> eej's [in, out]). (eej.model.transformer.stack_layers stacks
    per-layer param dicts instead.)

    `layers` may be a generator: it is consumed one array at a time, so a loader that reads layer by layer holds
    one layer's array besides the result, not all of them (SmolLM2-135M: 4 MB instead of 430 MB).
    """
    out = None
    for i, layer in enumerate(layers):
        layer = np.asarray(layer)
        if out is None:
            shape = (*layer.shape[:-2], layer.shape[-1], layer.shape[-2]) if transpose else layer.shape
            out = empty_aligned((count, *shape), layer.dtype)
        out[i] = np.swapaxes(layer, -1, -2) if transpose else layer
    return out


def transposed(a: np.ndarray) -> np.ndarray:
    """A copy of `a` [..., m, n] as [..., n, m] (`empty_aligned`)."""
    out = empty_aligned((*a.shape[:-2], a.shape[-1], a.shape[-2]), a.dtype)
    out[...] = np.swapaxes(a, -1, -2)
    return out


def empty_aligned(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.empty(shape, dtype)` at an address that is a multiple of 64 bytes.

    On CPU, jax makes such an array (or a slice of whole layers of one) a device array without copying it
    (eej.weights.registry.to_device): a load then writes each weight once, not twice. Memory written for the first
    time is slow on some virtual machines (up to 1.5 s per GB measured here, issue #19 startup time)."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def check_finite(params: Any, where: str) -> None:
    """ValueError naming the first weight of `params` (an array, or a pytree of them) that holds nan or inf:
    a damaged file, refused at load. `where` names the file (and the tensor, for a single array)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "f" and not np.isfinite(leaf).all():
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{where}{f' weight {name}' if name else ''} holds non-finite values (nan or inf); the "
                             "file is damaged — download or convert the model again")
