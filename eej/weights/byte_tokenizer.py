"""A byte-level tokenizer with ChatML specials, for the tiny random test models.

Ids 0..2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; ids 3..258 are the 256 bytes. Any text
round-trips, so the CLI and the bench harness run end to end on tiny models in tests.
"""

from __future__ import annotations

from eej.weights.tokenizer import Tokenizer

BYTE_VOCAB_SIZE = 259
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_CHATML,
        clean_up_tokenization_spaces=False,
    )
    return Tokenizer(hf)


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to `char`."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    # Non-printable bytes are mapped to 256 + their rank among the non-printable ones.
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
