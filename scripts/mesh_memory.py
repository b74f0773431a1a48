"""Peak resident memory of `eej generate` on meshes of simulated CPU devices (issue #19, item 9).

Each configuration runs `python -m eej generate` in its own process (8 fake CPU devices through
XLA_FLAGS, the compile cache off so every run compiles) and records that process's peak RSS
(`os.wait4`'s ru_maxrss). Results are merged into the JSON under `--label` (e.g. before/after a
change), so one file holds both; the markdown table is rendered from the JSON.

    python scripts/mesh_memory.py --label after
    python scripts/mesh_memory.py --label before --source /tmp/eej-before   # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

from eej.bench.machine import machine_info
from eej.files import write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Tell me about the sea.", "What is 2+2?", "Write a poem about cats.", "Explain gravity.",
           "Name three colors.", "How do birds fly?", "What is Python?", "Describe a sunny day."]
# name -> extra flags of `eej generate`
CONFIGS = {
    "no mesh": [],
    "data=2": ["--mesh", "data=2"],
    "data=4": ["--mesh", "data=4"],
    "data=8": ["--mesh", "data=8"],
    "data=4 model=2": ["--mesh", "data=4,model=2"],
    "data=8 bfloat16": ["--mesh", "data=8", "--dtype", "bfloat16"],
    "no mesh bfloat16": ["--dtype", "bfloat16"],
}


def run_config(flags: list[str], prompts_file: str, source: str, max_new_tokens: int) -> dict[str, Any]:
    """One `eej generate` process -> its peak RSS (MiB), wall seconds and exit status."""
    cmd = [sys.executable, "-m", "eej", "generate", "--model", "smollm2-135m", "--batch-file", prompts_file,
           "--max-new-tokens", str(max_new_tokens), "--json", *flags]
    env = {**os.environ, "PYTHONPATH": source, "EEJ_CACHE_DIR": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    shown = ["python", *cmd[1:]]
    shown[shown.index(prompts_file)] = "PROMPTS.jsonl"  # the 8 prompts of PROMPTS, one {"prompt": ...} per line
    return {"command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 EEJ_CACHE_DIR= " + shlex.join(shown),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - start, 1),
            "exit_status": proc.returncode}


def machine_line(m: dict[str, Any]) -> str:
    """One line from eej.bench.machine.machine_info()."""
    return f"{m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['platform']}, JAX {m['jax']}"


def render(doc: dict[str, Any]) -> str:
    """The markdown table of every label's peak RSS per configuration."""
    labels = sorted(doc["runs"], key=lambda label: label != "before")  # before first
    configs = list(dict.fromkeys(c for label in labels for c in doc["runs"][label]["configs"]))
    lines = ["# Peak resident memory of `eej generate` on simulated CPU meshes", "",
             ("SmolLM2-135M, 8 prompts (batch 8), 32 new tokens, greedy, plain decoding, 8 fake CPU devices "
              "(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), compile cache off. Peak RSS of the whole "
              "process (`ru_maxrss`), MiB. Produced by `scripts/mesh_memory.py`."), "",
             "| configuration | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for c in configs:
        cells = [doc["runs"][label]["configs"].get(c, {}).get("peak_rss_mib", "") for label in labels]
        lines.append(f"| {c} | " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    for label in labels:
        r = doc["runs"][label]
        lines.append(f"- {label}: {r['date']}, commit {r['commit']}, load average {r['load_average']}; {r['note']}")
    lines += ["", f"Machine: {machine_line(doc['machine'])}.", "", "Commands:", ""]
    lines += [f"- {c}: `{doc['runs'][labels[-1]]['configs'][c]['command']}`" for c in configs
              if c in doc["runs"][labels[-1]]["configs"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="column of this run, e.g. before / after")
    p.add_argument("--source", default=ROOT, help="checkout whose eej runs (PYTHONPATH)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--note", default="", help="free text kept with this label")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mesh_memory.json"))
    args = p.parse_args()
    doc: dict[str, Any] = {"runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": t}) + "\n" for t in PROMPTS)
        results = {}
        for name in args.configs.split(","):
            results[name] = run_config(CONFIGS[name], prompts, args.source, args.max_new_tokens)
            print(f"{name}: {results[name]['peak_rss_mib']} MiB, {results[name]['seconds']} s", flush=True)
    commit = subprocess.run(["git", "-C", args.source, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", args.source, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    commit += " + uncommitted changes" if dirty else ""
    doc["benchmark"] = "peak resident memory of eej generate on simulated CPU meshes"
    doc["machine"] = machine_info()
    earlier = doc["runs"].get(args.label, {}).get("configs", {})  # a run of some configurations adds to the label
    doc["runs"][args.label] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
                               "load_average": load, "load_average_end": [round(x, 2) for x in os.getloadavg()],
                               "note": args.note, "configs": {**earlier, **results}}
    write_atomic(args.out, json.dumps(doc, indent=1) + "\n")  # eej.files: readers never see half a file
    write_atomic(os.path.splitext(args.out)[0] + ".md", render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
