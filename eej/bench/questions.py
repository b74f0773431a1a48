"""Benchmark questions in Spec-Bench's schema: one JSON object per line with `question_id`, `category`, `turns`,
and optionally `reference`: one entry per turn, a string or a list of acceptable strings ("" or [] or null: that
turn has none). eej.bench.quality scores answers against them.

    questions = load_questions("../shared/data/eval/spec_bench.jsonl")
    chosen = select_questions(questions, categories=["qa", "rag"], limit=10)
    drawn = with_draws(chosen, 3, greedy=False)  # sampling: each question answered three times (ids 81, 81#2, 81#3)

Category names. Spec-Bench stores its MT-Bench part (question ids 81-160) under MT-Bench's eight
category names; Spec-Bench reports them as one subtask, `mt_bench`. The rule (`mt_bench_categories`):
  "auto"  (default) a file that also holds other categories (a Spec-Bench-style mix) has the eight
          merged into `mt_bench`; a file holding only MT-Bench categories (mt_bench.jsonl) keeps them,
          since there they are the only split there is.
  "merge" always merge the eight into `mt_bench`.
  "keep"  never merge.
A merged question remembers its original category (`source_category`); `--limit N` on a merged
category takes questions round-robin over the original categories (each in question_id order), so
that 10 MT-Bench questions cover all eight categories rather than only `writing`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from eej.bench.quality import Reference
from eej.jsonl import read_jsonl
from eej.settings import REPO_ROOT

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MT_BENCH = "mt_bench"
CATEGORY_MODES = ("auto", "merge", "keep")
# Spec-Bench's questions where the scripts look for them unless told (EEJ_QUESTIONS): next to the checkout.
SPEC_BENCH = os.environ.get("EEJ_QUESTIONS", os.path.join(REPO_ROOT, "..", "shared", "data", "eval", "spec_bench.jsonl"))


class QuestionsError(ValueError):
    """A questions file or a selection that can't be used (the message is one line)."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question: `turns` are the user messages, asked one after another."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    source_category: str | None = None  # the file's category when it was merged into `category`
    references: tuple[Reference | None, ...] = ()  # one per turn (None: no reference), () when the file has none


def load_questions(path: str, mt_bench_categories: str = "auto") -> list[Question]:
    """Read and validate a Spec-Bench-schema JSONL file; categories mapped as the module docstring says."""
    if mt_bench_categories not in CATEGORY_MODES:
        raise QuestionsError(f"mt_bench_categories must be one of {', '.join(CATEGORY_MODES)}, got {mt_bench_categories!r}")
    questions: list[Question] = []
    seen: dict[int | str, int] = {}
    for n, obj in read_jsonl(path, "questions file", QuestionsError):
        question = _parse(obj, f"{path}:{n}")
        if question.question_id in seen:
            raise QuestionsError(
                f"{path}:{n}: question_id {question.question_id!r} already used on line {seen[question.question_id]}"
            )
        seen[question.question_id] = n
        questions.append(question)
    if not questions:
        raise QuestionsError(f"{path} holds no questions")
    return map_categories(questions, mt_bench_categories)


