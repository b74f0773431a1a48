"""One benchmark run from loaded contestants to the JSON document: shared by `eej bench` and `eej.api`.

    doc, records = bench_document(model, contestants, questions, RunSettings(max_new_tokens=64),
                                  described={"command": "...", "questions": "spec_bench.jsonl"})

`described` holds what the caller alone knows about the run (the command that reproduces it, the
questions file); the protocol settings, timings, machine and commit are filled in here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Sequence

from eej.bench.checkpoint import BenchCheckpoint
from eej.bench.contestants import Contestant
from eej.bench.fidelity import sequence_argmax
from eej.bench.machine import load_average, machine_info, peak_rss_mib
from eej.bench.metrics import AnswerRecord, agreement_count, summarize
from eej.bench.quality import Reference, texts
from eej.bench.questions import Question, categories_in_order, references_by_answer
from eej.bench.report import build_document
from eej.bench.runner import RunSettings, plan_batches, run_bench
from eej.decoding.engine import ScoringError
from eej.weights.registry import Model


def bench_document(
    model: Model,
    contestants: Sequence[Contestant],
    questions: Sequence[Question],
    settings: RunSettings,
    described: dict[str, Any],
    *,
    agreement: bool = True,
    perplexity: bool = True,
    progress: bool = True,
    load_average_start: Any = None,
    checkpoint: BenchCheckpoint | None = None,
) -> tuple[dict[str, Any], list[AnswerRecord]]:
    """Run every contestant on `questions` (eej.bench.runner's protocol) -> (bench JSON document, records).

    agreement: compute token_agreement (one teacher-forced forward per answer).
    perplexity: compute reference_perplexity (each method's teacher-forced pass over the references).
    progress: tqdm bars on stderr.
    checkpoint: keeps finished batches on disk and supplies those of an interrupted run.
    """
    load_start = load_average() if load_average_start is None else load_average_start
    total = sum(len(q.turns) for q in questions) * len(contestants) * settings.rounds
    completed = {} if checkpoint is None else dict(checkpoint.completed)
    bar = _progress(total, "eej bench", "answer", progress)
    bar.update(sum(len(r) for r in completed.values()))
    start = time.perf_counter()
    try:
        records, compile_seconds = run_bench(
            contestants, questions, model.tokenizer, settings,
            on_answer=lambda r: (bar.set_postfix_str(f"{r.contestant} / {r.category}", refresh=False), bar.update(1)),
            completed=completed,
            on_batch=(lambda b, r: None) if checkpoint is None else checkpoint.add,
        )
    finally:
        bar.close()
    run_seconds = time.perf_counter() - start
    fidelity_seconds = add_agreement(model, records, progress) if agreement else 0.0
    omitted: dict[str, str] = {}
    if perplexity:
        perplexity_seconds, omitted = add_reference_perplexity(model, contestants, questions, records, settings, progress)
    else:
        perplexity_seconds = 0.0

    order = categories_in_order(questions)
    names = [c.name for c in contestants]
    infos = {c.name: c.describe() for c in contestants}
    sampling = settings.sampling
    summary = summarize(records, names, order, sampling.greedy or sampling.coupled, references_by_answer(questions),
                        run_noise_sd=settings.run_noise_sd)
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
               "peak_rss_mib": peak_rss_mib()}  # read last: the whole run's peak
    run_settings = {
        **described,
        "categories": order,
        "questions_per_category": {c: sum(q.category == c for q in questions) for c in order},
        "answers_per_contestant": sum(len(q.turns) for q in questions),
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "coupled": sampling.coupled and not sampling.greedy,
        "seed": settings.seed,
        "greedy": sampling.greedy,
        "chat_template": True,
        "warmup": "each contestant answers turn 1 of the first batch once before timing (discarded)",
        "interleaving": "per batch, every contestant in turn; the order rotates by one each batch",
        "ignore_eos": settings.ignore_eos,
        "rounds": settings.rounds,
        "run_noise_sd": settings.run_noise_sd,
        "attention": list(dict.fromkeys(i["attention"] for i in infos.values() if "attention" in i)),
        "matmul": list(dict.fromkeys(i["matmul"] for i in infos.values() if "matmul" in i)),
        "methods": [c.name for c in contestants if c.kind == "method"],
        "peers": [c.name for c in contestants if c.kind == "peer"],
        "token_agreement": agreement,
        "reference_perplexity": perplexity,
        "reference_perplexity_omitted": omitted,
        "resumed_batches": len(completed),
        "run_seconds": round(run_seconds, 1),
        "fidelity_seconds": round(fidelity_seconds, 1),
        "perplexity_seconds": round(perplexity_seconds, 1),
        "eej_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    model_info = {"name": model.name, "num_layers": model.cfg.num_layers, "dtype": model.cfg.dtype,
                  "attention": model.cfg.attention_impl, "matmul": model.cfg.matmul_impl, "eos_ids": list(model.cfg.eos_ids)}
    return build_document(model_info, machine, run_settings, summary, infos, compile_seconds), records


def add_agreement(model: Model, records: Sequence[AnswerRecord], progress: bool = True) -> float:
    """Fill each record's `agreement` from one teacher-forced forward over prompt + answer; -> seconds spent."""
    start = time.perf_counter()
    bar = _progress(len(records), "token agreement", "answer", progress)
    for r in records:
        if r.tokens:
            argmax = sequence_argmax(model, r.prompt_tokens + r.tokens)
            r.agreement = agreement_count(r.tokens, argmax, len(r.prompt_tokens))
        else:
            r.agreement = 0
        bar.update(1)
    bar.close()
    return time.perf_counter() - start


def reference_tokens(model: Model, reference: Reference, max_new_tokens: int) -> list[int]:
    """A reference as the answer the chat template puts after the prompt's assistant header: its (first acceptable)
    text stripped, tokenized without special tokens, capped at `max_new_tokens` (what a contestant could generate)."""
    return model.tokenizer.encode(texts(reference)[0].strip())[:max_new_tokens]


def add_reference_perplexity(
    model: Model,
    contestants: Sequence[Contestant],
    questions: Sequence[Question],
    records: Sequence[AnswerRecord],
    settings: RunSettings,
    progress: bool = True,
) -> tuple[float, dict[str, str]]:
    """Fill `reference_nll` and `reference_tokens` of every method's records whose turn has a reference: the reference
    teacher-forced after the record's own prompt through the method's engine (`Engine.score`; lossless methods by plain),
    rows batched as the run batched them (the rows of a batch and turn that have a reference). Peers are not scored.
    -> (seconds spent, {contestant: why it was not scored} for methods that can't score)."""
    references = references_by_answer(questions)
    batch_of = {q.question_id: b for b, batch in enumerate(plan_batches(questions, settings.batch_size, model.tokenizer))
                for q in batch}
    methods = [c for c in contestants if c.kind == "method" and getattr(c, "engine", None) is not None]
    groups: dict[str, dict[tuple[int, int], list[AnswerRecord]]] = {c.name: {} for c in methods}
    for r in records:
        if r.contestant in groups and r.key in references:
            groups[r.contestant].setdefault((batch_of[r.question_id], r.turn), []).append(r)
    start = time.perf_counter()
    bar = _progress(sum(len(g) for g in groups.values()), "reference perplexity", "batch", progress)
    omitted: dict[str, str] = {}
    for c in methods:
        for rows in groups[c.name].values():
            refs = [reference_tokens(model, references[r.key], settings.max_new_tokens) for r in rows]
            try:
                out = c.engine.score([r.prompt_tokens for r in rows], refs, settings.max_new_tokens, seed=settings.seed)
            except ScoringError as e:
                omitted[c.name] = str(e)
                break
            for r, nll, n in zip(rows, out.nll, out.tokens):
                r.reference_nll, r.reference_tokens = nll, n
            bar.update(1)
    bar.close()
    return time.perf_counter() - start, omitted


def _progress(total: int, description: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm  # a widget in a notebook, text on a terminal

    return tqdm(total=total, unit=unit, desc=description, disable=not enabled, file=sys.stderr, mininterval=2.0)


def git_commit() -> str | None:
    """The eej checkout's commit (with -dirty for uncommitted changes), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
