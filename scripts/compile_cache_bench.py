#!/usr/bin/env python
"""How much sooner a second identical `eej generate` process answers with eej's compile cache (eej.local_cache).

For each method: a fresh cache directory, then the same command run `--repeats` times in new processes; the first
compiles and stores its XLA programs (and measures a method's step times), the next ones load them. Records each
process's wall time to its answer, the compile (+ measuring) seconds it reports and the programs it loaded, and the
same command with the cache off (`EEJ_CACHE_DIR=`). One process at a time (nothing else may run meanwhile).

    python scripts/compile_cache_bench.py [--methods plain,kangaroo] [--repeats 3] [--out benchmarks/results/compile_cache]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result

PROMPT = "Explain in two sentences why the sky is blue."


def run(method: str, cache: str, max_new_tokens: int) -> dict:
    env = {**os.environ, "EEJ_CACHE_DIR": cache}
    command = [sys.executable, "-m", "eej", "generate", "--model", "smollm2-135m", "--chat", "--method", method,
               "--prompt", PROMPT, "--max-new-tokens", str(max_new_tokens), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    out = json.loads(proc.stdout)
    return {"wall_s": round(wall, 2), "compile_s": round(out["compile_seconds"], 2), "cache_hits": out["compile_cache_hits"],
            "tokens": out["outputs"][0]["token_ids"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="plain,kangaroo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/compile_cache")
    args = ap.parse_args(argv)
    load_start = load_average()
    rows = []
    for method in args.methods.split(","):
        off = run(method, "", args.max_new_tokens)
        with tempfile.TemporaryDirectory() as cache:
            runs = [run(method, cache, args.max_new_tokens) for _ in range(args.repeats)]
        same = all(r["tokens"] == off["tokens"] for r in runs)
        warm = min(r["wall_s"] for r in runs[1:])
        rows.append({"method": method, "cache_off": off, "runs": runs, "tokens_identical": same,
                     "second_process_sooner": round(1 - warm / runs[0]["wall_s"], 3)})
        print(json.dumps(rows[-1] | {"runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}), file=sys.stderr)
    doc = {"machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
           "command": "python scripts/compile_cache_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": vars(args), "results": rows}
    table = markdown_table(
        ["method", "cache off: wall s (compile s)", "first process: wall s (compile s)", "next processes: wall s (compile s, programs loaded)",
         "answers sooner", "same tokens"],
        [[f"`{r['method']}`", f"{r['cache_off']['wall_s']} ({r['cache_off']['compile_s']})",
          f"{r['runs'][0]['wall_s']} ({r['runs'][0]['compile_s']})",
          ", ".join(f"{x['wall_s']} ({x['compile_s']}, {x['cache_hits']})" for x in r["runs"][1:]),
          f"{100 * r['second_process_sooner']:.0f}%", "yes" if r["tokens_identical"] else "NO"] for r in rows])
    markdown = (f"# eej's compile cache: a second identical process ({doc['machine']['cpu']}, load {load_start} -> "
                f"{load_average()})\n\n`{doc['command']}`: `eej generate --model smollm2-135m --chat --method M --prompt "
                f"'{PROMPT}' --max-new-tokens {args.max_new_tokens}` in new processes, wall time to the answer (model load "
                f"included).\n\n{table}\n")
    write_result(doc, markdown, args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
