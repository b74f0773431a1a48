"""Self-distillation: the model's own answers to training prompts, the data a draft or an exit should learn from.

A drafter must predict what the model says, not what a data set's authors wrote. `distill` asks the model, with
eej's batched engine, to answer every prompt of the training files — the first answer greedy, further ones
sampled at `temperature` — and writes `{"prompt", "response", "sample"}` lines into shards of `shard_size`
answers under the output directory (`shard-00000.jsonl`, ...), which `eej train ... --data OUT/*.jsonl` reads like
any chat data. The run is resumable: running it again with the same options writes only the answers missing (an
answer an interruption cut short is removed and answered again; a different model or options in the same directory
is an error, and so is a second run while one writes there). A resumed run's sampled answers are not those an
uninterrupted run would have drawn (their keys follow the batches), its greedy ones are. Prompts are batched by
length; a progress bar shows the answers done and the time left.

Evaluation prompts are never distilled: a file under a folder named `eval` (Spec-Bench, MT-Bench) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import numpy as np

from eej.config import SamplingConfig
from eej.decoding.engine import Engine
from eej.train.data import read_examples
from eej.train.loop import run_lock
from eej.train.trainers import TrainError, check_options, option
from eej.weights.registry import Model

MANIFEST = "distill.json"
# The training files (under ../shared/data/train) whose prompts the shipped add-ons' answers came from, in the order
# their `eej distill --data` named them (docs/kangaroo.md): the shuffle permutes the files' concatenation, so another
# order is another sequence of prompts.
SHIPPED_FILES = ("roleplay-simple-deduped-roleplay-instruct.json", "toolformer-dedupe-only-dataset.json",
                 "codegen-instruct.json", "gsm8k_train.jsonl")


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """`eej distill`'s options (see the module docstring)."""

    files: tuple[str, ...] = option(help="training files whose prompts the model answers", flag="data")
    max_prompts: int | None = option(None, "the first N prompts of a seeded shuffle (default: all)")
    max_prompt_tokens: int = option(256, "skip prompts longer than this (chat-formatted)", at_least=1, integer=True)
    max_new_tokens: int = option(256, "the longest answer", at_least=1, integer=True)
    samples: int = option(1, "answers per prompt: the first greedy, the others sampled", at_least=1, integer=True)
    temperature: float = option(0.7, "temperature of the sampled answers", at_least=0.0)
    batch_size: int = option(16, "prompts answered together", at_least=1, integer=True)
    shard_size: int = option(1000, "answers per shard file", at_least=1, integer=True)
    seed: int = option(0, "the prompts' shuffle and the sampled answers' keys")

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", (self.files,) if isinstance(self.files, str) else tuple(self.files))
        check_options(self, "distill")
        evaluation = [f for f in self.files if "eval" in os.path.normpath(os.path.abspath(f)).split(os.sep)[:-1]]
        if evaluation:
            raise TrainError(f"{evaluation[0]} is an evaluation file: benchmark prompts are never distilled or trained on")


def distill_prompts(model: Model, options: DistillOptions) -> list[tuple[str, list[int]]]:
    """The prompts to answer, in the run's order: (text, chat-formatted token ids), long ones skipped."""
    examples = [ex for path in options.files for ex in read_examples(path) if ex.prompt is not None]
    if not examples:
        raise TrainError(f"no prompts in {', '.join(options.files)} (raw text files have none)")
    order = np.random.default_rng(options.seed).permutation(len(examples))
    prompts = []
    for i in order:
        ids = model.tokenizer.encode_chat(examples[i].prompt)
        if len(ids) <= options.max_prompt_tokens:
            prompts.append((examples[i].prompt, ids))
        if options.max_prompts is not None and len(prompts) == options.max_prompts:
            break
    return prompts


def _shards(out_dir: str) -> list[str]:
    return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith("shard-") and n.endswith(".jsonl"))


def _written(out_dir: str) -> Iterator[dict]:
    """The answers on disk; a line an interruption cut short is removed from its shard (it is answered again)."""
    for path in _shards(out_dir):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if len(rows) != len(lines) or (lines and not lines[-1].endswith("\n")):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            os.replace(path + ".tmp", path)
        yield from rows


def distill(model: Model, options: DistillOptions, out_dir: str, progress: bool = True) -> list[str]:
    """Answer the prompts (see the module docstring) into shards under `out_dir`; returns the shard paths."""
    with run_lock(out_dir):  # a second distillation into the same directory is refused
        return _distill(model, options, out_dir, progress)


def _distill(model: Model, options: DistillOptions, out_dir: str, progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    # The kernels too: their sums round differently, and greedy answers can differ where two tokens nearly tie.
    manifest = {"model": model.name, "options": dataclasses.asdict(options),
                "kernels": {"attention": model.cfg.attention_impl, "matmul": model.cfg.matmul_impl}}
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        now = json.loads(json.dumps(manifest))
        if before != now and {**before, "kernels": now["kernels"]} == now:
            kernels = before.get("kernels", {}).get("matmul")
            raise TrainError(f"{out_dir} was answered with {kernels} kernels ({path}); resume it with --kernels {kernels}, "
                             "or use another --out")
        if before != now:
            raise TrainError(f"{out_dir} holds a distillation with other settings ({path}); use another --out")
    else:
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
    prompts = distill_prompts(model, options)
    done = {(r["prompt"], r["sample"]) for r in _written(out_dir)}
    todo = [(text, ids, s) for s in range(options.samples) for text, ids in prompts if (text, s) not in done]
    todo.sort(key=lambda item: (item[2], len(item[1])))  # greedy first; similar lengths together
    engine = Engine(model)
    shard, count = len(_shards(out_dir)), 0
    bar = tqdm(total=len(prompts) * options.samples, initial=len(done), desc="distill", unit="answer", disable=not progress)
    f = None
    try:
        for start in range(0, len(todo), options.batch_size):
            chunk = todo[start : start + options.batch_size]
            sample = chunk[0][2]
            sampling = SamplingConfig() if sample == 0 else SamplingConfig(temperature=options.temperature)
            out = engine.generate([ids for _, ids, _ in chunk], options.max_new_tokens, sampling,
                                  seed=options.seed * 1_000_003 + start + sample)
            for (text, _, s), ids in zip(chunk, out.tokens):
                if f is None or count == options.shard_size:
                    f = f.close() if f else None
                    f, count = open(os.path.join(out_dir, f"shard-{shard:05d}.jsonl"), "a", encoding="utf-8"), 0
                    shard += 1
                f.write(json.dumps({"prompt": text, "response": model.tokenizer.decode(ids), "sample": s}) + "\n")
                count += 1
            f.flush()
            bar.update(len(chunk))
    finally:
        if f is not None:
            f.close()
        bar.close()
    return _shards(out_dir)
