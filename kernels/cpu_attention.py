"""Attention for the few queries of a decode or verification step on a CPU, float32: `--attention cpu`.

`attention(q, k_cache, v_cache, positions, *, sliding_window)` (shapes as `eej.model.attention.reference_attention`)
calls the C++ kernel in `cpu_attention.cc` through XLA's FFI: it reads each KV head's cache once for all its
queries, only up to the last slot a query reads (why and how: that file's header and docs/engine.md, "The CPU
attention"). A query's result does not depend on the other queries of its step. A block of more than `MAX_QUERIES` queries (a prefill) runs `xla_attention`, as the Pallas
kernels' long blocks do. The kernel is compiled on first use by `eej.kernels.cpu_build`.

Not differentiable (decoding only): training runs `--attention xla`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eej.kernels.cpu_build import build, register_target
from eej.model.attention import register_impl, xla_attention

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "eej_cpu_attention"
MAX_QUERIES = 16


def register() -> None:
    """Build (if needed), load and register the kernel as an XLA FFI target for the CPU (once per process)."""
    register_target(TARGET, SOURCE, "EejCpuAttention")


def build_library() -> Path:
    """The kernel's shared library, compiled for this machine if it was not yet."""
    return build(SOURCE)


def attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, *, sliding_window: int | None = None
) -> jax.Array:
    """q [B, T, Hq, Dh] over k_cache, v_cache [B, Hkv, S, Dh] at positions [B, T] -> [B, T, Hq, Dh] (q's dtype)."""
    if q.shape[1] > MAX_QUERIES:
        return xla_attention(q, k_cache, v_cache, positions, sliding_window=sliding_window)
    if k_cache.dtype != jnp.float32 or v_cache.dtype != jnp.float32:
        raise ValueError(f"--attention cpu runs float32 caches, got {k_cache.dtype}; use --attention xla")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    register()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    out = call(q.astype(jnp.float32), k_cache, v_cache, positions.astype(jnp.int32),
               window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)


register_impl("cpu", attention)
