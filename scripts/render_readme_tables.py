#!/usr/bin/env python
"""Rewrite the generated tables of README.md and benchmarks/RESULTS.md from the code and from
benchmarks/results/*.json (never typed by hand).

    python scripts/render_readme_tables.py            # rewrite both pages in place
    python scripts/render_readme_tables.py --check    # exit 1 if either is out of date (a test runs this check)

Each page holds named sections between markers; each is replaced by what the code and the result
files say:

    README.md
    <!-- generated:methods -->    the registered methods: paper, lossless, batching, presets, add-ons, docs page
    <!-- generated:comparison --> eej against transformers / LayerSkip, EAGLE, Medusa and the papers' code;
                                  eej's column is read from the registered methods, so it claims only merged ones
    <!-- generated:status -->     the latest readings of the STATUS_SERIES runs (eej.bench.results) of `eej bench`, a column per cell
    <!-- generated:plain -->      scripts/bench_plain.py output
    <!-- generated:gpu -->        scripts/gpu_bench.py output
    benchmarks/RESULTS.md
    <!-- generated:specbench -->  every `eej bench` JSON document in benchmarks/results/
    <!-- generated:other -->      any other JSON there, listed with its device

each closed by `<!-- /generated:NAME -->`. The result sections come from eej.bench.results (the
library renders its own documents); this script adds what only the README says (the method registry
as a table, the comparison with other projects) and edits the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys

import yaml

from eej.bench.report import markdown_table
from eej.bench.results import STATUS_SERIES, results_markdown, status_markdown
from eej.decoding.methods import METHOD_MODULES, known_methods, random_method
from eej.testing import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README_SECTIONS = ("methods", "comparison", "status", "plain", "gpu")
RESULTS_PAGE_SECTIONS = ("specbench", "other")
SECTIONS = (*README_SECTIONS, *RESULTS_PAGE_SECTIONS)
_MARKER = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


class ReadmeError(ValueError):
    """The README's markers can't be used."""


@dataclasses.dataclass
class MethodInfo:
    """What the README says about one registered method (besides `plain`), read from the code and configs/."""

    name: str
    paper: str | None
    lossless: bool | None  # None: no random instance to read the class flags from
    batch_invariant: bool | None
    presets: str
    shipped: list[str]  # trained add-on files the presets name (artifacts/...)
    page: str | None


def method_infos(model_name: str = "smollm2-135m") -> list[MethodInfo]:
    """Every registered method but `plain`, as its module, its strategy class and its presets file say.

    In METHOD_MODULES' order (registration order depends on which module a process imported first)."""
    tiny = tiny_model("tiny-llama")
    infos = []
    order = {m.rsplit(".", 1)[1]: i for i, m in enumerate(METHOD_MODULES)}
    for name in sorted(known_methods(), key=lambda n: order.get(method_family(n), len(order))):
        if name == "plain":
            continue
        strategy = random_method(tiny, name)[0]
        family = method_family(name)
        module = next((m for m in METHOD_MODULES if m.rsplit(".", 1)[1] == family), None)
        doc = (importlib.import_module(module).__doc__ or "") if module else ""
        paper = re.search(r"\(([^()]*arXiv[^()]*)\)", doc)
        presets_path = os.path.join(ROOT, "configs", model_name, f"{name}.yaml")
        presets, shipped = "-", []
        if os.path.exists(presets_path):
            with open(presets_path) as f:
                data = yaml.safe_load(f)
            presets = f"{len(data['presets'])} ([{data['default']}]({_rel(presets_path)}) default)"
            shipped = sorted({v for p in data["presets"].values() for v in p.values()
                              if isinstance(v, str) and v.startswith("artifacts/")})
        page = os.path.join("docs", f"{family}.md")
        infos.append(MethodInfo(
            name=name, paper=paper.group(1) if paper else None,
            lossless=None if strategy is None else bool(strategy.lossless),
            batch_invariant=None if strategy is None else bool(strategy.batch_invariant),
            presets=presets, shipped=shipped, page=page if os.path.exists(os.path.join(ROOT, page)) else None,
        ))
    return infos


def _yes_no(flag: bool | None, no: str = "no") -> str:
    return "-" if flag is None else ("yes" if flag else no)


def _shipped(files: list[str]) -> str:
    return ", ".join(f"[`{os.path.basename(f)}`]({f})" + ("" if os.path.exists(os.path.join(ROOT, f)) else " (MISSING)")
                     for f in files)


