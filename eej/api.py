"""eej in a notebook: load a model, generate with any method, compare methods, benchmark, plot.

    import eej
    model = eej.load_model("smollm2-135m")
    eej.generate(model, "Why is the sky blue?", method="plain")             # -> Completions; any "NAME[:PRESET]"
    methods = eej.api.ready_methods(model)                                 # registered and ready for this model
    report = eej.compare(model, ["Why is the sky blue?", "Name three rivers."], methods)
    report                      # a table in a notebook (overall metrics per method)
    report.plot()               # speedup per category, and speedup vs token agreement
    eej.benchmark(model, "../shared/data/eval/spec_bench.jsonl", methods, limit=2)

A method is a spec string (`NAME[:PRESET|:FILE]`, resolved by the method registry), a `Strategy`
(no add-ons), or a `(strategy, method_params)` pair (add-ons you built or trained yourself).
Engines are kept per model and method, so a second call reuses the compiled code. Everything here
is a thin layer over `Engine`, `build_method` and `eej.bench`; `compare` and `benchmark` follow the
bench protocol (interleaved, warm-up and compile time excluded; see docs/bench.md).

A model of your own (params + a per-layer function) comes from `eej.custom_model`
(eej.weights.custom; see docs/engine.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from typing import Any, Mapping, Sequence, Union

import jax
import numpy as np

from eej.bench.contestants import MethodContestant
from eej.bench.peers import load_peers, parse_peers
from eej.bench.questions import Question, load_questions, select_questions, with_draws
from eej.bench.report import BenchReport
from eej.bench.runner import RunSettings
from eej.bench.session import bench_document
from eej.config import SamplingConfig
from eej.decoding.engine import Engine, GenerationOutput
from eej.decoding.methods import build_method, known_methods
from eej.decoding.strategy import Strategy
from eej.weights.registry import Model

MethodLike = Union[str, Strategy, "tuple[Strategy, Any]"]
Prompt = Union[str, Sequence[int]]

# id(model) -> {key: (method_params, Engine)}; entries leave with their model (weakref.finalize).
_ENGINES: dict[int, dict[Any, tuple[Any, Engine]]] = {}


def _resolve(model: Model, method: MethodLike) -> tuple[Any, Strategy, Any]:
    """(cache key, strategy, method_params) of a method given as a spec, a Strategy or a pair."""
    if isinstance(method, str):
        return method, None, None  # built on a cache miss only
    if isinstance(method, Strategy):
        return method, method, None
    if isinstance(method, tuple) and len(method) == 2 and isinstance(method[0], Strategy):
        return (method[0], id(method[1])), method[0], method[1]
    raise TypeError(f"a method is a spec string, a Strategy or a (strategy, method_params) pair, got {method!r}")


def engine(model: Model, method: MethodLike = "plain", *, cache_size: int | None = None) -> Engine:
    """The Engine for `method` on `model` (built once per model, method and cache size, then reused)."""
    key, strategy, method_params = _resolve(model, method)
    key = (key, cache_size)
    engines = _ENGINES.get(id(model))
    if engines is None:
        engines = _ENGINES[id(model)] = {}
        weakref.finalize(model, _ENGINES.pop, id(model), None)
    hit = engines.get(key)
    if hit is not None and (isinstance(method, str) or hit[0] is method_params):  # a spec: what it built last time
        return hit[1]
    if isinstance(method, str):
        strategy, method_params = build_method(model, method)
    built = Engine(model, strategy, method_params, cache_size=cache_size)
    engines[key] = (method_params, built)
    return built


def method_status(model: Model) -> dict[str, str]:
    """Every registered method -> "ready" if `--method NAME` builds for `model` (its default preset and
    trained add-ons are there), else the one-line reason it does not."""
    status = {}
    for name in known_methods():
        try:
            build_method(model, name)
            status[name] = "ready"
        except (ValueError, OSError) as e:  # preset, artifact and settings errors are ValueErrors
            status[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return status


def ready_methods(model: Model) -> list[str]:
    """The registered methods that build for `model` as they are (see `method_status`)."""
    return [name for name, s in method_status(model).items() if s == "ready"]


def method_label(method: MethodLike) -> str:
    """A display name: the spec itself, or the strategy's registered name."""
    if isinstance(method, str):
        return method
    return (method if isinstance(method, Strategy) else method[0]).name


# ----------------------------------------------------------------------------- generate


