"""The CPU matmul kernel (`--matmul cpu`, eej.kernels.cpu_matmul): its products against a float64 reference,
one row's result independent of the rows beside it, gradients and vmap, where `linear` uses it, and lossless
methods still giving plain decoding's tokens with it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eej.cli.options import resolve_matmul
from eej.cli.parser import CliError
from eej.decoding.methods import known_methods
from eej.kernels import cpu_matmul
from eej.model.packed import pack
from eej.model.transformer import linear
from eej.testing import agreeable_model, method_and_plain
from eej.weights.registry import load_model, with_kernels

# (rows, K, N): decode and verification shapes, widths that are not a multiple of the 32-column tile, rows in
# several register blocks (> 12 rows with AVX-512, > 5 with AVX2), more rows than one call takes (> CALL_ROWS: calls in a loop, the last padded),
# a K of one row, an odd K for the blocks that take two rows of w at a time (1 and 2 rows of x, with AVX-512), and
# fewer tiles than threads.
SHAPES = [(1, 64, 64), (2, 48, 200), (2, 37, 96), (5, 37, 130), (8, 16, 4096 + 80), (9, 100, 70), (13, 300, 130),
          (16, 21, 5), (20, 70, 4096 + 64), (27, 45, 90), (3, 1, 1), (70, 33, 100)]


def _data(rows, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, n), np.float32)


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_matches_a_float64_reference(rows, k, n):
    x, w = _data(rows, k, n)
    got = np.asarray(jax.jit(cpu_matmul.matmul)(x, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (rows, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * k * np.abs(x).max() * np.abs(w).max())


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_a_row_does_not_depend_on_its_neighbours(rows, k, n):
    """What makes a verification's logits bit-identical to a one-token step's."""
    x, w = _data(rows, k, n, seed=1)
    together = np.asarray(jax.jit(cpu_matmul.matmul)(x, w))
    for i in range(rows):
        alone = np.asarray(jax.jit(cpu_matmul.matmul)(x[i:i + 1], w))
        np.testing.assert_array_equal(alone[0], together[i])


def test_packed_and_unpacked_weights_give_the_same_bits():
    """An engine packs its weights once (eej.model.packed); a weight given unpacked is packed in the call."""
    x, w = _data(6, 40, 70, seed=4)
    np.testing.assert_array_equal(cpu_matmul.matmul(x, pack(w)), cpu_matmul.matmul(x, w))


def test_leading_axes_vmap_and_gradients():
    x, w = _data(6, 24, 40, seed=2)
    x3 = x.reshape(2, 3, 24)
    np.testing.assert_allclose(cpu_matmul.matmul(x3, w), x3 @ w, rtol=1e-5, atol=1e-5)
    batched = jax.vmap(cpu_matmul.matmul, in_axes=(0, None))(x3, w)
    np.testing.assert_allclose(batched, x3 @ w, rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    got = jax.grad(loss(cpu_matmul.matmul), argnums=(0, 1))(x3, w)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x3, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    got_tiles = jax.grad(lambda x, t: jnp.sum(jnp.sin(cpu_matmul.matmul(x, t))), argnums=1)(x3, pack(w))
    np.testing.assert_allclose(got_tiles.unpacked(), want[1], rtol=1e-4, atol=1e-4)


def test_linear_uses_the_kernel_only_where_it_applies():
    x, w = _data(cpu_matmul.MAX_ROWS + 1, 16, 24, seed=3)
    hlo = jax.jit(lambda x, w: linear(x, w, impl="cpu")).lower(x[:4], w).as_text()
    assert cpu_matmul.TARGET in hlo
    for args in ((x, w), (x[:4].astype(jnp.bfloat16), w)):  # a prefill's many rows, a bfloat16 model
        assert cpu_matmul.TARGET not in jax.jit(lambda x, w: linear(x, w, impl="cpu")).lower(*args).as_text()
    bias = np.arange(24, dtype=np.float32)
    np.testing.assert_allclose(linear(x[:4], w, bias, impl="cpu"), x[:4] @ w + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown matmul implementation"):
        linear(x, w, impl="nope")


@pytest.mark.parametrize("method", known_methods())
def test_lossless_methods_match_plain_greedy_with_the_kernel(method):
    model = agreeable_model("tiny-gqa", seed=6)
    model = dataclasses.replace(model, cfg=model.cfg.replace(matmul_impl="cpu"))
    pair = method_and_plain(model, method)
    if pair is None:
        pytest.skip(f"{method} is lossy")
    assert pair[0] == pair[1]


def test_resolving_the_cli_choice():
    assert resolve_matmul("auto", "float32") == "cpu"  # this suite runs on the CPU backend
    assert resolve_matmul("auto", "bfloat16") == "xla"
    assert resolve_matmul("xla", "float32") == "xla"
    with pytest.raises(CliError, match="--matmul cpu runs float32 models"):
        resolve_matmul("cpu", "bfloat16")


def test_load_model_runs_the_cpu_kernels_where_they_apply():
    model = load_model("tiny-llama")  # kernels="auto", on this suite's CPU backend
    assert (model.cfg.attention_impl, model.cfg.matmul_impl) == ("cpu", "cpu")
    assert load_model("tiny-llama", dtype="bfloat16").cfg.matmul_impl == "xla"
    xla = load_model("tiny-llama", kernels="xla")
    assert (xla.cfg.attention_impl, xla.cfg.matmul_impl) == ("xla", "xla")
    assert with_kernels(xla, "auto").cfg == model.cfg and with_kernels(model, "xla").cfg == xla.cfg
    with pytest.raises(ValueError, match="kernels='cpu' runs float32 models.*use kernels='xla'"):
        load_model("tiny-llama", dtype="bfloat16", kernels="cpu")
    with pytest.raises(ValueError, match="kernels must be one of auto, xla, cpu"):
        load_model("tiny-llama", kernels="fast")


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cpu_matmul.KernelBuildError, match="need a C\\+\\+ compiler.*--matmul xla"):
        cpu_matmul.build_library()


def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("EEJ_CACHE_DIR", str(tmp_path))
    first = cpu_matmul.build_library()
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert cpu_matmul.build_library() == first and [p.name for p in first.parent.iterdir()] == [first.name]