def render_methods(infos: list[MethodInfo], model_name: str = "smollm2-135m") -> str:
    """The method registry as a table: what each method is and what ships for `model_name`."""
    if not infos:
        return "_No method besides `plain` is merged yet; each appears here (with its presets, trained add-ons and docs page) when its module registers._"
    header = ["method", "paper", "lossless", "rows independent in a batch",
              f"presets for {model_name}", "trained add-ons shipped", "page"]
    rows = [[f"`{m.name}`", m.paper or "-", _yes_no(m.lossless), _yes_no(m.batch_invariant, "no (one decision per batch)"),
             m.presets, (_shipped(m.shipped) or "none needed") if m.presets != "-" else "-",
             f"[{m.page}]({m.page})" if m.page else "-"] for m in infos]
    return markdown_table(header, rows)


def _names(infos: list[MethodInfo]) -> str:
    return ", ".join(f"`{m.name}`" for m in infos)


def method_family(name: str) -> str:
    """The module (and docs page) a registered method belongs to: `m2r2-spec` -> `m2r2`."""
    return name.split("-", 1)[0]


# The methods eej is built to implement (module name -> name in prose).
PUBLISHED_METHODS = {"skipdecode": "SkipDecode", "kangaroo": "Kangaroo", "specee": "SpecEE", "m2r2": "M2R2"}

# The peers' cells: what their code and maintainers say (links below the table). eej's cells are
# rendered from the registered methods, so the table never claims a method that is not merged.
PEERS = ("transformers assisted generation, incl. LayerSkip", "EAGLE (official code)", "Medusa (official code)",
         "the four methods' published code")
PEER_CELLS = {
    "methods": ("a draft model, prompt lookup, or the model's own early layers (LayerSkip, `assistant_early_exit`)",
                "EAGLE-1/2/3: a trained feature-level draft head, tree drafts",
                "Medusa-1/2: extra decoding heads, tree attention",
                "one method each; Kangaroo and SpecEE released theirs"),
    "batching": ("batch size 1 (`generate` raises `assisted generate is only supported for batch_size = 1`, transformers 5.24)",
                 "EAGLE-2/3: batch size 1 ([#126][eagle-126]); EAGLE-1 batched ([#90][eagle-90]); batched in SGLang / vLLM",
                 "batch size 1 ([#66][medusa-66])", "batch size 1"),
    "sampling": ("greedy and sampling ([docs][hf-ad])", "greedy and sampling", "greedy; \"typical acceptance\" for sampling",
                 "greedy only"),
    "lossless": ("yes", "yes", "greedy: yes; typical acceptance: no", "as the method: Kangaroo yes, SkipDecode and SpecEE no"),
    "training needed": ("none with an existing draft model; LayerSkip needs a model trained with its recipe ([blog][hf-ls])",
                        "a draft head", "decoding heads (Medusa-1) or joint fine-tuning (Medusa-2)", "per method"),
    "multi-device": ("PyTorch `device_map`", "PyTorch `device_map`", "PyTorch", "not addressed"),
    "framework": ("PyTorch", "PyTorch", "PyTorch", "PyTorch"),
}
PEER_LINKS = """[hf-ad]: https://huggingface.co/docs/transformers/assisted_decoding
[hf-ls]: https://huggingface.co/blog/layerskip
[eagle-126]: https://github.com/SafeAILab/EAGLE/issues/126
[eagle-90]: https://github.com/SafeAILab/EAGLE/issues/90
[medusa-66]: https://github.com/FasterDecoding/Medusa/issues/66"""


