#!/usr/bin/env python
"""SkipDecode's speed/quality trade-off from `eej bench` results: one table and one plot over budgets.

Reads bench JSON files (one per batch size, each holding plain and the skipdecode presets) and
writes OUT.md (a table: budget x fine-tuned, avg layers, tokens/s and speedup per batch size,
token_agreement, ROUGE-L) and OUT.png (speedup against token agreement, one curve per batch size
and fine-tuning, points labelled by budget). Numbers are copied from the bench files, nothing is
measured here.

    python scripts/skipdecode_tradeoff.py benchmarks/results/skipdecode_b1.json benchmarks/results/skipdecode_b8.json \
        --out benchmarks/results/skipdecode_tradeoff
"""

from __future__ import annotations

import argparse
import json
import os
import re

PRESET = re.compile(r"^skipdecode:(\d+)x(-untuned)?$")


def read(paths: list[str]) -> dict[int, dict]:
    docs = {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        docs[int(doc["settings"]["batch_size"])] = doc
    return docs


def rows(docs: dict[int, dict]) -> list[dict]:
    """One row per (budget, tuned) with per-batch speed and the batch-1 run's fidelity."""
    out: dict[tuple[int, bool], dict] = {}
    for bs, doc in sorted(docs.items()):
        for name, c in doc["methods"].items():
            m = PRESET.match(name)
            if name == "plain":
                key = (1, False)
            elif m:
                key = (int(m.group(1)), m.group(2) is None)
            else:
                continue
            o = c["overall"]
            row = out.setdefault(key, {"budget": key[0], "tuned": key[1], "name": name})
            row[f"b{bs}"] = {k: o[k] for k in ("tokens_per_second", "speedup", "avg_layers", "token_agreement", "rouge_l", "answers", "new_tokens")}
    return [out[k] for k in sorted(out)]


def markdown(table: list[dict], docs: dict[int, dict], sources: list[str]) -> str:
    sizes = sorted(docs)
    first = docs[sizes[0]]
    s, m = first["settings"], first["machine"]
    lines = [
        "# SkipDecode on smollm2-135m: speed/quality trade-off",
        "",
        f"From {', '.join(f'`{os.path.relpath(p)}`' for p in sources)} (`eej bench`; commands in those files and in "
        "docs/skipdecode.md). Greedy, chat template, EOS honoured, "
        f"{s['max_new_tokens']} new tokens max. Machine: {m['cpu']}, {m['cpu_count']} cores ({s.get('note') or 'no note'}; "
        "speedups are side by side in one run).",
        "",
    ]
    for bs, doc in sorted(docs.items()):
        s, m = doc["settings"], doc["machine"]
        questions = ", ".join(f"{c}: {n}" for c, n in s["questions_per_category"].items())
        lines.append(
            f"- batch {bs}: {s['answers_per_contestant']} answers per contestant ({questions} questions); "
            f"load average {m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end."
        )
    lines.append("")
    header = ["preset", "fine-tuned", "avg layers"]
    for bs in sizes:
        header += [f"tokens b{bs}", f"tokens/s b{bs}", f"speedup b{bs}"]
    for bs in sizes:
        header += [f"token agreement b{bs}", f"ROUGE-L b{bs}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(v, p):
        return "n/a" if v is None else p.format(v)

    for r in table:
        cells = [f"`{r['name']}`", "yes" if r["tuned"] else "no", fmt(r.get(f"b{sizes[0]}", {}).get("avg_layers"), "{:.2f}")]
        for bs in sizes:
            b = r.get(f"b{bs}", {})
            cells += [fmt(b.get("new_tokens"), "{}"), fmt(b.get("tokens_per_second"), "{:.1f}"), fmt(b.get("speedup"), "{:.2f}x")]
        for bs in sizes:
            b = r.get(f"b{bs}", {})
            cells += [fmt(b.get("token_agreement"), "{:.3f}"), fmt(b.get("rouge_l"), "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], docs: dict[int, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {True: "-", False: ":"}
    for bs in sorted(docs):
        for tuned in (True, False):
            pts = [(r[f"b{bs}"]["token_agreement"], r[f"b{bs}"]["speedup"], r["budget"]) for r in table
                   if f"b{bs}" in r and r["tuned"] == tuned and r["budget"] > 1]
            pts = [p for p in pts if p[0] is not None and p[1] is not None]
            if not pts:
                continue
            pts.sort(key=lambda p: p[2])
            label = f"batch {bs}, {'fine-tuned (LoRA)' if tuned else 'untuned'}"
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[tuned], marker="o", label=label)
            for a, s, k in pts:
                ax.annotate(f"{k}x", (a, s), textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.scatter([1.0], [1.0], color="black", marker="*", s=120, label="plain (full model)", zorder=5)
    ax.axhline(1.0, color="gray", linewidth=0.7, linestyle="--")
    ax.set_xlabel("token agreement with the full model's argmax")
    ax.set_ylabel("speedup vs plain at the same batch size")
    ax.set_title("SkipDecode on SmolLM2-135M: layer budgets 2x-5x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", nargs="+")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "skipdecode_tradeoff"))
    args = ap.parse_args()
    docs = read(args.bench_json)
    table = rows(docs)
    md = markdown(table, docs, args.bench_json)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    plot(table, docs, args.out + ".png")
    print(md)


if __name__ == "__main__":
    main()
