"""Where a method's fallback step spends its time against plain decoding's, kernel by kernel (a GPU question).

For plain decoding and each method at mode 0 (the step an adaptive method takes when it does nothing special), as
scripts/plain_mode_overhead.py builds them: the compiled decode loop's optimized HLO (`<name>.hlo.txt`) and a
profiler trace of one run of its steps (`<name>/plugins/profile/*/*.trace.json.gz`), summarised per step: device
kernels and their busy time, host-device copies, and the wall time. Run it alone.

    python scripts/gpu_step_profile.py --methods kangaroo,m2r2-exit --out /tmp/profile
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eej  # noqa: E402
from eej.bench.machine import machine_info  # noqa: E402
from eej.config import SamplingConfig  # noqa: E402
from plain_mode_overhead import STEPS, _contestants  # noqa: E402


def summarise(trace_dir: str) -> dict:
    """Per-step counts and microseconds from the trace under `trace_dir`: device events by kind, and the wall span."""
    path, = glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [e for e in events if e.get("ph") == "X" and "device" in names.get(e["pid"], "").lower()]
    copies = [e for e in device if "memcpy" in e["name"].lower() or "memset" in e["name"].lower()]
    kernels = [e for e in device if e not in copies]
    span = (max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)) if device else 0.0
    host = {}
    for e in events:
        if e.get("ph") == "X" and "host" in names.get(e["pid"], "").lower():
            host[e["name"]] = host.get(e["name"], 0) + 1
    top: dict[str, list[float]] = {}
    for e in kernels:
        top.setdefault(e["name"], []).append(e["dur"])
    return {"host_reads_per_step": host.get("MemcpyD2H", 0) / STEPS, "kernels_per_step": len(kernels) / STEPS, "kernel_us_per_step": sum(e["dur"] for e in kernels) / STEPS,
            "copies_per_step": len(copies) / STEPS, "copy_us_per_step": sum(e["dur"] for e in copies) / STEPS,
            "device_span_us_per_step": span / STEPS,
            "host_events_per_step": sorted(((n, c / STEPS) for n, c in host.items()), key=lambda t: -t[1])[:25],
            "top_kernels": sorted(((n, len(d) / STEPS, sum(d) / STEPS) for n, d in top.items()), key=lambda t: -t[2])[:25]}


def markdown(doc: dict, command: str) -> str:
    """The summary as a markdown table (one row per contestant) with the machine and the command."""
    lines = [f"# Decode steps profiled, kernel by kernel (batch {doc['batch']}, prompt of {doc['prompt_length']} tokens)", "",
             f"`{command}`; {', '.join(doc['devices'])}, JAX {doc['jax']}; a run of {doc['steps']} steps per contestant under "
             "`jax.profiler.trace` (ms/step: one run without it). Per step: device kernels and their busy time, device "
             "copies, host-side reads of a device value (MemcpyD2H: a predicate the host waits for).", "",
             "| contestant | ms/step | kernels | kernel µs | copies | copy µs | MemcpyD2H |", "|---|---|---|---|---|---|---|"]
    for name, row in doc["summary"].items():
        reads = row["host_reads_per_step"]
        lines.append(f"| {name} | {row['ms_per_step']:.2f} | {row['kernels_per_step']:.0f} | {row['kernel_us_per_step']:.0f} | "
                     f"{row['copies_per_step']:.1f} | {row['copy_us_per_step']:.0f} | {reads:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kangaroo,m2r2-exit")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = eej.load_model("smollm2-135m", kernels="xla")
    runs = _contestants(model, args.prompt_length, args.batch, SamplingConfig(), tuple(m for m in args.methods.split(",") if m), {0})
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name, run, loop in runs:
        slug = name.replace(" ", "_")
        with open(f"{args.out}/{slug}.hlo.txt", "w") as f:
            f.write(loop.as_text())
        run(), run()
        ms = run()
        with jax.profiler.trace(f"{args.out}/{slug}"):
            run()
        summary[name] = {"ms_per_step": ms, **summarise(f"{args.out}/{slug}")}
        print(name, json.dumps({k: v for k, v in summary[name].items() if not k.startswith(("top", "host"))}), flush=True)
        for row in summary[name]["top_kernels"][:12] + summary[name]["host_events_per_step"][:12]:
            print("   ", row, flush=True)
    doc = {"batch": args.batch, "prompt_length": args.prompt_length, "steps": STEPS, "jax": jax.__version__,
           "devices": [d.device_kind for d in jax.devices()], "machine": {**machine_info(), "load_average": os.getloadavg()},
           "summary": summary}
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(f"{args.out}/summary.md", "w") as f:
        f.write(markdown(doc, f"python scripts/gpu_step_profile.py {' '.join(sys.argv[1:])}"))


if __name__ == "__main__":
    main()
