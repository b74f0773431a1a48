"""Benchmark decoding methods (and transformers peers) on a questions file, Spec-Bench style.

    eej bench --model smollm2-135m --questions ../shared/data/eval/spec_bench.jsonl --methods plain \\
        --limit 10 --peers hf,hf-early-exit --out r.json --report r.md --plot r.png

See docs/bench.md for the protocol and the metric definitions.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
from typing import Any

from eej.bench.checkpoint import BenchCheckpoint, CheckpointError
from eej.bench.contestants import method_contestants, unique
from eej.bench.machine import load_average
from eej.bench.metrics import RUN_NOISE_SD
from eej.bench.peers import PEERS, load_peers, parse_peers
from eej.bench.questions import CATEGORY_MODES, load_questions, select_questions, with_draws
from eej.bench.report import markdown_report, write_json, write_markdown, write_plot, write_text
from eej.bench.runner import RunSettings, check_prompts_fit
from eej.bench.session import bench_document, git_commit
from eej.cli.options import (
    add_model_arguments,
    add_residual_sampling_argument,
    check_lengths,
    load_model_from_args,
    resolve_attention,
    resolve_matmul,
    sampling_from_args,
    seed_arg,
)
from eej.cli.parser import CliError
from eej.files import check_writable, exclusive

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, attention_list=True)
    p.add_argument("--questions", required=True, help="JSONL in Spec-Bench's schema (question_id, category, turns)")
    p.add_argument("--methods", default="plain",
                   help="comma-separated NAME[:CONFIG], or LABEL=NAME[:CONFIG] to name a contestant "
                        "(again=plain: an A/A control); plain (the baseline) is always run")
    p.add_argument("--categories", default=None, help="comma-separated categories to run (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N questions (by question_id) of each category")
    p.add_argument(
        "--mt-bench-categories", default="auto", choices=CATEGORY_MODES,
        help="merge MT-Bench's eight categories into mt_bench: auto = when the file also has other categories",
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--ignore-eos", action="store_true",
                   help="every answer is exactly --max-new-tokens long (EOS ends nothing): equal work, for speed only")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole interleaved run N times; each answer's time is the mean of its rounds")
    p.add_argument("--run-noise-sd", type=float, default=RUN_NOISE_SD,
                   help="log-scale noise between runs that the speedup intervals also allow for (speedup_run_ci_*; "
                        f"default {RUN_NOISE_SD}, this project's CPU VM: scripts/aa_calibration.py measures a machine's)")
    p.add_argument("--draws", type=int, default=1,
                   help="answer each question N times, each with its own random draws (sampling only): N draws of "
                        "every answer's length instead of one")
    p.add_argument("--batch-size", type=int, default=1, help="questions decoded together (same category)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the Spec-Bench protocol)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit (sampling only)")
    p.add_argument("--top-p", type=float, default=1.0, help="(sampling only)")
    add_residual_sampling_argument(p)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--peers", default=None, help=f"comma-separated transformers baselines: {', '.join(PEERS)} (need torch)")
    p.add_argument(
        "--early-exit-layer", type=int, default=None,
        help="layer the hf-early-exit peer drafts from (default: the last layer but one)",
    )
    p.add_argument("--peer-threads", type=int, default=0, help="torch threads for the peers (0 = torch's default)")
    p.add_argument("--no-agreement", action="store_true", help="skip the teacher-forced forwards (token_agreement = null)")
    p.add_argument("--no-perplexity", action="store_true",
                   help="skip the teacher-forced passes over the references (reference_perplexity = null)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--report", default=None, help="markdown report file")
    p.add_argument("--plot", default=None, help="PNG with the speedup and quality/speed plots")
    p.add_argument("--answers", default=None, help="JSONL file with every answer (tokens and text)")
    p.add_argument("--note", default=None, help="free text recorded in the report (e.g. 'machine shared')")
    p.add_argument(
        "--checkpoint", default=None,
        help="JSONL file keeping every finished batch's answers; run the same command again to continue from it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# The options a checkpoint's answers depend on: resuming with any of them changed is refused.
_RUN_KEYS = ("model", "dtype", "attention", "matmul", "cache_size", "methods", "mt_bench_categories", "max_new_tokens",
             "batch_size",
             "temperature", "top_k", "top_p", "residual_sampling", "seed", "peers", "early_exit_layer", "peer_threads", "ignore_eos", "rounds", "draws")


def _command(args: argparse.Namespace) -> str:
    """The full command that reproduces this run (every option explicit)."""
    parts = ["eej", "bench", "--model", args.model, "--questions", args.questions, "--methods", args.methods]
    if args.categories:
        parts += ["--categories", args.categories]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    parts += ["--mt-bench-categories", args.mt_bench_categories, "--max-new-tokens", str(args.max_new_tokens),
              "--batch-size", str(args.batch_size), "--temperature", str(args.temperature), "--seed", str(args.seed)]
    if args.ignore_eos:
        parts.append("--ignore-eos")
    if args.rounds != 1:
        parts += ["--rounds", str(args.rounds)]
    if args.draws != 1:
        parts += ["--draws", str(args.draws)]
    if args.run_noise_sd != RUN_NOISE_SD:
        parts += ["--run-noise-sd", str(args.run_noise_sd)]
    if args.temperature > 0:
        parts += ["--top-k", str(args.top_k), "--top-p", str(args.top_p)]
        if args.residual_sampling:
            parts.append("--residual-sampling")
    if args.dtype != "float32":
        parts += ["--dtype", args.dtype]
    if args.attention != "auto":
        parts += ["--attention", args.attention]
    if args.matmul != "auto":
        parts += ["--matmul", args.matmul]
    if args.cache_size is not None:
        parts += ["--cache-size", str(args.cache_size)]
    if args.moefy:
        parts += ["--moefy", args.moefy]
    if args.experts_per_token is not None:
        parts += ["--experts-per-token", str(args.experts_per_token)]
    if args.peers:
        parts += ["--peers", args.peers]
        if "hf-early-exit" in args.peers and args.early_exit_layer is not None:
            parts += ["--early-exit-layer", str(args.early_exit_layer)]
        if args.peer_threads:
            parts += ["--peer-threads", str(args.peer_threads)]
    if args.no_agreement:
        parts.append("--no-agreement")
    if args.no_perplexity:
        parts.append("--no-perplexity")
    for flag in ("out", "report", "plot", "answers"):  # --note is metadata, not part of the experiment
        if getattr(args, flag):
            parts += [f"--{flag}", getattr(args, flag)]
    return shlex.join(parts)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(args: argparse.Namespace) -> int:
    """Check every output path, take the locks of --out and --checkpoint (one run per file), then benchmark."""
    outputs = [p for p in (args.report, args.plot, args.answers, args.out) if p]
    check_writable(outputs + ([args.checkpoint] if args.checkpoint else []))
    with exclusive([p for p in (args.out, args.checkpoint) if p]):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.rounds < 1:
        raise CliError(f"--rounds must be >= 1, got {args.rounds}")
    if not args.run_noise_sd >= 0:
        raise CliError(f"--run-noise-sd must be >= 0, got {args.run_noise_sd}")
    attention = unique([resolve_attention(a.strip(), args.dtype) for a in args.attention.split(",") if a.strip()],
                       "--attention")
    if not attention:
        raise CliError("--attention names no implementation")
    matmul = unique([resolve_matmul(m.strip(), args.dtype) for m in args.matmul.split(",") if m.strip()], "--matmul")
    if not matmul:
        raise CliError("--matmul names no implementation")
    peer_names = parse_peers(args.peers)
    if "hf-early-exit" in peer_names and args.batch_size > 1:
        raise CliError("the hf-early-exit peer (transformers' assisted generation) runs batch size 1 only")
    questions = load_questions(args.questions, args.mt_bench_categories)
    categories = args.categories.split(",") if args.categories else None
    sampling = sampling_from_args(args)
    chosen = with_draws(select_questions(questions, categories, args.limit), args.draws, sampling.greedy)
    load_start = load_average()

    model = load_model_from_args(args, attention=attention[0], matmul=matmul[0])
    capacity = check_lengths(model, args.max_new_tokens, args.cache_size)
    check_prompts_fit(chosen, model.tokenizer, args.max_new_tokens, capacity)
    contestants: list[Any] = method_contestants(model, args.methods.split(","), args.cache_size, attention, matmul)
    contestants += load_peers(peer_names, args.model, model, args.early_exit_layer, args.peer_threads)

    described = {
        "command": _command(args),
        "note": args.note,
        "questions": args.questions,
        "questions_sha256": _sha256(args.questions),
        "limit": args.limit,
        "draws": args.draws,
        "mt_bench_categories": args.mt_bench_categories,
    }
    settings = RunSettings(args.max_new_tokens, args.batch_size, sampling, args.seed, ignore_eos=args.ignore_eos,
                           rounds=args.rounds, run_noise_sd=args.run_noise_sd)
    checkpoint = None
    if args.checkpoint:
        run = {k: v for k, v in vars(args).items() if k in _RUN_KEYS}
        run.update(questions_sha256=described["questions_sha256"], questions_chosen=[q.question_id for q in chosen],
                   eej_commit=git_commit())
        try:
            checkpoint = BenchCheckpoint(args.checkpoint, run)
        except CheckpointError as e:
            raise CliError(str(e)) from None
    doc, records = bench_document(
        model, contestants, chosen, settings, described,
        agreement=not args.no_agreement, perplexity=not args.no_perplexity, progress=not args.no_progress, load_average_start=load_start,
        checkpoint=checkpoint,
    )
    # Every file atomically, the JSON last: its presence means the run finished (docs/bench.md, scripts/cloud_job.sh).
    if args.report:
        write_markdown(doc, args.report)
    if args.plot:
        write_plot(doc, args.plot)
    if args.answers:
        _write_answers(records, args.answers)
    if args.out:
        write_json(doc, args.out)
    report = markdown_report(doc)
    print(report.split("## Per category")[0].rstrip())
    return 0


def _write_answers(records, path: str) -> None:
    import json

    write_text("".join(json.dumps({
        "contestant": r.contestant, "question_id": r.question_id, "category": r.category, "turn": r.turn,
        "prompt_length": len(r.prompt_tokens), "tokens": r.tokens, "text": r.text, "seconds": round(r.seconds, 4),
        "forwards": r.forwards, "layers": r.layers, "agreement": r.agreement,
        "reference_nll": r.reference_nll, "reference_tokens": r.reference_tokens,
    }) + "\n" for r in records), path)
