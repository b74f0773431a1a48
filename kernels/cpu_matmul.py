"""A float32 matmul for the few rows of a decode or verification step on a CPU: `--matmul cpu`.

`matmul(x [..., K], w [K, N]) -> [..., N]` calls the C++ kernel in `cpu_matmul.cc` through XLA's FFI (why
and how it works: that file's header and docs/engine.md, "The CPU matmul"). It reads the weights once for up
to 24 rows and sums every output in the same order whatever the number of rows, so a row's result is
bit-identical whether it is computed alone (a plain step) or beside others (a verification).

The kernel is compiled on first use by `eej.kernels.cpu_build` (the machine's C++ compiler, for this CPU); no
compiler is an error that says so (`--matmul xla` runs without one), never a silent fallback.

Gradients: the backward pass is two ordinary XLA matmuls (`custom_vjp`), so a model running with this kernel
can still be differentiated. Under `vmap` the call runs once per batch element.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from eej.kernels.cpu_build import KernelBuildError, build, register_target  # noqa: F401 (KernelBuildError: re-exported)

SOURCE = Path(__file__).with_name("cpu_matmul.cc")
TARGET = "eej_cpu_matmul"
# Rows (the product of x's leading dimensions) the kernel takes; more — a prefill — go to XLA's matrix product,
# which packs the weights once and then wins (SmolLM2-135M's products on the 2-core EPYC: the kernel 1.05-1.25x
# faster than XLA's from 8 to 32 rows, 0.95x at 48).
MAX_ROWS = 32


def register() -> None:
    """Build (if needed), load and register the kernel as an XLA FFI target for the CPU (once per process)."""
    register_target(TARGET, SOURCE, "EejCpuMatmul")


def build_library() -> Path:
    """The kernel's shared library, compiled for this machine if it was not yet."""
    return build(SOURCE)


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul` takes this product (float32, a 2-D weight, at most MAX_ROWS rows); else use XLA's."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and x.ndim >= 1
            and 0 < rows <= MAX_ROWS and x.shape[-1] == w.shape[0])


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] by the kernel (float32; see `applies`)."""
    register()
    rows = x.reshape(-1, x.shape[-1])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(rows, w).reshape(*x.shape[:-1], w.shape[1])


def _forward(x: jax.Array, w: jax.Array):
    return matmul(x, w), (x, w)


def _backward(saved, dy: jax.Array):
    x, w = saved
    dx = jnp.matmul(dy, w.T)
    dw = jnp.matmul(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
    return dx, dw


matmul.defvjp(_forward, _backward)
