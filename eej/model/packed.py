"""Projection weights laid out in column tiles, for the CPU matmul kernel (`eej.kernels.cpu_matmul`).

A weight w [..., K, N] (y = x @ w) becomes `PackedWeight(tiles, columns=N)` with

    tiles [..., ceil(N / TILE), K, TILE],   tiles[..., t, k, j] = w[..., k, t * TILE + j]   (zero past column N),

so the K rows of TILE columns are one contiguous block: the kernel streams each block once and keeps its sums
in registers over the whole of K (why: kernels/cpu_matmul.cc). An engine whose model runs `matmul_impl="cpu"`
packs the projection weights of its params and method params when it is built (`pack_projections`), and engines
on the same weights share one packed copy (`pack_shared`);
`eej.model.transformer.linear` takes either form, so every function of the model accepts both, and
`take_columns` gathers columns of either (a draft head's vocabulary, a SpecEE check's candidates).

A `PackedWeight` is a pytree (its tiles the one leaf), so stacking, slicing a layer out of a stacked `[L, ...]`
weight, `jax.jit` and `jax.tree.map` work on it as on an array; `shape` is the logical [..., K, N].
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
import jax.numpy as jnp

TILE = 32  # columns per tile: kernels/cpu_matmul.cc's kTile
# Params keys whose arrays are projection weights [in, out] (eej.model.transformer's layout) or an LM head
# [D, V] read through `linear`; a mixture-of-experts layer (one with a "router") keeps its own layout.
PROJECTION_KEYS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head", "draft_head"})


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight [..., K, N] as tiles [..., ceil(N / TILE), K, TILE]; `columns` is N."""

    tiles: jax.Array
    columns: int

    def tree_flatten(self):
        return (self.tiles,), self.columns

    @classmethod
    def tree_unflatten(cls, columns: int, children: tuple) -> "PackedWeight":
        return cls(children[0], columns)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.tiles.shape[:-3], self.tiles.shape[-2], self.columns)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.tiles.dtype

    def unpacked(self) -> jax.Array:
        """The weight [..., K, N] again."""
        t = self.tiles
        w = jnp.swapaxes(t, -3, -2).reshape(*t.shape[:-3], t.shape[-2], t.shape[-3] * TILE)
        return w[..., : self.columns]


def pack(w: jax.Array) -> PackedWeight:
    """w [..., K, N] -> its tiles (see the module docstring); a PackedWeight passes through."""
    if isinstance(w, PackedWeight):
        return w
    w = jnp.asarray(w)
    *lead, k, n = w.shape
    count = -(-n // TILE)
    padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, count * TILE - n)])
    return PackedWeight(jnp.swapaxes(padded.reshape(*lead, k, count, TILE), -3, -2), n)


def product(x: jax.Array, w: PackedWeight) -> jax.Array:
    """x [..., K] @ w -> [..., N] by XLA's product on the tiles (a prefill's many rows, or no CPU kernel)."""
    y = jnp.einsum("...k,ckj->...cj", x, w.tiles.astype(x.dtype))
    return y.reshape(*y.shape[:-2], -1)[..., : w.columns]


def take_columns(w: jax.Array | PackedWeight, ids: jax.Array) -> jax.Array:
    """Columns `ids` [...] of a 2-D weight w [K, N], packed or not -> [K, ...] (`jnp.take(w, ids, axis=1)`)."""
    if not isinstance(w, PackedWeight):
        return jnp.take(w, ids, axis=1)
    picked = w.tiles[ids // TILE, :, ids % TILE]  # [..., K]
    return jnp.moveaxis(picked, -1, 0)


# id(weight) -> its packed copy, held weakly: engines built on the same weights share one copy, which lives as
# long as some engine holds it (an entry leaves with its weight; a dead copy is packed again on demand).
_PACKED: dict[int, weakref.ref] = {}


def pack_shared(w: Any) -> PackedWeight:
    """`pack(w)`, shared: while a packed copy of this very array is alive, the same copy again (several engines on
    one model hold one packed copy of its weights, not one each). Only a concrete jax.Array (immutable) is shared;
    a traced value or a numpy array is packed afresh."""
    if isinstance(w, PackedWeight) or isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
        return pack(w)
    key = id(w)
    ref = _PACKED.get(key)
    packed = ref() if ref is not None else None
    if packed is None:
        packed = pack(w)
        if ref is None:
            weakref.finalize(w, _PACKED.pop, key, None)
        _PACKED[key] = weakref.ref(packed)
    return packed


def pack_projections(tree: Any) -> Any:
    """`tree` (params or method params: nested dicts, tuples and lists) with every float32 projection weight
    (a `PROJECTION_KEYS` entry of at least 2 dimensions, outside mixture-of-experts layers) packed (`pack_shared`)."""
    if isinstance(tree, dict):
        dense = "router" not in tree
        return {key: (pack_shared(value) if dense and key in PROJECTION_KEYS and _packable(value) else pack_projections(value))
                for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(pack_projections(value) for value in tree)
    return tree


def _packable(value: Any) -> bool:
    return (isinstance(value, PackedWeight)
            or (hasattr(value, "ndim") and value.ndim >= 2 and jnp.dtype(value.dtype) == jnp.float32))
