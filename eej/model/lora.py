"""Low-rank adapters (LoRA) on the transformer's projections.

A LoRA pytree mirrors `params["layers"]` for the projections it adapts, stacked over layers:

    {"wq": {"a": [L, in, r], "b": [L, r, out]}, "w_up": {...}, ...}

with W' = W + scale * A @ B. `merge_lora` folds the adapters into a copy of the weights, which is
how both inference (zero extra cost per token) and training (gradients flow through the merge to A
and B) use them, so the forward pass itself knows nothing of LoRA. B starts at zero: an untrained
adapter leaves the model unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from eej.config import ModelConfig
from eej.model.transformer import Params, stack_layers, unstack_layers

ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")
PROJECTIONS = (*ATTENTION_PROJECTIONS, "w_gate", "w_up", "w_down")


def default_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """Every projection of a dense model; the attention projections of a mixture of experts (whose MLP
    weights are E experts, not one [in, out] matrix)."""
    return ATTENTION_PROJECTIONS if cfg.is_moe else PROJECTIONS


def parse_targets(cfg: ModelConfig, spec: str | None) -> tuple[str, ...]:
    """"wq,wk,..." -> LoRA target names (None: `default_targets(cfg)`); ValueError naming bad ones."""
    if spec is None:
        return default_targets(cfg)
    targets = tuple(t.strip() for t in spec.split(",") if t.strip())
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA targets {', '.join(bad) or '(none)'}; choose from {', '.join(PROJECTIONS)}")
    for name in targets:
        projection_shape(cfg, name)  # rejects MLP targets on a mixture of experts
    return targets


def projection_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in, out) of projection `name`."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_size
    shapes = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if name not in shapes:
        raise ValueError(f"unknown projection {name!r}; LoRA targets are {', '.join(PROJECTIONS)}")
    if cfg.is_moe and name not in ATTENTION_PROJECTIONS:
        raise ValueError(f"LoRA on {name} is not supported on a mixture-of-experts model ({cfg.num_experts} experts); "
                         f"use attention-only LoRA targets {','.join(ATTENTION_PROJECTIONS)}")
    return shapes[name]


def init_lora(
    key: jax.Array, cfg: ModelConfig, rank: int, targets: Sequence[str] | None = None, num_layers: int | None = None
) -> dict[str, dict[str, jax.Array]]:
    """Fresh adapters for `num_layers` layers (default all) on `targets` (default `default_targets(cfg)`):
    A ~ N(0, 1/in), B = 0."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    n = cfg.num_layers if num_layers is None else num_layers
    targets = default_targets(cfg) if targets is None else targets
    out = {}
    for name, k in zip(targets, jax.random.split(key, len(targets))):
        fan_in, fan_out = projection_shape(cfg, name)
        out[name] = {
            "a": jax.random.normal(k, (n, fan_in, rank), jnp.float32) / jnp.sqrt(fan_in),
            "b": jnp.zeros((n, rank, fan_out), jnp.float32),
        }
    return out


def lora_delta(lora: dict[str, dict[str, jax.Array]], scale: float) -> dict[str, jax.Array]:
    """The weight updates scale * A @ B, stacked [L, in, out] per adapted projection."""
    return {name: scale * jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) for name, ab in lora.items()}


def merge_lora(params: Params, lora: dict[str, Any], scale: float = 1.0, first_layer: int = 0) -> Params:
    """`params` with the adapters folded into layers [first_layer, first_layer + L_lora).

    Works with stacked or per-layer (decoding) layouts and returns the same layout.
    """
    delta = lora_delta(lora, scale)
    per_layer = isinstance(params["layers"], (tuple, list))
    layers = list(unstack_layers(params["layers"]))
    n = next(iter(delta.values())).shape[0] if delta else 0
    if first_layer + n > len(layers):
        raise ValueError(f"LoRA covers {n} layers from {first_layer}, the model has {len(layers)}")
    for i in range(n):
        layer = dict(layers[first_layer + i])
        missing = sorted(set(delta) - set(layer))
        if missing:  # e.g. a custom layer_fn model whose params don't use the Llama names
            raise ValueError(f"LoRA adapts {', '.join(missing)}, which layer {first_layer + i} of this model lacks "
                             f"(it has {', '.join(sorted(layer))})")
        for name, d in delta.items():
            if d[i].shape != layer[name].shape:
                raise ValueError(f"LoRA adapts {name} as {list(d[i].shape)}, but layer {first_layer + i}'s {name} "
                                 f"is {list(layer[name].shape)}")
            layer[name] = (layer[name] + d[i].astype(layer[name].dtype))
        layers[first_layer + i] = layer
    merged = tuple(layers) if per_layer else stack_layers(tuple(layers))
    return {**params, "layers": merged}
