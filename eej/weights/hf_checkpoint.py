"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) without torch.

Llama, Mistral and Qwen2 style decoders, and the mixtures of experts Mixtral and Qwen2-MoE (into the
layout of eej.model.moe). Per-layer tensors are mapped by an explicit name table and stacked on a
leading layer axis. Experts are read either one by one (`experts.{j}.w1.weight`, the Hub's naming,
also what transformers 5 writes by default) or fused (`experts.gate_up_proj` [E, 2Fe, D] and
`experts.down_proj` [E, D, Fe], what transformers 5 writes with `save_original_format=False`).

Every tensor in the files is checked against config.json, as transformers does: a tensor missing,
left over (an extra layer, a bias eej's layers lack) or of another shape, a value that is not finite,
a required key missing and a config option eej does not implement (mlp_bias, an o_proj bias, some
layers with a sliding window and some without) are each a CheckpointError naming the tensor or key,
never a model that silently computes something else.
"""

from __future__ import annotations

import glob
import json
import os
import math
import re
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from eej.config import ModelConfig, RopeConfig
from eej.weights.convert import check_finite, from_hf_layout

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


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (memory-mapped, bf16 via ml_dtypes).

    The header is checked before anything is read: its length against the file's, and each tensor's
    dtype, shape and byte range against the data; a damaged file is a CheckpointError naming it.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < header_len <= min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} does not fit its "
                                  f"{size} bytes); the file is damaged — download or convert it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is damaged")
    data_size = size - 8 - header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_size else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _header_entry(path, name, info, data_size)
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    return out


def _header_entry(path: str, name: str, info: Any, data_size: int) -> tuple[Any, list[int], tuple[int, int]]:
    """(numpy dtype, shape, byte range) of one tensor's header entry, checked against the file's data size."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: tensor {name} lacks dtype, shape or data_offsets in the header (file damaged)")
    if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    shape, offsets = info["shape"], info["data_offsets"]
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not (isinstance(shape, list) and all(map(is_count, shape)) and isinstance(offsets, list) and len(offsets) == 2
            and all(map(is_count, offsets))):
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r} or data_offsets {offsets!r}")
    dtype = _DTYPES[info["dtype"]]
    start, end = offsets
    if not start <= end <= data_size or end - start != math.prod(shape) * np.dtype(dtype).itemsize:
        raise CheckpointError(f"{path}: tensor {name} ({info['dtype']} {shape}) has data_offsets {offsets} that don't "
                              f"match its size or the file's {data_size} data bytes; the file is damaged")
    return dtype, shape, (start, end)


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


_REQUIRED = object()


