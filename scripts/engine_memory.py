"""Resident memory of one model and an engine per method on it, as `eej.compare` and `eej bench` build them.

Loads SmolLM2-135M (the CPU kernels where they apply: `eej.load_model`'s default), then builds an engine per
method in turn and prints the process's resident memory (VmRSS) after each. Engines on the CPU matmul pack the
model's projection weights into column tiles; engines on one model share one packed copy (`eej.model.packed`).

    python scripts/engine_memory.py [--methods plain,kangaroo,...]
"""

from __future__ import annotations

import argparse
import gc

import eej
import eej.api

METHODS = "plain,kangaroo,kangaroo:fixed,m2r2-spec,specee,m2r2-exit,skipdecode"


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this script reads Linux's process status)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=METHODS)
    args = parser.parse_args()
    model = eej.load_model("smollm2-135m")
    print(f"| after | resident MiB |\n|---|---|\n| loading the model (matmul {model.cfg.matmul_impl}) | {resident_mib():.0f} |")
    engines = []
    for name in args.methods.split(","):
        engines.append(eej.api.engine(model, name))
        gc.collect()
        print(f"| + engine `{name}` | {resident_mib():.0f} |")


if __name__ == "__main__":
    main()
