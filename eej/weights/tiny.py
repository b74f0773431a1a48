"""Tiny random models (`--model tiny-llama`, ...): a byte vocabulary and a few small layers, for tests,
examples and notebooks that must run anywhere in seconds. `tiny-llama@7` picks random seed 7.

    tiny-llama    4 layers, multi-head attention
    tiny-gqa      6 layers, grouped-query attention (6 query heads over 2 KV heads)
    tiny-qwen2    q/k/v biases (Qwen2)
    tiny-mistral  a sliding attention window of 16 (Mistral)
    tiny-moe      a mixture of 8 experts, 2 per token, in every layer
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eej.config import ModelConfig
from eej.model.transformer import Params
from eej.weights.byte_tokenizer import BYTE_VOCAB_SIZE

TINY_MODELS = {
    "tiny-llama": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=16, ffn_size=128),
    "tiny-gqa": dict(hidden_size=64, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=16, ffn_size=96),
    "tiny-qwen2": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, attention_bias=True),
    "tiny-mistral": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, sliding_window=16),
    "tiny-moe": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128,
                     num_experts=8, experts_per_token=2, moe_ffn_size=32),
}


def tiny_config(name: str = "tiny-llama", **overrides: Any) -> ModelConfig:
    """Config of a registered tiny random model (byte vocabulary), with optional field overrides."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    fields = dict(
        name=name, vocab_size=BYTE_VOCAB_SIZE, rms_eps=1e-5, tie_embeddings=False, max_position=2048,
        bos_id=1, eos_ids=(2,), pad_id=0,
    )
    fields.update(TINY_MODELS[name])
    fields.update(overrides)
    return ModelConfig(**fields)


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.08) -> Params:
    """Random params (eej layout, layers stacked [L, ...], float32 numpy) for `cfg`; norms near 1."""
    rng = np.random.default_rng(seed)
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.ffn_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def w(*shape: int, s: float = scale) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    layers = {
        "attn_norm": 1 + w(L, D, s=0.1), "wq": w(L, D, q), "wk": w(L, D, kv), "wv": w(L, D, kv),
        "wo": w(L, q, D), "mlp_norm": 1 + w(L, D, s=0.1), "w_gate": w(L, D, F), "w_up": w(L, D, F),
        "w_down": w(L, F, D),
    }
    if cfg.is_moe:
        E, Fe, Fs = cfg.num_experts, cfg.moe_ffn_size, cfg.shared_expert_ffn_size
        layers.update(router=w(L, D, E, s=0.5), w_gate=w(L, E, D, Fe), w_up=w(L, E, D, Fe), w_down=w(L, E, Fe, D))
        if Fs:
            layers.update(shared_w_gate=w(L, D, Fs), shared_w_up=w(L, D, Fs), shared_w_down=w(L, Fs, D),
                          shared_gate=w(L, D, 1))
    if cfg.attention_bias:
        layers.update(bq=w(L, q, s=0.02), bk=w(L, kv, s=0.02), bv=w(L, kv, s=0.02))
    embed = w(cfg.vocab_size, D, s=1.0)
    head = embed.T.copy() if cfg.tie_embeddings else w(D, cfg.vocab_size, s=0.5)
    return {"embed": embed, "layers": layers, "final_norm": 1 + w(D, s=0.1), "lm_head": head}
