"""How often Kangaroo's first draft would be accepted, without timing: teacher-forced on the model's own answers to
held-out training prompts, by draft temperature and by draft vocabulary.

    flock /tmp/eej-benchmark.lock .venv/bin/python scripts/draft_acceptance.py --temperature 0.7 \
        --draft-temperatures 1,0.7,0.55,0.4,0 --draft-vocab 4096 --out benchmarks/results/draft_acceptance_t0.7

Prompts: the training files' prompts in `eej distill`'s order (its seeded shuffle of eej.train.distill.SHIPPED_FILES), from --skip on. The shipped
add-ons were trained on the model's answers to the first 1600 of that order (configs/smollm2-135m/*.yaml), so the
default --skip 1600 measures on prompts they never saw; the evaluation sets (Spec-Bench, MT-Bench) are never read.
Plain decoding answers each prompt at --temperature (the answers a speculative decoder drafts against); then the
whole model runs once over prompt + answer, and so does the drafter (layers [0, l), the adapter, the draft head)
on the residual entering layer l. At each position that predicts an answer token, with p the target's
distribution at --temperature (over the full vocabulary) and q the draft's at a draft temperature τ (over the V'
tokens of its head):

- the chance a draft drawn from q is accepted by speculative sampling: Σ_v min(p_v, q_v);
- τ = 0 (a greedy draft, the argmax of the draft logits): p(argmax q) — under a greedy target, whether the two
  argmaxes agree;
- the ceiling any q over those V' tokens could reach: Σ_{v in V'} p_v;
- under coupled sampling (eej.decoding.sampling, the default), where a draft is accepted when the draft's own draw
  and the target's draw with the same key agree: the chance of that, P(race(q) = race(p)), from the two-round race's
  closed form (`coupled_agreement`: a lower bound, short by at most the min(p, q) mass off the ids it sums). No
  coupling agrees more often than Σ min(p, q), the residual rule's acceptance.

Lossless speculative sampling holds for any q the draft was drawn from (eej.decoding.verify), so τ and V' are free
choices of the drafter; this measures what they are worth, per draft, at the first draft of a step (later drafts
follow a drafted, not a committed, token). Reported: the mean over positions, and a 95% interval over prompts.

Several --method options (e.g. the shipped adapter and one of your own, `kangaroo:path/to/settings.yaml`) are
measured on the same answers, and each after the first also as a paired difference from the first: its acceptance
minus the first's, position by position, with a 95% interval over prompts — far narrower than the two intervals.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eej.bench.machine import load_average, machine_info
from eej.bench.report import markdown_table, write_result
from eej.config import SamplingConfig
from eej.decoding.sampling import probabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "..", "shared", "data", "train")


def acceptance(target_logits: np.ndarray, draft_logits: np.ndarray, draft_ids: np.ndarray | None, temperature: float,
               draft_temperature: float) -> np.ndarray:
    """Per position, the chance the first draft is accepted (module docstring): Σ min(p, q) over the draft head's
    tokens, p and q as decoding samples them (eej.decoding.sampling.probabilities; one-hot where greedy).

    target_logits [T, V]; draft_logits [T, V'] over the tokens `draft_ids` [V'] (None: V' = V, the full head);
    temperature: the target's (0 = greedy); draft_temperature τ (0 = the draft's argmax). -> [T] float64.
    """
    ids = np.arange(np.shape(target_logits)[-1]) if draft_ids is None else np.asarray(draft_ids)
    p_head = _probabilities(target_logits, temperature)[:, ids]  # [T, V']: the target's on the draft's tokens
    return np.minimum(p_head, _probabilities(draft_logits, draft_temperature)).sum(axis=-1)


def coupled_agreement(p: np.ndarray, q: np.ndarray, blocks: int = 16, per_block: int = 64) -> np.ndarray:
    """[T] the chance that the coupled draws from p and q [T, V] (full-vocabulary distributions, q zero off the draft's
    tokens) with one key agree: the race of eej.decoding.sampling.race_sample, blocks of `_BLOCK` ids on their summed
    weights, then the ids of the winning block.

    A race of exponential clocks picks the same entry s from weights a and b with probability
    1 / Σ_u max(a_u / a_s, b_u / b_s) (every other clock must outlast both ratios), so with P, Q the block sums
    P(agree) = Σ_S [1 / Σ_T max(P_T/P_S, Q_T/Q_S)] · Σ_{v in S} [1 / Σ_{u in S} max(p_u/p_v, q_u/q_v)]. Summed over the
    `blocks` blocks and, inside each, the `per_block` ids with the most min(p, q): a lower bound; what it omits is
    at most the min(p, q) mass off those ids.
    """
    from eej.decoding.sampling import _BLOCK

    t, vocab = p.shape
    pad = -vocab % _BLOCK
    pb = np.pad(p, ((0, 0), (0, pad))).reshape(t, -1, _BLOCK)
    qb = np.pad(q, ((0, 0), (0, pad))).reshape(t, -1, _BLOCK)
    big_p, big_q = pb.sum(-1), qb.sum(-1)
    out = np.zeros(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(t):
            chosen = np.argsort(-np.minimum(big_p[i], big_q[i]))[:blocks]
            chosen = chosen[np.minimum(big_p[i, chosen], big_q[i, chosen]) > 0]
            if not len(chosen):
                continue
            block_term = 1.0 / np.maximum(big_p[i][None] / big_p[i, chosen, None],
                                          big_q[i][None] / big_q[i, chosen, None]).sum(-1)  # [blocks]
            ps, qs = pb[i, chosen], qb[i, chosen]  # [blocks, _BLOCK]
            top = np.argsort(-np.minimum(ps, qs), axis=-1)[:, :per_block]
            pv, qv = np.take_along_axis(ps, top, -1), np.take_along_axis(qs, top, -1)  # [blocks, per_block]
            ratio = np.maximum(ps[:, None, :] / pv[..., None], qs[:, None, :] / qv[..., None]).sum(-1)
            inner = np.where(np.minimum(pv, qv) > 0, 1.0 / ratio, 0.0).sum(-1)
            out[i] = float((block_term * inner).sum())
    return out


def ceiling(target_logits: np.ndarray, draft_ids: np.ndarray | None, temperature: float) -> np.ndarray:
    """[T]: the target's probability mass on the draft head's tokens (1 for a greedy target whose argmax it holds)."""
    if draft_ids is None:
        return np.ones(len(target_logits))
    return _probabilities(target_logits, temperature)[:, np.asarray(draft_ids)].sum(axis=-1)


def _probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """[T, V] logits -> what decoding at `temperature` draws from (float32 as there, returned as float64)."""
    probs = probabilities(jnp.asarray(logits, jnp.float32), SamplingConfig(temperature=temperature))
    return np.asarray(probs, np.float64)


def interval_over_prompts(sums: Sequence[float], counts: Sequence[int], resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of Σ sums / Σ counts, resampling prompts (a prompt's positions are not
    independent of each other)."""
    table = np.array([sums, counts], np.float64).T
    draws = np.random.default_rng(seed).integers(0, len(table), size=(resamples, len(table)))
    totals = table[draws].sum(axis=1)
    low, high = np.quantile(totals[:, 0] / np.maximum(totals[:, 1], 1), [0.025, 0.975])
    return float(low), float(high)