@dataclasses.dataclass
class Completions:
    """What `generate` returns: one completion per prompt, and the engine's timings.

    texts / tokens: the completions (text, and generated ids with the EOS that ended a row).
    output: the engine's GenerationOutput (per-row forwards and layers, prefill / decode / compile seconds).
    """

    method: str
    prompts: list[Prompt]
    texts: list[str]
    tokens: list[list[int]]
    output: GenerationOutput

    @property
    def text(self) -> str:
        """The first completion."""
        return self.texts[0]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens / (prefill + decode) seconds; compile time excluded."""
        return self.output.tokens_per_second

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens from decode steps / decode seconds (the first token of each row comes from the prefill)."""
        o = self.output
        return (sum(o.new_tokens) - len(o.tokens)) / o.decode_seconds if o.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        o = self.output
        return (f"{self.method}: {sum(o.new_tokens)} tokens in {o.seconds:.2f} s, {self.tokens_per_second:.1f} tokens/s "
                f"({self.decode_tokens_per_second:.1f} decoding; compile {o.compile_seconds:.1f} s not counted)")

    def __repr__(self) -> str:
        return "\n".join([self.summary(), *(f"[{i}] {t}" for i, t in enumerate(self.texts))])

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {i} | {_cell(_prompt_text(p))} | {_cell(t)} |" for i, (p, t) in enumerate(zip(self.prompts, self.texts)))
        return f"**{self.summary()}**\n\n| # | prompt | completion |\n|---|---|---|\n{rows}\n"


def _prompt_text(p: Prompt) -> str:
    return p if isinstance(p, str) else f"<{len(p)} token ids>"


def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", "<br>")


_IDS = "token ids (a list of ints, or a 1-D integer numpy/JAX array)"


def _token_ids(prompt: Any, where: str) -> list[int] | None:
    """A prompt given as token ids — a list or tuple of ints, or a 1-D integer numpy or JAX array — as a list of
    ints; None if it is not token ids at all. TypeError naming `where` for ids of the wrong kind (float or bool
    arrays or elements, arrays of another rank)."""
    if isinstance(prompt, (np.ndarray, jax.Array)):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise TypeError(f"{where}: an array prompt must be 1-D integer token ids, got {prompt.dtype} of shape "
                            f"{tuple(prompt.shape)}")
        return [int(t) for t in np.asarray(prompt)]
    # A list holding any number is meant as token ids (not a batch), so every element must be an int.
    if isinstance(prompt, (list, tuple)) and any(isinstance(t, (int, float, np.number, np.bool_)) for t in prompt):
        for i, t in enumerate(prompt):
            if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_)):
                raise TypeError(f"{where}: token ids must be ints; element {i} is {type(t).__name__} {t!r}")
        return [int(t) for t in prompt]
    return None


def _not_a_prompt(where: str, value: Any, batch: bool = False) -> TypeError:
    hint = " (decode bytes to a string first)" if isinstance(value, (bytes, bytearray)) else ""
    what = f"a string, {_IDS}, or a list of those" if batch else f"a string or {_IDS}"
    return TypeError(f"{where}: expected {what}; got {type(value).__name__}{hint}")


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt or a batch -> prompts, each a string or a list of token ids; TypeError naming what is wrong.

    A batch is a list or tuple of prompts, or a 2-D integer array (one row per prompt).
    """
    if isinstance(prompts, (np.ndarray, jax.Array)) and prompts.ndim == 2:
        if not np.issubdtype(prompts.dtype, np.integer):
            raise TypeError(f"prompts: a 2-D array must be integer token ids (one row per prompt), got {prompts.dtype}")
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, str):
        return [prompts]
    ids = _token_ids(prompts, "prompts")
    if ids is not None:
        return [ids]
    if not isinstance(prompts, (list, tuple)):
        raise _not_a_prompt("prompts", prompts, batch=True)
    if not prompts:
        raise ValueError("no prompts given")
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        ids = None if isinstance(p, str) else _token_ids(p, f"prompt {i}")
        if not isinstance(p, str) and ids is None:
            raise _not_a_prompt(f"prompt {i}", p)
        out.append(p if isinstance(p, str) else ids)
    return out


def generate(
    model: Model,
    prompts: Prompt | Sequence[Prompt],
    method: MethodLike = "plain",
    *,
    max_new_tokens: int = 128,
    chat: bool = True,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    coupled: bool = True,
    seed: int = 0,
    cache_size: int | None = None,
    batch_size: int | None = None,
) -> Completions:
    """Generate for one prompt or a batch (texts, or token-id lists used as they are) with `method`.

    chat: wrap text prompts in the model's chat template. temperature 0 = greedy. coupled: see
    eej.config.SamplingConfig (False: residual speculative sampling). batch_size: decode at most this many prompts
    at once, the others queued for the first row to free up (None: all at once; eej.decoding.engine.Engine.generate).
    """
    items = _as_prompt_list(prompts)
    tok = model.tokenizer
    ids = [(tok.encode_chat(p) if chat else tok.encode(p)) if isinstance(p, str) else p for p in items]
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, coupled=coupled)
    out = engine(model, method, cache_size=cache_size).generate(ids, max_new_tokens, sampling, seed=seed,
                                                                batch_size=batch_size)
    return Completions(method_label(method), items, [tok.decode(t) for t in out.tokens], out.tokens, out)


# ----------------------------------------------------------------------------- compare / benchmark


def _named_methods(methods: Sequence[MethodLike] | Mapping[str, MethodLike]) -> dict[str, MethodLike]:
    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        if isinstance(methods, (str, Strategy)):
            methods = [methods]
        named = {}
        for m in methods:
            name = method_label(m)
            if name in named:
                raise ValueError(f"method {name!r} is listed twice; pass a dict {{name: method}} to name them apart")
            named[name] = m
    if "plain" not in named:
        named = {"plain": "plain", **named}  # the baseline every metric is relative to
    return {"plain": named["plain"], **{k: v for k, v in named.items() if k != "plain"}}


def _contestants(model: Model, methods, cache_size: int | None) -> list[Any]:
    """One contestant per named method, on the cached engine; a method named a second time in the same call (an A/A
    control, {"plain": "plain", "again": "plain"}) gets an engine of its own that compiles apart and is not cached, as
    `eej bench`'s contestants do: timing one engine twice would hide where each compile's code landed."""
    contestants, used = [], set()
    for name, m in _named_methods(methods).items():
        built = engine(model, m, cache_size=cache_size)
        if id(built) in used:
            built = Engine(model, built.strategy, built.method_params, cache_size=cache_size, share_programs=False)
        used.add(id(built))
        contestants.append(MethodContestant(model, name, engine=built))
    return contestants


def _call(name: str, model: Model, **shown: Any) -> str:
    """How this run was asked for, recorded as the report's command."""
    args = ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None)
    return f"eej.{name}(eej.load_model({model.name!r}), {args})"


