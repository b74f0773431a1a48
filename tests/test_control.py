"""eej.model.control: conditionals that match lax.switch / lax.cond, update their state in place, and run a
branch's work only when it is taken."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from eej.model.control import branch_whole_step, cond_in_place, implementation, run_if, switch_in_place

BIG = (1, 3, 512, 64)  # one layer's cache at batch 1 (SmolLM2 heads), 512 positions


def _branches(scale):
    def make(i):
        def branch(state, x):
            buf, acc = state
            buf = lax.dynamic_update_slice(buf, jnp.full((1, 3, i + 1, 64), x * (i + 1)), (0, 0, i, 0))
            return (buf, acc + i), jnp.sum(buf[:, :, : i + 2]) * scale + i

        return branch

    return [make(i) for i in range(3)]


@pytest.mark.parametrize("index", [-2, 0, 1, 2, 7])
def test_switch_in_place_matches_lax_switch(index, conditionals):
    branches = _branches(0.5)
    state = (jnp.arange(np.prod(BIG), dtype=jnp.float32).reshape(BIG) / 1e5, jnp.int32(3))
    want = lax.switch(index, branches, state, jnp.float32(2.0))
    for i in (index, jnp.int32(index)):  # a Python int runs the branch directly; a traced one through the loops
        got = jax.jit(lambda i, s, x: switch_in_place(i, branches, s, x))(i, state, jnp.float32(2.0)) if not isinstance(i, int) \
            else switch_in_place(i, branches, state, jnp.float32(2.0))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


@pytest.mark.parametrize("pred", [True, False])
def test_cond_in_place_and_run_if_match_lax_cond(pred, conditionals):
    state = jnp.ones((4, 8))

    def yes(s, w):
        return s * w, jnp.sum(s)

    def no(s, w):
        return s - w, jnp.max(s)

    w = jnp.float32(3.0)
    want = lax.cond(pred, yes, no, state, w)
    got = jax.jit(lambda p, s, w: cond_in_place(p, yes, no, s, w))(jnp.asarray(pred), state, w)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    ran = jax.jit(lambda p, s: run_if(p, lambda s: s + w, s))(jnp.asarray(pred), state)
    np.testing.assert_array_equal(np.asarray(ran), np.asarray(state + w if pred else state))


def _big_copies(hlo: str) -> int:
    return len([line for line in hlo.splitlines() if " copy(" in line and "512,64]" in line])


def test_state_is_updated_in_place_inside_a_loop():
    """The decode loop's situation: a branch updates a big buffer it carries. lax.switch copies it every step
    (checked here too, so the test would notice if XLA stopped doing so); switch_in_place does not."""
    branches = [lambda s, x, i=i: (lax.dynamic_update_slice(s, jnp.full((1, 3, 1, 64), x + i), (0, 0, i, 0)), ()) for i in range(3)]

    def loop(step, buf):
        def body(carry):
            t, b = carry
            return t + 1, step(t % 3, b, t.astype(jnp.float32))

        return lax.while_loop(lambda c: c[0] < 5, body, (jnp.int32(0), buf))[1]

    ours = lambda i, b, x: switch_in_place(i, branches, b, x)[0]  # noqa: E731
    theirs = lambda i, b, x: lax.switch(i, [lambda b, x, f=f: f(b, x)[0] for f in branches], b, x)  # noqa: E731
    buf = jnp.zeros(BIG)
    assert _big_copies(jax.jit(lambda b: loop(ours, b), donate_argnums=0).lower(buf).compile().as_text()) == 0
    assert _big_copies(jax.jit(lambda b: loop(theirs, b), donate_argnums=0).lower(buf).compile().as_text()) > 0


def test_work_of_a_branch_not_taken_is_not_hoisted_out(conditionals):
    """Work that reads only an operand or a closed-over array (not the state) stays inside the branch: XLA would
    otherwise move it out of the 0-or-1-trip loop and run it even when the branch is not taken."""
    w = jnp.ones((256, 256))

    def f(pred, state, x):
        return run_if(pred, lambda s: s + jnp.tanh(x @ w), state)

    hlo = jax.jit(f).lower(jnp.asarray(False), jnp.zeros((4, 256)), jnp.ones((4, 256))).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[: entry.index("\n}")]
    assert not re.search(r"\bdot\(", entry) and "tanh" not in entry, "the branch's matmul was hoisted out of it"


def test_the_implementation_is_what_the_environment_asks_for(monkeypatch):
    def ops(index):
        hlo = jax.jit(lambda i, s: switch_in_place(i, _branches(1.0), s, jnp.float32(1.0))).lower(index, (jnp.zeros(BIG), jnp.int32(0))).as_text()
        return "stablehlo.while" in hlo, "stablehlo.case" in hlo

    monkeypatch.delenv("EEJ_CONDITIONALS", raising=False)
    assert implementation() == "loops"  # this CPU's default
    monkeypatch.setenv("EEJ_CONDITIONALS", "lax")
    assert ops(jnp.int32(1)) == (False, True)
    monkeypatch.setenv("EEJ_CONDITIONALS", "loops")
    assert ops(jnp.int32(1)) == (True, False)
    monkeypatch.setenv("EEJ_CONDITIONALS", "cond")
    with pytest.raises(ValueError, match="EEJ_CONDITIONALS must be one of loops, lax"):
        implementation()


def test_the_whole_step_branches_where_the_environment_says(monkeypatch):
    monkeypatch.delenv("EEJ_BRANCH_STEP", raising=False)
    assert branch_whole_step() is False  # this CPU's default
    monkeypatch.setenv("EEJ_BRANCH_STEP", "1")
    assert branch_whole_step() is True
    monkeypatch.setenv("EEJ_BRANCH_STEP", "yes")
    with pytest.raises(ValueError, match="EEJ_BRANCH_STEP must be 1 or 0"):
        branch_whole_step()
