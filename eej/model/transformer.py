"""The Llama-family decoder as pure functions over an explicit params pytree.

Params pytree (shapes for L layers, width D, Hq query heads, Hkv KV heads, head dim Dh, FFN F, vocab V):

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, Hq*Dh], "wk": [L, D, Hkv*Dh], "wv": [L, D, Hkv*Dh],
                "wo": [L, Hq*Dh, D], ("bq": [L, Hq*Dh], "bk": [L, Hkv*Dh], "bv": [L, Hkv*Dh]),
                "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}            # a transposed copy of "embed" when the model ties them

A mixture-of-experts model's layers hold a "router" [L, D, E] and experts stacked [L, E, ...] in place
of the dense w_gate/w_up/w_down (layout in eej.model.moe).

Projection weights are `[in, out]` (y = x @ w). Measured on XLA:CPU with SmolLM2 shapes, one
step over all 30 layers: batch 1 — 10.7 ms vs 9.9 ms for HF's [out, in]; batch 2 — 10.9 vs 18.2;
batch 8 — 13.6 vs 21.4. Several rows per step is what batched decoding and speculative
verification do, so [in, out] wins; the head follows suit.

`layers` is stacked on a leading L axis — the canonical form used for storage, training and
sharding. For decoding, `eej.weights.registry.load_model` gives a tuple of L per-layer dicts, and
the layer loops are Python-unrolled: on XLA:CPU, slicing a layer out of a stacked array inside a
jitted step copies it (measured: 36 vs 90 tokens/s for a SmolLM2-sized stack), and a `lax.scan`
over the stacked layers, which compiles 4-6x faster, decodes 6-14% slower (docs/engine.md,
benchmarks/results/scan_vs_unrolled.md). Every function here accepts either form.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from eej.config import ModelConfig
from eej.model import attention as attn_lib
from eej.model import moe
from eej.model.cache import KVCache, write_block
from eej.model.control import branch_whole_step, cond_in_place, implementation, run_if, switch_in_place
from eej.model.packed import PackedWeight, product as packed_product
from eej.model.rope import apply_rope

Params = dict[str, Any]
Layers = Any  # dict of [L, ...] arrays, or tuple of L dicts of per-layer arrays


# ----------------------------------------------------------------------------- layer stacks


def num_layers(layers: Layers) -> int:
    if isinstance(layers, (tuple, list)):
        return len(layers)
    return jax.tree.leaves(layers)[0].shape[0]


def get_layer(layers: Layers, i: int) -> dict[str, jax.Array]:
    """Layer `i` (a Python int) of a stacked or tuple layer stack."""
    if isinstance(layers, (tuple, list)):
        return layers[i]
    return jax.tree.map(lambda a: a[i], layers)


def unstack_layers(layers: Layers) -> tuple[dict[str, jax.Array], ...]:
    """A stacked `[L, ...]` layer dict as a tuple of L per-layer dicts (tuples pass through)."""
    if isinstance(layers, (tuple, list)):
        return tuple(layers)
    return tuple(get_layer(layers, i) for i in range(num_layers(layers)))


def stack_layers(layers: Layers) -> dict[str, jax.Array]:
    """A tuple of per-layer dicts as one dict of `[L, ...]` arrays (stacked input passes through)."""
    if isinstance(layers, (tuple, list)):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return layers


def canonical_layout(params: Params) -> Params:
    """`params` with `layers` stacked on a leading axis."""
    return {**params, "layers": stack_layers(params["layers"])}


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype; a row's result does not depend on
    the rows beside it (`row_sum`)."""
    xf = x.astype(jnp.float32)
    mean_square = row_sum(xf * xf)[..., None] / x.shape[-1]
    y = xf * lax.rsqrt(mean_square + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


_SUM_LANES = 64


def row_sum(x: jax.Array) -> jax.Array:
    """x [..., D] summed over its last axis -> [...], in one fixed order whatever the leading shape.

    XLA's own reduction picks its order by shape: on a CPU a row of SmolLM2-135M's residual summed among 8 or more
    rows rounds differently from the same row among 5, so a verification of several tokens per row, or a batch, got
    other logits than a one-token step — and a near-tie between two tokens could go the other way. Here the sum is
    elementwise adds only, which XLA does not reorder: lanes of `_SUM_LANES` columns added chunk after chunk, then
    halved pairwise. (The CPU matmul and attention kernels hold the same property: kernels/cpu_matmul.cc.)
    """
    width = x.shape[-1]
    lanes = min(_SUM_LANES, 1 << max(width - 1, 0).bit_length())  # a power of two
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -width % lanes)])
    chunks = x.reshape(*x.shape[:-1], -1, lanes)
    acc = chunks[..., 0, :]
    for i in range(1, chunks.shape[-2]):
        acc = acc + chunks[..., i, :]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