def held_out_prompts(model: Any, count: int, skip: int) -> list[list[int]]:
    """Chat-formatted prompts [skip, skip + count) of `eej distill`'s order over the shipped adapters' training files."""
    from eej.train.distill import SHIPPED_FILES, DistillOptions, distill_prompts

    files = [os.path.join(TRAIN, name) for name in SHIPPED_FILES]
    prompts = distill_prompts(model, DistillOptions(files=tuple(files), max_prompts=skip + count))[skip:]
    if len(prompts) < count:
        raise SystemExit(f"error: only {len(prompts)} training prompts after --skip {skip}; ask for fewer")
    return [ids for _, ids in prompts]


def teacher_forced(model: Any, method_params: dict, exit_layer: int, sequence: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(target logits [T, V], draft logits [T, V']) after every token of `sequence` (length T)."""
    padded = -(-len(sequence) // 64) * 64  # a few compiled shapes, not one per length
    tokens = jnp.asarray(np.pad(np.asarray(sequence, np.int32), (0, padded - len(sequence))))[None]
    target, draft = _forward(model.params, method_params, tokens, model.cfg, exit_layer)
    return np.asarray(target[: len(sequence)]), np.asarray(draft[: len(sequence)])


@functools.partial(jax.jit, static_argnames=("cfg", "exit_layer"))
def _forward(params: Any, method_params: dict, tokens: jax.Array, cfg: Any, exit_layer: int) -> tuple[jax.Array, jax.Array]:
    """tokens [1, P] -> (the model's logits [P, V], the draft's [P, V']) after each token."""
    from eej.decoding.speculation import adapter_forward, draft_head, run_tapped
    from eej.model.cache import init_cache
    from eej.model.transformer import linear, logits_from_hidden

    padded = tokens.shape[1]
    hidden, _, tapped, positions = run_tapped(params, tokens, init_cache(cfg, 1, padded), cfg, exit_layer)
    head, _ = draft_head(params, method_params)
    drafted, _ = adapter_forward(method_params["adapter"], tapped, init_cache(cfg, 1, padded, num_layers=1), positions,
                                 cfg, kv_limit=padded)
    return logits_from_hidden(params, hidden, cfg)[0], linear(drafted[0], head)


def _numbers(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", dest="methods", action="append",
                        help="a Kangaroo spec, kangaroo[:PRESET|:FILE]; repeat to compare adapters on the same answers "
                             "(default: the shipped one)")
    parser.add_argument("--temperature", type=float, default=0.7, help="the target's sampling temperature (0 = greedy)")
    parser.add_argument("--draft-temperatures", type=_numbers, default=[1.0, 0.7, 0.55, 0.4, 0.0],
                        help="the draft's temperatures τ, comma-separated (0 = the draft's argmax)")
    parser.add_argument("--draft-vocab", type=_numbers, default=[4096],
                        help="draft head sizes V' from the adapter's ranking, comma-separated (0 = the full head)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--skip", type=int, default=1600, help="prompts of the distillation order to leave out")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.prompts < 1 or args.skip < 0 or args.max_new_tokens < 1:
        parser.error("--temperature and --skip must be >= 0, --prompts and --max-new-tokens >= 1")
    if any(v != int(v) for v in args.draft_vocab):
        parser.error("--draft-vocab takes whole numbers of tokens")

    from eej.config import SamplingConfig
    from eej.decoding.engine import Engine
    from eej.decoding.kangaroo import Kangaroo
    from eej.decoding.methods import MethodError, build_method, method_settings_for, parse_method
    from eej.decoding.speculation import load_adapter
    from eej.weights.registry import load_model

    methods = args.methods or ["kangaroo"]
    if len(set(methods)) < len(methods):
        parser.error(f"--method given twice with the same spec: {methods}")
    presets = {}
    for method in methods:
        try:
            name, presets[method] = parse_method(method)
        except MethodError as e:
            parser.error(str(e))
        if name != "kangaroo":
            parser.error(f"--method takes a Kangaroo spec (kangaroo[:PRESET|:FILE]), got {method!r}")
    load_start = load_average()
    model = load_model("smollm2-135m", kernels="xla")  # the reference products: what is measured is not speed
    drafters = {}  # (method, V') -> (exit layer, method_params)
    strategies = {}
    for method in methods:
        try:
            strategies[method], _ = build_method(model, method)
            adapter_path = method_settings_for(model, "kangaroo", presets[method]).adapter
            for size in (int(v) for v in args.draft_vocab):
                drafters[method, size] = (strategies[method].exit_layer,
                                          load_adapter(model, adapter_path, strategies[method].exit_layer, size))
        except MethodError as e:
            parser.error(str(e))
        assert isinstance(strategies[method], Kangaroo)

    prompts = held_out_prompts(model, args.prompts, args.skip)
    sampling = SamplingConfig(temperature=args.temperature)
    answers = Engine(model).generate(prompts, args.max_new_tokens, sampling, seed=args.seed).tokens
    per_prompt: dict[tuple[str, int, float], list[np.ndarray]] = {}
    per_coupled: dict[tuple[str, int, float], list[np.ndarray]] = {}
    ceilings: dict[int, list[np.ndarray]] = {}
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        sequence = list(prompt) + list(answer)
        for (method, size), (exit_layer, method_params) in drafters.items():
            target, draft = teacher_forced(model, method_params, exit_layer, sequence)
            predicting = slice(len(prompt) - 1, len(sequence) - 1)  # the positions whose next token is an answer's
            ids = None if "draft_ids" not in method_params else np.asarray(method_params["draft_ids"])
            if method == methods[0]:
                ceilings.setdefault(size, []).append(ceiling(target[predicting], ids, args.temperature))
            for tau in args.draft_temperatures:
                per_prompt.setdefault((method, size, tau), []).append(
                    acceptance(target[predicting], draft[predicting], ids, args.temperature, tau))
                if args.temperature > 0 and tau > 0:  # coupled draws: both sampled, with one key
                    p = _probabilities(target[predicting], args.temperature)
                    q = np.zeros_like(p)
                    q[:, np.arange(p.shape[1]) if ids is None else ids] = _probabilities(draft[predicting], tau)
                    per_coupled.setdefault((method, size, tau), []).append(coupled_agreement(p, q))
    rows, differences = [], []
    for (method, size, tau), values in per_prompt.items():
        low, high = interval_over_prompts([v.sum() for v in values], [len(v) for v in values])
        rows.append({"method": method, "draft_vocab": size, "draft_temperature": tau,
                     "acceptance": float(np.concatenate(values).mean()), "interval": [low, high],
                     "ceiling": float(np.concatenate(ceilings[size]).mean()),
                     "positions": int(sum(len(v) for v in values)), "prompts": len(values), "coupled": None,
                     "coupled_interval": None})
        coupled = per_coupled.get((method, size, tau))
        if coupled:
            rows[-1]["coupled"] = float(np.concatenate(coupled).mean())
            rows[-1]["coupled_interval"] = list(interval_over_prompts([v.sum() for v in coupled], [len(v) for v in coupled]))
        print(f"{method} V'={size} tau={tau}: acceptance {rows[-1]['acceptance']:.3f} ({low:.3f}-{high:.3f}); "
              f"ceiling {rows[-1]['ceiling']:.3f}; coupled {rows[-1]['coupled']}", flush=True)
        if method != methods[0]:
            base = per_prompt[methods[0], size, tau]
            low, high = interval_over_prompts([v.sum() - b.sum() for v, b in zip(values, base)], [len(v) for v in values])
            differences.append({"method": method, "versus": methods[0], "draft_vocab": size, "draft_temperature": tau,
                                "difference": float((np.concatenate(values) - np.concatenate(base)).mean()),
                                "interval": [low, high]})
            print(f"  minus {methods[0]}: {differences[-1]['difference']:+.3f} ({low:+.3f} to {high:+.3f})", flush=True)
    if args.out:
        machine = machine_info()
        machine["load_average_start"], machine["load_average_end"] = load_start, load_average()
        command = " ".join(["python", "scripts/draft_acceptance.py", *(sys.argv[1:] if argv is None else argv)])
        doc = {"command": command, "machine": machine, "model": "smollm2-135m", "methods": methods,
               "strategies": {m: repr(s) for m, s in strategies.items()}, "temperature": args.temperature,
               "prompts": args.prompts, "skip": args.skip, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
               "rows": rows, "differences": differences}
        tau_text = lambda r: "argmax" if r["draft_temperature"] == 0 else f"{r['draft_temperature']:g}"  # noqa: E731
        table = markdown_table(
            ("method", "draft vocab V'", "draft temperature", "acceptance (95% interval)",
             "coupled draws agree (95% interval)", "ceiling (mass on V')", "positions"),
            [(f"`{r['method']}`", str(r["draft_vocab"] or "full"), tau_text(r),
              f"{r['acceptance']:.3f} ({r['interval'][0]:.3f}-{r['interval'][1]:.3f})",
              "n/a" if r["coupled"] is None else
              f"{r['coupled']:.3f} ({r['coupled_interval'][0]:.3f}-{r['coupled_interval'][1]:.3f})",
              f"{r['ceiling']:.3f}", str(r["positions"])) for r in rows])
        if differences:
            table += "\n\nPaired differences (the same answers and positions; 95% interval over prompts):\n\n" + markdown_table(
                ("method", "minus", "draft vocab V'", "draft temperature", "difference (95% interval)"),
                [(f"`{d['method']}`", f"`{d['versus']}`", str(d["draft_vocab"] or "full"), tau_text(d),
                  f"{d['difference']:+.3f} ({d['interval'][0]:+.3f} to {d['interval'][1]:+.3f})") for d in differences])
        target = "a greedy target" if args.temperature == 0 else f"a target at temperature {args.temperature:g}"
        lines = [f"# Kangaroo's first draft, teacher-forced: acceptance against {target}", "",
                 f"`{command}`; {machine['cpu']}, {machine['cpu_count']} CPUs, load average {load_start} -> "
                 f"{machine['load_average_end']}. {args.prompts} held-out training prompts (from {args.skip} on in "
                 f"`eej distill`'s order), answered by plain decoding; acceptance per answer position, mean over "
                 "positions, 95% interval over prompts (scripts/draft_acceptance.py explains each column).", "", table]
        write_result(doc, "\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
