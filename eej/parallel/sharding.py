"""Which part of every array each device holds when decoding on a (data, model) mesh.

Rules, applied to any pytree by leaf name and shape (so a method's params and state are covered
without the method saying anything):

- params (Megatron-style tensor parallelism over `model`): the q/k/v projections (and biases) are
  split over their output features = heads, `wo` over its input features; the FFN's gate/up over
  F, `w_down` over its input F; `lm_head` over the vocabulary, `embed` over its rows. A mixture of
  experts (eej.model.moe) is split the same way inside every expert: gate/up [E, D, Fe] over Fe,
  `w_down` [E, Fe, D] over Fe (each device holds a slice of every expert, so routing needs no
  communication), the shared expert like the dense FFN; the router stays whole. Attention is
  split only when both the query and KV head counts are multiples of the `model` size (a split
  must not cut a head or separate a query head from its KV head); any dim that does not divide
  stays whole. Everything else (norms, small adapters' other leaves) is replicated.
- KV caches: rows over `data`, KV heads over `model` (when attention is split).
- any other state leaf whose leading dim is the batch: rows over `data` (when the batch divides).

A sharding never changes what is computed, only where: jit inserts the collectives. Kernels,
which XLA cannot partition, run per shard via `per_shard` (shard_map).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eej.config import ModelConfig
from eej.model.cache import KVCache

# leaf name -> the axis (from the end) split over `model`; "heads" marks attention weights.
# Axes count from the end, so stacked [L, ...] leaves and experts [E, ...] follow the same rules.
_COLUMN = {"wq": "heads", "wk": "heads", "wv": "heads", "bq": "heads", "bk": "heads", "bv": "heads",
           "w_gate": "ffn", "w_up": "ffn", "shared_w_gate": "ffn", "shared_w_up": "ffn", "lm_head": "vocab"}
_ROW = {"wo": "heads", "w_down": "ffn", "shared_w_down": "ffn"}


def _leaf_name(path) -> str | None:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return None


def _split(ndim: int, axis: int, name: str | None) -> P:
    spec: list[Any] = [None] * ndim
    spec[axis] = name
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class DecodeSharding:
    """Sharding rules of one model on one mesh (see the module docstring)."""

    mesh: Mesh
    cfg: ModelConfig

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"]

    @property
    def model_size(self) -> int:
        return self.mesh.shape["model"]

    @property
    def splits_heads(self) -> bool:
        m = self.model_size
        return m > 1 and self.cfg.num_heads % m == 0 and self.cfg.num_kv_heads % m == 0

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # ------------------------------------------------------------------ specs

    def param_spec(self, name: str | None, shape: tuple[int, ...]) -> P:
        """PartitionSpec of a parameter leaf called `name` (works for stacked [L, ...] leaves too)."""
        m, ndim = self.model_size, len(shape)
        if m == 1 or ndim == 0:
            return P()
        if name == "embed" and ndim == 2:
            axis, kind = 0, "vocab"
        elif name in _COLUMN:
            axis, kind = ndim - 1, _COLUMN[name]
        elif name in _ROW and ndim >= 2:
            axis, kind = ndim - 2, _ROW[name]
        else:
            return P()
        if (kind == "heads" and not self.splits_heads) or shape[axis] % m:
            return P()
        return _split(ndim, axis, "model")

    def batch_spec(self, shape: tuple[int, ...], batch: int) -> P:
        """Rows over `data` for a leaf whose leading dim is the batch (and divides); else replicated."""
        if shape and shape[0] == batch and batch % self.data_size == 0 and self.data_size > 1:
            return _split(len(shape), 0, "data")
        return P()

    def cache_spec(self, shape: tuple[int, ...], batch: int) -> P:
        """A [B, Hkv, S, Dh] cache array: rows over `data`, KV heads over `model`."""
        rows = "data" if (self.data_size > 1 and shape[0] % self.data_size == 0 and shape[0] == batch) else None
        heads = "model" if (self.splits_heads and shape[1] % self.model_size == 0) else None
        return P(rows, heads, None, None)

    # ------------------------------------------------------------------ trees

    def params(self, tree: Any) -> Any:
        """NamedShardings for a params pytree (the model's or a method's)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.named(self.param_spec(_leaf_name(path), np.shape(x))), tree
        )

    def state(self, tree: Any, batch: int) -> Any:
        """NamedShardings for decode-time data (state, inputs) of `batch` rows; KV caches anywhere inside."""

        def cache_shardings(cache: KVCache) -> KVCache:
            return KVCache(
                k=tuple(self.named(self.cache_spec(a.shape, batch)) for a in cache.k),
                v=tuple(self.named(self.cache_spec(a.shape, batch)) for a in cache.v),
                lengths=self.named(self.batch_spec(cache.lengths.shape, batch)),
            )

        def leaf(x: Any) -> Any:
            if isinstance(x, KVCache):
                return cache_shardings(x)
            return self.named(self.batch_spec(np.shape(x), batch))

        return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, KVCache))

    # ------------------------------------------------------------------ placement

    def place(self, tree: Any, shardings: Any) -> Any:
        """Put host or single-device values onto the mesh as global arrays (identical input on every process)."""

        def put(x: Any, sharding: NamedSharding) -> jax.Array:
            if jax.process_count() == 1:
                return jax.device_put(x, sharding)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_shard(op: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Run an attention op `op(q, k_cache, v_cache, positions, **kw)` shard by shard under the current mesh.

    XLA cannot partition a kernel (a custom call), so under `jax.set_mesh` of a (data, model) mesh
    the op runs inside shard_map: rows split over `data`, heads over `model` where they divide —
    each device sees an ordinary smaller attention problem. Without a mesh it is `op` itself.
    """

    def wrapped(q, k_cache, v_cache, positions, **kw):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not set(("data", "model")) <= set(mesh.axis_names):
            return op(q, k_cache, v_cache, positions, **kw)
        data, model = mesh.shape["data"], mesh.shape["model"]
        rows = "data" if q.shape[0] % data == 0 else None
        heads = "model" if (q.shape[2] % model == 0 and k_cache.shape[1] % model == 0) else None
        if rows is None and heads is None:
            return op(q, k_cache, v_cache, positions, **kw)
        q_spec, cache_spec = P(rows, None, heads, None), P(rows, heads, None, None)
        return jax.shard_map(
            lambda q, k, v, p: op(q, k, v, p, **kw),
            mesh=mesh,
            in_specs=(q_spec, cache_spec, cache_spec, P(rows, None)),
            out_specs=q_spec,
            check_vma=False,
        )(q, k_cache, v_cache, positions)

    wrapped.__doc__ = op.__doc__
    wrapped.__wrapped__ = op
    return wrapped
