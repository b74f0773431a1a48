"""Step times measured on the running machine, and kept on disk per machine.

A strategy that adapts to what its steps cost (eej.decoding.adaptive) names the variants to time
(`Strategy.calibration_points`); the engine times its compiled decode loop under each, a few steps
from the prefilled state, at the batch and cache size it is about to run — once per shape — and
remembers the milliseconds per step in `step_times.json` in eej's cache directory —
keyed by the device, JAX's version, the model's shape and dtype, its matmul and attention
implementations (eej's CPU kernels by their source digest), the strategy's settings and the shape —
so that the next process on the same machine skips the measurement. A missing, corrupt or foreign
entry only means measuring again.

A table is kept on disk only if it was measured steadily: the rounds, each a cost per point relative to the
round's first point (what the adaptive rules compare: their choices do not change when every cost is scaled), agree
within `STEADY_SPREAD`. A table whose rounds disagree (another process woke up midway through) is measured again, up to
`ATTEMPTS` times; if none is steady, the steadiest is used for this process and not kept, so that the next one
measures again instead of inheriting the disturbance.

The cache directory is eej's (eej.local_cache: `$EEJ_CACHE_DIR`, else `$XDG_CACHE_HOME/eej`, else
`~/.cache/eej`; `EEJ_CACHE_DIR=` (empty) keeps nothing on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.files import write_atomic
from eej.kernels import cpu_attention, cpu_matmul
from eej.kernels.cpu_build import source_digest
from eej.local_cache import cache_dir
from eej.weights.artifacts import model_fingerprint

STEP_TIMES_FILE = "step_times.json"
ROUNDS = 3
CALIBRATION_STEPS = 8  # decode steps per timed run
ATTEMPTS = 3  # sets of rounds at most, while the rounds disagree
STEADY_SPREAD = 0.5  # rounds whose relative costs differ by more than this are not steady (a quiet VM: up to 0.37)
# Part of every key: raise it when what a calibration point measures changes, so that older times are not reused
# (2: a forced self-speculative step drafts all k tokens and verification is as wide as the drafts).
MEASURES_VERSION = 2


def step_times_key(cfg, strategy: Any, sampling: Any, batch: int, capacity: int) -> dict[str, Any]:
    """What measured step times depend on (JSON-ready)."""
    device = jax.devices()[0]
    return {"measures": MEASURES_VERSION, "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
            "jax": jax.__version__, "model": model_fingerprint(cfg), "dtype": cfg.dtype,
            "attention": _implementation(cfg.attention_impl, cpu_attention.SOURCE),
            "matmul": _implementation(cfg.matmul_impl, cpu_matmul.SOURCE),
            "strategy": repr(strategy), "sampling": repr(sampling), "batch": batch, "capacity": capacity}


def _implementation(name: str, cpu_source: os.PathLike) -> str:
    """`name`, and for eej's own CPU kernel its source digest: a changed kernel is measured again."""
    return f"cpu:{source_digest(cpu_source)}" if name == "cpu" else name


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_step_times(key: dict[str, Any], count: int) -> list[float] | None:
    """The milliseconds stored for `key` (None if absent, unreadable or not `count` positive numbers)."""
    directory = cache_dir()
    if directory is None:
        return None
    entry = _read(os.path.join(directory, STEP_TIMES_FILE)).get(_digest(key))
    ms = entry.get("ms") if isinstance(entry, dict) and entry.get("key") == key else None
    if not isinstance(ms, list) or len(ms) != count or not all(isinstance(m, (int, float)) and m > 0 for m in ms):
        return None
    return [float(m) for m in ms]


def store_step_times(key: dict[str, Any], ms: Sequence[float]) -> None:
    """Remember `ms` for `key` (atomically; a cache that can't be written is skipped, never an error)."""
    directory = cache_dir()
    if directory is None:
        return
    path = os.path.join(directory, STEP_TIMES_FILE)
    try:
        data = _read(path)
        data[_digest(key)] = {"key": key, "ms": [round(float(m), 4) for m in ms], "measured": time.strftime("%Y-%m-%d")}
        write_atomic(path, json.dumps(data, indent=1))
    except OSError:
        pass


class Measured(NamedTuple):
    """A calibration: milliseconds per step for each point (the median over rounds), and whether its rounds agreed."""

    ms: list[float]
    steady: bool


def spread(rounds: Sequence[Sequence[float]]) -> float:
    """How far the rounds of one measurement disagree: over points, the largest max / min - 1 of a point's cost
    relative to its round's first point. rounds: [rounds][points] milliseconds. 0 for fewer than 2 points or rounds."""
    relative = np.asarray(rounds, np.float64)
    relative = relative / relative[:, :1]
    return float(np.max(relative.max(axis=0) / relative.min(axis=0)) - 1.0) if relative.size else 0.0


def time_loop(loop: Callable[[Any], Any], state: Any, edits: Sequence[Callable[[Any], Any]], rounds: int = ROUNDS,
              attempts: int = ATTEMPTS) -> Measured | None:
    """Milliseconds per step of the compiled decode `loop` run from `edit(state)`, for each edit: the median over
    `rounds` rounds, interleaved (drift hits every point alike). Measured again, up to `attempts` sets of rounds in
    all, while the rounds' `spread` exceeds `STEADY_SPREAD`; the steadiest set otherwise (`steady` False). None if a
    run made no step (nothing left to decode).

    loop: state -> state, donating its input (`state` itself is not consumed: each run starts from a copy);
    the edits also set how many steps a run makes (the loop's step counter).
    """

    def run(edit: Callable[[Any], Any]) -> float | None:
        s = edit(jax.tree.map(jnp.copy, state))
        before = int(s.steps)
        start = time.perf_counter()
        s = jax.block_until_ready(loop(s))
        steps = int(s.steps) - before
        return 1e3 * (time.perf_counter() - start) / steps if steps > 0 else None

    for edit in edits:  # the first call of a compiled program is not representative
        if run(edit) is None:
            return None
    best: list[list[float]] | None = None
    for _ in range(attempts):
        times = [[run(edit) for edit in edits] for _ in range(rounds)]
        if best is None or spread(times) < spread(best):
            best = times
        if spread(best) <= STEADY_SPREAD:
            break
    return Measured([float(np.median([t[i] for t in best])) for i in range(len(edits))], spread(best) <= STEADY_SPREAD)
