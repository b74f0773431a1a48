"""What eej keeps on this machine between processes: XLA's compiled programs and the step times it measured.

The directory is `$EEJ_CACHE_DIR`, else `$XDG_CACHE_HOME/eej`, else `~/.cache/eej`; `EEJ_CACHE_DIR=` (empty)
keeps nothing. Compiled programs go to `xla/` through JAX's persistent compilation cache (the CLI, the Python
API and the notebooks all compile through `eej.decoding.engine.Engine`, which turns it on), so a second
process with the same model, method and shapes loads its executables instead of compiling them; a corrupt or
stale entry makes JAX compile again (it warns; results never change). If the JAX cache directory was set
already (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), eej leaves it as it is.
"""

from __future__ import annotations

import os

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

_HITS = [0]
_listening = [False]


def cache_dir() -> str | None:
    """Where eej keeps what it measured or compiled on this machine (None: nowhere, `EEJ_CACHE_DIR=`)."""
    if "EEJ_CACHE_DIR" in os.environ:
        return os.environ["EEJ_CACHE_DIR"] or None
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eej")


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in `cache_dir()/xla` (once; a directory set by the user wins).

    Returns the directory in use, or None.
    """
    if not _listening[0]:
        monitoring.register_event_listener(_count_hits)
        _listening[0] = True
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    directory = cache_dir()
    if directory is None:
        return None
    compilation_cache.set_cache_dir(os.path.join(directory, "xla"))
    compilation_cache.reset_cache()  # a compile before this (say, of a small eager op) found no directory: look again
    return jax.config.jax_compilation_cache_dir


def compile_cache_hits() -> int:
    """How many programs this process has loaded from the persistent compilation cache so far."""
    return _HITS[0]


def _count_hits(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _HITS[0] += 1
