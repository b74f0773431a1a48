"""Compiling eej's C++ CPU kernels (`cpu_matmul.cc`, `cpu_attention.cc`) and registering them with XLA's FFI.

A kernel is compiled with the machine's C++ compiler (`$CXX`, else g++) for this CPU (`-march=native`) the
first time it is used, into `eej.local_cache.cache_dir()/kernels` (a temporary directory when that cache is
off), keyed by its source and the headers beside it (`cpu_parallel.h`), the compiler and its flags, JAX's FFI
headers and the CPU; later processes load it.
No compiler, or a failed compile, is a `KernelBuildError` that names the XLA alternative.
`runs_here` is where the kernels apply at all, and `choose` resolves "auto" by it (`eej.load_model(kernels=...)`, the
CLI's --matmul and --attention).
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

from eej.local_cache import cache_dir

# -ffp-contract=off: the compiler fuses no multiply-adds of its own; a kernel fuses where it says so, and its vector
# and scalar paths round alike
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")

_registered: set[str] = set()


class KernelBuildError(RuntimeError):
    """A CPU kernel could not be compiled or loaded on this machine."""


def runs_here(dtype: str, mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether eej's CPU kernels apply: the CPU backend, a float32 model, no mesh of more than one device."""
    return jax.default_backend() == "cpu" and dtype == "float32" and (mesh is None or mesh.size == 1)


def choose(choice: str, dtype: str, mesh: jax.sharding.Mesh | None = None, *, asked: str, instead: str) -> str:
    """"auto" -> "cpu" where the kernels apply (`runs_here`), else "xla"; "cpu" where they do not is a one-line
    ValueError that names the request (`asked`, e.g. "--matmul cpu") and what to use (`instead`); any other choice
    is returned as given. Building the kernel is the caller's."""
    fits = runs_here(dtype, mesh)
    if choice == "auto":
        return "cpu" if fits else "xla"
    if choice == "cpu" and not fits:
        raise ValueError(f"{asked} runs float32 models on the CPU backend, off a mesh (here: backend "
                         f"{jax.default_backend()}, dtype {dtype}, mesh {'none' if mesh is None else dict(mesh.shape)});"
                         f" use {instead}")
    return choice


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
            f"eej's CPU kernels (--matmul cpu, --attention cpu) need a C++ compiler, but {cxx!r} is not on PATH: "
            "install one (Debian: apt install g++) or set $CXX, or use --matmul xla / --attention xla"
        )
    return cxx


def source_digest(source: Path) -> str:
    """A digest of what a kernel computes and how fast: its source, the headers beside it and the flags (a changed
    kernel gets a new library here and new step-time measurements in eej.decoding.calibration)."""
    digest = hashlib.sha256()
    headers = sorted(source.parent.glob("*.h"))
    for part in (source.read_bytes(), " ".join(FLAGS).encode(), *(h.read_bytes() for h in headers)):
        digest.update(part)
    return digest.hexdigest()[:16]


def build(source: Path) -> Path:
    """Compile `source` for this machine (once; later calls find it) and return the shared library's path."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    digest = hashlib.sha256()
    for part in (source_digest(source).encode(), cxx.encode(), _cpu_signature().encode(),
                 *(h.read_bytes() for h in sorted(Path(include, "xla", "ffi", "api").glob("*.h")))):
        digest.update(part)
    root = cache_dir()
    directory = Path(root, "kernels") if root else Path(tempfile.gettempdir(), f"eej-kernels-{os.getuid()}")
    library = directory / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Each process compiles to a file of its own and renames it into place: parallel test workers never see a
    # half-written library.
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, f"-I{include}", f"-I{source.parent}", str(source), "-o", partial],
                              capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(f"compiling {source.name} with {cxx} failed (--matmul xla and --attention xla run "
                                   f"without it):\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def register_target(target: str, source: Path, symbol: str) -> None:
    """Build `source` (if needed), load it and register its FFI handler `symbol` as XLA CPU target `target`
    (once per process)."""
    if target in _registered:
        return
    library = ctypes.cdll.LoadLibrary(str(build(source)))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    _registered.add(target)
