"""A training run's curves from its log (`OUT/train_log.jsonl`, written by every `eej train` trainer): each logged
metric averaged over windows of steps, as JSON, a markdown table and a plot — what shows a committed artifact
converged.

    .venv/bin/python scripts/train_curve.py runs/final_l2 --window 100 --out benchmarks/results/kangaroo_train_curve

The logged metrics are the training batches' (the held-out numbers are in the artifact's header, `held_out`);
the window mean smooths the batch-to-batch noise. Bad input (no log, a window < 1) exits 2 before anything is
written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from eej.bench.report import markdown_table, write_result
from eej.train.loop import LOG_FILE, RUN_FILE, read_log


def read_records(run_dir: str) -> list[dict[str, Any]]:
    """The run's log lines (eej.train.loop.read_log) in step order; a resumed run may have logged a step twice: the
    last one counts."""
    by_step = {int(r["step"]): r for r in read_log(run_dir)}
    return [by_step[s] for s in sorted(by_step)]


def windows(records: Sequence[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """Per window of `window` steps ((0, window], (window, 2 window], ...): the last step logged in it and the mean
    of each numeric metric over its records (`time` and `step` excepted)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault((int(r["step"]) - 1) // window, []).append(r)
    rows = []
    for _, group in sorted(out.items()):
        keys = [k for k in group[0] if k not in ("step", "time") and isinstance(group[0][k], (int, float))]
        rows.append({"step": int(group[-1]["step"]), "records": len(group),
                     **{k: float(np.mean([g[k] for g in group if k in g])) for k in keys}})
    return rows


def _plot(rows: list[dict[str, Any]], metrics: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes[0], metrics):
        ax.plot(steps, [r[name] for r in rows], marker=".")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an `eej train` run directory (its --out)")
    parser.add_argument("--window", type=int, default=100, help="steps per averaged point")
    parser.add_argument("--out", required=True, help="write PREFIX.json, PREFIX.md and PREFIX.png")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    if not os.path.isfile(os.path.join(args.run_dir, LOG_FILE)):
        parser.error(f"no {LOG_FILE} in {args.run_dir!r}: give the --out directory of an `eej train` run")
    records = read_records(args.run_dir)
    if not records:
        parser.error(f"{os.path.join(args.run_dir, LOG_FILE)} holds no steps yet")
    rows = windows(records, args.window)
    metrics = [k for k in rows[0] if k not in ("step", "records")]
    run = {}
    if os.path.isfile(os.path.join(args.run_dir, RUN_FILE)):
        with open(os.path.join(args.run_dir, RUN_FILE)) as f:
            run = json.load(f)
    command = " ".join(["python", "scripts/train_curve.py", *(sys.argv[1:] if argv is None else argv)])
    doc = {"command": command, "run_dir": args.run_dir, "run": run, "window": args.window, "rows": rows}
    table = markdown_table(("steps up to", *metrics),
                           [(str(r["step"]), *(f"{r[m]:.4g}" for m in metrics)) for r in rows])
    name = os.path.basename(os.path.normpath(args.run_dir))
    lines = [f"# Training curve of `{name}`", "", f"`{command}`: the training batches' metrics, mean over each window "
             f"of {args.window} steps ({len(records)} logged steps).", "", table, "",
             f"![curves]({os.path.basename(args.out)}.png)"]
    _plot(rows, [m for m in metrics if m != "lr"], args.out + ".png", f"{name}: mean per {args.window} steps")
    write_result(doc, "\n".join(lines) + "\n", args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
