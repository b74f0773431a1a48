"""Expert offloading: a MoE model decoding with its experts in host memory and an LRU cache of them on device.

`OffloadedDecoder` keeps every non-expert weight (embeddings, attention, norms, routers, head, a shared
expert) on the device and the routed experts in host memory (JAX's `pinned_host` memory kind, else
numpy). Each layer has `capacity` device
slots managed by `eej.experts.cache.ExpertCache`. A decode step runs layer by layer:

1. attention + router (jitted, one program for every layer); the chosen expert ids come to the host;
2. `request(layer, ids, "demand")`: missing experts are copied host -> device into their slots
   (`jax.device_put` to the `device` memory kind: a host-to-device DMA on a GPU/TPU, a memcpy on CPU);
3. the experts run from their slots (jitted; one program per number of distinct experts).

Prefetching, `prefetch="next-layer"` (the usual baseline): once layer l's router has run, layer l+1's
router applied to layer l's residual predicts layer l+1's experts, loaded while layer l computes.

Ahead-of-time loading (`prefetch="m2r2"`): before layer 0, the M2R2 fast stream (eej.decoding.m2r2: the
first K layers with accelerator adapters, resident on device) runs on the new token; its state f_k
approximates the slow residual at depth tau(k), so layer l's router applied to f_{k(l)} predicts layer
l's experts. Those predictions are requested as "prefetch" loads for every layer at once, before the
slow stream starts: `jax.device_put` returns immediately, so on an accelerator the copies run while
earlier layers compute. Mispredicted experts are loaded on demand as in the baseline.

What comes out never depends on the cache: a slot is read only after `request` has put the right
expert there (tests check both properties). Prefill streams each layer's experts once, outside the cache.

Every step also records, per layer, the experts needed and the prefetch predictions (`StepRecord`),
from which exact hit rates, bytes moved and a transfer-time model are computed (eej.experts.timeline).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from eej.config import ModelConfig
from eej.decoding.m2r2 import fast_trajectory, target_depth
from eej.experts.cache import ExpertCache, Load
from eej.model.cache import KVCache, init_cache
from eej.model.moe import route, router_logits, shared_expert
from eej.model.transformer import attention_block, block, embed, logits_from_hidden, rms_norm
from eej.weights.registry import Model

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass
class StepRecord:
    """One decode step: needed[l] = distinct experts layer l used; predicted[l] = prefetched ones (or empty)."""

    needed: list[list[int]]
    predicted: list[list[int]]
    loads: list[Load]
    routed: np.ndarray  # [L, B, k] the router's choice per row
    slow_predictions: np.ndarray | None = None  # [L(source), L(target), B, k]: target's norm + router on source's residual
    fast_predictions: np.ndarray | None = None  # [K, L, B, k]: layer l's router on fast state f_k (with a fast stream)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _attend_and_route(layer: dict, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """Attention sub-block + router: -> (x_mid [B,T,D], h [B,T,D] normed MLP input, ids [B,T,k], weights, k, v)."""
    x, k_cache, v_cache = attention_block(layer, x, k_cache, v_cache, positions, cfg)
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_eps)
    ids, weights = route(router_logits(layer, h), cfg)
    return x, h, ids, weights, k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _experts_from_slots(layer: dict, slots: tuple, x: jax.Array, h: jax.Array, local_ids: jax.Array, weights: jax.Array, cfg: ModelConfig):
    """x + the chosen experts + shared expert -> x [B, T, D].

    slots: U (w_gate, w_up, w_down) tuples, the distinct experts the tokens chose, each used in place
    (no stacking copy); local_ids [B, T, k] index into them; weights [B, T, k].
    """
    y = jnp.zeros_like(h)
    for j, (w_gate, w_up, w_down) in enumerate(slots):
        share = jnp.sum(jnp.where(local_ids == j, weights, 0.0), axis=-1)[..., None]  # [B, T, 1]
        a = jax.nn.silu(h @ w_gate.astype(h.dtype)) * (h @ w_up.astype(h.dtype))
        y = y + (a @ w_down.astype(h.dtype)) * share.astype(h.dtype)
    if "shared_w_gate" in layer:
        y = y + shared_expert(layer, h)
    return x + y


@functools.partial(jax.jit, static_argnames=("cfg",))
def _all_routers(mlp_norms: jax.Array, routers: jax.Array, states: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Every layer's router on every given state: states [S, B, D] -> expert ids [S, L, B, k] (layer l's norm + router)."""
    h = jax.vmap(lambda w: rms_norm(states, w, cfg.rms_eps), out_axes=1)(mlp_norms)  # [S, L, B, D]
    logits = jnp.einsum("slbd,lde->slbe", h.astype(jnp.float32), routers.astype(jnp.float32))
    return route(logits, cfg)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _fast_stream(params: dict, fast_layers: tuple, x: jax.Array, k_cache: tuple, v_cache: tuple, positions: jax.Array,
                 cfg: ModelConfig) -> jax.Array:
    """The M2R2 fast trajectory [K, B, D] of the new token (reads the shared cache; its writes are dropped)."""
    cache = KVCache(k=tuple(k_cache[: len(fast_layers)]), v=tuple(v_cache[: len(fast_layers)]), lengths=positions[:, 0])
    states, _ = fast_trajectory(params, {"fast_layers": fast_layers}, x, cache, positions, cfg)
    return jnp.stack([s[:, -1] for s in states])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _greedy_token(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Last hidden [B, D] -> greedy next token [B] int32."""
    return jnp.argmax(logits_from_hidden(params, x, cfg), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill_layer(layer: dict, x, k_cache, v_cache, positions, cfg: ModelConfig):
    return block(layer, x, k_cache, v_cache, positions, cfg)


class OffloadedDecoder:
    """Greedy batched decoding of a MoE model with offloaded experts (see module docstring).

    Args:
      model: a MoE model (`cfg.is_moe`); its expert weights are copied to host memory (`pinned_host`
        where the device offers that memory kind, else numpy).
      capacity: device slots per layer (experts); must hold the distinct experts one step needs.
      prefetch: "none" (on demand only), "next-layer" (after layer l's router, layer l+1's router on
        layer l's residual predicts layer l+1's experts: one layer ahead) or "m2r2" (the fast stream's
        predictions for every layer, issued before layer 0).
      fast: M2R2 method params (`fast_layers`: K per-layer dicts) for prefetch="m2r2".
      fast_states: use only the first this many fast layers (a cheaper fast stream); default all K.
      predictor: for each layer l, which fast state f_k (index k-1) predicts it, -1 = no prefetch
        (default: the state whose target depth tau(k) is nearest to l, for every layer >= 1).
      prefetch_top: prefetch each row's `prefetch_top` highest-ranked predicted experts (default k).
      record_slow: also record every layer's router applied to every layer's residual (prediction
        accuracy by layer distance; one extra small program per step).
    """

    def __init__(self, model: Model, capacity: int, prefetch: str = "none", fast: dict | None = None,
                 fast_states: int | None = None, predictor: Sequence[int] | None = None, rate: float | None = None,
                 prefetch_top: int | None = None, record_slow: bool = False, device: Any = None) -> None:
        cfg = model.cfg
        if not cfg.is_moe:
            raise ValueError(f"{cfg.name} is a dense model: expert offloading needs a mixture-of-experts model")
        if prefetch not in ("none", "next-layer", "m2r2"):
            raise ValueError(f"prefetch must be 'none', 'next-layer' or 'm2r2', got {prefetch!r}")
        if (prefetch == "m2r2") != (fast is not None):
            raise ValueError("prefetch='m2r2' needs the M2R2 fast stream (fast=...), and only it uses one")
        self.cfg, self.record_slow, self.prefetch = cfg, record_slow, prefetch
        self.device = device or jax.devices()[0]
        layers = model.params["layers"]
        if not isinstance(layers, (tuple, list)):
            raise ValueError("OffloadedDecoder needs the decoding layout (load_model's default)")
        # experts live in host memory: a pinned_host memory kind where the device has one (DMA-able on a
        # GPU), else numpy; the executor keeps no device reference to them (the caller's Model still does)
        kinds = {m.kind for m in self.device.addressable_memories()}
        self.host_memory = "pinned_host" if "pinned_host" in kinds else "numpy"
        self.host_experts = [[tuple(self._to_host(layer[n][e]) for n in EXPERT_WEIGHTS) for e in range(cfg.num_experts)]
                             for layer in layers]
        self.params = {k: v for k, v in model.params.items() if k != "layers"}
        self.resident = tuple({k: v for k, v in layer.items() if k not in EXPERT_WEIGHTS} for layer in layers)
        self.mlp_norms = jnp.stack([layer["mlp_norm"] for layer in layers])
        self.routers = jnp.stack([layer["router"] for layer in layers])
        self._layer_routing = [(self.mlp_norms[l : l + 1], self.routers[l : l + 1]) for l in range(cfg.num_layers)]
        self.expert_bytes = int(sum(w.nbytes for w in self.host_experts[0][0]))
        self.cache = ExpertCache(cfg.num_layers, cfg.num_experts, capacity)
        self.slots: list[list[tuple | None]] = [[None] * capacity for _ in range(cfg.num_layers)]
        self.prefetch_top = cfg.experts_per_token if prefetch_top is None else prefetch_top
        if not 1 <= self.prefetch_top <= cfg.experts_per_token:
            raise ValueError(f"prefetch_top must be in [1, {cfg.experts_per_token}], got {prefetch_top}")
        self.fast_layers = None
        if fast is not None:
            k = len(fast["fast_layers"]) if fast_states is None else fast_states
            if not 1 <= k <= len(fast["fast_layers"]):
                raise ValueError(f"fast_states must be in [1, {len(fast['fast_layers'])}], got {fast_states}")
            self.fast_layers = tuple(fast["fast_layers"][:k])
            self.predictor = list(self._default_predictor(rate, len(fast["fast_layers"])) if predictor is None else predictor)
            if len(self.predictor) != cfg.num_layers or max(self.predictor) >= k:
                raise ValueError(f"predictor needs one entry per layer ({cfg.num_layers}), each < fast_states={k}")
        self.prefill_bytes = 0
        self.records: list[StepRecord] = []

    def _default_predictor(self, rate: float | None, num_fast: int) -> list[int]:
        n = self.cfg.num_layers
        rate = n / num_fast if rate is None else rate
        depths = [target_depth(j + 1, rate, n) for j in range(num_fast)]
        return [-1 if l == 0 else int(np.argmin([abs(d - l) for d in depths])) for l in range(n)]

    # -------------------------------------------------------------------------------- transfers

    def _to_host(self, a: jax.Array):
        if self.host_memory == "numpy":
            return np.asarray(a)
        return jax.device_put(a, SingleDeviceSharding(self.device, memory_kind="pinned_host"))

    def copy_to_device(self, a) -> jax.Array:
        """A host -> device copy (asynchronous: JAX returns before the transfer ends)."""
        if self.host_memory == "numpy":
            return jax.device_put(a, self.device)
        return jax.device_put(a, SingleDeviceSharding(self.device, memory_kind="device"))

    def _perform(self, loads: list[Load]) -> None:
        for load in loads:
            self.slots[load.layer][load.slot] = tuple(self.copy_to_device(w) for w in self.host_experts[load.layer][load.expert])

    def _prefetch(self, x: jax.Array, k_cache: tuple, v_cache: tuple, positions: jax.Array):
        """Run the fast stream, request every layer's predicted experts -> (predicted per layer, loads, all predictions)."""
        states = _fast_stream(self.params, self.fast_layers, x, k_cache, v_cache, positions, self.cfg)  # [K', B, D]
        ids = np.asarray(_all_routers(self.mlp_norms, self.routers, states, self.cfg))  # [K', L, B, k]
        predicted, loads = [], []
        for layer, j in enumerate(self.predictor):
            if j < 0:
                predicted.append([])
                continue
            experts, new = self._request_prefetch(layer, ids[j, layer], -1)
            predicted.append(experts)
            loads.extend(new)
        return predicted, loads, ids

    def _request_prefetch(self, layer: int, ids: np.ndarray, issued_after: int) -> tuple[list[int], list[Load]]:
        """Prefetch each row's top `prefetch_top` of `ids` [B, k] for `layer` -> (experts, loads performed)."""
        experts = list(dict.fromkeys(ids[:, : self.prefetch_top].ravel().tolist()))[: self.cache.capacity]
        new = self.cache.request(layer, experts, "prefetch", issued_after)
        self._perform(new)
        return experts, new

    # -------------------------------------------------------------------------------- decoding

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, capacity: int):
        """Prompt tokens [B, P] (right-padded; real lengths [B]) -> (last hidden [B, D], kv cache lists)."""
        cfg = self.cfg
        b, p = tokens.shape
        cache = init_cache(cfg, b, capacity)
        ks, vs = list(cache.k), list(cache.v)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        x = embed(self.params, jnp.asarray(tokens), cfg)
        for l, layer in enumerate(self.resident):
            experts = [tuple(self.copy_to_device(w) for w in ws) for ws in self.host_experts[l]]  # streamed, not cached
            full = {**layer, **{n: jnp.stack([e[i] for e in experts]) for i, n in enumerate(EXPERT_WEIGHTS)}}
            self.prefill_bytes += self.expert_bytes * cfg.num_experts
            x, ks[l], vs[l] = _prefill_layer(full, x, ks[l], vs[l], positions, cfg)
        last = x[jnp.arange(b), jnp.asarray(lengths) - 1]
        return last, ks, vs

    def step(self, tokens: jax.Array, positions: jax.Array, ks: list, vs: list) -> jax.Array:
        """One token per row: tokens [B], positions [B] -> last hidden [B, D]; ks/vs updated in place."""
        cfg = self.cfg
        pos = positions[:, None]
        x = embed(self.params, tokens[:, None], cfg)
        predicted, loads, fast_ids = ([[] for _ in range(cfg.num_layers)], [], None)
        if self.prefetch == "m2r2":
            predicted, loads, fast_ids = self._prefetch(x, tuple(ks), tuple(vs), pos)
        needed, routed, mids = [], [], []
        for l, layer in enumerate(self.resident):
            x_mid, h, ids, weights, ks[l], vs[l] = _attend_and_route(layer, x, ks[l], vs[l], pos, cfg)
            ids_host = np.asarray(ids)  # [B, 1, k]: the layer must know its experts before it can run them
            experts = list(dict.fromkeys(ids_host.ravel().tolist()))
            new = self.cache.request(l, experts, "demand")
            self._perform(new)
            loads.extend(new)
            slot_of = {e: self.cache.slot_of(l, e) for e in experts}
            order = sorted(set(slot_of.values()))
            local = np.vectorize(lambda e: order.index(slot_of[e]))(ids_host).astype(np.int32)
            x = _experts_from_slots(layer, tuple(self.slots[l][s] for s in order), x_mid, h, jnp.asarray(local), weights, cfg)
            needed.append(experts)
            routed.append(ids_host[:, 0])
            if self.prefetch == "next-layer" and l + 1 < cfg.num_layers:
                nxt = np.asarray(_all_routers(*self._layer_routing[l + 1], x_mid[:, -1][None], cfg))
                predicted[l + 1], new = self._request_prefetch(l + 1, nxt[0, 0], l)
                loads.extend(new)
            if self.record_slow:
                mids.append(x_mid[:, -1])
        slow = None
        if self.record_slow:
            # layer l's router on layer j's post-attention residual (normalised with layer l's norm): [L(j), L(l), B, k]
            slow = np.asarray(_all_routers(self.mlp_norms, self.routers, jnp.stack(mids), cfg))
        self.records.append(StepRecord(needed, predicted, loads, np.stack(routed), slow, fast_ids))
        return x[:, -1]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of each prompt (token ids) -> [B, max_new_tokens] int32 (no early stop)."""
        cfg = self.cfg
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        width = int(lengths.max())
        tokens = np.full((len(prompts), width), cfg.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        capacity = width + max_new_tokens
        last, ks, vs = self.prefill(tokens, lengths, capacity)
        out = []
        token, positions = _greedy_token(self.params, last, cfg), jnp.asarray(lengths)
        for _ in range(max_new_tokens):
            out.append(np.asarray(token))
            if len(out) == max_new_tokens:
                break
            last = self.step(token, positions, ks, vs)
            token, positions = _greedy_token(self.params, last, cfg), positions + 1
        return np.stack(out, axis=1)
