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
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Branch = Callable[..., tuple[Any, Any]]


def run_if(pred: jax.Array | bool, fn: Callable[..., Any], state: Any, *operands: Any) -> Any:
    """`fn(state, *operands)` -> new state where `pred` (a bool scalar, traced is fine) holds, else `state`."""
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
