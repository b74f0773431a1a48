"""Load a Llama-family `.gguf` file: config, dequantized params and tokenizer, without torch.

Every tensor is checked against the file's metadata: a tensor missing, left over (an extra block,
a bias or table eej's layers lack, such as llama.cpp's `rope_freqs.weight` for Llama 3 RoPE
scaling) or of another shape, a value that is not finite (a damaged file), and a metadata key
missing are each a GGUFError naming the tensor or key.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from eej.config import ModelConfig, RopeConfig
from eej.weights.convert import check_finite, from_hf_layout
from eej.weights.tokenizer import Tokenizer, tokenizer_from_gguf_fields

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


class GGUFError(ValueError):
    """The file is not a GGUF model eej can load."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


@functools.cache
def _reader_class(gguf: Any) -> type:
    """gguf's GGUFReader, reading the file through a plain ndarray view of its memory map instead of the
    `np.memmap` itself (the same bytes, still mapped, not read into memory).

    The reader slices the file once or twice per metadata value, and a GGUF tokenizer holds ~100k strings; a
    slice of an `np.memmap` is another `np.memmap`, whose bookkeeping made reading SmolLM2-135M's metadata take
    1.8 s instead of 0.4 s (issue #19, startup time).
    """

    class Reader(gguf.GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            view = self.__dict__.get("_plain")
            if view is None:  # the memory map is made in __init__, before the first read
                view = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            arr = view[offset : offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows (its RoPE pairs adjacent dims; HF's pairs halves)."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(out_dim, *rest)


def read_gguf(path: str, name: str | None = None) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read `path` -> (config, params in eej layout with layers stacked [L, ...], float32 numpy, tokenizer)."""
    import gguf  # imported lazily: only this loader needs it

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = _reader_class(gguf)(path)
    except Exception as e:  # the gguf package raises assorted errors on non-GGUF input
        raise GGUFError(f"{path} is not a readable GGUF file ({e})") from e
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (eej loads {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    def count(key: str, default: Any = None) -> int:
        """A positive integer metadata value; GGUFError naming the key if it is missing or not one."""
        value = meta(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise GGUFError(f"{path}: metadata {arch}.{key} must be a positive integer, got {value!r}")
        return int(value)

    def number(key: str, default: Any = None) -> float:
        """A positive finite metadata number; GGUFError naming the key otherwise."""
        value = meta(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < float("inf"):
            raise GGUFError(f"{path}: metadata {arch}.{key} must be a positive number, got {value!r}")
        return float(value)

    experts = int(meta("expert_count", 0) or 0)
    if experts:
        raise GGUFError(f"{path}: mixture-of-experts GGUF files ({experts} experts) are not supported; load the model's "
                        "Hugging Face checkpoint directory instead (Mixtral and Qwen2-MoE load from there)")

    n_layers = count("block_count")
    hidden = count("embedding_length")
    n_heads = count("attention.head_count")
    n_kv = count("attention.head_count_kv", n_heads)
    head_dim = count("attention.key_length", hidden // n_heads)
    ffn = count("feed_forward_length")
    rotary = meta("rope.dimension_count")
    if rotary is not None and rotary != head_dim:
        raise GGUFError(f"{path}: metadata {arch}.rope.dimension_count is {rotary} but heads have {head_dim} "
                        "dimensions; partial rotary embeddings are not supported")
    tensors = {t.name: t for t in reader.tensors}
    q, kv = n_heads * head_dim, n_kv * head_dim
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml lists dimensions innermost first
    if meta("vocab_size", vocab) != vocab:
        raise GGUFError(f"{path}: tensor token_embd.weight has {vocab} rows; metadata {arch}.vocab_size is "
                        f"{meta('vocab_size')}")
    shapes = {"attn_norm": (hidden,), "wq": (q, hidden), "wk": (kv, hidden), "wv": (kv, hidden), "wo": (hidden, q),
              "bq": (q,), "bk": (kv,), "bv": (kv,), "mlp_norm": (hidden,), "w_gate": (ffn, hidden),
              "w_up": (ffn, hidden), "w_down": (hidden, ffn)}
    used: set[str] = set()

    def load(tensor_name: str, shape: tuple[int, ...]) -> np.ndarray:
        if tensor_name not in tensors:
            raise GGUFError(f"{path}: tensor {tensor_name} is missing")
        t = tensors[tensor_name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.shape != shape:
            raise GGUFError(f"{path}: tensor {tensor_name} has shape {list(w.shape)}; the metadata gives {list(shape)} "
                            "(embedding_length, feed_forward_length, attention.head_count[_kv] x key_length)")
        check_finite(w, f"{path}: tensor {tensor_name}")
        used.add(tensor_name)
        return w

    embed = load("token_embd.weight", (vocab, hidden))
    layers: dict[str, list[np.ndarray]] = {}
    for key, suffix in _LAYER_TENSORS.items():
        if key in ("bq", "bk", "bv") and f"blk.0.{suffix}" not in tensors:
            continue
        per_layer = []
        for i in range(n_layers):
            w = load(f"blk.{i}.{suffix}", shapes[key])
            if arch != "qwen2" and key in ("wq", "bq"):
                w = _unpermute_rope_rows(w, n_heads)
            elif arch != "qwen2" and key in ("wk", "bk"):
                w = _unpermute_rope_rows(w, n_kv)
            per_layer.append(w)
        layers[key] = per_layer
    params: dict[str, Any] = {
        "embed": embed,
        "layers": layers,  # per-layer lists: from_hf_layout stacks them (transposed) in one copy
        "final_norm": load("output_norm.weight", (hidden,)),
    }
    tied = "output.weight" not in tensors
    if not tied:
        params["lm_head"] = load("output.weight", (vocab, hidden))
    left = sorted(set(tensors) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise GGUFError(f"{path}: tensor {left[0]}{more} is not part of the model the metadata describes "
                        f"({arch}, {n_layers} blocks); eej refuses it rather than compute without it")

    try:
        tokenizer = tokenizer_from_gguf_fields(lambda key, default=None: _field(reader, key, default))
    except Exception as e:  # tokenizers raises assorted errors on malformed vocabularies or merges
        raise GGUFError(f"{path}: the tokenizer metadata can't be used ({' '.join(str(e).split())})") from None
    scaling_type = meta("rope.scaling.type", "none")
    rope = RopeConfig(theta=number("rope.freq_base", 10000.0))
    if scaling_type == "linear":
        rope = RopeConfig(theta=rope.theta, type="linear", factor=number("rope.scaling.factor"))
    elif scaling_type == "yarn":
        rope = RopeConfig(
            theta=rope.theta,
            type="yarn",
            factor=number("rope.scaling.factor"),
            original_max_position=count("rope.scaling.original_context_length"),
        )
    elif scaling_type not in ("none", None):
        raise GGUFError(f"{path}: RoPE scaling {scaling_type!r} is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", eos if eos is not None else 0)
    cfg = ModelConfig(
        name=name or os.path.basename(path),
        vocab_size=embed.shape[0],
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_size=ffn,
        rope=rope,
        rms_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings=tied,
        attention_bias="bq" in layers,
        sliding_window=None,
        max_position=count("context_length", 4096),
        bos_id=None if bos is None else int(bos),
        eos_ids=() if eos is None else (int(eos),),
        pad_id=int(pad) if pad is not None else 0,
    )
    return cfg, from_hf_layout(params), tokenizer
