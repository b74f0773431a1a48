"""Training text: chat-formatted instruction/response pairs with assistant-only loss masks.

Readers (chosen by file content, not name):
  *.json   a list of {"instruction", "input", "response"} objects (GPTeacher)
  *.jsonl  one object per line with a prompt field ("question" | "instruction" | "prompt") and a
           response field ("answer" | "response" | "output") (GSM8K and similar)
  *.txt    raw text, cut into chunks; every token is a target (no chat template)

Files are read by path (e.g. from ../shared/data/train); nothing is copied into the repository.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from eej.jsonl import parse_jsonl
from eej.train.trainers import TrainError, check_options, option
from eej.weights.registry import Model
from eej.weights.tokenizer import Tokenizer

_PROMPT_KEYS = ("question", "instruction", "prompt")
_RESPONSE_KEYS = ("answer", "response", "output")


class DataError(TrainError):
    """A training data file is missing or not in a supported format."""


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The training text: files (any mix of the formats above), sequence length, optional cap on sequences."""

    files: tuple[str, ...] = option(help="training files (e.g. ../shared/data/train/*.json)", flag="data")
    seq_len: int = option(256, at_least=8, integer=True)
    max_examples: int | None = option(None, "cap the number of training sequences")

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", (self.files,) if isinstance(self.files, str) else tuple(self.files))
        check_options(self, "training data")


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation: the user turn and the assistant's answer (raw text: prompt is None)."""

    prompt: str | None
    response: str


