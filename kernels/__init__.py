"""Attention kernels for the decode hot path, installed as `eej.kernels` (this folder sits at the top level).

- `eej.kernels.pallas_attention`: Pallas kernels (decode, verification of up to 16 drafts) with their
  jnp references; registers `--attention pallas`.
- `eej.kernels.triton_attention`: the same kernel written in Triton and called through jax-triton
  (GPU only, `pip install 'eej[gpu]'`); registers `--attention triton`.
- `eej.kernels.layout`: input checks, grouped-query row packing and split merging they share.

Nothing is imported here: `eej.model.attention` imports an implementation's module the first time
it is selected, so the optional GPU dependencies are needed only by whoever uses them.
"""
