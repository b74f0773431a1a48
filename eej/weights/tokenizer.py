"""Tokenizers and chat templates, built without torch.

A GGUF file carries its byte-level BPE vocabulary, merges, special tokens and chat template in its
metadata; `tokenizer_from_gguf_fields` rebuilds a `tokenizers` BPE tokenizer from them. A Hugging
Face checkpoint directory ships `tokenizer.json`, loaded with transformers' fast tokenizer class.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

# Pre-tokenizer split patterns of the BPE families GGUF names in `tokenizer.ggml.pre`.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """Text <-> token ids, the chat template, and the ids that end a turn.

    Wraps a transformers `PreTrainedTokenizerFast` (which needs no torch).
    """

    def __init__(self, hf_tokenizer: Any, eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        ids = list(eos_ids)
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.append(hf_tokenizer.eos_token_id)
        self.eos_ids: tuple[int, ...] = tuple(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no BOS added; chat templates add what they need as text)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: Sequence[dict[str, str]] | str, add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}], or one user message as a string) with the chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; run without --chat")
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict[str, str]] | str, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.chat_prompt(messages, add_generation_prompt))


def _bpe_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    patterns = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
    if pre in patterns:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated", invert=False), byte_level]
        )
    raise ValueError(
        f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; load the model from a Hugging Face "
        "checkpoint directory (with tokenizer.json) instead"
    )


def tokenizer_from_gguf_fields(field: Callable[..., Any]) -> Tokenizer:
    """Build the tokenizer from GGUF metadata; `field(key, default)` reads one metadata value."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (eej rebuilds byte-level BPE, 'gpt2'); load the "
            "model from a Hugging Face checkpoint directory instead"
        )
    if field("tokenizer.ggml.tokens") is None:
        raise ValueError("GGUF metadata tokenizer.ggml.tokens is missing: the file carries no vocabulary")
    tokens: list[str] = list(field("tokenizer.ggml.tokens"))
    types: list[int] = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    raw.pre_tokenizer = _bpe_pre_tokenizer(field("tokenizer.ggml.pre"))
    raw.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: matched whole in text, never split by BPE.
    specials = [AddedToken(tokens[i], special=(t == 3), normalized=False) for i, t in enumerate(types) if t in (3, 4)]
    raw.add_special_tokens([s for s in specials if s.special])
    raw.add_tokens([s for s in specials if not s.special])

    def token(key: str) -> str | None:
        idx = field(key)
        return None if idx is None or idx >= len(tokens) else tokens[idx]

    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=field("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return Tokenizer(hf)


def tokenizer_from_directory(path: str) -> Tokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json [+ tokenizer_config.json, generation_config.json])
    -> Tokenizer; ValueError naming the file that is missing or can't be read."""
    import json
    import os

    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # tokenizers and transformers raise assorted errors on a missing or damaged file
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise ValueError(f"{path} has no tokenizer.json (eej reads fast tokenizers: save one with "
                             "transformers' tokenizer.save_pretrained)") from None
        raise ValueError(f"{path}: tokenizer.json or tokenizer_config.json can't be read "
                         f"({' '.join(str(e).split()) or type(e).__name__})") from None
    eos: list[int] = []
    gen_cfg = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_cfg):
        try:
            with open(gen_cfg, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ValueError(f"{gen_cfg}: not a JSON object") from None
        eos = value if isinstance(value, list) else ([] if value is None else [value])
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
            raise ValueError(f"{gen_cfg}: eos_token_id must be a token id or a list of them, got {value!r}")
    return Tokenizer(tok, eos_ids=eos)