@dataclasses.dataclass
class TokenizedData:
    """Fixed-length training sequences.

    tokens: [N, T] int32, right-padded with the pad id.
    loss_mask: [N, T] float32, 1 where tokens[n, t] is a training target (an assistant token).
    lengths: [N] int32 real lengths.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, index: np.ndarray) -> "TokenizedData":
        return TokenizedData(self.tokens[index], self.loss_mask[index], self.lengths[index])


def read_examples(path: str, txt_chunk_chars: int = 1500) -> list[Example]:
    """All examples of one file (see the module docstring for formats)."""
    if not os.path.isfile(path):
        raise DataError(f"training data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".txt"):
        return [Example(None, text[i : i + txt_chunk_chars]) for i in range(0, len(text), txt_chunk_chars)]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = [(f"{path}: record {n}", r) for n, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = [(f"{path}:{n}", obj) for n, obj in parse_jsonl(text.splitlines(), path, DataError)]
    examples = []
    for where, r in records:
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object with a prompt and a response field, "
                            f"got {type(r).__name__}")
        prompt_key = next((k for k in _PROMPT_KEYS if k in r), None)
        response_key = next((k for k in _RESPONSE_KEYS if k in r), None)
        if prompt_key is None or response_key is None:
            raise DataError(
                f"{where}: no prompt field ({'/'.join(_PROMPT_KEYS)}) or response field ({'/'.join(_RESPONSE_KEYS)})"
            )
        prompt = str(r[prompt_key])
        if r.get("input"):
            prompt = f"{prompt}\n\n{r['input']}"
        examples.append(Example(prompt, str(r[response_key])))
    return examples


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int) -> TokenizedData:
    """Chat-format, tokenize, truncate to `seq_len`, pad; mask = the assistant's tokens (end-of-turn included)."""
    tokens = np.full((len(examples), seq_len), tokenizer.hf.pad_token_id or 0, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    lengths = np.zeros((len(examples),), np.int32)
    for i, ex in enumerate(examples):
        if ex.prompt is None:
            ids = tokenizer.encode(ex.response)
            start = 1
        else:
            prefix = tokenizer.encode_chat([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
            full = tokenizer.encode_chat(
                [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}],
                add_generation_prompt=False,
            )
            ids, start = full, len(prefix)
        ids = ids[:seq_len]
        tokens[i, : len(ids)] = ids
        mask[i, start : len(ids)] = 1.0
        lengths[i] = len(ids)
    return TokenizedData(tokens, mask, lengths)


def load_training_data(
    paths: Iterable[str], tokenizer: Tokenizer, seq_len: int, max_examples: int | None = None, seed: int = 0
) -> TokenizedData:
    """Read, shuffle (deterministically), cap at `max_examples` and tokenize every file in `paths`.

    Sequences whose assistant part was cut away entirely by truncation are dropped.
    """
    examples: list[Example] = []
    for path in paths:
        examples.extend(read_examples(path))
    if not examples:
        raise DataError("no training examples in the given files")
    order = np.random.default_rng(seed).permutation(len(examples))
    if max_examples is not None:
        order = order[:max_examples]
    data = tokenize_examples([examples[i] for i in order], tokenizer, seq_len)
    kept = data.subset(np.nonzero(data.loss_mask.sum(axis=1) > 0)[0])
    if not len(kept):
        raise DataError(f"no training example keeps an answer token within seq_len={seq_len} (truncation cut every "
                        "answer away): raise --seq-len or use shorter prompts")
    return kept


def file_digests(paths: Iterable[str]) -> list[str]:
    """The sha256 of each file's bytes: what a run or a cache built from these files depends on (not their paths)."""
    out = []
    for path in paths:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise DataError(f"training data file not found: {path}") from None
        out.append(digest.hexdigest())
    return out


def split_rows(n: int, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of n sequences, both in one seeded random order: round(n * eval_fraction)
    held out, at least one if eval_fraction > 0."""
    order = np.random.default_rng(seed + 1).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 else 0
    return order[n_eval:], order[:n_eval]


def split(data: TokenizedData, eval_fraction: float, seed: int = 0) -> tuple[TokenizedData, TokenizedData]:
    """(train, held-out) split of `data` (see `split_rows`)."""
    train_rows, eval_rows = split_rows(len(data), eval_fraction, seed)
    return data.subset(train_rows), data.subset(eval_rows)


def token_ranking(tokens: np.ndarray, loss_mask: np.ndarray, always: Sequence[int] = ()) -> np.ndarray:
    """Token ids ordered by how often they are training targets (ties: lower id first); `always` first.

    Only tokens that occur are ranked. tokens, loss_mask: [N, T].
    """
    counts = np.bincount(tokens[loss_mask > 0].astype(np.int64), minlength=int(tokens.max()) + 1)
    seen = np.nonzero(counts)[0]
    ranked = seen[np.lexsort((seen, -counts[seen]))]
    first = [int(t) for t in always]
    return np.asarray(first + [int(t) for t in ranked if int(t) not in first], np.int32)


def prepare_data(model: Model, data: DataOptions, eval_fraction: float, seed: int) -> tuple[TokenizedData, np.ndarray, np.ndarray, np.ndarray]:
    """Training sequences and their split -> (data, train_rows, eval_rows, token ranking of the train answers).

    Deterministic, so an evaluation script given the same options sees the same held-out rows (sorted).
    """
    tokenized = load_training_data(data.files, model.tokenizer, data.seq_len, data.max_examples, seed)
    train_rows, eval_rows = (np.sort(rows) for rows in split_rows(len(tokenized), eval_fraction, seed))
    if not len(train_rows):
        raise DataError(f"all {len(tokenized)} training sequences are held out: more data or a smaller --eval-fraction")
    ranking = token_ranking(tokenized.tokens[train_rows], tokenized.loss_mask[train_rows], always=model.cfg.eos_ids)
    return tokenized, train_rows, eval_rows, ranking


def predicting_positions(loss_mask: np.ndarray) -> np.ndarray:
    """[N, T] bool: position t predicts an assistant token (the target at t + 1 is in the loss)."""
    out = np.zeros(loss_mask.shape, bool)
    out[:, :-1] = loss_mask[:, 1:] > 0
    return out


def length_batches(data: TokenizedData, batch_size: int, description: str,
                   progress: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Every sequence of `data` in batches of similar length, shortest first: (start, rows [b], tokens [batch_size, W]),
    W the batch's longest length rounded up to a multiple of 64 (a pass costs what the real tokens cost), the last
    batch padded with copies of its last row (one compiled shape per width)."""
    from tqdm.auto import tqdm

    order = np.argsort(data.lengths, kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc=description, disable=not progress):
        rows = order[start : start + batch_size]
        tokens = data.tokens[rows, : min(data.tokens.shape[1], -(-int(data.lengths[rows].max()) // 64) * 64)]
        yield start, rows, np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - len(rows), axis=0)])


def batch_indices(n: int, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Indices [batch_size] of the sequences (out of n) in the batch for `step`: a pure function of
    (step, seed), so a resumed run sees the same data. Walks through the data in epochs, each a fresh
    permutation."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    index = order[offset * batch_size : offset * batch_size + batch_size]
    if len(index) < batch_size:  # tiny data sets: wrap around
        index = np.resize(order, batch_size)
    return index


def batch_at(data: TokenizedData, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch for `step` (see `batch_indices`)."""
    index = batch_indices(len(data), step, batch_size, seed)
    return {"tokens": data.tokens[index], "loss_mask": data.loss_mask[index], "lengths": data.lengths[index]}


def sample_positions(predicting: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to `count` (row, column) pairs where `predicting` [B, T] is set, padded to `count`; -> (rows, cols, real)."""
    rows, cols = np.nonzero(predicting)
    if len(rows) > count:
        keep = np.sort(rng.choice(len(rows), count, replace=False))
        rows, cols = rows[keep], cols[keep]
    real = len(rows)
    pad = count - real
    return (np.concatenate([rows, np.zeros(pad, rows.dtype)]).astype(np.int32),
            np.concatenate([cols, np.zeros(pad, cols.dtype)]).astype(np.int32), real)
