"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) without torch.

Llama, Mistral and Qwen2 style decoders, and the mixtures of experts Mixtral and Qwen2-MoE (into the
layout of eej.model.moe). Per-layer tensors are mapped by an explicit name table and stacked on a
leading layer axis. Experts are read either one by one (`experts.{j}.w1.weight`, the Hub's naming,
also what transformers 5 writes by default) or fused (`experts.gate_up_proj` [E, 2Fe, D] and
`experts.down_proj` [E, D, Fe], what transformers 5 writes with `save_original_format=False`).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from eej.config import ModelConfig, RopeConfig
from eej.weights.convert import from_hf_layout

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
# model_type -> (names of the MoE sub-block, first found is used; per-expert names of gate, up, down)
_MOE_NAMES = {
    "mixtral": (("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "qwen2_moe": (("mlp",), ("gate_proj", "up_proj", "down_proj")),
}
_SHARED_NAMES = {"shared_w_gate": "shared_expert.gate_proj.weight", "shared_w_up": "shared_expert.up_proj.weight",
                 "shared_w_down": "shared_expert.down_proj.weight", "shared_gate": "shared_expert_gate.weight"}
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}


class CheckpointError(ValueError):
    """The directory is not a checkpoint eej can load."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (memory-mapped, bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})  # transformers v5
    legacy = hf.get("rope_scaling") or {}  # transformers v4
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind not in ("linear", "llama3", "yarn"):
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported (eej supports linear, llama3, yarn)")
    original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    return RopeConfig(
        theta=theta,
        type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The ModelConfig fields of a Mixtral / Qwen2-MoE config (none for a dense model).

    Router jitter and auxiliary losses only act in training, so they are not read.
    """
    if model_type == "mixtral":  # every layer MoE; top-k weights always renormalised
        return dict(num_experts=int(hf["num_local_experts"]), experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_ffn_size=int(hf["intermediate_size"]), moe_norm_topk=True)
    if model_type == "qwen2_moe" and int(hf.get("num_experts") or 0) > 0:
        mlp_only, step = hf.get("mlp_only_layers") or [], int(hf.get("decoder_sparse_step", 1))
        if mlp_only or step != 1:
            raise CheckpointError(
                f"Qwen2-MoE with dense layers among the MoE ones (mlp_only_layers={mlp_only}, decoder_sparse_step="
                f"{step}) is not supported: eej needs every layer to be a mixture of experts"
            )
        return dict(num_experts=int(hf["num_experts"]), experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_ffn_size=int(hf["moe_intermediate_size"]), moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
                    shared_expert_ffn_size=int(hf.get("shared_expert_intermediate_size") or 0))
    return {}


def config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """A transformers config.json dict -> ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported (eej loads {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act {act!r} is not supported (eej's MLP is SwiGLU: silu)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    sliding = hf.get("sliding_window") if (model_type in ("mistral", "mixtral") or hf.get("use_sliding_window")) else None
    bias = hf.get("attention_bias", hf.get("qkv_bias", model_type in ("qwen2", "qwen2_moe")))
    return ModelConfig(
        name=name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        ffn_size=int(hf["intermediate_size"]),
        rope=_rope_from_hf(hf),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(bias),
        sliding_window=None if sliding is None else int(sliding),
        max_position=int(hf.get("max_position_embeddings", 4096)),
        bos_id=hf.get("bos_token_id"),
        eos_ids=eos_ids,
        pad_id=int(hf.get("pad_token_id") or (eos_ids[0] if eos_ids else 0)),
        **_moe_fields(hf, model_type),
    )


def read_hf_checkpoint(path: str, name: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a checkpoint directory -> (config, params in eej layout with layers stacked [L, ...], float32 numpy)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    with open(cfg_path) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, name or path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files (eej reads safetensors, not .bin)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))

    def take(key: str) -> np.ndarray:
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key} is missing")
        return np.asarray(tensors[key], dtype=np.float32)

    layers = {}
    for ours, theirs in _LAYER_NAMES.items():
        if (ours in ("bq", "bk", "bv") and not cfg.attention_bias) or (cfg.is_moe and ours in ("w_gate", "w_up", "w_down")):
            continue
        layers[ours] = np.stack([take(f"model.layers.{i}.{theirs}") for i in range(cfg.num_layers)])
    if cfg.is_moe:
        per_layer = [_moe_layer(tensors, take, i, cfg, hf["model_type"]) for i in range(cfg.num_layers)]
        layers.update({k: np.stack([t[k] for t in per_layer]) for k in per_layer[0]})
    params: dict[str, Any] = {"embed": take("model.embed_tokens.weight"), "layers": layers, "final_norm": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight")
    return cfg, from_hf_layout(params)


def _moe_layer(tensors: dict[str, np.ndarray], take: Callable[[str], np.ndarray], i: int, cfg: ModelConfig, model_type: str) -> dict[str, np.ndarray]:
    """Layer i's MoE tensors in HF orientation: router [E, D], w_gate/w_up [E, Fe, D], w_down [E, D, Fe]
    (+ shared_w_gate/shared_w_up [Fs, D], shared_w_down [D, Fs], shared_gate [1, D])."""
    blocks, (gate_name, up_name, down_name) = _MOE_NAMES[model_type]
    found = [b for b in blocks if f"model.layers.{i}.{b}.gate.weight" in tensors]
    base = f"model.layers.{i}.{found[0] if found else blocks[0]}"
    e, fe, d = cfg.num_experts, cfg.moe_ffn_size, cfg.hidden_size
    out = {"router": take(f"{base}.gate.weight")}
    if f"{base}.experts.gate_up_proj" in tensors:  # fused (transformers 5)
        gate_up, down = take(f"{base}.experts.gate_up_proj"), take(f"{base}.experts.down_proj")
        if gate_up.shape != (e, 2 * fe, d) or down.shape != (e, d, fe):
            raise CheckpointError(f"{base}.experts: gate_up_proj {list(gate_up.shape)} / down_proj {list(down.shape)}, "
                                  f"the config needs {[e, 2 * fe, d]} / {[e, d, fe]}")
        out["w_gate"], out["w_up"], out["w_down"] = gate_up[:, :fe], gate_up[:, fe:], down
    else:  # one tensor per expert (the Hub's naming)
        for ours, theirs in (("w_gate", gate_name), ("w_up", up_name), ("w_down", down_name)):
            out[ours] = np.stack([take(f"{base}.experts.{j}.{theirs}.weight") for j in range(e)])
    if cfg.shared_expert_ffn_size:
        out.update({ours: take(f"{base}.{theirs}") for ours, theirs in _SHARED_NAMES.items()})
    return out