MATMUL_IMPLS = ("xla", "cpu")
_CPU_MATMUL = "eej.kernels.cpu_matmul"


def linear(x: jax.Array, w: jax.Array | PackedWeight, b: jax.Array | None = None, impl: str = "xla") -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out]) -> [..., out]; w may be packed in column tiles (eej.model.packed).

    impl: "xla" (jnp.matmul), or "cpu" — the CPU kernel `eej.kernels.cpu_matmul` for float32 products of at
    most its MAX_ROWS rows (decode and verification steps, short prefills), XLA's for the rest
    (`ModelConfig.matmul_impl`).
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul implementation {impl!r}; one of {', '.join(MATMUL_IMPLS)}")
    # the kernel module (layer 2) is imported when first selected
    kernel = importlib.import_module(_CPU_MATMUL) if impl == "cpu" else None
    if kernel is not None and kernel.applies(x, w):
        y = kernel.matmul(x, w)
    elif isinstance(w, PackedWeight):
        y = packed_product(x, w)
    else:
        y = jnp.matmul(x, w.astype(x.dtype))
    return y if b is None else y + b.astype(y.dtype)


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token ids [B, T] -> embeddings [B, T, D] in the model dtype."""
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.jnp_dtype)


def final_norm(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, params["final_norm"], cfg.rms_eps)


def logits_from_hidden(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm + LM head: hidden [..., D] -> float32 logits [..., V]."""
    return linear(final_norm(params, x, cfg), params["lm_head"], impl=cfg.matmul_impl).astype(jnp.float32)


