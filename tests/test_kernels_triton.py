"""The Triton kernel (`--attention triton`) under Triton's CPU interpreter, where Triton is installed.

CI has no Triton (it comes with the `gpu` extra), so this skips there; run it with
`pip install triton` (any 3.x) — and on a GPU, scripts/gpu_bench.sh checks the compiled kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton, or the gpu extra)")
    pytest.importorskip("torch")
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_interpret_cases.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") >= 6, proc.stdout


def test_triton_impl_fails_clearly_without_triton_or_gpu():
    from eej.model.attention import get_impl

    try:
        impl = get_impl("triton")
    except ValueError as e:  # no Triton here: the message says what to install
        assert "pip install 'eej[gpu]'" in str(e)
        return
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present; scripts/gpu_bench.sh checks the compiled kernel")
    q = jnp.zeros((1, 1, 2, 16))
    k = jnp.zeros((1, 1, 32, 16))
    with pytest.raises(ValueError, match="runs on GPUs only"):
        impl(q, k, k, jnp.zeros((1, 1), jnp.int32))
