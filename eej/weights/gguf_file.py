"""Load a Llama-family `.gguf` file: config, dequantized params and tokenizer, without torch.

Every tensor is checked against the file's metadata: a tensor missing, left over (an extra block,
a bias or table eej's layers lack, such as llama.cpp's `rope_freqs.weight` for Llama 3 RoPE
scaling) or of another shape, a value that is not finite (a damaged file), and a metadata key
missing are each a GGUFError naming the tensor or key.

The file's header is parsed here (`open_gguf`) and its tensors mapped, not read; F32, Q4_1 and Q8_0
tensors are dequantized here too, other types by the gguf package. Both give the gguf package's values
bit for bit, sooner (issue #19, startup time): its reader builds a numpy view per metadata value (0.65 s
for SmolLM2-135M's 49k-token vocabulary and merges, 0.05 s here) and its dequantizers work 16 rows at a
time (0.9 s for SmolLM2-135M's tensors, 0.25 s here).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from eej.config import ModelConfig, RopeConfig
from eej.weights.convert import check_finite, empty_aligned, from_hf_layout
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

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
# GGUF metadata value types: the struct format of each scalar one (8 is a string, 9 an array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRUCTS = {code: struct.Struct("<" + code) for code in _SCALARS.values()}
_U64 = _STRUCTS["Q"]


class GGUFError(ValueError):
    """The file is not a GGUF model eej can load."""


class GGUFTensor(NamedTuple):
    name: str
    type: int  # ggml type, a gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, outermost first (the file lists dimensions innermost first)
    data: np.ndarray  # uint8 [n_bytes]: the tensor's bytes, mapped from the file


class _Header:
    """Reads the values of a GGUF header (little-endian) one after another from the mapped file `buf`."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.offset = buf, path, 0

    def error(self, why: str) -> GGUFError:
        return GGUFError(f"{self.path} is not a readable GGUF file ({why})")

    def skip(self, size: int) -> int:
        """The offset of the next `size` bytes, moving past them."""
        start = self.offset
        if start + size > len(self.buf):
            raise self.error("it ends inside its header: truncated?")
        self.offset += size
        return start

    def scalar(self, code: str) -> Any:
        unpack = _STRUCTS[code]
        return unpack.unpack_from(self.buf, self.skip(unpack.size))[0]

    def strings(self, count: int) -> list[str]:
        """`count` strings, each a u64 byte length then UTF-8; in one loop, as a vocabulary holds ~100k of them."""
        buf, offset, out = self.buf, self.offset, []
        for _ in range(count):
            if offset + 8 > len(buf):
                raise self.error("it ends inside its header: truncated?")
            size = _U64.unpack_from(buf, offset)[0]
            offset += 8 + size
            out.append(buf[offset - size:offset].decode())
        if offset > len(buf):
            raise self.error("it ends inside its header: truncated?")
        self.offset = offset
        return out

    def value(self, kind: int) -> Any:
        """One metadata value of GGUF type `kind`: an int, float, bool or str, or a list of them (an array)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.strings(1)[0]
        if kind != 9:
            raise self.error(f"metadata value type {kind} is unknown")
        item, count = self.scalar("I"), self.scalar("Q")
        if item == 8:
            return self.strings(count)
        if item in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item])
            return np.frombuffer(self.buf, dtype, count, self.skip(count * dtype.itemsize)).tolist()
        return [self.value(item) for _ in range(count)]


def open_gguf(path: str) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """A GGUF file's metadata (key -> int, float, bool, str or list) and tensors (name -> GGUFTensor, data mapped
    from the file, in file order); GGUFError if it is not a GGUF file (version 2 or 3, little-endian)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GGUFError(f"{path} is not a readable GGUF file (it is empty)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header = _Header(buf, path)
    try:
        if buf[:4] != _MAGIC:
            raise header.error("it does not start with the GGUF magic bytes")
        header.skip(4)
        version = header.scalar("I")
        if version not in _VERSIONS:
            big_endian = int.from_bytes(version.to_bytes(4, "little"), "big") in _VERSIONS
            raise header.error("it is big-endian; eej reads little-endian GGUF files" if big_endian else
                               f"version {version}; eej reads versions 2 and 3")
        n_tensors, n_keys = header.scalar("Q"), header.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key, kind = header.strings(1)[0], header.scalar("I")
            if key in metadata:
                raise header.error(f"metadata key {key} appears twice")
            if key == "general.alignment" and kind != 4:
                raise header.error("metadata general.alignment must be a uint32")
            metadata[key] = header.value(kind)
        infos = []
        for _ in range(n_tensors):
            name, n_dims = header.strings(1)[0], header.scalar("I")
            dims = [header.scalar("Q") for _ in range(n_dims)]
            infos.append((name, dims, header.scalar("I"), header.scalar("Q")))
    except UnicodeDecodeError:
        raise header.error("a metadata key, value or tensor name is not UTF-8") from None
    alignment = metadata.get("general.alignment", 32)
    if alignment < 1 or alignment & (alignment - 1):
        raise header.error(f"metadata general.alignment is {alignment}, not a power of two")
    start = -(-header.offset // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, kind, offset in infos:
        if name in tensors:
            raise header.error(f"tensor {name} appears twice")
        try:
            kind = GGMLQuantizationType(kind)
        except ValueError:
            raise header.error(f"tensor {name} has ggml type {kind}, which the gguf package does not know") from None
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise header.error(f"tensor {name} has rows of {dims[0]} values, not whole {kind.name} blocks of {block}")
        size = math.prod(dims) // block * block_bytes
        if start + offset + size > len(buf):
            raise header.error(f"tensor {name} runs past the end of the file: truncated?")
        data = np.frombuffer(buf, np.uint8, size, start + offset)
        tensors[name] = GGUFTensor(name, kind, tuple(reversed(dims)), data)
    return metadata, tensors


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """A tensor's values, float32 [shape]: F32, Q4_1 and Q8_0 (SmolLM2-135M's types) here, a whole tensor at once
    with the gguf package's arithmetic (the same bits); other types by `gguf.quants.dequantize`.

    GGUFError if the gguf package can't dequantize the type either."""
    import gguf

    kind, shape = tensor.type, tensor.shape
    if kind == gguf.GGMLQuantizationType.F32:
        return tensor.data.view(np.float32).reshape(shape)
    if kind == gguf.GGMLQuantizationType.Q8_0:  # blocks of 32: f16 scale, 32 int8
        blocks = tensor.data.reshape(-1, 34)
        values = empty_aligned((len(blocks), 32), np.float32)
        values[:] = blocks[:, 2:].view(np.int8)
        values *= blocks[:, :2].view(np.float16).astype(np.float32)
        return values.reshape(shape)
    if kind == gguf.GGMLQuantizationType.Q4_1:  # blocks of 32: f16 scale, f16 minimum, 16 bytes of 2 nibbles
        blocks = tensor.data.reshape(-1, 20)
        values = empty_aligned((len(blocks), 32), np.float32)
        values[:, :16] = blocks[:, 4:] & 0x0F  # the low nibbles are values 0-15, the high ones 16-31
        values[:, 16:] = blocks[:, 4:] >> 4
        values *= blocks[:, 0:2].view(np.float16).astype(np.float32)
        values += blocks[:, 2:4].view(np.float16).astype(np.float32)
        return values.reshape(shape)
    try:
        values = gguf.quants.dequantize(tensor.data.reshape(*shape[:-1], -1), kind)
    except NotImplementedError:
        raise GGUFError(f"tensor {tensor.name} is stored as {kind.name}, which eej can't dequantize (the gguf package "
                        "can't either); convert the model to another type, such as Q8_0 or F16") from None
    return np.asarray(values, dtype=np.float32)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows (its RoPE pairs adjacent dims; HF's pairs halves)."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(out_dim, *rest)


def read_gguf(path: str, name: str | None = None) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read `path` -> (config, params in eej layout with layers stacked [L, ...], float32 numpy, tokenizer)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    fields, tensors = open_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (eej loads {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

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
    q, kv = n_heads * head_dim, n_kv * head_dim
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    vocab = tensors["token_embd.weight"].shape[0]
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
        if t.shape != shape:
            raise GGUFError(f"{path}: tensor {tensor_name} has shape {list(t.shape)}; the metadata gives {list(shape)} "
                            "(embedding_length, feed_forward_length, attention.head_count[_kv] x key_length)")
        try:
            w = dequantize(t)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        check_finite(w, f"{path}: tensor {tensor_name}")
        used.add(tensor_name)
        return w

    embed = load("token_embd.weight", (vocab, hidden))

    def layer(key: str, i: int) -> np.ndarray:
        w = load(f"blk.{i}.{_LAYER_TENSORS[key]}", shapes[key])
        if arch != "qwen2" and key in ("wq", "bq"):
            return _unpermute_rope_rows(w, n_heads)
        if arch != "qwen2" and key in ("wk", "bk"):
            return _unpermute_rope_rows(w, n_kv)
        return w

    def per_layer(key: str) -> Iterator[np.ndarray]:
        return (layer(key, i) for i in range(n_layers))

    # Each layer's tensor is dequantized and copied into the stack (eej's layout) in turn: one is held at a time.
    present = [key for key, suffix in _LAYER_TENSORS.items() if key not in ("bq", "bk", "bv") or f"blk.0.{suffix}" in tensors]
    params: dict[str, Any] = {"embed": embed, "layers": {key: per_layer(key) for key in present},
                              "final_norm": load("output_norm.weight", (hidden,))}
    tied = "output.weight" not in tensors
    if not tied:
        params["lm_head"] = load("output.weight", (vocab, hidden))
    params = from_hf_layout(params, n_layers)  # reads the layers: before the check of what was used
    left = sorted(set(tensors) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise GGUFError(f"{path}: tensor {left[0]}{more} is not part of the model the metadata describes "
                        f"({arch}, {n_layers} blocks); eej refuses it rather than compute without it")

    try:
        tokenizer = tokenizer_from_gguf_fields(fields.get)
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
    eos = fields.get("tokenizer.ggml.eos_token_id")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    pad = fields.get("tokenizer.ggml.padding_token_id", eos if eos is not None else 0)
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
        attention_bias="bq" in present,
        sliding_window=None,
        max_position=count("context_length", 4096),
        bos_id=None if bos is None else int(bos),
        eos_ids=() if eos is None else (int(eos),),
        pad_id=int(pad) if pad is not None else 0,
    )
    return cfg, params, tokenizer