def _parse(obj: object, where: str) -> Question:
    if not isinstance(obj, dict):
        raise QuestionsError(f"{where}: expected a JSON object with question_id, category and turns")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise QuestionsError(f"{where}: missing field(s) {', '.join(missing)} (Spec-Bench schema: question_id, category, turns)")
    qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise QuestionsError(f"{where}: question_id must be an integer or a string, got {qid!r}")
    if not isinstance(category, str) or not category.strip():
        raise QuestionsError(f"{where}: category must be a non-empty string, got {category!r}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise QuestionsError(f"{where}: turns must be a non-empty list of non-empty strings")
    references = _references(obj.get("reference"), len(turns), where)
    return Question(question_id=qid, category=category.strip(), turns=tuple(turns), references=references)


def _references(value: object, turns: int, where: str) -> tuple[Reference | None, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) != turns:
        raise QuestionsError(f"{where}: reference must be a list with one entry per turn ({turns})")
    out: list[Reference | None] = []
    for entry in value:
        if isinstance(entry, list) and all(isinstance(t, str) for t in entry):
            kept = tuple(t for t in entry if t.strip())
            out.append(kept or None)
        elif isinstance(entry, str) or entry is None:
            out.append(entry if entry and entry.strip() else None)
        else:
            raise QuestionsError(f"{where}: each reference must be a string, a list of strings or null, got {entry!r}")
    return tuple(out)


def references_by_answer(questions: Sequence[Question]) -> dict[tuple[int | str, int], Reference]:
    """{(question_id, turn): reference} for the turns (numbered from 1) that have one."""
    return {(q.question_id, turn): ref
            for q in questions for turn, ref in enumerate(q.references, 1) if ref is not None}


def map_categories(questions: Sequence[Question], mode: str = "auto") -> list[Question]:
    """Apply the MT-Bench category rule (see the module docstring) to `questions`."""
    categories = {q.category for q in questions}
    merge = mode == "merge" or (mode == "auto" and not categories <= set(MT_BENCH_CATEGORIES))
    if not merge:
        return list(questions)
    return [
        dataclasses.replace(q, category=MT_BENCH, source_category=q.category) if q.category in MT_BENCH_CATEGORIES else q
        for q in questions
    ]


def categories_in_order(questions: Sequence[Question]) -> list[str]:
    """Categories in the order they first appear in the file."""
    return list(dict.fromkeys(q.category for q in questions))


def select_questions(
    questions: Sequence[Question], categories: Sequence[str] | None = None, limit: int | None = None
) -> list[Question]:
    """The questions of `categories` (default: all, file order), the first `limit` of each by question_id
    (round-robin over the original categories of a merged category).

    Returned grouped by category (in the order of `categories`, else file order), each group sorted by
    question_id: a deterministic function of the file and the arguments.
    """
    available = categories_in_order(questions)
    if categories is None or len(categories) == 0:
        wanted = available
    else:
        wanted = list(dict.fromkeys(c.strip() for c in categories if c.strip()))
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise QuestionsError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                                 f"the file has: {', '.join(available)}")
        if not wanted:
            raise QuestionsError("no categories given")
    if limit is not None and limit < 1:
        raise QuestionsError(f"--limit must be >= 1, got {limit}")
    chosen: list[Question] = []
    for category in wanted:
        group = sorted((q for q in questions if q.category == category), key=_id_key)
        chosen.extend(_first(group, limit) if limit is not None else group)
    return chosen


def with_draws(questions: Sequence[Question], draws: int, greedy: bool) -> list[Question]:
    """Each question `draws` times in a row, copy d > 1 named `<question_id>#<d>` (its references kept): under
    sampling every copy is answered with draws of its own, so a method's speed is measured over several draws of
    each answer's length instead of one (at batch > 1 a batch runs as long as its longest row). Greedy decoding
    would repeat its answers: more than one draw of it is an error."""
    if draws < 1:
        raise QuestionsError(f"--draws must be >= 1, got {draws}")
    if draws > 1 and greedy:
        raise QuestionsError(f"--draws {draws} repeats greedy answers exactly; draws need sampling (--temperature > 0)")
    ids = {q.question_id for q in questions}
    out: list[Question] = []
    for q in questions:
        out.append(q)
        for d in range(2, draws + 1):
            copy_id = f"{q.question_id}#{d}"
            if copy_id in ids:
                raise QuestionsError(f"question_id {copy_id!r} is taken; a draw of question {q.question_id!r} needs it")
            out.append(dataclasses.replace(q, question_id=copy_id))
    return out


def mt_bench_questions(path: str, n: int) -> list[Question]:
    """The first `n` MT-Bench questions of a Spec-Bench-schema file (spec_bench.jsonl or mt_bench.jsonl), one of
    each MT-Bench category in turn: the prompts of the scripts' fixed-length speed runs."""
    return select_questions(load_questions(path, "merge"), [MT_BENCH], n)


def _first(group: list[Question], limit: int) -> list[Question]:
    """The first `limit` of an id-sorted group, round-robin over source categories; returned id-sorted."""
    strata: dict[str | None, list[Question]] = {}
    for q in group:
        strata.setdefault(q.source_category, []).append(q)
    if len(strata) == 1:
        return group[:limit]
    picked: list[Question] = []
    depth = 0
    while len(picked) < limit and any(depth < len(s) for s in strata.values()):
        for stratum in strata.values():
            if depth < len(stratum) and len(picked) < limit:
                picked.append(stratum[depth])
        depth += 1
    return sorted(picked, key=_id_key)


def _id_key(q: Question) -> tuple[int, int | str]:
    # Integer ids sort numerically; string ids (any file in the schema) after them, as strings.
    return (0, q.question_id) if isinstance(q.question_id, int) else (1, q.question_id)
