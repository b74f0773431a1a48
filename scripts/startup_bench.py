"""Startup time of a plain `eej generate` process with a warm compile cache (issue #19).

`eej generate --model smollm2-135m --prompt hi --max-new-tokens 8 --json` in new processes: one run fills a fresh
compile cache, then `--repeats` runs are timed (wall time from process start to exit). Each run also reports how
long `import eej.cli`, `load_model` and the rest took (`-X importtime` is not needed: the command is timed from
outside, the phases from a small wrapper that imports and calls the CLI). Results are merged into the JSON under
`--label` (e.g. before / after a change) and the markdown table is rendered from the JSON.

    python scripts/startup_bench.py --label after
    python scripts/startup_bench.py --label before --source /tmp/eej-before    # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from eej.bench.machine import machine_info
from eej.files import write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["generate", "--model", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "8", "--json"]
# Runs the CLI like `python -m eej` and prints, on stderr, how long the import and the model load took.
WRAPPER = """
import sys, time
start = time.perf_counter()
import eej.cli
imported = time.perf_counter()
import eej.weights.registry as registry
load = registry.load_model
spent = []
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return load(*a, **k)
    finally:
        spent.append(time.perf_counter() - t)
registry.load_model = timed
import eej.cli.options
eej.cli.options.load_model = timed
code = eej.cli.main(sys.argv[1:])
print("PHASES", imported - start, sum(spent), time.perf_counter() - start, file=sys.stderr)
sys.exit(code)
"""


def run_once(source: str, cache: str) -> dict[str, float]:
    """One process -> wall seconds, and the seconds of its import, model load and everything in-process."""
    env = {**os.environ, "PYTHONPATH": source, "EEJ_CACHE_DIR": cache}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *ARGS], env=env, cwd=source, capture_output=True, text=True,
                          check=True)
    wall = time.perf_counter() - start
    phases = next(line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("PHASES"))
    out = json.loads(proc.stdout)
    return {"wall_s": round(wall, 2), "import_s": round(float(phases[0]), 2), "load_model_s": round(float(phases[1]), 2),
            "in_process_s": round(float(phases[2]), 2), "compile_s": round(out["compile_seconds"], 2),
            "generate_s": round(out["seconds"], 2), "tokens": out["outputs"][0]["token_ids"]}


def machine_line(m: dict[str, Any]) -> str:
    """One line from eej.bench.machine.machine_info()."""
    return f"{m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['platform']}, JAX {m['jax']}"


def render(doc: dict[str, Any]) -> str:
    """The markdown table: per label, the median of each timing over the timed runs."""
    labels = sorted(doc["runs"], key=lambda label: label != "before")  # before first
    keys = ["wall_s", "import_s", "load_model_s", "compile_s", "generate_s"]
    lines = ["# Startup time of a plain `eej generate` (warm compile cache)", "",
             (f"`{doc['command']}`, in new processes: a first run fills a fresh compile cache, then "
              f"{doc['repeats']} timed runs; medians, seconds. Produced by `scripts/startup_bench.py`."), "",
             "| label | wall | import eej.cli | load_model | compile (cache load) | prefill + decode | same tokens |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label in labels:
        r = doc["runs"][label]
        cells = [f"{r['median'][k]:.2f}" for k in keys]
        same = r["tokens_identical"] and r["tokens"] == doc["runs"][labels[0]]["tokens"]  # within and across labels
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    lines.append("")
    for label in labels:
        r = doc["runs"][label]
        lines.append(f"- {label}: {r['date']}, load average {r['load_average']} -> {r['load_average_end']}; "
                     f"wall times {[x['wall_s'] for x in r['timed']]}; {r['note']}")
    lines += ["", f"Machine: {machine_line(doc['machine'])}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--source", default=ROOT, help="checkout whose eej runs (PYTHONPATH)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup.json"))
    args = p.parse_args()
    doc: dict[str, Any] = {"runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as cache:
        warm = run_once(args.source, cache)
        timed = [run_once(args.source, cache) for _ in range(args.repeats)]
    median = {k: round(statistics.median(r[k] for r in timed), 2) for k in timed[0] if k != "tokens"}
    doc["command"] = "eej " + " ".join(ARGS)
    doc["repeats"] = args.repeats
    doc["benchmark"] = "startup time of a plain eej generate (warm compile cache)"
    doc["machine"] = machine_info()
    doc["runs"][args.label] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "note": args.note, "load_average": load,
        "load_average_end": [round(x, 2) for x in os.getloadavg()], "median": median,
        "warmup": {k: v for k, v in warm.items() if k != "tokens"},
        "timed": [{k: v for k, v in r.items() if k != "tokens"} for r in timed],
        "tokens": warm["tokens"], "tokens_identical": all(r["tokens"] == warm["tokens"] for r in timed),
    }
    print(json.dumps(doc["runs"][args.label]["median"]))
    write_atomic(args.out, json.dumps(doc, indent=1) + "\n")  # eej.files: readers never see half a file
    write_atomic(os.path.splitext(args.out)[0] + ".md", render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
