"""One-process A/B of the verification width: fixed Kangaroo (K = 4 every step) verifying k + 1 tokens whatever
it drafted ("old": the width once followed the k asked for) against verifying what its draft loop made ("new",
eej.decoding.adaptive.verify_by_width), and plain decoding; MT-Bench turn-1 prompts (the first 6, read from
../shared/data/eval), greedy, batch 1, 128 new tokens, the three interleaved (order rotating), 2 rounds. Prints
tokens/s, the ratio to plain and whether every answer is plain's. Run it alone:

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/verify_width_ab.py
"""

from __future__ import annotations

import json
import os
import time

import eej
import eej.api
from eej.decoding import kangaroo
from eej.decoding.engine import Engine
from eej.decoding.methods import build_method

QUESTIONS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "mt_bench.jsonl")
MAX_NEW, ROUNDS = 128, 2


def old_width_engine(model, prompts):
    """kangaroo:fixed compiled (for every prompt's shapes) with the width of the k asked for: while its programs
    trace, `verify_by_width` is handed the draft loop's `num_steps` instead of the steps it ran."""
    real_loop, real_width, asked = kangaroo.draft_loop, kangaroo.verify_by_width, {}

    def draft_loop(*args, **kwargs):
        asked["k"] = kwargs["num_steps"]
        return real_loop(*args, **kwargs)

    kangaroo.draft_loop = draft_loop
    kangaroo.verify_by_width = lambda drafted, max_k, verify, cache: real_width(asked["k"], max_k, verify, cache)
    try:
        engine = Engine(model, *build_method(model, "kangaroo:fixed"), share_programs=False)
        for p in prompts:
            engine.generate([p], MAX_NEW)
    finally:
        kangaroo.draft_loop, kangaroo.verify_by_width = real_loop, real_width
    return engine


def main() -> None:
    with open(QUESTIONS) as f:
        questions = [json.loads(line) for line in f][:6]
    model = eej.load_model("smollm2-135m", kernels="xla")
    prompts = [model.tokenizer.encode_chat(q["turns"][0]) for q in questions]
    engines = {"plain": eej.api.engine(model, "plain"), "new": eej.api.engine(model, "kangaroo:fixed")}
    for engine in engines.values():
        for p in prompts:
            engine.generate([p], MAX_NEW)
    engines["old"] = old_width_engine(model, prompts)
    names = list(engines)
    seconds, tokens, answers = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), {}
    for r in range(ROUNDS):
        for i, p in enumerate(prompts):
            shift = (i + r) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                out = engines[name].generate([p], MAX_NEW)
                seconds[name] += time.perf_counter() - start
                tokens[name] += len(out.tokens[0])
                answers[name, i] = out.tokens[0]
    identical = all(answers[n, i] == answers["plain", i] for n in names for i in range(len(prompts)))
    speed = {n: tokens[n] / seconds[n] for n in names}
    print(f"load {os.getloadavg()[0]:.2f}; identical to plain: {identical}; tokens/s "
          + ", ".join(f"{n} {speed[n]:.2f} ({speed[n] / speed['plain']:.3f}x)" for n in names))


if __name__ == "__main__":
    main()
