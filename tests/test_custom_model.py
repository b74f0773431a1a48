"""A model of your own (params + a per-layer function) on eej's engine: `eej.custom_model` / ModelConfig.layer_fn.

Checks: the Llama layer written as a user layer_fn reproduces the built-in model exactly; a
different architecture (LayerNorm, GELU, biases, RoPE, GQA) decoded by the engine (cached, batched,
ragged prompts) matches a plain uncached reference loop; `layer_kv` equals what the layer writes;
every registered method runs on such a model (lossless ones produce plain's tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eej
from eej.config import RopeConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import known_methods, random_method
from eej.model.cache import init_cache
from eej.model.rope import apply_rope
from eej.model.transformer import block, layer_kv, linear, mlp, qkv

from eej.testing import random_prompts, tiny_model

HEADS, KV_HEADS, HEAD_DIM, WIDTH, LAYERS, VOCAB = 4, 2, 8, 32, 3, 300
ROPE = RopeConfig(theta=10000.0)


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def gpt_layer(p, x, positions, attend):
    """A pre-LayerNorm GPT-style layer with biases, GELU, RoPE and grouped-query attention."""
    b, t, _ = x.shape
    h = _layer_norm(x, p["ln1"])
    q = (h @ p["wq"] + p["bq"]).reshape(b, t, HEADS, HEAD_DIM)
    k = (h @ p["wk"] + p["bk"]).reshape(b, t, KV_HEADS, HEAD_DIM)
    v = (h @ p["wv"] + p["bv"]).reshape(b, t, KV_HEADS, HEAD_DIM)
    out = attend(apply_rope(q, positions, ROPE), apply_rope(k, positions, ROPE), v)
    x = x + out.reshape(b, t, HEADS * HEAD_DIM) @ p["wo"]
    h = _layer_norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"]


def gpt_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.15):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def norm():
        return {"scale": 1 + w(WIDTH, s=0.1), "bias": w(WIDTH, s=0.05)}

    layers = [
        {"ln1": norm(), "wq": w(WIDTH, HEADS * HEAD_DIM), "bq": w(HEADS * HEAD_DIM, s=0.02),
         "wk": w(WIDTH, KV_HEADS * HEAD_DIM), "bk": w(KV_HEADS * HEAD_DIM, s=0.02),
         "wv": w(WIDTH, KV_HEADS * HEAD_DIM), "bv": w(KV_HEADS * HEAD_DIM, s=0.02),
         "wo": w(HEADS * HEAD_DIM, WIDTH), "ln2": norm(), "w1": w(WIDTH, 4 * WIDTH), "b1": w(4 * WIDTH, s=0.02),
         "w2": w(4 * WIDTH, WIDTH)}
        for _ in range(LAYERS)
    ]
    return {"embed": w(VOCAB, WIDTH, s=1.0), "layers": layers, "final_norm": np.ones(WIDTH, np.float32),
            "lm_head": w(WIDTH, VOCAB, s=1.0)}


def _attend_without_cache(q, k, v):
    """Causal softmax attention over the block itself, KV heads shared by groups of query heads."""
    t = q.shape[1]
    k = jnp.repeat(k, HEADS // KV_HEADS, axis=2)
    v = jnp.repeat(v, HEADS // KV_HEADS, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@jax.jit
def _next_tokens(params: dict, tokens: jax.Array) -> jax.Array:
    """No cache: the whole sequence [1, T] through every layer -> greedy next token at every position [T]."""
    x = params["embed"][tokens]
    for layer in params["layers"]:
        x = gpt_layer(layer, x, jnp.arange(tokens.shape[1])[None], _attend_without_cache)
    h = x[0] * jax.lax.rsqrt(jnp.mean(x[0] * x[0], axis=-1, keepdims=True) + 1e-5) * params["final_norm"]
    return jnp.argmax(h @ params["lm_head"], axis=-1)


def reference_greedy(params: dict, prompt: list[int], steps: int, width: int = 32) -> list[int]:
    """Greedy decoding that recomputes the whole (right-padded: one compile) sequence for each new token."""
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(_next_tokens(params, padded)[len(seq) - 1]))
    return seq[len(prompt):]


def test_own_architecture_matches_an_uncached_reference():
    params = gpt_params()
    model = eej.custom_model(params, gpt_layer, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, name="gpt-test")
    assert model.cfg.num_layers == LAYERS and model.cfg.vocab_size == VOCAB and model.cfg.hidden_size == WIDTH
    prompts = random_prompts(np.random.default_rng(1), [5, 12, 2], VOCAB)
    got = Engine(model).generate(prompts, max_new_tokens=10, eos_ids=()).tokens
    assert got == [reference_greedy(params, p, 10) for p in prompts]


def _llama_as_layer_fn(seed: int):
    """(eej's built-in tiny-gqa, the same model with eej's own Llama layer given through the user interface)."""
    builtin = tiny_model("tiny-gqa", seed=seed)
    cfg = builtin.cfg

    def llama_layer(p, x, positions, attend):
        b, t, _ = x.shape
        q, k, v = qkv(p, x, positions, cfg)
        x = x + linear(attend(q, k, v).reshape(b, t, -1), p["wo"])
        return mlp(p, x, cfg)

    mine = eej.custom_model(builtin.params, llama_layer, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, eos_ids=cfg.eos_ids, ffn_size=cfg.ffn_size)
    return builtin, mine


def test_llama_layer_written_as_a_layer_fn_reproduces_the_builtin_model():
    builtin, mine = _llama_as_layer_fn(3)
    prompts = random_prompts(np.random.default_rng(2), [3, 9, 6], builtin.cfg.vocab_size)
    want = Engine(builtin).generate(prompts, max_new_tokens=12, eos_ids=())
    got = Engine(mine).generate(prompts, max_new_tokens=12, eos_ids=())
    assert got.tokens == want.tokens


def test_layer_kv_is_what_the_layer_writes():
    model = eej.custom_model(gpt_params(), gpt_layer, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    cfg, layer = model.cfg, model.params["layers"][1]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, WIDTH))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cache = init_cache(cfg, 2, 8)
    _, k_cache, v_cache = block(layer, x, cache.k[0], cache.v[0], positions, cfg)
    k, v = layer_kv(layer, x, positions, cfg)
    np.testing.assert_allclose(k_cache[:, :, :5], k.transpose(0, 2, 1, 3), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v_cache[:, :, :5], v.transpose(0, 2, 1, 3), rtol=1e-6, atol=1e-6)


def test_layer_fn_must_attend_exactly_once():
    params = gpt_params()
    never = eej.custom_model(params, lambda p, x, positions, attend: x, num_heads=HEADS, num_kv_heads=KV_HEADS,
                             head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="never called attend"):
        Engine(never).generate([[5, 6]], max_new_tokens=2)

    def twice(p, x, positions, attend):
        return gpt_layer(p, gpt_layer(p, x, positions, attend), positions, attend)

    with pytest.raises(ValueError, match="only once"):
        Engine(eej.custom_model(params, twice, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)).generate(
            [[5, 6]], max_new_tokens=2)


def test_custom_model_input_errors():
    params = gpt_params()
    with pytest.raises(ValueError, match="lack lm_head"):
        eej.custom_model({k: v for k, v in params.items() if k != "lm_head"}, gpt_layer, num_heads=4, num_kv_heads=2,
                         head_dim=8)
    with pytest.raises(ValueError, match="lm_head must be"):
        eej.custom_model({**params, "lm_head": params["lm_head"].T}, gpt_layer, num_heads=4, num_kv_heads=2, head_dim=8)
    small = {**params, "embed": params["embed"][:100], "lm_head": params["lm_head"][:, :100]}
    with pytest.raises(ValueError, match="byte tokenizer"):
        eej.custom_model(small, gpt_layer, num_heads=4, num_kv_heads=2, head_dim=8)


def _gpt(seed: int):
    return eej.custom_model(gpt_params(seed), gpt_layer, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM), VOCAB


@pytest.mark.parametrize("architecture", ["llama-layer-fn", "gpt"])
@pytest.mark.parametrize("method", [m for m in known_methods() if m != "plain"] or ["plain"])
def test_every_method_composes_with_a_custom_model(method, architecture):
    """Each registered method, untrained, on the user's model: it runs, and a lossless one gives plain's tokens.

    On the GPT-style model, a method whose add-ons patch base weights by their Llama names (LoRA) cannot
    apply; it must say so in one clear error (and is skipped), while the Llama-named model runs it.
    """
    if architecture == "llama-layer-fn":  # every add-on's weight names and shapes exist here
        builtin, model = _llama_as_layer_fn(4)
        vocab = builtin.cfg.vocab_size
    else:
        model, vocab = _gpt(4)
    prompts = random_prompts(np.random.default_rng(3), [4, 10], vocab)
    try:
        strategy, method_params = random_method(model, method, seed=0)
        got = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=12, eos_ids=()).tokens
    except ValueError as e:
        if architecture == "gpt" and str(e).startswith("LoRA adapts"):
            pytest.skip(f"{method}: {e}")
        raise
    assert all(len(t) == 12 for t in got)
    if strategy.lossless:
        assert got == Engine(model).generate(prompts, max_new_tokens=12, eos_ids=()).tokens
