"""Frozen, hashable configuration dataclasses.

Every config here is immutable and hashable so it can be passed to `jax.jit` as a static argument.
Method-specific configs live next to their method in `eej.decoding`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import jax.numpy as jnp

RopeType = Literal["default", "linear", "llama3", "yarn"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency plus an optional context-extension scaling.

    type: "default" (plain RoPE), "linear" (positions divided by `factor`), "llama3" (Llama 3.1 smooth
    frequency-band scaling) or "yarn" (NTK-by-parts interpolation with an attention temperature).
    """

    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(
                f"unsupported RoPE scaling type {self.type!r}; eej supports default, linear, llama3 and yarn"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("RoPE theta and factor must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).

    Attributes:
      name: registry name or path the config came from (informational).
      vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, ffn_size: shapes.
      rope: rotary embedding settings.
      rms_eps: RMSNorm epsilon.
      tie_embeddings: the LM head reuses the token embedding matrix.
      attention_bias: q/k/v projections carry a bias (Qwen2).
      sliding_window: keys further back than this many positions are masked (Mistral); None = full.
      max_position: the longest context the model was trained for.
      bos_id, eos_ids, pad_id: special token ids; generation stops at any of `eos_ids`.
      dtype: parameter / activation dtype name ("float32" or "bfloat16").
      attention_impl: which attention implementation runs ("xla" reference, or a registered kernel).
      matmul_impl: how projections and heads multiply: "xla" (jnp.matmul), or "cpu" — a C++ kernel for the
        few rows of a decode or verification step on a CPU, float32 (eej.kernels.cpu_matmul).
      layer_fn: None for the Llama decoder layer, or a layer of your own,
        `layer_fn(layer_params, x [B,T,D], positions [B,T], attend) -> x [B,T,D]`, where
        `attend(q [B,T,Hq,Dh], k [B,T,Hkv,Dh], v [B,T,Hkv,Dh]) -> [B,T,Hq,Dh]` is causal attention
        over the KV cache (called once per layer; see `eej.model.transformer.block` and
        `eej.custom_model`). Compared by identity, so the config stays hashable.
      num_experts: 0 for a dense MLP in every layer; E > 0 for a mixture-of-experts MLP in every layer
        (eej.model.moe): a router picks `experts_per_token` of E SwiGLU experts of width `moe_ffn_size`.
      moe_weighting: how the chosen experts' outputs are combined — "softmax" (softmax over all E router
        logits, taken at the top-k; renormalised over them when `moe_norm_topk`: Mixtral, Qwen2-MoE) or
        "unit" (each chosen expert counts once: the experts partition a dense FFN, MoEfication).
      shared_expert_ffn_size: width of an always-active shared expert with a sigmoid gate (Qwen2-MoE); 0 = none.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    rope: RopeConfig = RopeConfig()
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    sliding_window: int | None = None
    max_position: int = 8192
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    dtype: str = "float32"
    attention_impl: str = "xla"
    matmul_impl: str = "xla"
    layer_fn: Callable[..., Any] | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_size: int = 0
    moe_weighting: str = "softmax"
    moe_norm_topk: bool = True
    shared_expert_ffn_size: int = 0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.matmul_impl not in ("xla", "cpu"):
            raise ValueError(f"matmul_impl must be 'xla' or 'cpu', got {self.matmul_impl!r}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 = dense MLP), got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"experts_per_token must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}"
                )
            if self.moe_ffn_size <= 0:
                raise ValueError(f"a mixture-of-experts model needs moe_ffn_size > 0, got {self.moe_ffn_size}")
            if self.moe_weighting not in ("softmax", "unit"):
                raise ValueError(f"moe_weighting must be 'softmax' or 'unit', got {self.moe_weighting!r}")

    @property
    def is_moe(self) -> bool:
        """Every layer's MLP is a mixture of experts."""
        return self.num_experts > 0

    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from logits.

    temperature 0 means greedy (argmax). Otherwise logits are divided by `temperature`, then
    restricted to the `top_k` most likely tokens (0 = no limit) and to the smallest set whose
    probability reaches `top_p` (1.0 = no limit).

    coupled (sampling only): each token is drawn by a race of exponential clocks keyed by (seed, row, position)
    (eej.decoding.sampling.race_sample), so that a lossless speculative method's sampled text is plain
    decoding's, token for token, for the same seed — its drafts are drawn with the same clocks and accepted where
    they equal the target's draw. False: one uniform per row and step, and speculative sampling's residual rule
    (eej.decoding.verify.verify_sampling): about 7% more drafts accepted, the text the same in distribution only.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    coupled: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.coupled, bool):
            raise ValueError(f"coupled must be True or False, got {self.coupled!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
