"""The Spec-Bench protocol: every contestant answers the same questions, interleaved, multi-turn.

For each batch of questions (a batch never mixes categories) every contestant runs in turn — the
order rotates from batch to batch — so drift of the machine's speed hits all contestants alike.
A contestant answers turn 1 of each question, then turn 2 with the conversation so far (its own
turn-1 answer as the assistant message), and so on, as Spec-Bench does. Prompts use the model's chat
template. Before timing, each contestant generates once for the first batch (warm-up, discarded).

`rounds` > 1 repeats the whole interleaved run (every batch, every contestant, with the same seeds),
the rotation continuing from round to round; each answer keeps its first round's tokens and the
mean of its rounds' times. `ignore_eos` makes every answer exactly `max_new_tokens` long (the same
work for every contestant: EOS is generated but ends nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from eej.bench.contestants import Contestant
from eej.bench.metrics import RUN_NOISE_SD, AnswerRecord
from eej.bench.questions import Question
from eej.config import SamplingConfig
from eej.weights.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RunSettings:
    max_new_tokens: int = 256
    batch_size: int = 1
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    warmup: bool = True
    ignore_eos: bool = False
    rounds: int = 1
    run_noise_sd: float = RUN_NOISE_SD  # allowed for in speedup_run_ci_* (eej.bench.metrics.run_interval)


def plan_batches(questions: Sequence[Question], batch_size: int, tokenizer: Tokenizer) -> list[list[Question]]:
    """Split `questions` into batches of at most `batch_size`, never mixing categories.

    With batch_size > 1 each category's questions are sorted by turn-1 prompt length first (ties by
    input order), so rows padded together have similar lengths. Batch size 1 keeps the input order.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.category, []).append(q)
    batches: list[list[Question]] = []
    for group in groups.values():
        if batch_size > 1:
            lengths = [len(tokenizer.encode_chat(q.turns[0])) for q in group]
            group = [q for _, _, q in sorted(zip(lengths, range(len(group)), group), key=lambda t: t[:2])]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def check_prompts_fit(questions: Sequence[Question], tokenizer: Tokenizer, max_new_tokens: int, capacity: int) -> None:
    """ValueError naming the first question and turn whose prompt can't fit `capacity` positions with
    `max_new_tokens` more, checked before any answer: turn 1 exactly; a later turn with its earlier
    answers left empty (a lower bound: its real answers only add tokens, so such a turn fails for sure)."""
    for q in questions:
        conversation: list[dict[str, str]] = []
        for turn, text in enumerate(q.turns, 1):
            conversation += [{"role": "user", "content": text}]
            length = len(tokenizer.encode_chat(conversation))
            if length + max_new_tokens > capacity:
                raise ValueError(f"question {q.question_id} turn {turn}: prompt of {length}"
                                 f"{' or more' if turn > 1 else ''} tokens + max_new_tokens {max_new_tokens} exceeds "
                                 f"the {capacity} positions of a row; lower --max-new-tokens or leave the question out")
            conversation += [{"role": "assistant", "content": ""}]


