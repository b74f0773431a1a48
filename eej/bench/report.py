"""Bench outputs: the JSON document, the markdown report and the plots.

JSON top level (schema_version 1):
  {"schema_version", "model", "machine", "settings",
   "methods": {name: {"info", "compile_seconds", "overall": metrics, "per_category": {category: metrics}}},
   "peers":   {name: same as methods}}
with metrics as in eej.bench.metrics.METRIC_KEYS (null where not measured or not meaningful).
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Any, Sequence

from eej.bench.metrics import CI_RESAMPLES, MIN_CI_UNITS, REQUIRED_METRIC_KEYS, RUN_NOISE_SD
from eej.files import write_atomic

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("schema_version", "model", "machine", "settings", "methods", "peers")
CONTESTANT_KEYS = ("info", "compile_seconds", "overall", "per_category")


def build_document(
    model: dict[str, Any],
    machine: dict[str, Any],
    settings: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    infos: dict[str, dict[str, Any]],
    compile_seconds: dict[str, float],
) -> dict[str, Any]:
    """Assemble the JSON document; contestants go under "methods" or "peers" by their info["kind"]."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "machine": machine,
        "settings": settings,
        "methods": {},
        "peers": {},
    }
    for name, metrics in summary.items():
        section = "peers" if infos[name]["kind"] == "peer" else "methods"
        doc[section][name] = {
            "info": infos[name],
            "compile_seconds": compile_seconds.get(name, 0.0),
            "overall": metrics["overall"],
            "per_category": metrics["per_category"],
        }
    return doc


def write_text(text: str, path: str) -> None:
    """`text` into the file `path`, its folder made if needed, atomically (eej.files.write_atomic)."""
    write_atomic(path, text)


def write_json(doc: dict[str, Any], path: str) -> None:
    write_text(json.dumps(doc, indent=1) + "\n", path)


def write_result(doc: dict[str, Any], markdown: str, prefix: str) -> None:
    """A benchmark's result and its report: PREFIX.md, then PREFIX.json (the JSON last: its presence means done)."""
    write_text(markdown, prefix + ".md")
    write_json(doc, prefix + ".json")


# ----------------------------------------------------------------------------- markdown

