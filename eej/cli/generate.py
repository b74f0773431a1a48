"""Generate text with a decoding method.

    eej generate --model NAME (--prompt TEXT | --batch-file FILE.jsonl) [--method NAME[:CONFIG]] [--chat] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax

from eej.cli.options import (
    add_model_arguments,
    add_parallel_arguments,
    add_sampling_arguments,
    check_lengths,
    device_description,
    load_model_from_args,
    mesh_from_args,
    sampling_from_args,
)
from eej.cli.parser import CliError
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method
from eej.jsonl import read_jsonl


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_parallel_arguments(p)
    p.add_argument("--method", default="plain", help="decoding method, NAME[:CONFIG]")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--batch-file", help="JSONL file with one {\"prompt\": ...} object per line")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows decoded together (with --batch-file): the other prompts wait in a queue and each takes "
                        "the first row to free up (on a mesh: batches, one after another)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-stream", action="store_true", help="don't stream tokens to the terminal")
    add_sampling_arguments(p)


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) of each line of a JSONL file of {"prompt": str} objects."""
    prompts = []
    for n, obj in read_jsonl(path, "batch file", CliError):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise CliError(f'{path}:{n}: expected an object with a string "prompt" field')
        prompts.append((n, obj["prompt"]))
    if not prompts:
        raise CliError(f"{path} holds no prompts")
    return prompts


def check_prompts(prompts: list[list[int]], where: list[str], max_new_tokens: int, capacity: int, room: str) -> None:
    """Every prompt fits `capacity` positions with `max_new_tokens` more, checked before any is decoded;
    an error names the prompt's `where` (the batch file's line) and `room` (what limits the positions)."""
    for ids, place in zip(prompts, where):
        if not ids:
            raise CliError(f"{place}: the prompt is empty")
        if len(ids) + max_new_tokens > capacity:
            raise CliError(f"{place}: prompt of {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceeds "
                           f"{room} of {capacity} positions; shorten it or lower --max-new-tokens")


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.batch_file is None):
        raise CliError("give exactly one of --prompt TEXT or --batch-file FILE.jsonl")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = sampling_from_args(args)
    if args.prompt is not None:
        texts, where = [args.prompt], ["--prompt"]
    else:
        lines = read_prompt_file(args.batch_file)
        texts, where = [t for _, t in lines], [f"{args.batch_file}:{n}" for n, _ in lines]

    mesh = mesh_from_args(args)
    model = load_model_from_args(args, mesh=mesh)
    capacity = check_lengths(model, args.max_new_tokens, args.cache_size)
    strategy, method_params = build_method(model, args.method)
    engine = Engine(model, strategy, method_params, cache_size=args.cache_size, mesh=mesh)
    # On a mesh the engine holds its own placed copy of the params: drop ours, or, where placing copied every
    # shard (a `model` split), one more full copy of the weights stays resident for the whole run.
    model, method_params = engine.model, engine.method_params
    tok = model.tokenizer
    prompts = [tok.encode_chat(t) if args.chat else tok.encode(t) for t in texts]
    room = "the cache" if args.cache_size is not None else "the model's context"
    check_prompts(prompts, where, args.max_new_tokens, capacity, room)

    lead = jax.process_index() == 0  # every process computes; the first one reports
    stream = lead and not args.json and not args.no_stream and len(prompts) == 1 and sys.stdout.isatty()
    # Prompts of similar length decode side by side (less padding); results go back in input order. Off a mesh they
    # form one queue (Engine.generate's batch_size: no row idles while a prompt waits); on one, batches in turn.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict[str, Any]] = [{} for _ in prompts]
    seconds = compile_seconds = decode_seconds = 0.0
    decode_tokens = 0
    chunk_size = args.batch_size if mesh is not None or stream else len(order)
    for start in range(0, len(order), chunk_size):
        rows = order[start : start + chunk_size]
        chunk = [prompts[i] for i in rows]
        if stream:
            out = _stream_to_terminal(engine, chunk[0], args, sampling)
        else:
            out = engine.generate(chunk, args.max_new_tokens, sampling, seed=args.seed,
                                  batch_size=None if mesh is not None else args.batch_size)
        seconds += out.seconds
        compile_seconds += out.compile_seconds
        decode_seconds += out.decode_seconds
        decode_tokens += sum(out.new_tokens) - len(chunk)  # the first token of each row comes from the prefill
        for i, ids in zip(rows, out.tokens):
            results[i] = {"prompt": texts[i], "text": tok.decode(ids), "token_ids": ids, "new_tokens": len(ids)}
    total = sum(r["new_tokens"] for r in results)
    tps = total / seconds if seconds > 0 else 0.0
    if not lead:
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "model": model.name,
                    "method": args.method,
                    "outputs": results,
                    "seconds": seconds,
                    "tokens_per_second": tps,
                    "device": device_description(),
                    "attention": model.cfg.attention_impl,
                    "matmul": model.cfg.matmul_impl,
                    "mesh": None if mesh is None else dict(mesh.shape),
                    "processes": jax.process_count(),
                    "compile_seconds": compile_seconds,
                    "compile_cache_hits": engine.compile_cache_hits,
                }
            )
        )
        return 0
    if not stream:
        for r in results:
            if len(results) > 1:
                print(f"### {r['prompt']}")
            print(r["text"])
    decode_rate = decode_tokens / decode_seconds if decode_seconds > 0 else 0.0
    print(
        f"[{total} tokens in {seconds:.2f} s: {tps:.1f} tokens/s overall, {decode_rate:.1f} tokens/s decoding "
        f"(prefill {seconds - decode_seconds:.2f} s); method {args.method}; compile {compile_seconds:.1f} s not counted"
        f"{f' ({engine.compile_cache_hits} programs from the compile cache)' if engine.compile_cache_hits else ''}; "
        f"{device_description()}]",
        file=sys.stderr,
    )
    return 0


def _stream_to_terminal(engine, prompt: list[int], args: argparse.Namespace, sampling):
    """Print text as it is generated (incremental detokenization); returns the GenerationOutput."""
    tok = engine.model.tokenizer
    stream = engine.stream([prompt], args.max_new_tokens, sampling, seed=args.seed)
    ids: list[int] = []
    printed = ""
    for new in stream:
        ids.extend(new[0])
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            continue
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return stream.output
