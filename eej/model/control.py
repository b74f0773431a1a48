"""Conditionals that update big state (a KV cache) in place: `switch_in_place`, `cond_in_place`, `run_if`.

Why not `lax.cond` / `lax.switch`: inside a loop (the decode loop is one), XLA copies every buffer that
a branch updates in place — its copy insertion cannot prove the branch owns the buffer (jax-ml/jax#5986,
#39449). A KV cache that passes through a conditional each decode step is then copied each step: on
XLA:CPU with SmolLM2-135M, batch 1, an 800-token prompt, Kangaroo's plain step (verification by
`lax.switch` over widths) cost 1.18x a plain decoding step
(benchmarks/results/plain_mode_overhead_before_control.md). A `lax.while_loop` updates its carry in
place, and a while loop that runs 0 or 1 times is a conditional; here each branch is such a loop.

Each branch maps (state, *operands) -> (state, out): `state` holds what may be updated in place (caches),
`operands` what is only read, `out` what the branch computes (every branch the same structure). Branches
not taken cost one predicate test each. Not reverse-differentiable (while loops): for decoding; training
code uses `lax.cond`.

A predicate test is free on a CPU, not on a GPU: XLA:GPU reads each while loop's predicate back to the host
(as it does a `lax.cond`'s branch index), so a switch over K + 1 branches as loops waits on K + 1 round
trips where `lax.switch` waits on one. `implementation()` picks how these conditionals compile: "loops"
(above) or "lax" (`lax.switch` / `lax.cond`: one predicate read, state copied); the environment variable
`EEJ_CONDITIONALS` chooses (default "loops"). For the same reason an adaptive speculative step can be
one conditional between speculating and a step traced with nothing to draft (`branch_whole_step`), so that
its fallback tests one predicate instead of one per conditional inside. Both are read when a program is
traced: set them before the first decode.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Branch = Callable[..., tuple[Any, Any]]
IMPLEMENTATIONS = ("loops", "lax")


def implementation() -> str:
    """"loops" or "lax": `EEJ_CONDITIONALS` where set, else "loops" on every backend (on an H200 "lax" made the
    step of a method with many conditionals cheaper, 1.12x plain's against 1.17x, one measurement each; with the
    step branched once, `branch_whole_step`, it is not measured there yet)."""
    return _from_environment("EEJ_CONDITIONALS", IMPLEMENTATIONS, f"one of {', '.join(IMPLEMENTATIONS)}", "the default") or "loops"


def branch_whole_step() -> bool:
    """Whether an adaptive speculative step branches once, between speculating and a step with nothing to draft
    (eej.decoding.adaptive), rather than passing its conditionals with nothing to do: `EEJ_BRANCH_STEP` (1 or 0)
    where set, else on every backend but the CPU. On a 2-core AMD EPYC VM the whole-step branch made the fallback
    step 5% slower (Kangaroo, SmolLM2-135M, batch 1: 1.05x plain's against 0.99x); on an H200 the fallback step that passes
    its conditionals cost 1.16x plain's, 11 predicates read back to the host a step (docs/adaptive.md)."""
    chosen = _from_environment("EEJ_BRANCH_STEP", ("0", "1"), "1 or 0", "the backend's default")
    return chosen == "1" if chosen else jax.default_backend() != "cpu"


def _from_environment(name: str, allowed: Sequence[str], expected: str, unset: str) -> str:
    """The environment variable `name` ("" where unset or empty); any other value than `allowed` is a one-line
    ValueError saying what it must be (`expected`) and what unsetting it gives (`unset`)."""
    chosen = os.environ.get(name, "")
    if chosen and chosen not in allowed:
        raise ValueError(f"{name} must be {expected}, got {chosen!r}: unset it for {unset}")
    return chosen


def run_if(pred: jax.Array | bool, fn: Callable[..., Any], state: Any, *operands: Any) -> Any:
    """`fn(state, *operands)` -> new state where `pred` (a bool scalar, traced is fine) holds, else `state`."""
    if implementation() == "lax":
        return lax.cond(pred, fn, lambda st, *_: st, state, *operands)
    # XLA hoists loop-invariant work out of a while loop (it would then run even when the branch is not
    # taken): everything `fn` reads besides the state — its operands and the float arrays it closes over —
    # enters the loop through an optimization barrier tied to the trip counter.
    converted, consts = jax.closure_convert(fn, state, *operands)

    def body(carry):
        trips, st, inputs = carry
        trips, inputs = lax.optimization_barrier((trips, inputs))
        return trips + 1, converted(st, *inputs), inputs

    carry = (jnp.zeros((), jnp.int32), state, (*operands, *consts))
    return lax.while_loop(lambda c: c[0] < jnp.asarray(pred, jnp.int32), body, carry)[1]


def switch_in_place(index: jax.Array | int, branches: Sequence[Branch], state: Any, *operands: Any) -> tuple[Any, Any]:
    """`branches[index](state, *operands)` -> (state, out), the index clamped to the branches like `lax.switch`.

    A Python int index runs that branch only (nothing traced)."""
    if isinstance(index, int):
        return branches[min(max(index, 0), len(branches) - 1)](state, *operands)
    if implementation() == "lax":
        return lax.switch(index, list(branches), state, *operands)
    index = jnp.clip(index, 0, len(branches) - 1)
    out_shapes = jax.eval_shape(lambda st: branches[0](st, *operands)[1], state)
    out = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out_shapes)
    for i, branch in enumerate(branches):
        state, out = run_if(index == i, lambda carry, branch=branch: branch(carry[0], *operands), (state, out))
    return state, out


def cond_in_place(pred: jax.Array | bool, true_fn: Branch, false_fn: Branch, state: Any, *operands: Any) -> tuple[Any, Any]:
    """`true_fn(state, *operands)` if `pred` else `false_fn(...)`, each -> (state, out); see `switch_in_place`."""
    if isinstance(pred, bool):
        return (true_fn if pred else false_fn)(state, *operands)
    return switch_in_place(jnp.asarray(pred, jnp.int32), [false_fn, true_fn], state, *operands)
