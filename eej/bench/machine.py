"""What machine a benchmark ran on, and how fast it can stream memory (for rooflines)."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, accelerator and library versions."""
    import jax

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()],
    }
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def measure_bandwidth(gib: float = 1.0, repeats: int = 10) -> dict[str, float]:
    """Sustained read bandwidth (GB/s) of the default JAX device, best of `repeats`.

    Two probes over a `gib`-GiB float32 array: a full reduction (pure streaming read) and a
    matrix-vector product (the access pattern of batch-1 decoding).
    """
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 4
    cols = 1024
    data = jnp.ones((n // cols, cols), jnp.float32)
    vec = jnp.ones((cols,), jnp.float32)
    probes = {"reduction": jax.jit(lambda a: a.sum()), "matvec": jax.jit(lambda a: a @ vec)}
    out = {}
    for name, fn in probes.items():
        jax.block_until_ready(fn(data))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(data))
            best = min(best, time.perf_counter() - start)
        out[name] = data.nbytes / best / 1e9
    del data
    return out


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (`ru_maxrss`: KiB on Linux, bytes on macOS), or None
    where unknown. Read it at the end of a run: it only grows."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (how busy a shared machine was), or None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
