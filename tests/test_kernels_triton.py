"""The Triton kernel (`--attention triton`) without a GPU: compiled for a GPU target, and under Triton's interpreter.

Triton (Linux x86-64 wheels; part of the test extra there) compiles a kernel all the way to a CUDA
binary without a GPU: that is what caught the first H200 run's failure (a plain Python global read
inside the kernel, which compiled Triton refuses and the interpreter allows). On a GPU,
scripts/gpu_bench.sh runs the compiled kernel against the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _compile_variants():
    dtypes = [("fp32", True), ("bf16", False)]
    return [(d, exact, window) for d, exact in dtypes for window in (0, 16)]


@pytest.mark.parametrize("dtype,exact,window", _compile_variants())
def test_triton_kernel_compiles_for_a_gpu_target(dtype, exact, window):
    """Frontend, optimisation passes, PTX and ptxas for sm_90 (an H100/H200), on a machine without a GPU."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton, or the gpu extra)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from eej.kernels.triton_attention import attend_kernel

    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "pos_ptr": "i32", "acc_ptr": "fp32", "max_ptr": "fp32",
                "denom_ptr": "fp32"}
    consts = dict(NUM_KV_HEADS=3, CAPACITY=256, ROWS=16, HEAD_DIM=64, BLOCK_K=64, BLOCKS_PER_SPLIT=2, SPLITS=2,
                  WINDOW=window, SCALE=0.125, EXACT_FP32=exact)
    signature = {**{k: f"*{v}" for k, v in pointers.items()}, **{k: "constexpr" for k in consts}}
    kernel = triton.compile(ASTSource(fn=attend_kernel, signature=signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32))
    assert ".entry attend_kernel" in kernel.asm["ptx"]
    assert len(kernel.asm["cubin"]) > 0


def _interpreter_runs_tensor_loop_bounds() -> bool:
    """Triton 3.6's interpreter cannot take `range(a, b)` over tensor bounds under NumPy >= 2.4 (int() of a
    1-element array); compiled Triton can. Probe it on a two-line kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr):
        total = 0
        for i in range(tl.program_id(0), tl.program_id(0) + 2):
            total += i
        tl.store(out_ptr, total)

    import torch

    try:
        probe[(1,)](torch.zeros(1, dtype=torch.int32))
        return True
    except Exception as e:  # noqa: BLE001 - the interpreter wraps the TypeError
        return "0-dimensional" not in str(e)


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton, or the gpu extra)")
    pytest.importorskip("torch")
    # the tests folder on sys.path explicitly: `make test` runs with PYTHONSAFEPATH, so `-c` does not add the cwd
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import test_kernels_triton as t; "
                            "sys.exit(0 if t._interpreter_runs_tensor_loop_bounds() else 3)"],
                           env={**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}, cwd=HERE, capture_output=True, text=True)
    if probe.returncode == 3:
        pytest.skip("this Triton's interpreter cannot run tensor loop bounds with this NumPy (the compile test covers the kernel)")
    assert probe.returncode == 0, probe.stderr[-2000:]
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
