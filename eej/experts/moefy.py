"""MoEfication: a dense model's FFNs split into experts, with a small router per layer.

MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts")
observes that a dense FFN's neurons fire in groups: partition each layer's F neurons into E groups of
F/E (the experts) and a router that predicts, per token, which groups matter reproduces the FFN with a
fraction of its neurons. eej builds it for SwiGLU FFNs (`y = (silu(h Wg) * (h Wu)) Wd`):

- **Partition** (`partition_layer`): each neuron is described by its activation magnitudes
  |a_i| = |silu(h Wg_i) (h Wu_i)| over sample tokens of real text; balanced spherical k-means groups
  neurons that are active on the same tokens into E equal-sized experts.
- **Expert importance** (`expert_scores`): the norm of expert e's exact contribution ||a_e Wd_e|| for a token.
- **Router**: per layer, a linear map W_r [D, E] of the normed MLP input (the standard MoE router
  shape, so the result is an ordinary MoE model, eej.model.moe), trained with binary cross-entropy to
  mark each token's k most important experts (eej/train/moefy.py).
- The MoE model uses `moe_weighting="unit"`: each chosen expert's output counts once, so with k = E the
  MoE model is the dense model exactly (the experts sum to the dense FFN).

The artifact holds only the partition ([L, E, F/E] neuron ids) and the routers ([L, D, E]); the expert
weights are the dense model's, rearranged at load time (`moefy_params`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.model.cache import init_cache
from eej.model.transformer import attention_block, embed, get_layer, mlp, num_layers, rms_norm, stack_layers
from eej.settings import resolve_path
from eej.weights.artifacts import load_artifact
from eej.weights.registry import Model, to_device

METHOD = "moefy"


class MoefyError(ValueError):
    """Settings or an artifact that do not fit the model."""


def check_split(cfg: ModelConfig, num_experts: int, experts_per_token: int | None = None) -> int:
    """The expert width F/E; clear errors for a model or settings MoEfication cannot split."""
    if cfg.is_moe:
        raise MoefyError(f"{cfg.name} is already a mixture-of-experts model; MoEfication splits a dense model")
    if cfg.layer_fn is not None:
        raise MoefyError("MoEfication needs the built-in SwiGLU layer (w_gate, w_up, w_down), not a custom layer_fn")
    if num_experts < 2 or cfg.ffn_size % num_experts:
        raise MoefyError(f"--experts must be >= 2 and divide the FFN width {cfg.ffn_size}, got {num_experts}")
    if experts_per_token is not None and not 1 <= experts_per_token <= num_experts:
        raise MoefyError(f"experts per token must be in [1, {num_experts}], got {experts_per_token}")
    return cfg.ffn_size // num_experts


@functools.partial(jax.jit, static_argnames=("cfg",))
def mlp_inputs(params: dict, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The normed MLP input of every layer of the (dense or MoE) model: tokens [B, T] -> [L, B, T, D]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, b, t)
    x = embed(params, tokens, cfg)
    out = []
    for i in range(num_layers(params["layers"])):
        layer = get_layer(params["layers"], i)
        x, _, _ = attention_block(layer, x, cache.k[i], cache.v[i], positions, cfg)
        out.append(rms_norm(x, layer["mlp_norm"], cfg.rms_eps))
        x = mlp(layer, x, cfg)
    return jnp.stack(out)


def activations(w_gate: jax.Array, w_up: jax.Array, h: jax.Array) -> jax.Array:
    """SwiGLU neuron activations a = silu(h Wg) * (h Wu): h [N, D], w [D, F] -> [N, F] float32."""
    h = h.astype(jnp.float32)
    return jax.nn.silu(h @ w_gate.astype(jnp.float32)) * (h @ w_up.astype(jnp.float32))


@jax.jit
def expert_scores(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, partition: jax.Array, h: jax.Array) -> jax.Array:
    """||a_e Wd_e||: the norm of each expert's exact contribution for each token -> [N, E] float32.

    w_gate, w_up [D, F], w_down [F, D] of one dense layer; partition [E, Fe] neuron ids; h [N, D].
    """
    a = activations(w_gate, w_up, h)[:, partition]  # [N, E, Fe]
    y = jnp.einsum("nef,efd->ned", a, w_down.astype(jnp.float32)[partition])
    return jnp.sqrt(jnp.sum(y * y, axis=-1))


def balanced_assign(similarity: np.ndarray, capacity: int) -> np.ndarray:
    """Each row (neuron) to a column (expert) with at most `capacity` rows per column, greedily by similarity.

    similarity [F, E] with F = E * capacity -> assignment [F] int (every column gets exactly `capacity`).
    """
    f, e = similarity.shape
    order = np.argsort(-similarity, axis=None, kind="stable")
    assignment = np.full(f, -1, np.int64)
    fill = np.zeros(e, np.int64)
    for flat in order:
        i, j = divmod(int(flat), e)
        if assignment[i] < 0 and fill[j] < capacity:
            assignment[i], fill[j] = j, fill[j] + 1
    return assignment


def partition_layer(magnitudes: np.ndarray, num_experts: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Balanced spherical k-means of neurons by co-activation.

    magnitudes [N, F]: |activation| of each of F neurons on N sample tokens -> partition [E, F/E] of
    neuron ids (each sorted), every expert of equal size.
    """
    n, f = magnitudes.shape
    capacity = f // num_experts
    feats = magnitudes.T.astype(np.float64)
    feats = feats - feats.mean(axis=1, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-9  # [F, N]
    rng = np.random.default_rng(seed)
    centroids = feats[rng.choice(f, num_experts, replace=False)]
    assignment = np.zeros(f, np.int64)
    for _ in range(iters):
        assignment = balanced_assign(feats @ centroids.T, capacity)
        centroids = np.stack([feats[assignment == j].mean(axis=0) for j in range(num_experts)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
    return np.stack([np.sort(np.nonzero(assignment == j)[0]) for j in range(num_experts)]).astype(np.int32)


def moe_config(cfg: ModelConfig, num_experts: int, experts_per_token: int) -> ModelConfig:
    """The MoEfied model's config: E experts of width F/E, unit weighting, k chosen per token."""
    fe = check_split(cfg, num_experts, experts_per_token)
    return cfg.replace(
        name=f"{cfg.name}-moe{num_experts}", num_experts=num_experts, experts_per_token=experts_per_token,
        moe_ffn_size=fe, moe_weighting="unit", moe_norm_topk=False,
    )


def moefy_params(dense_layers: dict[str, np.ndarray], partition: np.ndarray, router: np.ndarray) -> dict[str, np.ndarray]:
    """Stacked dense layer params + partition [L, E, Fe] + router [L, D, E] -> stacked MoE layer params.

    w_gate/w_up [L, D, F] -> [L, E, D, Fe]; w_down [L, F, D] -> [L, E, Fe, D] (neuron ids from `partition`).
    """
    layers = {k: v for k, v in dense_layers.items() if k not in ("w_gate", "w_up", "w_down")}
    idx = np.arange(partition.shape[0])[:, None, None]
    for name in ("w_gate", "w_up"):
        w = np.asarray(dense_layers[name])
        layers[name] = np.ascontiguousarray(np.moveaxis(w, 1, 2)[idx, partition].transpose(0, 1, 3, 2))
    layers["w_down"] = np.ascontiguousarray(np.asarray(dense_layers["w_down"])[idx, partition])
    layers["router"] = np.asarray(router, np.float32)
    return layers


def host_layers(model: Model) -> dict[str, np.ndarray]:
    """A model's layer params stacked on the leading axis, as float32 numpy."""
    return {k: np.asarray(v, np.float32) for k, v in stack_layers(model.params["layers"]).items()}


def moefy_model(model: Model, partition: np.ndarray, router: np.ndarray, experts_per_token: int) -> Model:
    """The MoE model made from dense `model` by a partition [L, E, Fe] and routers [L, D, E]."""
    cfg = model.cfg
    if partition.ndim != 3 or partition.shape[0] != cfg.num_layers or partition.shape[1] * partition.shape[2] != cfg.ffn_size:
        raise MoefyError(
            f"the partition has shape {tuple(partition.shape)}; {cfg.name} needs [L={cfg.num_layers}, E, F/E] "
            f"with E * F/E = {cfg.ffn_size}"
        )
    if router.shape != (cfg.num_layers, cfg.hidden_size, partition.shape[1]):
        raise MoefyError(f"the routers have shape {tuple(router.shape)}, expected {(cfg.num_layers, cfg.hidden_size, partition.shape[1])}")
    moe_cfg = moe_config(cfg, partition.shape[1], experts_per_token)
    host = {k: np.asarray(v, np.float32) for k, v in model.params.items() if k != "layers"}
    host["layers"] = moefy_params(host_layers(model), partition, router)
    return Model(cfg=moe_cfg, params=to_device(host, moe_cfg), tokenizer=model.tokenizer)


def load_moefied(model: Model, path: str, experts_per_token: int | None = None) -> Model:
    """The MoE model of a `eej train moefy` artifact (k defaults to the artifact's)."""
    arrays, header = load_artifact(path if os.path.exists(path) else resolve_path(path), METHOD, model.cfg)
    k = int(header["settings"]["experts_per_token"]) if experts_per_token is None else experts_per_token
    return moefy_model(model, np.asarray(arrays["partition"]), np.asarray(arrays["router"], np.float32), k)


def summary(header: dict[str, Any]) -> str:
    s = header.get("settings", {})
    return f"{s.get('num_experts')} experts of {s.get('expert_width')} neurons, top-{s.get('experts_per_token')}"
