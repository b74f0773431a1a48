"""How far the committed A/A controls stray beyond their bootstrap intervals: the noise between runs
(eej.bench.metrics.RUN_NOISE_SD).

An A/A control is a second plain decoding in the same `eej bench` run (`--methods plain,again=plain,...`): its true
speedup is 1. Its 95% bootstrap interval covers timing noise from call to call within the run, not what holds for a
whole run (where each engine's compiled code landed in memory, the machine's drift over minutes), so across many
runs the intervals exclude 1.0 more often than 5% of the time. This reads every committed run that has one, reports
that rate, estimates the standard deviation between runs (eej.bench.metrics.between_run_sd) and shows the rate with
the intervals widened by it (eej.bench.metrics.run_interval; in-sample, so about 5% by construction).

    python scripts/aa_calibration.py [--before 2026-12-07] [--out benchmarks/results/aa_calibration]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eej.bench.metrics import between_run_sd, interval_sd, run_interval  # noqa: E402
from eej.bench.report import markdown_table  # noqa: E402

CONTROL = "again"


def controls(results_dir: str, before: str | None) -> list[dict]:
    """One entry per committed bench run with an A/A control that has a speedup interval (dated before `before`)."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        c = doc.get("methods", {}).get(CONTROL) if isinstance(doc, dict) and isinstance(doc.get("methods"), dict) else None
        if not c:
            continue
        o, settings = c["overall"], doc["settings"]
        if o.get("speedup") is None or o.get("speedup_ci_low") is None:
            continue
        if before is not None and settings["date"][:10] >= before:
            continue
        out.append({"run": os.path.splitext(os.path.basename(path))[0], "date": settings["date"],
                    "batch_size": settings["batch_size"], "greedy": settings["greedy"], "speedup": o["speedup"],
                    "low": o["speedup_ci_low"], "high": o["speedup_ci_high"]})
    return out


def summary(runs: list[dict], sd: float) -> dict:
    triples = [(r["speedup"], r["low"], r["high"]) for r in runs]
    widened = [run_interval(*t, run_sd=sd) for t in triples]
    logs = [math.log(s) for s, _, _ in triples]
    return {
        "runs": len(runs),
        "mean_log_speedup": statistics.fmean(logs),
        "sd_log_speedup": math.sqrt(statistics.fmean(x * x for x in logs)),  # about 0: an A/A's true speedup is 1
        "rms_interval_sd": math.sqrt(statistics.fmean(interval_sd(lo, h) ** 2 for _, lo, h in triples)),
        "bootstrap_excluding_1": sum(lo > 1 or h < 1 for _, lo, h in triples),
        "widened_excluding_1": sum(lo > 1 or h < 1 for lo, h in widened),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--before", default=None, help="only runs dated before this day (YYYY-MM-DD)")
    parser.add_argument("--out", default="benchmarks/results/aa_calibration")
    args = parser.parse_args()
    runs = controls(args.results, args.before)
    if not runs:
        parser.exit(2, f"error: no run in {args.results} has an A/A control ({CONTROL}=plain) with an interval\n")
    sd = between_run_sd([(r["speedup"], r["low"], r["high"]) for r in runs])
    groups = {"all": runs, **{f"batch {b}": [r for r in runs if r["batch_size"] == b] for b in sorted({r["batch_size"] for r in runs})},
              "greedy": [r for r in runs if r["greedy"]], "sampled": [r for r in runs if not r["greedy"]]}
    doc = {"title": "A/A controls against their bootstrap intervals: the noise between runs",
           "command": "python scripts/aa_calibration.py" + (f" --before {args.before}" if args.before else ""),
           "between_run_sd": sd, "groups": {k: summary(v, sd) for k, v in groups.items() if v}, "controls": runs}
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    rows = [[name, str(g["runs"]), f"{g['sd_log_speedup']:.4f}", f"{g['rms_interval_sd']:.4f}",
             f"{g['bootstrap_excluding_1']} ({g['bootstrap_excluding_1'] / g['runs']:.0%})",
             f"{g['widened_excluding_1']} ({g['widened_excluding_1'] / g['runs']:.0%})"] for name, g in doc["groups"].items()]
    table = markdown_table(["runs", "A/A controls", "sd of ln speedup", "sd its intervals imply",
                            "95% intervals excluding 1.0", f"widened by {sd:.4f}: excluding 1.0"], rows)
    dates = sorted(r["date"] for r in runs)
    with open(args.out + ".md", "w") as f:
        f.write(f"# {doc['title']}\n\n`{doc['command']}`: every committed `eej bench` run with an A/A control "
                f"(`again=plain`) and a speedup interval, {dates[0]} to {dates[-1]}.\n\n"
                f"Noise between runs beyond the intervals (method of moments): **{sd:.4f}** on the log scale.\n\n"
                f"{table}\n\nThe widened column is in-sample: the estimate was fitted to these runs.\n")
    print(f"{len(runs)} A/A controls; between-run sd {sd:.4f}; written {args.out}.json and .md")


if __name__ == "__main__":
    main()
