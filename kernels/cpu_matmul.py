"""A float32 matmul for the few rows of a decode or verification step on a CPU: `--matmul cpu`.

`matmul(x [..., K], w [K, N]) -> [..., N]` calls the C++ kernel in `cpu_matmul.cc` through XLA's FFI (why
and how it works: that file's header and docs/engine.md, "The CPU matmul"). It reads the weights once for up
to 8 rows and sums every output in the same order whatever the number of rows, so a row's result is
bit-identical whether it is computed alone (a plain step) or beside others (a verification).

The kernel is compiled with the machine's C++ compiler (`$CXX`, else g++) for this CPU (`-march=native`) the
first time it is used, into `eej.local_cache.cache_dir()/kernels` (a temporary directory when that cache is
off), keyed by the source, the compiler flags, JAX's FFI headers and the CPU; later processes load it. No
compiler is an error that says so (`--matmul xla` runs without one), never a silent fallback.

Gradients: the backward pass is two ordinary XLA matmuls (`custom_vjp`), so a model running with this kernel
can still be differentiated. Under `vmap` the call runs once per batch element.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from eej.local_cache import cache_dir

SOURCE = Path(__file__).with_name("cpu_matmul.cc")
TARGET = "eej_cpu_matmul"
# Rows (the product of x's leading dimensions) the kernel takes; more — a prefill — go to XLA's matrix product,
# which packs the weights once and then wins.
MAX_ROWS = 16
# -ffp-contract=off: no fused multiply-adds, so the vector tiles and the scalar tail round alike
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")

_registered: list[str] = []


class KernelBuildError(RuntimeError):
    """The CPU matmul kernel could not be compiled or loaded on this machine."""


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags.strip()}"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise KernelBuildError(
            f"--matmul cpu compiles a C++ kernel and needs a C++ compiler, but {cxx!r} is not on PATH: "
            "install one (Debian: apt install g++) or set $CXX, or use --matmul xla"
        )
    return cxx


def build() -> Path:
    """Compile the kernel for this machine (once; later calls find it) and return the shared library's path."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    headers = sorted(Path(include, "xla", "ffi", "api").glob("*.h"))
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), _cpu_signature().encode(),
                 *(h.read_bytes() for h in headers)):
        digest.update(part)
    root = cache_dir()
    directory = Path(root, "kernels") if root else Path(tempfile.gettempdir(), f"eej-kernels-{os.getuid()}")
    library = directory / f"cpu_matmul-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Each process compiles to a file of its own and renames it into place: parallel test workers never see a
    # half-written library.
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", partial],
                              capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(f"compiling {SOURCE.name} with {cxx} failed (use --matmul xla to run without "
                                   f"it):\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def register() -> None:
    """Build (if needed), load and register the kernel as an XLA FFI target for the CPU (once per process)."""
    if _registered:
        return
    library = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.EejCpuMatmul), platform="cpu")
    _registered.append(TARGET)


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