def answer_text(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    """An answer as the assistant message of the next turn (special tokens dropped, stripped, as Spec-Bench)."""
    return tokenizer.decode(tokens).strip()


def _answer_batch(
    contestant: Contestant,
    batch: Sequence[Question],
    tokenizer: Tokenizer,
    settings: RunSettings,
    seed: int,
    on_answer: Callable[[AnswerRecord], None],
    index: int | None = None,
) -> tuple[list[AnswerRecord], float]:
    """All turns of `batch` (the plan's batch `index`) by one contestant -> (records, compile seconds)."""
    conversations: list[list[dict[str, str]]] = [[] for _ in batch]
    records: list[AnswerRecord] = []
    compile_seconds = 0.0
    for turn in range(max(len(q.turns) for q in batch)):
        rows = [i for i, q in enumerate(batch) if len(q.turns) > turn]
        for i in rows:
            conversations[i].append({"role": "user", "content": batch[i].turns[turn]})
        prompts = [tokenizer.encode_chat(conversations[i]) for i in rows]
        gen = contestant.generate(prompts, settings.max_new_tokens, settings.sampling, seed + turn, settings.ignore_eos)
        compile_seconds += gen.compile_seconds
        # The loop ran while any row was generating: as many steps as its longest-running row took.
        loop_steps = max(gen.steps) if gen.steps else 0
        for j, i in enumerate(rows):
            tokens = list(gen.tokens[j])
            text = answer_text(tokenizer, tokens)
            conversations[i].append({"role": "assistant", "content": text})
            record = AnswerRecord(
                contestant=contestant.name,
                question_id=batch[i].question_id,
                category=batch[i].category,
                turn=turn + 1,
                prompt_tokens=list(prompts[j]),
                tokens=tokens,
                seconds=gen.seconds / len(rows),
                forwards=None if gen.forwards is None else int(gen.forwards[j]),
                layers=None if gen.layers is None else float(gen.layers[j]),
                text=text,
                decode_seconds=None if gen.decode_seconds is None else gen.decode_seconds / len(rows),
                row_decode_seconds=(None if gen.decode_seconds is None or gen.steps is None
                                    else gen.decode_seconds * gen.steps[j] / loop_steps if loop_steps else 0.0),
                batch=index,
                **{k: None if getattr(gen, k) is None else int(getattr(gen, k)[j]) for k in ("steps", "speculated_steps", "exited_steps", "checked_steps")},
            )
            records.append(record)
            on_answer(record)
    return records, compile_seconds


def run_bench(
    contestants: Sequence[Contestant],
    questions: Sequence[Question],
    tokenizer: Tokenizer,
    settings: RunSettings,
    on_answer: Callable[[AnswerRecord], None] = lambda r: None,
    completed: Mapping[int, Sequence[AnswerRecord]] | None = None,
    on_batch: Callable[[int, list[AnswerRecord]], None] = lambda b, records: None,
) -> tuple[list[AnswerRecord], dict[str, float]]:
    """Run every contestant on every question (see the module docstring).

    Returns (answer records in run order, rounds combined; compile seconds per contestant, warm-up
    included). on_answer is called after each answer (progress reporting), on_batch with each finished
    batch's index (round * batches + batch) and records (checkpoints). completed: records of batches
    answered before (a resumed run, see eej.bench.checkpoint), taken as they are instead of being
    answered again.
    """
    completed = completed or {}
    if not tokenizer.has_chat_template:
        raise ValueError("the bench uses the model's chat template, and this model's tokenizer has none")
    if settings.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {settings.rounds}")
    batches = plan_batches(questions, settings.batch_size, tokenizer)
    compile_seconds = {c.name: 0.0 for c in contestants}
    if settings.warmup and batches:
        first = batches[0]
        prompts = [tokenizer.encode_chat(q.turns[0]) for q in first]
        for c in contestants:
            gen = c.generate(prompts, settings.max_new_tokens, settings.sampling, settings.seed, settings.ignore_eos)
            compile_seconds[c.name] += gen.compile_seconds
    records: list[AnswerRecord] = []
    turns = max((len(q.turns) for q in questions), default=1)
    for index in range(settings.rounds * len(batches)):
        if index in completed:
            records.extend(completed[index])
            continue
        b = index % len(batches)
        shift = index % len(contestants)
        batch_records: list[AnswerRecord] = []
        for c in [*contestants[shift:], *contestants[:shift]]:
            # The same seed for every contestant on the same batch and turn, in every round.
            new, compile_s = _answer_batch(c, batches[b], tokenizer, settings, settings.seed + b * turns, on_answer, b)
            batch_records.extend(new)
            compile_seconds[c.name] += compile_s
        records.extend(batch_records)
        on_batch(index, batch_records)
    return combine_rounds(records), compile_seconds


def combine_rounds(records: Sequence[AnswerRecord]) -> list[AnswerRecord]:
    """One record per (contestant, question, turn): the first round's, with the mean of all its rounds' times."""
    groups: dict[tuple[str, Any, int], list[AnswerRecord]] = {}
    for r in records:
        groups.setdefault((r.contestant, *r.key), []).append(r)
    out = []
    for rounds in groups.values():
        decode = [r.decode_seconds for r in rounds]
        row_decode = [r.row_decode_seconds for r in rounds]
        out.append(dataclasses.replace(rounds[0], seconds=sum(r.seconds for r in rounds) / len(rounds),
                                       decode_seconds=None if None in decode else sum(decode) / len(decode),
                                       row_decode_seconds=None if None in row_decode else sum(row_decode) / len(row_decode)))
    return out
