"""A model of your own — params + a per-layer function — as an eej `Model` (docs/engine.md).

The engine and every strategy call a model only through `embed`, the per-layer `block`, a layer's
K/V projection and `logits_from_hidden` (eej.model.transformer); a config whose `layer_fn` is your
layer makes all of them run it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from eej.config import ModelConfig
from eej.model.transformer import num_layers, unstack_layers
from eej.weights.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from eej.weights.registry import Model


def custom_model(
    params: dict[str, Any],
    layer_fn: Callable[..., jax.Array],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tokenizer: Any = None,
    name: str = "custom",
    eos_ids: Sequence[int] | None = None,
    max_position: int = 4096,
    rms_eps: float = 1e-5,
    ffn_size: int | None = None,
) -> Model:
    """A model of your own — params + a per-layer function — as an eej Model: Engine, every strategy,
    `generate`, `compare` and the bench run it.

    params: {"embed": [V, D], "layers": your per-layer params (a list/tuple of pytrees, or a pytree of
      [L, ...] arrays), "final_norm": [D] (RMSNorm weight; ones for none), "lm_head": [D, V]}.
    layer_fn(layer_params, x [B, T, D], positions [B, T], attend) -> x [B, T, D]: one decoder layer;
      `attend(q [B,T,num_heads,head_dim], k [B,T,num_kv_heads,head_dim], v) -> [B,T,num_heads,head_dim]`
      is causal attention over eej's KV cache (apply your position encoding to q and k before).
      Call it exactly once per layer. Define layer_fn once: the compiled code is keyed on it.
    tokenizer: an eej Tokenizer (default: the byte tokenizer with ChatML specials, vocabulary >= 259).

    ffn_size: the width of your MLP's hidden layer (default D); only the built-in Llama layer and add-ons
      shaped like Llama's weights (a LoRA on `w_gate`, `w_up`, `w_down`) read it. Mesh sharding rules
      (`--mesh`) and LoRA know the Llama parameter names only.
    """
    missing = [k for k in ("embed", "layers", "final_norm", "lm_head") if k not in params]
    if missing:
        raise ValueError(f"params lack {', '.join(missing)} (need embed [V, D], layers, final_norm [D], lm_head [D, V])")
    vocab, hidden = params["embed"].shape
    if tuple(params["lm_head"].shape) != (hidden, vocab) or tuple(params["final_norm"].shape) != (hidden,):
        raise ValueError(f"with embed [{vocab}, {hidden}], lm_head must be [{hidden}, {vocab}] and final_norm [{hidden}]")
    if tokenizer is None:
        if vocab < BYTE_VOCAB_SIZE:
            raise ValueError(f"the default byte tokenizer needs a vocabulary of >= {BYTE_VOCAB_SIZE}; pass a tokenizer")
        tokenizer = byte_tokenizer()
    layers = unstack_layers(params["layers"])
    dtype = jnp.dtype(params["embed"].dtype).name
    cfg = ModelConfig(
        name=name, vocab_size=vocab, hidden_size=hidden, num_layers=num_layers(layers), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, ffn_size=hidden if ffn_size is None else ffn_size, rms_eps=rms_eps, tie_embeddings=False,
        max_position=max_position, eos_ids=tuple(tokenizer.eos_ids if eos_ids is None else eos_ids),
        pad_id=0, dtype=dtype if dtype in ("float32", "bfloat16") else "float32", layer_fn=layer_fn,
    )
    device_params = jax.tree.map(jnp.asarray, {**params, "layers": layers})
    return Model(cfg=cfg, params=device_params, tokenizer=tokenizer)