def _run_bench(model: Model, contestants: list[Any], questions: list[Any], described: dict[str, Any],
               max_new_tokens: int, batch_size: int, sampling: SamplingConfig, seed: int, agreement: bool,
               progress: bool) -> BenchReport:
    """The bench protocol over `questions` (eej.bench.session) -> BenchReport."""
    doc, records = bench_document(model, contestants, questions, RunSettings(max_new_tokens, batch_size, sampling, seed),
                                  described, agreement=agreement, progress=progress)
    return BenchReport(doc, records)


def compare(
    model: Model,
    prompts: Sequence[str] | Mapping[str, Sequence[str]],
    methods: Sequence[MethodLike] | Mapping[str, MethodLike] = ("plain",),
    *,
    max_new_tokens: int = 128,
    batch_size: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    coupled: bool = True,
    seed: int = 0,
    agreement: bool = True,
    progress: bool = False,
    cache_size: int | None = None,
) -> BenchReport:
    """Run `methods` (plain is added as the baseline) on your own prompts -> BenchReport.

    prompts: chat prompts, or {category: prompts} for per-category rows.
    The bench protocol applies: interleaved contestants, warm-up and compile time excluded, speedups
    against plain in the same run, identical-output and token-agreement checks.
    """
    groups = {"prompts": list(prompts)} if not isinstance(prompts, Mapping) else {k: list(v) for k, v in prompts.items()}
    if isinstance(prompts, str) or not all(isinstance(p, str) for g in groups.values() for p in g):
        raise TypeError("prompts: a list of strings, or {category: list of strings}")
    questions = [Question(i, category, (p,)) for i, (category, p) in
                 enumerate((c, p) for c, group in groups.items() for p in group)]
    if not questions:
        raise ValueError("no prompts given")
    contestants = _contestants(model, methods, cache_size)
    digest = hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()
    described = {
        "command": _call("compare", model, prompts=f"<{len(questions)} prompts>", methods=[c.name for c in contestants],
                         max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed),
        "note": None, "questions": "(prompts given in Python)", "questions_sha256": digest, "limit": None,
        "mt_bench_categories": "keep",
    }
    return _run_bench(model, contestants, questions, described, max_new_tokens, batch_size,
                      SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, coupled=coupled), seed, agreement, progress)


def benchmark(
    model: Model,
    questions: str,
    methods: Sequence[MethodLike] | Mapping[str, MethodLike] = ("plain",),
    *,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    peers: Sequence[str] = (),
    early_exit_layer: int | None = None,
    peer_threads: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    coupled: bool = True,
    seed: int = 0,
    draws: int = 1,
    agreement: bool = True,
    progress: bool = True,
    mt_bench_categories: str = "auto",
    note: str | None = None,
    cache_size: int | None = None,
) -> BenchReport:
    """`eej bench` from Python: a Spec-Bench-schema questions file, methods and optional transformers peers
    (`peers=["hf", "hf-early-exit"]`, with `early_exit_layer` and `peer_threads` as in docs/bench.md); `draws`
    answers each question that many times under sampling (eej.bench.questions.with_draws)."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, coupled=coupled)
    chosen = with_draws(select_questions(load_questions(questions, mt_bench_categories), categories, limit), draws,
                        sampling.greedy)
    peer_names = parse_peers(",".join(peers)) if peers else []
    contestants = _contestants(model, methods, cache_size)
    contestants += load_peers(peer_names, model.name, model, early_exit_layer, peer_threads)
    with open(questions, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    described = {
        "command": _call("benchmark", model, questions=questions, methods=[c.name for c in contestants if c.kind == "method"],
                         categories=list(categories) if categories else None, limit=limit, peers=list(peers) or None,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed,
                         **({"draws": draws} if draws != 1 else {})),
        "note": note, "questions": questions, "questions_sha256": digest, "limit": limit, "draws": draws,
        "mt_bench_categories": mt_bench_categories,
    }
    return _run_bench(model, contestants, chosen, described, max_new_tokens, batch_size, sampling, seed, agreement, progress)