_COLUMNS = (
    ("answers", "answers", "{:d}"),
    ("new_tokens", "tokens", "{:d}"),
    ("tokens_per_second", "tokens/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("mean_accepted_tokens", "mean accepted", "{:.2f}"),
    ("avg_layers", "avg layers", "{:.2f}"),
    ("identical_rate", "identical", "{:.3f}"),
    ("token_agreement", "token agreement", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("speculated_fraction", "speculated", "{:.2f}"),
    ("exited_fraction", "exited early", "{:.2f}"),
    ("checked_fraction", "checked exit", "{:.2f}"),
    ("row_speedup", "row speedup", "{:.2f}x"),
)


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def result_contestants(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A result document's contestants, methods then peers: (name, its entry)."""
    return [*doc["methods"].items(), *doc["peers"].items()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header, a separator and one line per row of cells."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


_LATER_COLUMNS = ("row_speedup", "checked_fraction")  # not in documents written before they were measured


def _columns(doc: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """_COLUMNS, less those of _LATER_COLUMNS that no contestant of `doc` has (written before it was measured)."""
    missing = {k for k in _LATER_COLUMNS if all(c["overall"].get(k) is None for _, c in result_contestants(doc))}
    return tuple(c for c in _COLUMNS if c[0] not in missing)


_INTERVALS = (("speedup", "speedup 95% CI"), ("row_speedup", "row speedup 95% CI"),
              ("speedup_run", "speedup 95% CI with run noise"))


def _intervals(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The _INTERVALS some contestant of `doc` has overall (none in documents written before they were measured)."""
    return [(k, label) for k, label in _INTERVALS if any(c["overall"].get(f"{k}_ci_low") is not None for _, c in result_contestants(doc))]


def _interval(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "n/a" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def overall_table(doc: dict[str, Any]) -> str:
    """Markdown table: one row per contestant with its overall metrics, speedup intervals and compile time."""
    rows, columns, intervals = [], _columns(doc), _intervals(doc)
    for name, c in result_contestants(doc):
        o = c["overall"]
        rows.append([f"`{name}`", c["info"]["kind"], *[_fmt(o.get(k), p) for k, _, p in columns],
                     *[_interval(o, k) for k, _ in intervals], f"{c['compile_seconds']:.1f}"])
    header = ["contestant", "kind", *[label for _, label, _ in columns], *[label for _, label in intervals]]
    return markdown_table([*header, "compile s (excluded)"], rows)


def per_category_table(doc: dict[str, Any], columns: Sequence[tuple[str, str, str]] | None = None,
                       categories: Sequence[str] | None = None) -> str:
    """Markdown table: one row per category (default: all of the run's) and contestant; columns default to the
    speed and fidelity ones."""
    columns = _columns(doc) if columns is None else columns
    rows = []
    for category in doc["settings"]["categories"] if categories is None else categories:
        for name, c in result_contestants(doc):
            o = c["per_category"].get(category)
            if o is not None:
                rows.append([category, f"`{name}`", *[_fmt(o.get(k), p) for k, _, p in columns]])
    return markdown_table(["category", "contestant", *[label for _, label, _ in columns]], rows)


_QUALITY_COLUMNS = (
    ("reference_rouge_l", "ROUGE-L vs reference", "{:.3f}"),
    ("reference_rouge_l_count", "answers", "{:d}"),
    ("reference_bleu", "BLEU", "{:.2f}"),
    ("reference_bleu_count", "BLEU answers", "{:d}"),
    ("reference_exact_match", "exact match", "{:.3f}"),
    ("reference_exact_match_count", "exact-match answers", "{:d}"),
    ("reference_perplexity", "reference perplexity", "{:.2f}"),
    ("reference_perplexity_count", "perplexity answers", "{:d}"),
    ("reference_skipped", "no reference (skipped)", "{:d}"),
)


def _scored(metrics: dict[str, Any]) -> bool:
    return bool(metrics.get("reference_rouge_l_count"))


def quality_tables(doc: dict[str, Any]) -> str | None:
    """Markdown: task quality against the questions' references, overall and for the categories that have
    references (None when no answer of the run had one, or the document predates these metrics)."""
    contestants = result_contestants(doc)
    if not any(_scored(c["overall"]) for _, c in contestants):
        return None
    rows = [[f"`{name}`", c["info"]["kind"], *[_fmt(c["overall"].get(k), p) for k, _, p in _QUALITY_COLUMNS]]
            for name, c in contestants]
    overall = markdown_table(["contestant", "kind", *[label for _, label, _ in _QUALITY_COLUMNS]], rows)
    categories = doc["settings"]["categories"]
    scored = [g for g in categories if any(_scored(c["per_category"].get(g, {})) for _, c in contestants)]
    lines = [overall, "", per_category_table(doc, _QUALITY_COLUMNS, scored)]
    unscored = [g for g in categories if g not in scored]
    if unscored:
        lines += ["", f"Categories without references (not scored): {', '.join(unscored)}."]
    for name, reason in doc["settings"].get("reference_perplexity_omitted", {}).items():
        lines += ["", f"`{name}`: no reference perplexity ({reason})."]
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any]) -> str:
    """The human-readable report: command, overall and per-category tables, settings, machine, definitions."""
    s, m, model = doc["settings"], doc["machine"], doc["model"]
    lines = [f"# eej bench: {model['name']} on {os.path.basename(s['questions'])}", ""]
    lines += ["Reproduce (from the repository root):", "", "```", s["command"], "```", ""]
    if s.get("note"):
        lines += [f"**Note:** {s['note']}", ""]

    lines += ["## Overall", "", overall_table(doc), ""]
    lines += ["## Per category", "", per_category_table(doc), ""]
    quality = quality_tables(doc)
    if quality is not None:
        lines += ["## Task quality (against the questions' references)", "", quality, ""]

    lines += ["## Settings", ""]
    shown = {k: v for k, v in s.items() if k not in ("command", "note")}
    lines += [f"- {k}: `{json.dumps(v)}`" for k, v in shown.items()] + [""]
    lines += ["## Contestants", ""]
    for name, c in result_contestants(doc):
        lines.append(f"- `{name}`: " + ", ".join(f"{k}={v}" for k, v in c["info"].items()))
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()] + [""]
    lines += ["## Definitions", "", *_DEFINITIONS, ""]
    return "\n".join(lines)


_DEFINITIONS = [
    "- tokens/s: generated tokens / generation wall time (prefill + decoding; compile time and warm-up "
    "excluded; compile time is listed apart). With batches, a batch's time is shared equally by its rows.",
    "- speedup: tokens/s / eej `plain`'s tokens/s on the same questions in the same run (peers too).",
    "- row speedup: decode speed of a generating row / eej `plain`'s: tokens after the first / the decode-loop "
    "seconds during which the answer's row was still generating (its batch's loop time x the share of the loop's steps "
    "it took part in). Rows that finished early and wait for their batch's longest row, and the prefill, do not count: "
    "under sampling answers of different lengths change `speedup` by chance, not this.",
    f"- speedup 95% CI, row speedup 95% CI: paired percentile-bootstrap intervals ({CI_RESAMPLES} resamples) over the "
    "run's generate calls (one batch, one turn: its rows share one timing), the same calls resampled for the contestant "
    "and eej `plain`. They cover timing noise from call to call and how the speedup varies over prompts, not an effect "
    f"lasting a whole process; n/a with fewer than {MIN_CI_UNITS} calls.",
    "- speedup 95% CI with run noise: that interval widened by the noise between runs that no bootstrap within a run "
    "sees (code placement, drift): a log-scale standard deviation (settings: run_noise_sd; by default "
    f"{RUN_NOISE_SD}, estimated from this project's A/A controls on its CPU VM) added in quadrature. Read \"faster than "
    "plain\" from this one.",
    "- mean accepted: generated tokens / full-model forwards (the prefill counts as one); plain = 1.00.",
    "- avg layers: transformer layers computed in decode steps / tokens those steps generated; plain = the "
    "model's layer count.",
    "- speculated, exited early, checked exit: fractions of decode steps in which the method drafted at least one "
    "token / the token left the stack before the last layer / the step checked whether it may (SpecEE's predictors, "
    "M2R2's fast stream and exit predictor; an adaptive exit skips the check where it does not pay).",
    "- identical: fraction of answers token-identical to eej `plain`'s answer (greedy and coupled-sampling runs).",
    "- token agreement: fraction of generated tokens equal to the full model's argmax given the answer's own "
    "prefix (one teacher-forced eej forward over prompt + answer).",
    "- ROUGE-L: mean LCS-based F1 on token ids against eej `plain`'s answer.",
    "- ROUGE-L vs reference: mean ROUGE-L F1 of the answer text against the question's reference (Google's "
    "rouge-score, `rougeL`, stemmed; the best of several acceptable references), over the answers with one.",
    "- BLEU: corpus BLEU (sacrebleu defaults, 0-100) of the translation answers against their references.",
    "- exact match: fraction of answers to GSM8K-style questions (reference ending `#### <answer>`) whose final "
    "number (the last number in the answer, after its last `####` if any) equals the reference's.",
    ("- reference perplexity: exp(total negative log-likelihood / total tokens) of the reference answers, each "
     "teacher-forced after the answer's own prompt through the contestant's compute path (SkipDecode's schedule by "
     "answer position, SpecEE's and M2R2's exits as they decide them; lossless methods: plain's), greedy decisions, "
     "references capped at max_new_tokens; peers are not scored."),
    "- answers / no reference (skipped): the answers behind each score, and those whose question has no reference "
    "for that turn (left out of all four).",
    "- n/a: not measured for that contestant (peers don't report forwards or layers) or not meaningful "
    "(identical rate when sampling).",
]


def write_markdown(doc: dict[str, Any], path: str) -> None:
    write_text(markdown_report(doc), path)


# ----------------------------------------------------------------------------- plots


@functools.cache
def _figure_class():
    from matplotlib.figure import Figure

    class ReportFigure(Figure):
        """A Figure that a notebook shows as a PNG when it is a cell's value, with no pyplot involved."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=90)
            return buffer.getvalue()

    return ReportFigure


def figure(doc: dict[str, Any]):
    """A matplotlib Figure with two panels: speedup per category per contestant (bars), and speedup vs
    token agreement; a third, speedup vs ROUGE-L against the questions' references, when the run had any, and a
    fourth, speedup vs the references' perplexity under each contestant, when it was computed.
    Built without pyplot, so it neither changes the backend nor stays open; a notebook shows it when it is
    a cell's value."""
    from matplotlib import colormaps

    categories = list(doc["settings"]["categories"])
    contestants = result_contestants(doc)
    colors = {name: colormaps["tab10"](i % 10) for i, (name, _) in enumerate(contestants)}
    with_quality = any(_scored(c["overall"]) for _, c in contestants)
    with_perplexity = with_quality and any(c["overall"].get("reference_perplexity") is not None for _, c in contestants)
    ratios = [3, 2] + [2] * (with_quality + with_perplexity)
    fig = _figure_class()(figsize=(14 + 6 * (len(ratios) - 2), 5))
    bars, frontier, *quality = fig.subplots(1, len(ratios), gridspec_kw={"width_ratios": ratios})

    groups = [*categories, "overall"]
    compared = [(n, c) for n, c in contestants if n != "plain"] or contestants
    width = 0.8 / len(compared)
    for i, (name, c) in enumerate(compared):
        values = [c["per_category"][g]["speedup"] if g != "overall" else c["overall"]["speedup"] for g in groups]
        xs = [g + (i - (len(compared) - 1) / 2) * width for g in range(len(groups))]
        bars.bar(xs, [v or 0.0 for v in values], width, label=name, color=colors[name])
    bars.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    bars.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    bars.set_ylabel("speedup vs eej plain (tokens/s ratio)")
    bars.set_title("Speedup per category")
    bars.legend(fontsize=8)

    xs = _frontier(frontier, contestants, colors, "token_agreement")
    frontier.set_xlim(min([0.9, *xs]) - 0.02, 1.01)
    frontier.set_xlabel("token agreement with the full model's argmax")
    frontier.set_title("Quality/speed frontier (big: overall, small: categories)")
    if quality:
        _frontier(quality[0], contestants, colors, "reference_rouge_l")
        quality[0].set_xlabel("ROUGE-L F1 against the questions' references")
        quality[0].set_title("Task quality/speed (categories with references)")
    if with_perplexity:
        _frontier(quality[1], contestants, colors, "reference_perplexity")
        quality[1].set_xscale("log")
        quality[1].set_xlabel("perplexity of the references (teacher-forced; lower is better)")
        quality[1].set_title("Reference perplexity/speed")
    fig.suptitle(f"eej bench: {doc['model']['name']}, {os.path.basename(doc['settings']['questions'])}")
    fig.tight_layout()
    return fig


def _frontier(axes, contestants: Sequence[tuple[str, dict[str, Any]]], colors: dict[str, Any], key: str) -> list[float]:
    """Scatter speedup against metric `key`: small points per category, a big one per contestant overall.
    Returns the x values drawn."""
    drawn: list[float] = []
    for name, c in contestants:
        per_cat = [(o.get(key), o["speedup"]) for o in c["per_category"].values()]
        per_cat = [(x, s) for x, s in per_cat if x is not None and s is not None]
        if per_cat:
            axes.scatter(*zip(*per_cat), s=12, alpha=0.4, color=colors[name])
            drawn += [x for x, _ in per_cat]
        o = c["overall"]
        if o.get(key) is not None and o["speedup"] is not None:
            axes.scatter([o[key]], [o["speedup"]], s=70, color=colors[name], label=name, edgecolor="black")
            drawn.append(o[key])
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_ylabel("speedup vs eej plain")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return drawn


def write_plot(doc: dict[str, Any], path: str) -> None:
    """`figure(doc)` as a PNG (written atomically)."""
    png = io.BytesIO()
    figure(doc).savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue())


def check_schema(doc: dict[str, Any]) -> None:
    """Raise ValueError if `doc` lacks a key of the documented schema (used by tests and readers)."""
    missing = [k for k in TOP_LEVEL_KEYS if k not in doc]
    if missing:
        raise ValueError(f"bench JSON lacks {', '.join(missing)}")
    for section in ("methods", "peers"):
        for name, c in doc[section].items():
            for k in CONTESTANT_KEYS:
                if k not in c:
                    raise ValueError(f"bench JSON {section}.{name} lacks {k}")
            for metrics in [c["overall"], *c["per_category"].values()]:
                absent = [k for k in REQUIRED_METRIC_KEYS if k not in metrics]
                if absent:
                    raise ValueError(f"bench JSON {section}.{name} metrics lack {', '.join(absent)}")


# ----------------------------------------------------------------------------- in a notebook


class BenchReport:
    """A bench JSON document (docs/bench.md) with notebook views: a table, per-category rows, plots.

    `doc` is the document itself (the same schema `eej bench --out` writes); `records` are the
    answers of a run made in this session (empty for a loaded file).
    """

    def __init__(self, doc: dict[str, Any], records: Sequence[Any] = ()):
        check_schema(doc)
        self.doc = doc
        self.records = list(records)

    @classmethod
    def load(cls, path: str) -> "BenchReport":
        """A report from a bench JSON file (e.g. benchmarks/results/*.json)."""
        with open(path) as f:
            return cls(json.load(f))

    def rows(self, category: str | None = None) -> list[dict[str, Any]]:
        """One dict per contestant: name, kind and the metrics (overall, or of one category)."""
        out = []
        for section in ("methods", "peers"):
            for name, c in self.doc[section].items():
                metrics = c["overall"] if category is None else c["per_category"][category]
                out.append({"contestant": name, "kind": c["info"]["kind"], **metrics})
        return out

    def table(self, per_category: bool = False) -> str:
        """The overall (or per-category) markdown table, as in `eej bench --report`."""
        return per_category_table(self.doc) if per_category else overall_table(self.doc)

    def markdown(self) -> str:
        """The full report `eej bench --report` writes."""
        return markdown_report(self.doc)

    def plot(self):
        """A matplotlib Figure: speedup per category, and speedup against token agreement (and against ROUGE-L
        to the questions' references and their perplexity, when the run had any)."""
        return figure(self.doc)

    def save(self, prefix: str) -> list[str]:
        """Write PREFIX.json, PREFIX.md and PREFIX.png; returns the paths."""
        paths = [prefix + ".json", prefix + ".md", prefix + ".png"]
        write_json(self.doc, paths[0])
        write_markdown(self.doc, paths[1])
        write_plot(self.doc, paths[2])
        return paths

    def __repr__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        s = self.doc["settings"]
        head = (f"**eej bench: {self.doc['model']['name']}**, {s['answers_per_contestant']} answers per contestant, "
                f"max {s['max_new_tokens']} new tokens, batch {s['batch_size']}, "
                f"{'greedy' if s['greedy'] else 'sampling'} on {', '.join(self.doc['machine']['devices'][:1])}")
        return f"{head}\n\n{self.table()}\n"


def load_results(path: str) -> BenchReport:
    """A bench JSON file as a BenchReport (`eej.load_results(path).plot()`)."""
    return BenchReport.load(path)
