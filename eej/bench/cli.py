"""`eej bench`: Spec-Bench-style benchmark of decoding methods (and transformers peers) on one model.

    eej bench --model smollm2-135m --questions ../shared/data/eval/spec_bench.jsonl --methods plain \\
        --limit 10 --peers hf,hf-early-exit --out r.json --report r.md --plot r.png

See docs/bench.md for the protocol and the metric definitions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from eej.cli import CliError, add_model_arguments, load_model_from_args, sampling_from_args, subcommand

DEFAULT_MAX_NEW_TOKENS = 256


def _arguments(p: argparse.ArgumentParser) -> None:
    from eej.bench.peers import PEERS
    from eej.bench.questions import CATEGORY_MODES

    add_model_arguments(p)
    p.add_argument("--questions", required=True, help="JSONL in Spec-Bench's schema (question_id, category, turns)")
    p.add_argument("--methods", default="plain", help="comma-separated NAME[:CONFIG]; plain (the baseline) is always run")
    p.add_argument("--categories", default=None, help="comma-separated categories to run (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N questions (by question_id) of each category")
    p.add_argument(
        "--mt-bench-categories", default="auto", choices=CATEGORY_MODES,
        help="merge MT-Bench's eight categories into mt_bench: auto = when the file also has other categories",
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=1, help="questions decoded together (same category)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the Spec-Bench protocol)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit (sampling only)")
    p.add_argument("--top-p", type=float, default=1.0, help="(sampling only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default=None, help=f"comma-separated transformers baselines: {', '.join(PEERS)} (need torch)")
    p.add_argument(
        "--early-exit-layer", type=int, default=None,
        help="layer the hf-early-exit peer drafts from (default: the last layer but one)",
    )
    p.add_argument("--peer-threads", type=int, default=0, help="torch threads for the peers (0 = torch's default)")
    p.add_argument("--no-agreement", action="store_true", help="skip the teacher-forced forwards (token_agreement = null)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--report", default=None, help="markdown report file")
    p.add_argument("--plot", default=None, help="PNG with the speedup and quality/speed plots")
    p.add_argument("--answers", default=None, help="JSONL file with every answer (tokens and text)")
    p.add_argument("--note", default=None, help="free text recorded in the report (e.g. 'machine shared')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command(args: argparse.Namespace) -> str:
    """The full command that reproduces this run (every option explicit)."""
    parts = ["eej", "bench", "--model", args.model, "--questions", args.questions, "--methods", args.methods]
    if args.categories:
        parts += ["--categories", args.categories]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    parts += ["--mt-bench-categories", args.mt_bench_categories, "--max-new-tokens", str(args.max_new_tokens),
              "--batch-size", str(args.batch_size), "--temperature", str(args.temperature), "--seed", str(args.seed)]
    if args.temperature > 0:
        parts += ["--top-k", str(args.top_k), "--top-p", str(args.top_p)]
    if args.dtype != "float32":
        parts += ["--dtype", args.dtype]
    if args.attention != "xla":
        parts += ["--attention", args.attention]
    if args.cache_size is not None:
        parts += ["--cache-size", str(args.cache_size)]
    if args.peers:
        parts += ["--peers", args.peers]
        if "hf-early-exit" in args.peers and args.early_exit_layer is not None:
            parts += ["--early-exit-layer", str(args.early_exit_layer)]
        if args.peer_threads:
            parts += ["--peer-threads", str(args.peer_threads)]
    if args.no_agreement:
        parts.append("--no-agreement")
    for flag in ("out", "report", "plot", "answers"):  # --note is metadata, not part of the experiment
        if getattr(args, flag):
            parts += [f"--{flag}", getattr(args, flag)]
    return shlex.join(parts)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _git_commit() -> str | None:
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


@subcommand("bench", _arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    from eej.bench.contestants import method_contestants
    from eej.bench.machine import load_average, machine_info
    from eej.bench.metrics import summarize
    from eej.bench.peers import load_peers, parse_peers
    from eej.bench.questions import categories_in_order, load_questions, select_questions
    from eej.bench.report import build_document, markdown_report, write_json, write_markdown, write_plot
    from eej.bench.runner import RunSettings, run_bench

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    peer_names = parse_peers(args.peers)
    if "hf-early-exit" in peer_names and args.batch_size > 1:
        raise CliError("the hf-early-exit peer (transformers' assisted generation) runs batch size 1 only")
    questions = load_questions(args.questions, args.mt_bench_categories)
    categories = args.categories.split(",") if args.categories else None
    chosen = select_questions(questions, categories, args.limit)
    sampling = sampling_from_args(args)
    load_start = load_average()

    model = load_model_from_args(args)
    contestants: list[Any] = method_contestants(model, args.methods.split(","), args.cache_size)
    contestants += load_peers(peer_names, args.model, model, args.early_exit_layer, args.peer_threads)
    tok = model.tokenizer

    settings = RunSettings(args.max_new_tokens, args.batch_size, sampling, args.seed)
    total = sum(len(q.turns) for q in chosen) * len(contestants)
    bar = _progress(total, args.no_progress)
    start = time.perf_counter()
    try:
        records, compile_seconds = run_bench(
            contestants, chosen, tok, settings,
            on_answer=lambda r: (bar.set_postfix_str(f"{r.contestant} / {r.category}", refresh=False), bar.update(1)),
        )
    finally:
        bar.close()
    run_seconds = time.perf_counter() - start

    fidelity_seconds = 0.0
    if not args.no_agreement:
        fidelity_seconds = _add_agreement(model, records, args.no_progress)

    order = categories_in_order(chosen)
    names = [c.name for c in contestants]
    summary = summarize(records, names, order, sampling.greedy)
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()}
    run_settings = {
        "command": _command(args),
        "note": args.note,
        "questions": args.questions,
        "questions_sha256": _sha256(args.questions),
        "categories": order,
        "questions_per_category": {c: sum(q.category == c for q in chosen) for c in order},
        "answers_per_contestant": sum(len(q.turns) for q in chosen),
        "limit": args.limit,
        "mt_bench_categories": args.mt_bench_categories,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": args.seed,
        "greedy": sampling.greedy,
        "chat_template": True,
        "warmup": "each contestant answers turn 1 of the first batch once before timing (discarded)",
        "interleaving": "per batch, every contestant in turn; the order rotates by one each batch",
        "methods": [c.name for c in contestants if c.kind == "method"],
        "peers": peer_names,
        "token_agreement": not args.no_agreement,
        "run_seconds": round(run_seconds, 1),
        "fidelity_seconds": round(fidelity_seconds, 1),
        "eej_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    model_info = {"name": model.name, "num_layers": model.cfg.num_layers, "dtype": model.cfg.dtype,
                  "attention": model.cfg.attention_impl, "eos_ids": list(model.cfg.eos_ids)}
    infos = {c.name: c.describe() for c in contestants}
    doc = build_document(model_info, machine, run_settings, summary, infos, compile_seconds)

    if args.out:
        write_json(doc, args.out)
    if args.report:
        write_markdown(doc, args.report)
    if args.plot:
        write_plot(doc, args.plot)
    if args.answers:
        _write_answers(records, args.answers)
    report = markdown_report(doc)
    print(report.split("## Per category")[0].rstrip())
    return 0


def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="answer", desc="eej bench", disable=disabled, file=sys.stderr, mininterval=2.0)


def _add_agreement(model, records, no_progress: bool) -> float:
    """Fill each record's `agreement` from one teacher-forced forward over prompt + answer; -> seconds spent."""
    from tqdm import tqdm

    from eej.bench.fidelity import sequence_argmax
    from eej.bench.metrics import agreement_count

    start = time.perf_counter()
    for r in tqdm(records, desc="token agreement", unit="answer", disable=no_progress, file=sys.stderr, mininterval=2.0):
        if not r.tokens:
            r.agreement = 0
            continue
        argmax = sequence_argmax(model, r.prompt_tokens + r.tokens)
        r.agreement = agreement_count(r.tokens, argmax, len(r.prompt_tokens))
    return time.perf_counter() - start


def _write_answers(records, path: str) -> None:
    import json

    from eej.bench.report import ensure_parent

    ensure_parent(path)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({
                "contestant": r.contestant, "question_id": r.question_id, "category": r.category, "turn": r.turn,
                "prompt_length": len(r.prompt_tokens), "tokens": r.tokens, "text": r.text, "seconds": round(r.seconds, 4),
                "forwards": r.forwards, "layers": r.layers, "agreement": r.agreement,
            }) + "\n")