def _int(hf: dict[str, Any], key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """config[key] as an int >= minimum (null counts as absent); CheckpointError naming the key."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"key {key!r} is missing")
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise CheckpointError(f"key {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise CheckpointError(f"key {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _number(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"key {key!r} must be a finite number, got {value!r}")
    return float(value)


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The ModelConfig fields of a Mixtral / Qwen2-MoE config (none for a dense model).

    Router jitter and auxiliary losses only act in training, so they are not read.
    """
    if model_type == "mixtral":  # every layer MoE; top-k weights always renormalised
        return dict(num_experts=_int(hf, "num_local_experts"), experts_per_token=_int(hf, "num_experts_per_tok"),
                    moe_ffn_size=_int(hf, "intermediate_size"), moe_norm_topk=True)
    if model_type == "qwen2_moe" and _int(hf, "num_experts", 0, minimum=0) > 0:
        mlp_only, step = hf.get("mlp_only_layers") or [], _int(hf, "decoder_sparse_step", 1)
        if mlp_only or step != 1:
            raise CheckpointError(
                f"Qwen2-MoE with dense layers among the MoE ones (mlp_only_layers={mlp_only}, decoder_sparse_step="
                f"{step}) is not supported: eej needs every layer to be a mixture of experts"
            )
        return dict(num_experts=_int(hf, "num_experts"), experts_per_token=_int(hf, "num_experts_per_tok"),
                    moe_ffn_size=_int(hf, "moe_intermediate_size"), moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
                    shared_expert_ffn_size=_int(hf, "shared_expert_intermediate_size", 0, minimum=0))
    return {}


def _attention_bias(hf: dict[str, Any], model_type: str) -> bool:
    """Whether q/k/v have biases, as transformers builds each model type; an o_proj bias is refused."""
    if model_type == "llama" and hf.get("attention_bias"):
        raise CheckpointError("key 'attention_bias' is true: a Llama attention with biases has an o_proj bias too, "
                              "which eej's attention lacks (not supported)")
    return {"qwen2": True, "qwen2_moe": bool(hf.get("qkv_bias", True))}.get(model_type, False)


def _sliding_window(hf: dict[str, Any], model_type: str, num_layers: int) -> int | None:
    """The sliding window of every layer (None: full attention), as transformers reads it per model type.

    Mistral and Mixtral slide in every layer when `sliding_window` is set. Qwen2 and Qwen2-MoE choose per
    layer (`layer_types`, else derived from `use_sliding_window` and `max_window_layers`); eej uses one
    window for all layers, so a mixture is refused.
    """
    window = hf.get("sliding_window")
    if model_type in ("mistral", "mixtral"):
        return None if window is None else _int(hf, "sliding_window")
    if model_type not in ("qwen2", "qwen2_moe"):
        return None
    if not (hf.get("use_sliding_window") and window):
        return None
    types = hf.get("layer_types")
    if types is None:
        first = _int(hf, "max_window_layers", 28, minimum=0)
        if model_type == "qwen2":
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention" if i % 2 == 0 and i < first else "full_attention" for i in range(num_layers)]
    kinds = {"full_attention", "sliding_attention"}
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= kinds:
        raise CheckpointError(f"key 'layer_types' must list full_attention or sliding_attention for each of the "
                              f"{num_layers} layers, got {types!r}")
    if len(set(types)) > 1:
        raise CheckpointError(f"layers {[i for i, t in enumerate(types) if t == 'sliding_attention']} have a sliding "
                              "window and the others not (layer_types / use_sliding_window, max_window_layers): "
                              "not supported, eej uses one attention window for every layer")
    return _int(hf, "sliding_window") if types[0] == "sliding_attention" else None


def config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """A transformers config.json dict -> ModelConfig; CheckpointError naming a missing, malformed or
    unsupported key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported (eej loads {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act {act!r} is not supported (eej's MLP is SwiGLU: silu)")
    if hf.get("mlp_bias"):
        raise CheckpointError("key 'mlp_bias' is true: eej's MLP has no biases (not supported)")
    heads = _int(hf, "num_attention_heads")
    hidden = _int(hf, "hidden_size")
    layers = _int(hf, "num_hidden_layers")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos_ids):
        raise CheckpointError(f"key 'eos_token_id' must be a token id or a list of them, got {eos!r}")
    pad = _int(hf, "pad_token_id", None, minimum=0)
    try:
        return ModelConfig(
            name=name,
            vocab_size=_int(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_int(hf, "num_key_value_heads", heads),
            head_dim=_int(hf, "head_dim", hidden // heads),
            ffn_size=_int(hf, "intermediate_size"),
            rope=_rope_from_hf(hf),
            rms_eps=_number(hf, "rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(hf, model_type),
            sliding_window=_sliding_window(hf, model_type, layers),
            max_position=_int(hf, "max_position_embeddings", 4096),
            bos_id=_int(hf, "bos_token_id", None, minimum=0),
            eos_ids=eos_ids,
            pad_id=pad if pad else (eos_ids[0] if eos_ids else 0),
            **_moe_fields(hf, model_type),
        )
    except (TypeError, ValueError) as e:  # RoPE parameters, ModelConfig's own checks
        raise CheckpointError(str(e)) from None


# HF shape of each per-layer tensor, in the dimension names of `_dims`.
_LAYER_SHAPES = {"attn_norm": ("D",), "wq": ("Q", "D"), "wk": ("K", "D"), "wv": ("K", "D"), "wo": ("D", "Q"),
                 "bq": ("Q",), "bk": ("K",), "bv": ("K",), "mlp_norm": ("D",),
                 "w_gate": ("F", "D"), "w_up": ("F", "D"), "w_down": ("D", "F")}


def _dims(cfg: ModelConfig, model_type: str) -> dict[str, tuple[int, str]]:
    """Dimension name -> (size, the config.json keys it comes from)."""
    experts, moe_ffn = (("num_local_experts", "intermediate_size") if model_type == "mixtral"
                        else ("num_experts", "moe_intermediate_size"))
    return {"D": (cfg.hidden_size, "hidden_size"), "V": (cfg.vocab_size, "vocab_size"),
            "F": (cfg.ffn_size, "intermediate_size"),
            "Q": (cfg.num_heads * cfg.head_dim, "num_attention_heads * head_dim"),
            "K": (cfg.num_kv_heads * cfg.head_dim, "num_key_value_heads * head_dim"),
            "E": (cfg.num_experts, experts), "Fe": (cfg.moe_ffn_size, moe_ffn),
            "2Fe": (2 * cfg.moe_ffn_size, f"2 * {moe_ffn}"),
            "Fs": (cfg.shared_expert_ffn_size, "shared_expert_intermediate_size"), "1": (1, "1")}


def _load_config(cfg_path: str, name: str) -> tuple[dict[str, Any], ModelConfig]:
    """config.json -> (its dict, ModelConfig); CheckpointError naming the file and the key."""
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of config keys")
    try:
        return hf, config_from_hf(hf, name)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def read_hf_checkpoint(path: str, name: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a checkpoint directory -> (config, params in eej layout with layers stacked [L, ...], float32 numpy).

    CheckpointError (naming the file and the tensor or key) when the files don't hold exactly the
    tensors config.json describes (see the module docstring).
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    hf, cfg = _load_config(cfg_path, name or path)
    model_type = hf["model_type"]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files (eej reads safetensors, not .bin)")
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in files:
        for key, value in read_safetensors(file).items():
            if key in tensors:
                raise CheckpointError(f"{file}: tensor {key} is also in {origin[key]}; remove one of the files")
            tensors[key], origin[key] = value, file
    dims = _dims(cfg, model_type)
    used: set[str] = set()

    def take(key: str, shape: tuple[str, ...]) -> np.ndarray:
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key} is missing")
        want = tuple(dims[d][0] for d in shape)
        if tuple(tensors[key].shape) != want:
            raise CheckpointError(f"{origin[key]}: tensor {key} has shape {list(tensors[key].shape)}; config.json "
                                  f"gives {list(want)} ({', '.join(dims[d][1] for d in shape)})")
        used.add(key)
        value = np.asarray(tensors[key], dtype=np.float32)
        check_finite(value, f"{origin[key]}: tensor {key}")
        return value

    skip = {"bq", "bk", "bv"} if not cfg.attention_bias else set()
    skip |= {"w_gate", "w_up", "w_down"} if cfg.is_moe else set()  # the experts' instead
    layers = {}
    for ours, theirs in _LAYER_NAMES.items():
        if ours in skip:
            continue
        shape = _LAYER_SHAPES[ours]
        layers[ours] = np.stack([take(f"model.layers.{i}.{theirs}", shape) for i in range(cfg.num_layers)])
    if cfg.is_moe:
        per_layer = [_moe_layer(tensors, take, i, cfg, model_type) for i in range(cfg.num_layers)]
        layers.update({k: np.stack([t[k] for t in per_layer]) for k in per_layer[0]})
    params: dict[str, Any] = {"embed": take("model.embed_tokens.weight", ("V", "D")), "layers": layers,
                              "final_norm": take("model.norm.weight", ("D",))}
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", ("V", "D"))
    _refuse_leftovers(cfg, model_type, sorted(set(tensors) - used, key=_natural), origin)
    return cfg, from_hf_layout(params)


def _refuse_leftovers(cfg: ModelConfig, model_type: str, left: list[str], origin: dict[str, str]) -> None:
    """CheckpointError naming the first tensor no part of the model reads (transformers refuses those too)."""
    # Buffers older transformers saved (recomputed), and the head of tied embeddings (transformers ties it).
    tied_head = "lm_head.weight" if cfg.tie_embeddings else None
    left = [k for k in left if not k.endswith(".rotary_emb.inv_freq") and k != tied_head]
    if not left:
        return
    first = left[0]
    layer = re.match(r"model\.layers\.(\d+)\.", first)
    if layer and int(layer.group(1)) >= cfg.num_layers:
        why = f"layer {layer.group(1)} is beyond num_hidden_layers={cfg.num_layers}"
    elif first.endswith(".bias"):
        why = "eej's layers have no such bias"
    else:
        why = f"eej's {model_type} model has no such weight"
    more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
    raise CheckpointError(f"{origin[first]}: tensor {first}{more} is not part of the model config.json describes "
                          f"({why}); eej refuses it rather than compute without it")


def _moe_layer(tensors: dict[str, np.ndarray], take: Callable[[str, tuple[str, ...]], np.ndarray], i: int,
               cfg: ModelConfig, model_type: str) -> dict[str, np.ndarray]:
    """Layer i's MoE tensors in HF orientation: router [E, D], w_gate/w_up [E, Fe, D], w_down [E, D, Fe]
    (+ shared_w_gate/shared_w_up [Fs, D], shared_w_down [D, Fs], shared_gate [1, D])."""
    blocks, (gate_name, up_name, down_name) = _MOE_NAMES[model_type]
    found = [b for b in blocks if f"model.layers.{i}.{b}.gate.weight" in tensors]
    base = f"model.layers.{i}.{found[0] if found else blocks[0]}"
    fe = cfg.moe_ffn_size
    out = {"router": take(f"{base}.gate.weight", ("E", "D"))}
    if f"{base}.experts.gate_up_proj" in tensors:  # fused (transformers 5)
        gate_up = take(f"{base}.experts.gate_up_proj", ("E", "2Fe", "D"))
        out["w_gate"], out["w_up"] = gate_up[:, :fe], gate_up[:, fe:]
        out["w_down"] = take(f"{base}.experts.down_proj", ("E", "D", "Fe"))
    else:  # one tensor per expert (the Hub's naming)
        for ours, theirs, shape in (("w_gate", gate_name, ("Fe", "D")), ("w_up", up_name, ("Fe", "D")),
                                    ("w_down", down_name, ("D", "Fe"))):
            out[ours] = np.stack([take(f"{base}.experts.{j}.{theirs}.weight", shape) for j in range(cfg.num_experts)])
    if cfg.shared_expert_ffn_size:
        shapes = {"shared_w_gate": ("Fs", "D"), "shared_w_up": ("Fs", "D"), "shared_w_down": ("D", "Fs"),
                  "shared_gate": ("1", "D")}
        out.update({ours: take(f"{base}.{theirs}", shapes[ours]) for ours, theirs in _SHARED_NAMES.items()})
    return out
