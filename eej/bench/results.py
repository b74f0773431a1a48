"""A folder of benchmark result files (benchmarks/results/*.json) as markdown, one section per kind of result.

    sections = results_markdown("benchmarks/results")    # {"specbench": ..., "plain": ..., "gpu": ..., "other": ...}

Kinds: `eej bench` documents (eej.bench.report), plain decoding against transformers (eej.bench.plain),
the GPU benchmark (eej.bench.gpu), and any other JSON, listed with its device. Each table names the
device and machine its numbers came from, the run's date and settings, and the file it was read from,
and is rendered by the code that renders that benchmark's own report, so both say the same.
scripts/render_readme_tables.py puts these sections into the README.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from eej.bench.gpu import gpu_markdown
from eej.bench.metrics import RUN_NOISE_SD, run_interval
from eej.bench.plain import BENCHMARK as PLAIN_BENCHMARK
from eej.bench.plain import plain_markdown
from eej.bench.report import markdown_table, overall_table, result_contestants

KINDS = ("specbench", "plain", "gpu", "other")
# This repository's scripts/adaptive_bench.sh series, oldest first, whose latest readings the README's status table and
# notebooks/02_methods_compared.ipynb show (`status_markdown`): adaptive_v30 the last that ran every set, temperature and
# batch size and every contestant; each later one ran some of its cells again on newer code (docs/adaptive.md says
# which and why).
STATUS_SERIES = ("adaptive_v30", "current_v35", "current_v36", "current_v37", "specee_v38", "current_v39", "current_v40",
                 "current_v41", "current_v42", "current_v43", "current_v44", "current_v45",
                 "current_v46", "current_v47", "current_v48", "current_v49")
EMPTY = {
    "specbench": "_No `eej bench` results are committed yet._",
    "plain": "_No plain-decoding results are committed yet (`make bench-plain` writes them)._",
    "gpu": "_No GPU results are committed yet (`scripts/gpu_bench.sh` writes them)._",
    "other": "_None._",
}


class ResultsError(ValueError):
    """A result file that can't be read or rendered (the message names it)."""


def kind_of(doc: Any) -> str:
    """Which section a result document belongs to."""
    if isinstance(doc, dict) and "schema_version" in doc and "methods" in doc and "peers" in doc:
        return "specbench"
    if isinstance(doc, dict) and "kernel_checks" in doc and "decoding" in doc:
        return "gpu"
    if isinstance(doc, dict) and str(doc.get("benchmark", "")).startswith(PLAIN_BENCHMARK) and "results" in doc:
        return "plain"
    return "other"


def device_note(machine: dict[str, Any], device: str | None = None) -> str:
    """Where the numbers came from: the accelerator (or CPU) and the host."""
    cpu = f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cpu_count', '?')} cores"
    backend = machine.get("jax_backend", "?")
    if device is None and backend != "cpu":
        device = ", ".join(sorted(set(machine.get("devices", [])))) or backend
    where = f"CPU ({cpu})" if device is None else f"{device} (host: {cpu})"
    return f"{where}; JAX {machine.get('jax', '?')}"


