"""The Triton kernel run by Triton's CPU interpreter against the reference (run by test_kernels_triton.py).

Needs TRITON_INTERPRET=1 in the environment before Triton is imported, `triton` and `torch`.
Prints one line per case and exits non-zero on the first mismatch. float32 only: Triton's
interpreter does not support bfloat16 `tl.dot` (it multiplies the raw bit patterns,
triton-lang/triton#11584); the bfloat16 kernel is checked on a GPU by scripts/gpu_bench.sh.
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import torch

from eej.kernels import triton_attention as ta
from eej.kernels.layout import merge_splits, pack_queries, unpack_rows
from eej.model.attention import reference_attention

TOL = 2e-5


def to_torch(x: jnp.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def run_case(seed, b, t, hq, hkv, s, dh, dtype, positions, window=None, block_k=16, kv_splits=None) -> float:
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, hq, dh)), dtype)
    k = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dtype)
    pos = jnp.asarray(positions, jnp.int32)
    grid, meta = ta.launch_settings(q.shape, s, hkv, sliding_window=window, block_k=block_k, kv_splits=kv_splits)
    rows, row_pos = pack_queries(q, pos, hkv)
    splits, r = grid[2], meta["ROWS"]
    acc = torch.zeros((b, hkv, splits, r, dh), dtype=torch.float32)
    row_max = torch.zeros((b, hkv, splits, r), dtype=torch.float32)
    denom = torch.zeros((b, hkv, splits, r), dtype=torch.float32)
    ta.attend_kernel[grid](
        to_torch(rows), to_torch(k), to_torch(v), torch.from_numpy(np.array(row_pos)), acc, row_max, denom,
        EXACT_FP32=dtype == jnp.float32, **meta,
    )
    merged = merge_splits(jnp.asarray(acc.numpy()), jnp.asarray(row_max.numpy()), jnp.asarray(denom.numpy()))
    got = unpack_rows(merged, t, hq)
    want = reference_attention(q, k, v, pos, sliding_window=window).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)))


CASES = [
    dict(name="decode gqa 9/3 ragged", args=(1, 4, 1, 9, 3, 64, 16, jnp.float32, [[0], [22], [31], [63]])),
    dict(name="decode mha", args=(2, 3, 1, 4, 4, 64, 16, jnp.float32, [[5], [40], [63]])),
    dict(name="decode splits", args=(3, 3, 1, 6, 2, 128, 32, jnp.float32, [[3], [40], [127]]), kv_splits=4),
    dict(name="verify 5 drafts", args=(4, 2, 5, 9, 3, 64, 16, jnp.float32, [[9, 10, 11, 12, 13], [59, 60, 61, 62, 63]])),
    dict(name="verify 16", args=(5, 1, 16, 2, 1, 64, 16, jnp.float32, [list(range(30, 46))])),
    dict(name="sliding window", args=(6, 2, 3, 4, 2, 64, 16, jnp.float32, [[2, 3, 4], [50, 51, 52]]), window=10,
         kv_splits=2),
]


def main() -> int:
    for case in CASES:
        err = run_case(*case["args"], window=case.get("window"), kv_splits=case.get("kv_splits"))
        ok = err <= TOL
        print(f"{'ok ' if ok else 'BAD'} {case['name']}: max abs error {err:.2e}", flush=True)
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