def qkv(layer: dict[str, jax.Array], x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """Normed, projected, rotated q [B,T,Hq,Dh], k [B,T,Hkv,Dh], v [B,T,Hkv,Dh] of residual x [B,T,D]."""
    b, t, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
    q = linear(h, layer["wq"], layer.get("bq"), cfg.matmul_impl).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(h, layer["wk"], layer.get("bk"), cfg.matmul_impl).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(h, layer["wv"], layer.get("bv"), cfg.matmul_impl).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    return apply_rope(q, positions, cfg.rope), apply_rope(k, positions, cfg.rope), v


def mlp(layer: dict[str, jax.Array], x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The SwiGLU feed-forward sub-block with its residual: x [B,T,D] -> [B,T,D].

    A layer with a "router" is a mixture of experts (eej.model.moe, settings from cfg); dense layers
    stay dense even in a MoE model's config (e.g. an add-on's dense copy of a layer)."""
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_eps)
    if "router" in layer:
        return x + moe.moe_ffn(layer, h, cfg)[0]
    impl = cfg.matmul_impl
    gated = jax.nn.silu(linear(h, layer["w_gate"], impl=impl)) * linear(h, layer["w_up"], impl=impl)
    return x + linear(gated, layer["w_down"], impl=impl)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    kv_limit: int | None = None,
    slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write a block's keys/values into one layer's cache and attend over it.

    Args:
      q: [B, T, Hq, Dh] queries; k, v: [B, T, Hkv, Dh] the block's keys/values (positions applied).
      k_cache, v_cache: the layer's cache [B, Hkv, S, Dh]; slot `slots[b, t]` (default: the
        token's position) receives token t, and the query reads slots 0..its own slot.
      kv_limit, slots: see `attention_block`.
    Returns:
      (attention output [B, T, Hq, Dh], k_cache, v_cache).
    """
    slots = positions if slots is None else slots
    k_cache = write_block(k_cache, k, slots)
    v_cache = write_block(v_cache, v, slots)
    if kv_limit is not None and kv_limit < k_cache.shape[2]:
        out = attn_lib.attention(q, k_cache[:, :, :kv_limit], v_cache[:, :, :kv_limit], slots, cfg)
    else:
        out = attn_lib.attention(q, k_cache, v_cache, slots, cfg)
    return out, k_cache, v_cache


def custom_block(
    layer: Any, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, cfg: ModelConfig,
    kv_limit: int | None = None, slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`block` for a config with a user `layer_fn` (see ModelConfig): its `attend` reads and extends the cache."""
    written: list[tuple[jax.Array, jax.Array]] = []

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if written:
            raise ValueError("a layer_fn may call attend only once per layer (one KV cache per layer)")
        out, kc, vc = cached_attention(q, k, v, k_cache, v_cache, positions, cfg, kv_limit, slots)
        written.append((kc, vc))
        return out

    x = cfg.layer_fn(layer, x, positions, attend)
    if not written:
        raise ValueError("the layer_fn never called attend: eej needs each layer's keys and values")
    return x, *written[0]


def attention_block(
    layer: dict[str, jax.Array],
    x: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    kv_limit: int | None = None,
    slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The self-attention sub-block with its residual, reading and extending one layer's cache.

    Args:
      layer: params with attn_norm, wq, wk, wv, wo (and optional biases); a decoder layer or an
        attention-only adapter (Kangaroo's).
      x: residual stream [B, T, D] of the block's tokens.
      k_cache, v_cache: this layer's cache [B, Hkv, S, Dh].
      positions: [B, T] position of each token; its K/V is written to that slot.
      kv_limit: if given (static), no position in the block reaches it, so attention reads only
        slots [0, kv_limit) — e.g. a prefill from position 0 of P tokens reads P slots, not S.
      slots: [B, T] cache slots of the block's tokens, if not their positions (a layer that holds
        only some tokens, packed: early exit without KV for exited tokens). RoPE still uses
        `positions`; the K/V go to `slots` and a query reads slots 0..its own slot.
    Returns:
      (x + attention output [B, T, D], k_cache, v_cache).
    """
    b, t, _ = x.shape
    q, k, v = qkv(layer, x, positions, cfg)
    out, k_cache, v_cache = cached_attention(q, k, v, k_cache, v_cache, positions, cfg, kv_limit, slots)
    return x + linear(out.reshape(b, t, cfg.num_heads * cfg.head_dim), layer["wo"], impl=cfg.matmul_impl), k_cache, v_cache


def block(
    layer: dict[str, jax.Array],
    x: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    kv_limit: int | None = None,
    slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer (attention then MLP sub-block) over a block of tokens; args as `attention_block`.

    Returns:
      (x [B, T, D], k_cache, v_cache) after the layer.

    With `cfg.layer_fn` set (a model of your own), that function is the layer (see `custom_block`).
    """
    if cfg.layer_fn is not None:
        return custom_block(layer, x, k_cache, v_cache, positions, cfg, kv_limit, slots)
    x, k_cache, v_cache = attention_block(layer, x, k_cache, v_cache, positions, cfg, kv_limit, slots)
    return mlp(layer, x, cfg), k_cache, v_cache


def trace_settings() -> tuple[Any, ...]:
    """The process-wide settings that model and decoding code read while it is traced, besides its arguments: the
    attention score budget (`eej.model.attention.score_budget`: the backend and CPU_SCORE_BYTES) and how
    conditionals compile (`EEJ_CONDITIONALS`, `EEJ_BRANCH_STEP`: eej.model.control). Anything that keeps a traced
    or compiled program for later calls keys it on these too, so that a program traced under other settings is
    never reused."""
    return attn_lib.score_budget(), implementation(), branch_whole_step()


def _keyed_block(*args: Any, settings: tuple[Any, ...], **kwargs: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    del settings  # only a key of the cache below: `block` reads the same settings while it is traced
    return block(*args, **kwargs)


_traced_blocks = jax.jit(_keyed_block, static_argnames=("cfg", "kv_limit", "settings"))


def traced_once(
    layer: Any, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, cfg: ModelConfig,
    kv_limit: int | None = None, slots: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`block` as one nested program per shape and `trace_settings()`: a stack of N equally shaped layers is traced
    and lowered once, not N times (XLA inlines the calls, so the compiled step is the same; the engine is built
    sooner)."""
    return _traced_blocks(layer, x, k_cache, v_cache, positions, cfg=cfg, kv_limit=kv_limit, slots=slots,
                          settings=trace_settings())


def run_layers(
    params: Params,
    x: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    start: int = 0,
    end: int | None = None,
    cache_offset: int = 0,
    kv_limit: int | None = None,
    active: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run layers [start, end) (Python ints) over a block of tokens.

    Args:
      params: model params (stacked or decoding layout).
      x: residual stream [B, T, D] entering layer `start`.
      cache: the KV cache; model layer l uses cache layer `l - cache_offset` (so a method can keep a
        cache holding only part of the stack).
      positions: [B, T] per-row positions of the block's tokens.
      kv_limit: see `attention_block`.
      active: optional [N] bool (traced is fine): layer l runs only where active[l]; a skipped layer is
        the identity for x and leaves its cache untouched (`run_layer_if`).
    Returns:
      (x [B, T, D] leaving layer end-1, cache with the block's K/V written in those layers).
      Lengths are not changed: committing tokens is the caller's decision.
    """
    layers = params["layers"]
    end = num_layers(layers) if end is None else end
    for i in range(start, end):
        if active is None:
            c = i - cache_offset
            x, k, v = traced_once(get_layer(layers, i), x, *cache.layer(c), positions, cfg, kv_limit)
            cache = cache.set_layer(c, k, v)
        else:
            x, cache = run_layer_if(active[i], get_layer(layers, i), i - cache_offset, x, cache, positions, cfg)
    return x, cache


def run_layer_if(
    run: jax.Array,
    layer: Any,
    index: int,
    x: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    *,
    slots: jax.Array | None = None,
    otherwise: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]] | None = None,
) -> tuple[jax.Array, KVCache]:
    """The layer with params `layer` over x, reading and writing cache layer `index`, when `run` holds.

    run: a bool scalar (traced is fine) decided for the whole batch — only the taken branch is computed
      (a per-row predicate under `vmap` would run both), and the cache is updated in place (eej.model.control).
    otherwise: what a skipped layer does, `(x, k_cache, v_cache) -> (x, k_cache, v_cache)`; default: nothing
      (the identity for x, the cache untouched).
    slots: see `attention_block`.
    Returns (x, cache).
    """

    def run_layer(operand):
        return traced_once(layer, *operand, positions, cfg, slots=slots)

    if otherwise is None:
        x, k, v = run_if(run, run_layer, (x, *cache.layer(index)))
    else:
        (x, k, v), _ = cond_in_place(run, lambda op: (run_layer(op), ()), lambda op: (otherwise(*op), ()), (x, *cache.layer(index)))
    return x, cache.set_layer(index, k, v)


def layer_kv(layer: Any, x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The keys/values [B, T, Hkv, Dh] a layer would write for residual input x [B, T, D].

    For a user `layer_fn` this runs the layer with an `attend` that only records k and v; under jit
    the rest of the layer is dead code and is not computed.
    """
    if cfg.layer_fn is None:
        return qkv(layer, x, positions, cfg)[1:]
    seen: list[tuple[jax.Array, jax.Array]] = []

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        seen.append((k, v))
        return jnp.zeros_like(q)

    cfg.layer_fn(layer, x, positions, attend)
    if len(seen) != 1:
        raise ValueError("a layer_fn must call attend exactly once per layer")
    return seen[0]


def propagate_kv(
    params: Params,
    x: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    first_layer: jax.Array | int,
    cache_offset: int = 0,
) -> KVCache:
    """State propagation for early exit (as in CALM): give layers the exited tokens skipped a K/V.

    A token that left the stack with hidden state x [B, T, D] gets, in every layer l >= first_layer,
    the keys/values that layer would compute if x were its input, so later tokens that run those
    layers can attend to it. Only the K/V projections run (no attention, no MLP).

    first_layer: an int, or an int32 array [] or [B] (per row; traced is fine). Layers below a row's
      first_layer are left untouched (their writes are dropped).
    """
    layers = params["layers"]
    first = jnp.broadcast_to(jnp.asarray(first_layer, jnp.int32), (x.shape[0],))[:, None]
    for c in range(cache.num_layers):
        i = c + cache_offset
        if isinstance(first_layer, int) and i < first_layer:
            continue
        k, v = layer_kv(get_layer(layers, i), x, positions, cfg)
        cache = cache.write(c, k, v, jnp.where(i >= first, positions, cache.capacity))  # out of range: dropped
    return cache


def run_layers_dynamic(
    params: Params,
    x: jax.Array,
    cache: KVCache,
    positions: jax.Array,
    cfg: ModelConfig,
    start: jax.Array,
    end: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Like `run_layers` but with traced `start`/`end` (int32 scalars): one compiled loop serves every range.

    Each iteration dispatches to its layer (`switch_in_place`), so weights are read in place. The
    cache must cover the whole stack (no offset).
    """
    layers = unstack_layers(params["layers"])

    def branch(i: int) -> Callable:
        def run(operand):
            x, cache = operand
            x, k, v = traced_once(layers[i], x, *cache.layer(i), positions, cfg)
            return (x, cache.set_layer(i, k, v)), ()

        return run

    branches = [branch(i) for i in range(len(layers))]
    return lax.fori_loop(start, end, lambda i, carry: switch_in_place(i, branches, carry)[0], (x, cache))


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    cfg: ModelConfig,
) -> tuple[jax.Array, KVCache]:
    """Full model over a block: tokens [B, T] at positions [B, T] -> (float32 logits [B, T, V], cache)."""
    x = embed(params, tokens, cfg)
    x, cache = run_layers(params, x, cache, positions, cfg)
    return logits_from_hidden(params, x, cfg), cache
