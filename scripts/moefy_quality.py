#!/usr/bin/env python
"""The quality cost of MoEfication: the held-out sweeps `eej train moefy` wrote into its artifacts, as one table.

Each artifact's header holds its held-out evaluation (teacher-forced top-1 agreement of the MoE model with
the dense model on held-out chat sequences, for a sweep of k; router recall@k) and the command that made it.

    python scripts/moefy_quality.py artifacts/smollm2-135m/moefy.npz runs/moefy-e16/moefy.npz runs/moefy-e64/moefy.npz \
        [--out benchmarks/results/moefy_quality]
"""

from __future__ import annotations

import argparse
import os
import sys

from eej.bench.machine import machine_info
from eej.bench.report import write_result
from eej.weights.artifacts import ArtifactError, load_artifact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "moefy_quality"))
    args = ap.parse_args()
    rows = []
    for path in args.artifacts:
        try:
            h = load_artifact(path, "moefy")[1]
        except ArtifactError as e:
            sys.exit(str(e))
        s, held = h["settings"], h["held_out"]
        rows.append({"artifact": os.path.relpath(path, ROOT), "experts": s["num_experts"], "expert_width": s["expert_width"],
                     "router_k": s["experts_per_token"], "router_recall_at_k": held["router_recall_at_k"],
                     "agreement_by_k": held["top1_agreement_by_k"], "held_out_sequences": held["sequences"],
                     "reproduce": h.get("reproduce")})
    result = {"benchmark": "moefy_quality", "machine": machine_info(), "rows": rows,
              "metric": "teacher-forced top-1 agreement of the MoE model with the dense model on held-out chat sequences "
                        "(every real token of 32 held-out sequences of <= 256 tokens)"}
    lines = ["# MoEfication quality: top-1 agreement with the dense model by experts per token", "",
             f"Metric: {result['metric']}. Router recall@k: the share of the k most important experts (exact output "
             "norm) that the router picks, on held-out tokens.", ""]
    for r in rows:
        ks = sorted(r["agreement_by_k"], key=int)
        lines += [f"**{r['experts']} experts of {r['expert_width']} neurons**, routers trained for k = {r['router_k']} "
                  f"(recall@{r['router_k']} {r['router_recall_at_k']:.3f}; `{r['artifact']}`)", "",
                  "| k (of E) | " + " | ".join(f"{k} ({int(k) / r['experts']:.0%})" for k in ks) + " |",
                  "|---" * (len(ks) + 1) + "|",
                  "| agreement | " + " | ".join(f"{r['agreement_by_k'][k]:.3f}" for k in ks) + " |", "",
                  f"Reproduce: `{r['reproduce']}`", ""]
    write_result(result, "\n".join(lines), args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
