"""A float32 matmul for the few rows of a decode or verification step on a CPU: `--matmul cpu`.

`matmul(x [..., K], w [K, N]) -> [..., N]` calls the C++ kernel in `cpu_matmul.cc` through XLA's FFI (why
and how it works: that file's header and docs/engine.md, "The CPU matmul"). It reads the weights once, in
column tiles (`eej.model.packed`), and sums every output in the same order whatever the number of rows, so a
row's result is bit-identical whether it is computed alone (a plain step) or beside others (a verification).

The kernel is compiled on first use by `eej.kernels.cpu_build` (the machine's C++ compiler, for this CPU); no
compiler is an error that says so (`--matmul xla` runs without one), never a silent fallback.

Gradients: the backward pass is two ordinary XLA products on the tiles (`custom_vjp`), so a model running
with this kernel can still be differentiated. Under `vmap` the call runs once per batch element.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from eej.kernels.cpu_build import KernelBuildError, build, register_target  # noqa: F401 (KernelBuildError: re-exported)
from eej.model.packed import PackedWeight, pack

SOURCE = Path(__file__).with_name("cpu_matmul.cc")
TARGET = "eej_cpu_matmul"
# Rows of x per call of the kernel (kernels/cpu_matmul.cc takes at most 36); more rows are cut into calls of this
# many, each reading the weights again.
CALL_ROWS = 32
# Rows (the product of x's leading dimensions) the kernel takes; more, a long prefill, go to XLA's matrix product,
# which blocks for cache reuse. SmolLM2-135M's prefill of one prompt on the 2-core EPYC (both CPU kernels, the
# minimum of 4 rounds): 64 tokens 176 ms by the kernel, 243-261 ms by XLA's product; 512 tokens 1174 / 1195 ms.
MAX_ROWS = 512


def register() -> None:
    """Build (if needed), load and register the kernel as an XLA FFI target for the CPU (once per process)."""
    register_target(TARGET, SOURCE, "EejCpuMatmul")


def build_library() -> Path:
    """The kernel's shared library, compiled for this machine if it was not yet."""
    return build(SOURCE)


def applies(x: jax.Array, w: jax.Array | PackedWeight) -> bool:
    """Whether `matmul` takes this product (float32, a 2-D weight, packed or not, at most MAX_ROWS rows); else
    use XLA's."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and x.ndim >= 1
            and 0 < rows <= MAX_ROWS and x.shape[-1] == w.shape[0])


def matmul(x: jax.Array, w: jax.Array | PackedWeight) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] by the kernel (float32; see `applies`). w is read in column tiles
    (`eej.model.packed`): give it packed — an engine packs its params once — or it is packed here, a copy of w
    in every call."""
    w = pack(w)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n <= CALL_ROWS:
        y = _tiled(rows, w.tiles)
    else:  # calls of CALL_ROWS rows in a loop (one call in the program); the last padded with zero rows
        calls = -(-n // CALL_ROWS)
        padded = jnp.pad(rows, ((0, calls * CALL_ROWS - n), (0, 0))).reshape(calls, CALL_ROWS, -1)
        y = lax.map(lambda part: _tiled(part, w.tiles), padded).reshape(calls * CALL_ROWS, -1)[:n]
    return y[:, : w.columns].reshape(*x.shape[:-1], w.columns)


@jax.custom_vjp
def _tiled(x: jax.Array, tiles: jax.Array) -> jax.Array:
    """x [..., K] @ tiles [C, K, TILE] -> [..., C * TILE] (the padded columns included)."""
    register()
    rows = x.reshape(-1, x.shape[-1])
    width = tiles.shape[0] * tiles.shape[2]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], width), jnp.float32), vmap_method="sequential")
    return call(rows, tiles).reshape(*x.shape[:-1], width)


def _forward(x: jax.Array, tiles: jax.Array):
    return _tiled(x, tiles), (x, tiles)


def _backward(saved, dy: jax.Array):
    x, tiles = saved
    dy = dy.reshape(*dy.shape[:-1], tiles.shape[0], tiles.shape[2])  # [..., C, TILE]
    dx = jnp.einsum("...cj,ckj->...k", dy, tiles)
    dtiles = jnp.einsum("mk,mcj->ckj", x.reshape(-1, x.shape[-1]), dy.reshape(-1, *dy.shape[-2:]))
    return dx, dtiles


_tiled.defvjp(_forward, _backward)
