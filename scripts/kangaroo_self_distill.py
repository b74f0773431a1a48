"""Self-distillation data: the model's own greedy answers to training prompts, as a JSONL training file.

A draft must predict what the model says, not what a data set's authors wrote. This script asks
the model (with the eej engine, in batches) to answer the prompts of the given training files and
writes {"prompt", "response"} lines that `eej train ... --data OUT.jsonl` reads like any chat data.

    python scripts/kangaroo_self_distill.py --data ../shared/data/train/*.json* \
        --out runs/self_distill.jsonl --max-examples 1600

Rows are generated in batches of similar prompt length; the output order is the (seeded) input order.
Re-running with the same --out appends only the prompts not written yet (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", nargs="+", required=True, help="training files with prompts (see eej.train.data)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--max-examples", type=int, default=1600)
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer prompts")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from eej.decoding.engine import Engine
    from eej.train.data import read_examples
    from eej.weights.registry import load_model

    model = load_model(args.model)
    tok = model.tokenizer
    examples = [ex for path in args.data for ex in read_examples(path) if ex.prompt is not None]
    order = np.random.default_rng(args.seed).permutation(len(examples))
    prompts: list[tuple[str, list[int]]] = []
    for i in order:
        ids = tok.encode_chat(examples[i].prompt)
        if len(ids) <= args.max_prompt_tokens:
            prompts.append((examples[i].prompt, ids))
        if len(prompts) == args.max_examples:
            break

    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["prompt"] for line in f if line.strip()}
    todo = [(text, ids) for text, ids in prompts if text not in done]
    todo.sort(key=lambda item: len(item[1]))
    engine = Engine(model)
    start, made = time.perf_counter(), 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for b in range(0, len(todo), args.batch_size):
            chunk = todo[b : b + args.batch_size]
            out = engine.generate([ids for _, ids in chunk], max_new_tokens=args.max_new_tokens)
            for (text, _), ids in zip(chunk, out.tokens):
                f.write(json.dumps({"prompt": text, "response": tok.decode(ids)}) + "\n")
                made += len(ids)
            f.flush()
            rate = made / (time.perf_counter() - start)
            print(f"{min(b + args.batch_size, len(todo))}/{len(todo)} prompts, {made} tokens, {rate:.0f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