def _demote(markdown: str, levels: int = 3) -> str:
    """Headings of an embedded report pushed below the page's own."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", markdown, flags=re.MULTILINE)


def _link(path: str, root: str) -> str:
    rel = _rel(path, root)
    return f"[`{rel}`]({rel})"


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def render_specbench(path: str, doc: dict[str, Any], root: str) -> str:
    s, m, model = doc["settings"], doc["machine"], doc["model"]
    draws = s.get("draws", 1)
    per_cat = ", ".join(f"{c} {n // draws}" for c, n in s["questions_per_category"].items()) \
        + (f", each answered {draws} times (draws)" if draws > 1 else "")
    load = ""
    if m.get("load_average_start") and m.get("load_average_end"):
        load = f" Load average (1 min) {m['load_average_start'][0]:.1f} at the start, {m['load_average_end'][0]:.1f} at the end."
    stem = os.path.splitext(path)[0]
    extra = [f"[{kind}]({_rel(stem + ext, root)})" for kind, ext in (("report", ".md"), ("plot", ".png"))
             if os.path.exists(stem + ext)]
    lines = [
        f"#### {os.path.basename(stem)}: {', '.join(f'`{n}`' for n in [*doc['methods'], *doc['peers']])} "
        f"on {os.path.basename(s['questions'])}",
        "",
        f"Measured on **{device_note(m)}**, {s['date']}.{load}",
        f"Model {model['name']} ({model['dtype']}, attention {model['attention']}"
        + (f", matmul {model['matmul']}" if "matmul" in model else "") + f"); questions per category: {per_cat}; "
        f"{s['answers_per_contestant']} answers per contestant; at most {s['max_new_tokens']} new tokens; "
        f"batch {s['batch_size']}; {'greedy' if s['greedy'] else 'coupled sampling' if s.get('coupled') else 'sampling'}"
        + ("; EOS ignored" if s.get("ignore_eos") else "") + (f"; {s['rounds']} rounds" if s.get("rounds", 1) > 1 else "")
        + f". From {_link(path, root)}{' (' + ', '.join(extra) + ')' if extra else ''}.",
    ]
    if s.get("note"):
        lines.append(f"Note: {s['note']}")
    lines += ["", overall_table(doc), "", f"Reproduce: `{s['command']}`"]
    return "\n".join(lines)


def render_plain(path: str, doc: dict[str, Any], root: str) -> str:
    body = _demote(plain_markdown(doc))
    return f"Measured on **{device_note(doc['machine'])}**. From {_link(path, root)}.\n\n{body.strip()}"


def render_gpu(path: str, doc: dict[str, Any], root: str) -> str:
    full = gpu_markdown(doc)
    decoding = full[full.index("## Decoding"):] if "## Decoding" in full else full
    md = os.path.splitext(path)[0] + ".md"
    more = f" Kernel checks and timings: {_link(md, root)}." if os.path.exists(md) else ""
    return (f"Measured on **{device_note(doc['machine'], doc.get('device'))}**. From {_link(path, root)}.{more}\n\n"
            f"{_demote(decoding, 2).strip()}")


def render_other(path: str, doc: Any, root: str) -> str:
    title = doc.get("benchmark") or doc.get("title") if isinstance(doc, dict) else None
    machine = doc.get("machine") if isinstance(doc, dict) else None
    where = f" Measured on {device_note(machine)}." if isinstance(machine, dict) else ""
    md = os.path.splitext(path)[0] + ".md"
    report = f" Report: {_link(md, root)}." if os.path.exists(md) else ""
    return f"- {_link(path, root)}{': ' + title if title else ''}.{where}{report}"


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e.msg})") from None


def status_markdown(results_dir: str, series: str | Sequence[str], root: str | None = None) -> str:
    """One table of the latest readings of a list of series of `eej bench` runs (files SERIES_*.json in
    `results_dir`, e.g. one per question set, temperature and batch size; `series` oldest first): a row per
    contestant, a column per cell (question set, temperature, batch size), each entry the contestant's overall
    speedup over plain decoding in the latest run of that cell that ran it, with its 95% interval where the run
    measured one, widened by the noise between runs (eej.bench.metrics.run_interval with the run's `run_noise_sd`;
    runs from before it was recorded: RUN_NOISE_SD, estimated from them); plain decoding's own entries give its
    tokens per second. A column's header links the cell's latest run (its report, or its JSON without one); an entry
    read from an earlier run of the cell is marked with a number that the list under the table resolves."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(results_dir)))
    names = sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []
    order = [series] if isinstance(series, str) else list(series)
    runs = []  # (cell, series rank, path, doc): oldest series first
    for rank, one in enumerate(order):
        for name in names:
            if not (name.startswith(one + "_") and name.endswith(".json")):
                continue
            path = os.path.join(results_dir, name)
            doc = _read(path)
            if kind_of(doc) != "specbench":
                raise ResultsError(f"{path}: not an `eej bench` result, so not part of the series {one}")
            s = doc["settings"]
            temperature = None if s["greedy"] else s.get("temperature")
            runs.append(((s["questions"], not s["greedy"], temperature, s["batch_size"]), rank, path, doc))
    if not runs:
        return f"_No results of the series {', '.join(order)} are committed._"
    cells = sorted({cell for cell, _, _, _ in runs}, key=lambda c: (os.path.basename(c[0]), c[1], c[2] or 0, c[3]))
    contestants = list(dict.fromkeys(n for _, _, _, doc in runs for n, _ in result_contestants(doc)))
    latest = {r[0]: r for r in runs}  # the last run of each cell: runs are in series order, then by file name
    earlier: list[str] = []  # paths of runs an entry comes from that are not their column's latest: footnotes 1, 2, ...

    def reading(doc: dict[str, Any], name: str) -> str | None:
        o = dict(result_contestants(doc)).get(name, {}).get("overall")
        if not o or o.get("speedup") is None:
            return None
        if name == "plain":  # every speedup's reference: its pace says what the machine did
            return f"{o['tokens_per_second']:.1f} tokens/s"
        if o.get("speedup_ci_low") is None:
            return f"{o['speedup']:.2f}x"
        low, high = run_interval(o["speedup"], o["speedup_ci_low"], o["speedup_ci_high"],
                                 doc["settings"].get("run_noise_sd", RUN_NOISE_SD))
        return f"{o['speedup']:.2f}x ({low:.2f}–{high:.2f})"

    def cell(column: tuple, name: str) -> str:
        for _, _, path, doc in reversed([r for r in runs if r[0] == column]):
            text = reading(doc, name)
            if text is None:
                continue
            if path == latest[column][2]:
                return text
            if path not in earlier:
                earlier.append(path)
            return f"{text} <sup>{earlier.index(path) + 1}</sup>"
        return "–"

    def link(path: str) -> str:  # the run's report where it has one, else its JSON
        report = os.path.splitext(path)[0] + ".md"
        return _rel(report if os.path.exists(report) else path, root)

    def label(column: tuple) -> str:
        questions, sampled, temperature, batch = column
        name = os.path.splitext(os.path.basename(questions))[0].replace("_", "-")
        return f"{name}, {'T ' + str(temperature if temperature is not None else '?') if sampled else 'greedy'}, batch {batch}"

    header = ["contestant", *[f"[{label(c)}]({link(latest[c][2])})" for c in cells]]
    table = markdown_table(header, [[f"`{n}`", *[cell(c, n) for c in cells]] for n in contestants])
    used = [latest[c] for c in cells] + [r for r in runs if r[2] in earlier]
    machines = sorted({device_note(doc["machine"]) for _, _, _, doc in used})
    dates = sorted(doc["settings"]["date"] for _, _, _, doc in used)
    dated = {path: doc["settings"]["date"] for _, _, path, doc in runs}
    notes = "".join(f"\n{i}. [{os.path.splitext(os.path.basename(path))[0]}]({link(path)}), {dated[path]}"
                    for i, path in enumerate(earlier, 1))
    return (f"Measured on **{'; '.join(machines)}**, {dates[0]} to {dates[-1]}; each column the latest `eej bench` run "
            f"of its cell (linked: settings, every metric, the command that reproduces it)"
            + ("; an entry marked with a number comes from the earlier run of its cell listed under the table (the "
               "latest did not run that contestant), and every entry is a speedup over plain decoding in its own run"
               if earlier else "")
            + f".\n\n{table}" + (f"\n{notes}" if earlier else ""))


RENDERERS: dict[str, Callable[[str, Any, str], str]] = {
    "specbench": render_specbench, "plain": render_plain, "gpu": render_gpu, "other": render_other,
}


def results_markdown(results_dir: str, root: str | None = None) -> dict[str, str]:
    """Kind -> markdown of every *.json in `results_dir` of that kind (by file name; EMPTY where none).

    Links are relative to `root` (default: the folder above `results_dir`'s parent, a repository root).
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(results_dir)))
    parts: dict[str, list[str]] = {k: [] for k in KINDS}
    names = sorted(f for f in os.listdir(results_dir) if f.endswith(".json")) if os.path.isdir(results_dir) else []
    for name in names:
        path = os.path.join(results_dir, name)
        doc = _read(path)
        kind = kind_of(doc)
        try:
            parts[kind].append(RENDERERS[kind](path, doc, root))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ResultsError(f"{path}: cannot render it as a {kind} result ({type(e).__name__}: {e})") from None
    return {k: ("\n" if k == "other" else "\n\n").join(v) if v else EMPTY[k] for k, v in parts.items()}
