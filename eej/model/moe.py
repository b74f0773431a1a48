"""The mixture-of-experts MLP sub-block: a router picks k of E SwiGLU experts per token.

Layer params of a MoE model (stacked on a leading L axis like every layer param; E experts of width Fe,
optional shared expert of width Fs):

    "mlp_norm": [L, D], "router": [L, D, E],
    "w_gate": [L, E, D, Fe], "w_up": [L, E, D, Fe], "w_down": [L, E, Fe, D],
    ("shared_w_gate": [L, D, Fs], "shared_w_up": [L, D, Fs], "shared_w_down": [L, Fs, D],
     "shared_gate": [L, D, 1])                                            # Qwen2-MoE

Routing (`route`): router logits z = RMSNorm(x) W_router (float32); the chosen experts are the top-k of z.
Their weights are softmax(z) at those experts, renormalised over them when `cfg.moe_norm_topk` (Mixtral,
Qwen2-MoE), or 1 each with `cfg.moe_weighting == "unit"` (a dense FFN split into experts: the sum of every
expert's output is the dense output). The shared expert's output is added with weight sigmoid(x W_sg).

Two ways to compute the experts, chosen statically by size (`moe_ffn`): *gathered* — each token's k
experts' weights are gathered and applied (3·B·T·k <= E: decoding a sparse MoE; reads only k of E
experts) — and *dense* — every expert on every token as one matmul batched over experts, combined with
a weight that is zero for experts not chosen (prefill, training, dense-ish routing). Same output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from eej.config import ModelConfig


def router_logits(layer: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """Router logits [..., E] (float32) for the normed MLP input h [..., D]."""
    return jnp.matmul(h.astype(jnp.float32), layer["router"].astype(jnp.float32))


def route(logits: jax.Array, cfg: ModelConfig, k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [..., E] -> (expert ids [..., k] int32, highest logit first; weights [..., k] float32)."""
    k = cfg.experts_per_token if k is None else k
    top, ids = lax.top_k(logits, k)
    if cfg.moe_weighting == "unit":
        return ids.astype(jnp.int32), jnp.ones_like(top)
    weights = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    if cfg.moe_norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def experts_dense(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, h: jax.Array, combine: jax.Array) -> jax.Array:
    """Every expert on every token, combined: sum_e combine[n, e] * expert_e(h[n]).

    w_gate, w_up [E, D, Fe], w_down [E, Fe, D]; h [N, D]; combine [N, E] (zero for experts not chosen) -> [N, D].
    A batched matmul over experts reads each expert's weights in place (an einsum contracting D of
    [E, D, Fe] made XLA:CPU copy them: 2.6x slower at one token, SmolLM2 shapes). Activations of experts
    not chosen are zeroed before the down projection, so an overflow there cannot turn into 0 * inf = NaN.
    """
    e = w_gate.shape[0]
    hb = jnp.broadcast_to(h[None], (e, *h.shape))
    a = jax.nn.silu(jnp.einsum("end,edf->enf", hb, w_gate.astype(h.dtype))) * jnp.einsum("end,edf->enf", hb, w_up.astype(h.dtype))
    weight = combine.T.astype(h.dtype)[:, :, None]  # [E, N, 1]
    a = jnp.where(weight != 0, a * weight, 0)
    return jnp.einsum("enf,efd->nd", a, w_down.astype(h.dtype))


def experts_gathered(
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, h: jax.Array, ids: jax.Array, weights: jax.Array
) -> jax.Array:
    """The weighted sum of each token's chosen experts, reading only those experts' weights.

    Args:
      w_gate, w_up: [E', D, Fe]; w_down: [E', Fe, D] — a layer's experts, or the slots of an expert cache.
      h: [N, D] normed MLP inputs; ids: [N, k] int32 indices into the E' axis; weights: [N, k].
    Returns:
      [N, D] in h's dtype.
    """
    g = jnp.take(w_gate, ids, axis=0).astype(h.dtype)  # [N, k, D, Fe]
    u = jnp.take(w_up, ids, axis=0).astype(h.dtype)
    d = jnp.take(w_down, ids, axis=0).astype(h.dtype)  # [N, k, Fe, D]
    a = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", h, g)) * jnp.einsum("nd,nkdf->nkf", h, u)
    y = jnp.einsum("nkf,nkfd->nkd", a, d)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))


def shared_expert(layer: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """The gated shared expert (Qwen2-MoE): h [..., D] -> [..., D]."""
    g = jnp.matmul(h, layer["shared_w_gate"].astype(h.dtype))
    u = jnp.matmul(h, layer["shared_w_up"].astype(h.dtype))
    y = jnp.matmul(jax.nn.silu(g) * u, layer["shared_w_down"].astype(h.dtype))
    gate = jax.nn.sigmoid(jnp.matmul(h, layer["shared_gate"].astype(h.dtype)).astype(jnp.float32))
    return (y.astype(jnp.float32) * gate).astype(h.dtype)


def moe_ffn(layer: dict[str, jax.Array], h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The MoE feed-forward on normed inputs h [B, T, D] -> (output [B, T, D], chosen expert ids [B, T, k])."""
    b, t, d = h.shape
    ids, weights = route(router_logits(layer, h), cfg)
    k, e = cfg.experts_per_token, cfg.num_experts
    # Gathering copies each token's k experts (read + write + read again), so it pays only while B*T*k
    # is small next to E: MoEfied SmolLM2 at top-12 of 16, batch 1, ran 2.2x slower gathered than dense
    # on XLA:CPU (36.8 vs ~17 ms a step); top-2 of 8 (Mixtral) gathers.
    if 3 * b * t * k <= e:  # few tokens (decoding): read only the chosen experts
        y = experts_gathered(layer["w_gate"], layer["w_up"], layer["w_down"], h.reshape(b * t, d),
                             ids.reshape(b * t, k), weights.reshape(b * t, k)).reshape(b, t, d)
    else:
        combine = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32) * weights[..., None], axis=-2)  # [B, T, E]
        y = experts_dense(layer["w_gate"], layer["w_up"], layer["w_down"], h.reshape(b * t, d),
                          combine.reshape(b * t, e)).reshape(b, t, d)
    if "shared_w_gate" in layer:
        y = y + shared_expert(layer, h)
    return y, ids

