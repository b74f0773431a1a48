"""Attention implementations against the jnp reference, and their speed: the kernel phases of the GPU benchmark.

    impls = implementations(["pallas", "triton"])      # name -> function, or why it can't run here
    checks = check_kernels(impls, HEAD_SHAPES, capacity=1024, batch=8, rng=np.random.default_rng(0))
    times = time_kernels(impls, HEAD_SHAPES, 4096, (1, 8, 32), (1, 8, 16), jnp.bfloat16, 20, rng)

Every result is a dict (one row of the GPU benchmark's JSON, eej.bench.gpu). A kernel that fails to
lower is a result (`error`: the whole message, up to 2,000 characters), not a crash. On CPU the Pallas
kernels run interpreted and Triton is unavailable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.model.attention import available_impls, get_impl, reference_attention

# (label, Hq, Hkv, Dh): the real model here and a Llama-3-8B-like layer.
HEAD_SHAPES = (("smollm2", 9, 3, 64), ("llama8b", 32, 8, 128))
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2}  # max abs error against the float32 reference


def implementations(names: Sequence[str] | None = None) -> dict[str, Callable | str]:
    """`xla` and the named implementations (default: all): name -> function, or why it is unavailable here."""
    known = available_impls()
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown attention implementation {unknown[0]!r}; known: {', '.join(known)}")
    impls: dict[str, Callable | str] = {}
    for name in known:
        if name == "cpu" and names is None:  # the CPU decode kernel is not a GPU kernel: only when named
            continue
        if name == "xla" or names is None or name in names:
            try:
                impls[name] = get_impl(name)
            except ValueError as e:
                impls[name] = str(e)
    if jax.default_backend() != "gpu" and callable(impls.get("triton")):
        impls["triton"] = "needs a GPU"
    return impls


def random_case(rng: np.random.Generator, b: int, t: int, hq: int, hkv: int, s: int, dh: int, dtype, kind: str):
    """q [b, t, hq, dh], k/v [b, hkv, s, dh] and positions [b, t]: 'ragged' lengths in [1, s-t], 'one' = a single
    cached slot, 'full' = up to the last slot."""
    q = jnp.asarray(rng.standard_normal((b, t, hq, dh)), dtype)
    k = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    if kind == "ragged":
        starts = rng.integers(0, s - t + 1, size=b)
    elif kind == "one":
        starts = np.zeros(b, np.int64)
    else:
        starts = np.full(b, s - t)
    return q, k, v, jnp.asarray(starts[:, None] + np.arange(t)[None, :], jnp.int32)


class Deadline:
    """Stops adding work once `seconds` have passed (so a time-limited GPU lease still returns results)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.hit = False

    def passed(self) -> bool:
        if self.end is not None and time.monotonic() > self.end:
            self.hit = True
        return self.hit


def error_text(e: BaseException, limit: int = 2000) -> str:
    """The whole error message (compiler errors put the cause on their last lines), capped at `limit` characters."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit // 2] + " [...] " + text[-limit // 2 :]


def error_summary(text: str) -> str:
    """One line for a markdown list: the first and the last non-empty line of an error."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"[:400]


def check_kernels(impls: dict[str, Callable | str], shapes: Sequence[tuple[str, int, int, int]], capacity: int, batch: int,
                  rng: np.random.Generator, smoke: bool = False, deadline: Deadline | None = None) -> list[dict]:
    """Every kernel (not xla, not the unavailable) vs the reference at full float32 precision: float32 and
    bfloat16, 1/5/16 queries, ragged / single-slot / full lengths, a sliding window (smoke: four cases)."""
    deadline = deadline or Deadline(None)
    cases = [(t, kind, None) for t in (1, 5, 16) for kind in ("ragged", "one", "full")]
    cases += [(t, "ragged", capacity // 4) for t in (1, 16)]
    if smoke:  # interpreted kernels compile slowly: a few of each kind
        cases = [(1, "ragged", None), (1, "full", None), (5, "one", None), (16, "ragged", capacity // 4)]
    records = []
    for label, hq, hkv, dh in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            for t, kind, window in cases:
                if deadline.passed():
                    return records
                q, k, v, pos = random_case(rng, batch, t, hq, hkv, capacity, dh, dtype, kind)
                # The truth at full float32 precision (on a GPU the default f32 matmul may use TF32).
                with jax.default_matmul_precision("highest"):
                    want = np.asarray(reference_attention(q, k, v, pos, sliding_window=window), np.float32)
                for name, fn in impls.items():
                    if name == "xla" or isinstance(fn, str):
                        continue
                    rec = dict(impl=name, shape=label, dtype=jnp.dtype(dtype).name, queries=t, lengths=kind,
                               sliding_window=window, batch=batch, capacity=capacity)
                    try:
                        got = np.asarray(jax.jit(lambda *a, fn=fn, w=window: fn(*a, sliding_window=w))(q, k, v, pos), np.float32)
                        err = float(np.max(np.abs(got - want)))
                        rec.update(max_abs_error=err, ok=bool(np.isfinite(err) and err <= TOLERANCE[rec["dtype"]]))
                    except Exception as e:  # a kernel that fails to lower is a result, not a crash
                        rec.update(ok=False, error=error_text(e))
                    records.append(rec)
    return records


def time_call(fn: Callable, args: tuple, iters: int) -> float:
    """Median milliseconds of `fn(*args)` over `iters` calls after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_kernels(impls: dict[str, Callable | str], shapes: Sequence[tuple[str, int, int, int]], capacity: int,
                 batches: Sequence[int], query_counts: Sequence[int], dtype, iters: int, rng: np.random.Generator,
                 deadline: Deadline | None = None) -> list[dict]:
    """Milliseconds per call of every implementation (ragged lengths) and the visible-KV bandwidth it reaches."""
    deadline = deadline or Deadline(None)
    records = []
    for label, hq, hkv, dh in shapes:
        for b in batches:
            for t in query_counts:
                if deadline.passed():
                    return records
                q, k, v, pos = random_case(rng, b, t, hq, hkv, capacity, dh, dtype, "ragged")
                visible = int(np.sum(np.asarray(pos)[:, -1] + 1))
                for name, fn in impls.items():
                    rec = dict(impl=name, shape=label, dtype=jnp.dtype(dtype).name, batch=b, queries=t, capacity=capacity)
                    if isinstance(fn, str):
                        rec["skipped"] = fn
                    else:
                        try:
                            ms = time_call(jax.jit(lambda *a, fn=fn: fn(*a, sliding_window=None)), (q, k, v, pos), iters)
                            kv_bytes = 2 * visible * hkv * dh * jnp.dtype(dtype).itemsize
                            rec.update(ms=ms, visible_kv_gb_per_s=kv_bytes / (ms * 1e-3) / 1e9)
                        except Exception as e:
                            rec["error"] = error_text(e)
                    records.append(rec)
    return records