def eej_cells(infos: list[MethodInfo]) -> dict[str, str]:
    """eej's column of the comparison table, from the registered methods only."""
    lossless = [m for m in infos if m.lossless]
    lossy = [m for m in infos if m.lossless is False]
    trained = [m for m in infos if m.shipped]
    pending = [title for name, title in PUBLISHED_METHODS.items() if name not in {method_family(m.name) for m in infos}]
    in_progress = f"{', '.join(pending)} in progress" if pending else ""
    if infos:
        methods = f"plain decoding and {_names(infos)} (see Methods)" + (f"; {in_progress}" if pending else "")
    else:
        methods = f"plain decoding on the shared engine; {in_progress} (none merged yet)"
    parts = []
    if lossless:
        parts.append(f"{_names(lossless)}: yes (tested token-identical to plain decoding)")
    if lossy:
        parts.append(f"{_names(lossy)}: no (fidelity measured by `eej bench`)")
    if not parts:
        parts.append("no speculative method merged yet; the shared acceptance rule (`eej.decoding.verify`) is tested lossless")
    training = (f"{', '.join(f'`{m.name}`' for m in trained)}: trained add-ons shipped (see Methods); "
                "one shared training loop, `eej train METHOD`"
                if trained else "no trained add-on shipped yet; one shared training loop (`eej.train.loop`, `eej train METHOD`) for every add-on")
    return {
        "methods": methods,
        "batching": "ragged batches in one compiled loop; every registered method is tested batched (`tests/test_methods_generic.py`); a queue of prompts keeps every row busy (continuous batching: `Engine.generate(..., batch_size=B)`, `eej generate --batch-file`)",
        "sampling": "temperature / top-k / top-p in the engine, for every method; lossless methods draw plain decoding's text token for token for the same seed (coupled draws, docs/sampling.md), or by speculative sampling's residual rule",
        "lossless": "; ".join(parts),
        "training needed": training,
        "multi-device": "device mesh (rows over `data`, heads / FFN / vocabulary over `model`), multi-host with "
                        "`jax.distributed` ([docs/scale.md](docs/scale.md)); tested on simulated CPU devices and two local processes",
        "framework": "JAX, one `jit`-compiled `while_loop` per generation; Pallas / Triton attention kernels",
    }


def render_comparison(infos: list[MethodInfo]) -> str:
    """eej against the published implementations and peers, one row per feature."""
    mine = eej_cells(infos)
    rows = [[f"**{feature}**", mine[feature], *cells] for feature, cells in PEER_CELLS.items()]
    return markdown_table(["", "eej (this tree)", *PEERS], rows) + "\n\n" + PEER_LINKS


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def render_sections(results_dir: str, names: tuple[str, ...], root: str = ROOT) -> dict[str, str]:
    """Section name -> generated markdown, for the sections `names`: the methods tables, the status table of the
    STATUS_SERIES runs, and every *.json in `results_dir` (by file name); links relative to `root`, the page's folder."""
    out: dict[str, str] = {}
    if {"methods", "comparison"} & set(names):
        infos = method_infos()
        out.update(methods=render_methods(infos), comparison=render_comparison(infos))
    if "status" in names:
        out["status"] = status_markdown(results_dir, STATUS_SERIES, root)
    if {"specbench", "plain", "gpu", "other"} & set(names):
        out.update(results_markdown(results_dir, root))
    return {k: out[k] for k in names}


def render_page(text: str, results_dir: str, names: tuple[str, ...], page: str, root: str = ROOT) -> str:
    """`text` (the page `page`, in the folder `root`) with its sections `names` regenerated; ReadmeError if a
    section's markers are missing or the page marks a section it does not hold."""
    found = {m.group(2) for m in _MARKER.finditer(text)}
    unknown = found - set(names)
    if unknown:
        raise ReadmeError(f"unknown results section(s) in {page}: {', '.join(sorted(unknown))}")
    missing = [k for k in names if k not in found]
    if missing:
        raise ReadmeError(f"{page} lacks the markers of section(s) {', '.join(missing)} "
                          f"(<!-- generated:NAME --> ... <!-- /generated:NAME -->)")
    sections = render_sections(results_dir, names, root)
    return _MARKER.sub(lambda m: f"{m.group(1)}{sections[m.group(2)]}\n{m.group(4)}", text)


def render_readme(text: str, results_dir: str) -> str:
    """`text` (a README) with its generated sections regenerated."""
    return render_page(text, results_dir, README_SECTIONS, "the README")


def render_results_page(text: str, results_dir: str) -> str:
    """`text` (benchmarks/RESULTS.md) with every run's table regenerated."""
    return render_page(text, results_dir, RESULTS_PAGE_SECTIONS, "the results page", os.path.join(ROOT, "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--results-page", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--check", action="store_true", help="don't write; exit 1 if a page is out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, render in ((args.readme, render_readme), (args.results_page, render_results_page)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            new = render(text, args.results)
        except ValueError as e:
            print(f"render_readme_tables: {e}", file=sys.stderr)
            return 2
        if new == text:
            continue
        if args.check:
            stale.append(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            print(f"updated {path}")
    if stale:
        print(f"{', '.join(stale)} out of date with {args.results}: run python scripts/render_readme_tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
