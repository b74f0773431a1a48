"""Benchmark metrics over answer records: speed, work per token, and fidelity to plain decoding.

Every aggregate is a ratio of sums over the answers it covers (so long answers weigh by their
tokens, as in Spec-Bench), except the per-answer rates `identical_rate` and `rouge_l`, which are means
over answers:

  tokens_per_second     generated tokens / generation wall time (prefill + decode loop; compile and
                        warm-up excluded). With batches, a batch's time is shared equally by its rows.
  speedup               tokens_per_second / plain's tokens_per_second on the same questions.
  mean_accepted_tokens  generated tokens / full-model forwards (the prefill counts as one forward and
                        yields the first token, so plain decoding gives exactly 1.0).
  avg_layers            transformer layers computed in decode steps / tokens those steps generated (the
                        first token comes from the full-depth prefill and is left out of both), so plain
                        decoding gives exactly num_layers.
  identical_rate        fraction of answers token-identical to plain's answer to the same question and
                        turn (greedy, or coupled sampling where a lossless method draws plain's tokens;
                        None under residual sampling, where it means nothing).
  token_agreement       fraction of generated tokens equal to the full model's argmax given the
                        answer's own prefix (one teacher-forced forward over prompt + answer).
  rouge_l               mean ROUGE-L F1 (LCS on token ids) of the answer against plain's answer.
  speedup_ci_low/high   a 95% paired-bootstrap interval of `speedup` (row_speedup_ci_low/high: of `row_speedup`):
                        the run's generate calls (one batch, one turn) resampled with replacement, the same ones
                        for the contestant and plain (`speedup_interval`); None with fewer than MIN_CI_UNITS calls.
  speedup_run_ci_low/high  that interval widened by what varies from run to run and no bootstrap within a run sees
                        (where each engine's compiled code landed in memory, the machine's drift): RUN_NOISE_SD added
                        in quadrature on the log scale (`run_interval`). It is the one to read "faster than plain"
                        from: A/A controls' bootstrap intervals excluded 1.0 four times as often as a 95% interval may.

Task quality against the references the questions carry (eej.bench.quality defines each score); answers
without a reference are left out of them and counted in `reference_skipped`, and each has a `*_count` of
the answers it covers (all None when the run was given no references):

  reference_rouge_l      mean over answers with a reference of the ROUGE-L F1 of the answer text.
  reference_bleu         corpus BLEU (0-100) of the answers in eej.bench.quality.BLEU_CATEGORIES.
  reference_exact_match  fraction of answers to GSM8K-style references whose final number is right.
  reference_perplexity   exp(total NLL / total tokens) of the reference answers, teacher-forced through the
                         contestant's own compute path (`Engine.score`; eej.bench.session fills each record's
                         `reference_nll` and `reference_tokens`), over the answers with a reference that were scored.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from eej.bench.quality import BLEU_CATEGORIES, Reference, corpus_bleu, exact_match, is_gsm8k, reference_rouge_l

# Task quality against the questions' references (see above); a *_count is the answers behind the score before it.
REFERENCE_KEYS = (
    "reference_rouge_l",
    "reference_rouge_l_count",
    "reference_skipped",
    "reference_bleu",
    "reference_bleu_count",
    "reference_exact_match",
    "reference_exact_match_count",
    "reference_perplexity",
    "reference_perplexity_count",
)
METRIC_KEYS = (
    "answers",
    "new_tokens",
    "seconds",
    "tokens_per_second",
    "speedup",
    "mean_accepted_tokens",
    "avg_layers",
    "identical_rate",
    "token_agreement",
    "rouge_l",
    "speculated_fraction",
    "exited_fraction",
    "checked_fraction",
    "row_speedup",
    "speedup_ci_low",
    "speedup_ci_high",
    "row_speedup_ci_low",
    "row_speedup_ci_high",
    "speedup_run_ci_low",
    "speedup_run_ci_high",
    *REFERENCE_KEYS,
)
# What every bench document has had since schema version 1 (the rest were added later, null when absent).
REQUIRED_METRIC_KEYS = METRIC_KEYS[:10]
BASELINE = "plain"
# Fewer generate calls than this give no speedup interval: a bootstrap over a handful of units says little.
MIN_CI_UNITS = 6
CI_LEVEL = 0.95
CI_RESAMPLES = 4000
RUN_NOISE_SD = 0.026
"""Standard deviation of a log speedup from run to run beyond its bootstrap interval (`between_run_sd`), on this
project's 2-core CPU VM: the 97 A/A controls (a second plain decoding against plain in the same run) committed under
benchmarks/results up to 2026-12-06 (`python scripts/aa_calibration.py`, benchmarks/results/aa_calibration.md). Their
log speedups spread with a standard deviation of 0.036 where their intervals implied 0.025, and 21 of their 97 95%
intervals excluded 1.0."""


@dataclasses.dataclass
class AnswerRecord:
    """One generated answer (one turn of one question) by one contestant (a method or a peer).

    tokens: generated ids, the EOS that ended the answer included.
    seconds: generation wall time attributed to this answer (its batch's time / rows in the batch).
    forwards, layers: full-model forwards (prefill = 1) and decode-step layers, None for peers.
    agreement: how many of `tokens` equal the full model's argmax on their own prefix (None: not computed).
    decode_seconds: the part of `seconds` after the first token (None: not measured apart, e.g. peers).
    row_decode_seconds: the decode-loop seconds during which this answer's row was still generating: its batch's
      loop time x the fraction of the loop's steps the row took part in (None: not measured, e.g. peers).
    batch: the index of the batch (eej.bench.runner.plan_batches) the answer was generated in, the same in every
      round (None: not recorded, e.g. a checkpoint written before it was): with `turn`, the generate call.
    steps, speculated_steps, exited_steps, checked_steps: decode steps of this answer, and those in which the method
      drafted at least one token / left the stack early / checked whether to leave early (None for peers; checked
      also for records written before it was counted).
    reference_nll, reference_tokens: the summed negative log-likelihood of the turn's reference answer (teacher-forced
      after this answer's prompt, through the contestant's compute path) and its token count (None: not scored).
    """

    contestant: str
    question_id: int | str
    category: str
    turn: int
    prompt_tokens: list[int]
    tokens: list[int]
    seconds: float
    forwards: int | None = None
    layers: float | None = None
    agreement: int | None = None
    text: str = ""
    decode_seconds: float | None = None
    steps: int | None = None
    speculated_steps: int | None = None
    exited_steps: int | None = None
    checked_steps: int | None = None
    reference_nll: float | None = None
    reference_tokens: int | None = None
    row_decode_seconds: float | None = None
    batch: int | None = None

    @property
    def key(self) -> tuple[Any, int]:
        return (self.question_id, self.turn)

    @property
    def call(self) -> tuple[int | None, int]:
        """The generate call that made this answer: (batch, turn)."""
        return (self.batch, self.turn)


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of `a` and `b` (O(len(a)*len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[Any], reference: Sequence[Any]) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (token sequences): 2PR/(P+R) with P = LCS/|cand|,
    R = LCS/|ref|. Two empty sequences score 1.0; one empty sequence scores 0.0."""
    if not candidate and not reference:
        return 1.0
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def agreement_count(answer: Sequence[int], teacher_argmax: Sequence[int], prompt_len: int) -> int:
    """How many answer tokens equal the teacher's argmax at the position before them.

    teacher_argmax: argmax over the vocabulary at every position of prompt + answer (at least
    prompt_len + len(answer) - 1 entries); position p predicts token p + 1.
    """
    return sum(int(teacher_argmax[prompt_len - 1 + i]) == int(t) for i, t in enumerate(answer))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _counted(r: AnswerRecord, row: bool) -> tuple[int, float | None]:
    """What `speedup` (row False) or `row_speedup` (row True) counts of one answer: (tokens, seconds) — all its tokens
    over its share of its batch's time, or the tokens after its first over the decode-loop time of its row."""
    return (len(r.tokens) - 1, r.row_decode_seconds) if row else (len(r.tokens), r.seconds)


def _rate(records: Sequence[AnswerRecord], row: bool) -> float | None:
    counted = [_counted(r, row) for r in records]
    if not counted or any(seconds is None for _, seconds in counted):
        return None
    return _ratio(sum(tokens for tokens, _ in counted), sum(seconds for _, seconds in counted))


def tokens_per_second(records: Sequence[AnswerRecord]) -> float | None:
    """Generated tokens / generation seconds of `records` (None without time)."""
    return _rate(records, row=False)


def decode_tokens_per_second(records: Sequence[AnswerRecord]) -> float | None:
    """Tokens after each answer's first (which the prefill makes) / decode-loop seconds (None where not measured)."""
    if not records or any(r.decode_seconds is None for r in records):
        return None
    return _ratio(sum(len(r.tokens) - 1 for r in records), sum(r.decode_seconds for r in records))


def row_tokens_per_second(records: Sequence[AnswerRecord]) -> float | None:
    """Tokens after each answer's first / the seconds its row was generating in the decode loop: a generating
    row's speed, which rows that finished early and wait for their batch's longest one do not lower (None where
    not measured)."""
    return _rate(records, row=True)


def speedup_interval(
    records: Sequence[AnswerRecord],
    baseline: Sequence[AnswerRecord],
    row: bool = False,
    level: float = CI_LEVEL,
    resamples: int = CI_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A paired percentile-bootstrap interval of `records`' speedup over `baseline` (row speedup if `row`).

    The unit is the generate call (AnswerRecord.call: one batch, one turn): its rows share one timing, so they
    are not independent. Each resample draws len(calls) calls with replacement, the same ones for both sides,
    and takes (tokens / seconds of the contestant) / (tokens / seconds of the baseline) over them, as `speedup`
    (`row_speedup`) does over all. It covers the machine's timing noise from call to call and how the speedup
    varies from prompt to prompt; not an effect that holds for a whole process (e.g. where its code landed in
    memory). -> (low, high), or None with fewer than MIN_CI_UNITS calls both sides have, or without timings.
    """
    def per_call(rs: Sequence[AnswerRecord]) -> dict[tuple[int | None, int], tuple[int, float]] | None:
        sums: dict[tuple[int | None, int], tuple[int, float]] = {}
        for r in rs:
            tokens, seconds = _counted(r, row)
            if r.batch is None or seconds is None:
                return None
            total_tokens, total_seconds = sums.get(r.call, (0, 0.0))
            sums[r.call] = (total_tokens + tokens, total_seconds + seconds)
        return sums

    mine, base = per_call(records), per_call(baseline)
    if mine is None or base is None:
        return None
    calls = sorted(set(mine) & set(base))
    if len(calls) < MIN_CI_UNITS:
        return None
    table = np.array([[*mine[c], *base[c]] for c in calls], np.float64)  # [calls, 4]: tokens, s; plain tokens, s
    draws = np.random.default_rng(seed).integers(0, len(calls), size=(resamples, len(calls)))
    sums = table[draws].sum(axis=1)  # [resamples, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (sums[:, 0] * sums[:, 3]) / (sums[:, 1] * sums[:, 2])
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size:
        return None
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _z(level: float) -> float:
    """The standard normal quantile with `level` of the mass between -z and z."""
    return float(statistics.NormalDist().inv_cdf((1 + level) / 2))


def interval_sd(low: float, high: float, level: float = CI_LEVEL) -> float:
    """The log-scale standard deviation a `level` interval (low, high) implies: its log width / 2z."""
    return math.log(high / low) / (2 * _z(level))


def run_interval(speedup: float, low: float, high: float, run_sd: float = RUN_NOISE_SD,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """A speedup's interval (`low`, `high`: from `speedup_interval` at `level`) widened by noise between runs of
    standard deviation `run_sd` on the log scale: each side's log half-width h becomes sqrt(h^2 + (z run_sd)^2)."""
    extra = (_z(level) * run_sd) ** 2
    below, above = abs(math.log(speedup / low)), abs(math.log(high / speedup))
    return speedup * math.exp(-math.sqrt(below**2 + extra)), speedup * math.exp(math.sqrt(above**2 + extra))


def between_run_sd(controls: Sequence[tuple[float, float, float]], level: float = CI_LEVEL) -> float:
    """The standard deviation between runs that A/A `controls` (speedup, low, high of one run each, whose true
    speedup is 1) show beyond their own intervals: the method-of-moments estimate of a random effect's variance,
    mean(ln(speedup)^2) - mean(se^2), with se the interval's log half-width / z; 0 where the intervals cover it."""
    if not controls:
        raise ValueError("no A/A controls to estimate the noise between runs from")
    spread = sum(math.log(s) ** 2 for s, _, _ in controls) / len(controls)
    within = sum(interval_sd(low, high, level) ** 2 for _, low, high in controls) / len(controls)
    return math.sqrt(max(spread - within, 0.0))


def reference_metrics(
    records: Sequence[AnswerRecord], references: Mapping[tuple[Any, int], Reference] | None
) -> dict[str, Any]:
    """The REFERENCE_KEYS for `records` against `references` by (question_id, turn) (None: all None)."""
    out: dict[str, Any] = dict.fromkeys(REFERENCE_KEYS)
    if references is None:
        return out
    scored = [(r, references[r.key]) for r in records if r.key in references]
    bleu = [(r.text, ref) for r, ref in scored if r.category in BLEU_CATEGORIES and isinstance(ref, str)]
    gsm8k = [(r.text, ref) for r, ref in scored if is_gsm8k(ref)]
    perplexity = [r for r, _ in scored if r.reference_nll is not None and r.reference_tokens is not None]
    out.update(
        reference_rouge_l_count=len(scored),
        reference_skipped=len(records) - len(scored),
        reference_bleu_count=len(bleu),
        reference_exact_match_count=len(gsm8k),
        reference_perplexity_count=len(perplexity),
    )
    if scored:
        out["reference_rouge_l"] = sum(reference_rouge_l(r.text, ref) for r, ref in scored) / len(scored)
    if bleu:
        out["reference_bleu"] = corpus_bleu(*zip(*bleu))
    if gsm8k:
        out["reference_exact_match"] = sum(exact_match(text, ref) for text, ref in gsm8k) / len(gsm8k)
    tokens = sum(r.reference_tokens for r in perplexity)
    if tokens:
        out["reference_perplexity"] = math.exp(sum(r.reference_nll for r in perplexity) / tokens)
    return out


def aggregate(
    records: Sequence[AnswerRecord],
    baseline: dict[tuple[Any, int], AnswerRecord] | None,
    baseline_tokens_per_second: float | None,
    reproducible: bool,
    references: Mapping[tuple[Any, int], Reference] | None = None,
    baseline_row_tokens_per_second: float | None = None,
    run_noise_sd: float = RUN_NOISE_SD,
) -> dict[str, Any]:
    """The METRIC_KEYS for `records` (one contestant, one category or all).

    baseline: plain's records by (question_id, turn), for identical_rate, rouge_l and the speedup intervals (None:
      they are None).
    baseline_tokens_per_second: plain's tokens/s on the same questions, for speedup.
    baseline_row_tokens_per_second: plain's `row_tokens_per_second` on the same questions, for row_speedup.
    reproducible: the answers of a lossless method must be plain's (greedy decoding, or coupled sampling), so
      identical_rate is computed.
    references: the questions' references by (question_id, turn), for the reference_* keys (None: they are None).
    run_noise_sd: the noise between runs that speedup_run_ci_* allows for (`run_interval`).
    """
    tokens = sum(len(r.tokens) for r in records)
    tps = tokens_per_second(records)
    row_tps = row_tokens_per_second(records)
    out: dict[str, Any] = {
        "answers": len(records),
        "new_tokens": tokens,
        "seconds": sum(r.seconds for r in records),
        "tokens_per_second": tps,
        "speedup": tps / baseline_tokens_per_second if tps is not None and baseline_tokens_per_second else None,
        "mean_accepted_tokens": None,
        "avg_layers": None,
        "identical_rate": None,
        "token_agreement": None,
        "rouge_l": None,
        "speculated_fraction": None,
        "exited_fraction": None,
        "checked_fraction": None,
        "row_speedup": row_tps / baseline_row_tokens_per_second if row_tps and baseline_row_tokens_per_second else None,
        **dict.fromkeys(("speedup_ci_low", "speedup_ci_high", "row_speedup_ci_low", "row_speedup_ci_high",
                         "speedup_run_ci_low", "speedup_run_ci_high")),
        **reference_metrics(records, references),
    }
    if baseline is not None:
        paired = [baseline[r.key] for r in records if r.key in baseline]
        for prefix, row in (("speedup", False), ("row_speedup", True)):
            interval = speedup_interval(records, paired, row=row)
            if interval is not None:
                out[f"{prefix}_ci_low"], out[f"{prefix}_ci_high"] = interval
        if out["speedup_ci_low"] is not None and out["speedup"]:
            out["speedup_run_ci_low"], out["speedup_run_ci_high"] = run_interval(
                out["speedup"], out["speedup_ci_low"], out["speedup_ci_high"], run_noise_sd)
    if records and all(r.steps is not None for r in records):
        steps = sum(r.steps for r in records)
        out["speculated_fraction"] = _ratio(sum(r.speculated_steps for r in records), steps)
        out["exited_fraction"] = _ratio(sum(r.exited_steps for r in records), steps)
        if all(r.checked_steps is not None for r in records):
            out["checked_fraction"] = _ratio(sum(r.checked_steps for r in records), steps)
    if records and all(r.forwards is not None for r in records):
        out["mean_accepted_tokens"] = _ratio(tokens, sum(r.forwards for r in records))
    if records and all(r.layers is not None for r in records):
        out["avg_layers"] = _ratio(sum(r.layers for r in records), sum(max(len(r.tokens) - 1, 0) for r in records))
    if records and all(r.agreement is not None for r in records):
        out["token_agreement"] = _ratio(sum(r.agreement for r in records), tokens)
    if baseline is not None and records:
        pairs = [(r, baseline[r.key]) for r in records if r.key in baseline]
        if pairs:
            if reproducible:
                out["identical_rate"] = sum(r.tokens == b.tokens for r, b in pairs) / len(pairs)
            out["rouge_l"] = sum(rouge_l(r.tokens, b.tokens) for r, b in pairs) / len(pairs)
    return out


def summarize(
    records: Iterable[AnswerRecord],
    contestants: Sequence[str],
    categories: Sequence[str],
    reproducible: bool,
    references: Mapping[tuple[Any, int], Reference] | None = None,
    run_noise_sd: float = RUN_NOISE_SD,
) -> dict[str, dict[str, Any]]:
    """{contestant: {"overall": metrics, "per_category": {category: metrics}}} (metrics as `aggregate`, with
    `run_noise_sd`).

    Fidelity and speedup are against the contestant named BASELINE ("plain"), which must be present;
    task quality against `references` (eej.bench.questions.references_by_answer; None: not scored).
    """
    by_contestant: dict[str, list[AnswerRecord]] = {c: [] for c in contestants}
    for r in records:
        by_contestant[r.contestant].append(r)
    if BASELINE not in by_contestant:
        raise ValueError(f"the records hold no {BASELINE!r} answers to compare against")
    base_records = by_contestant[BASELINE]
    base_by_key = {r.key: r for r in base_records}
    base_overall = (tokens_per_second(base_records), row_tokens_per_second(base_records))
    base_per_cat = {}
    for c in categories:
        in_category = [r for r in base_records if r.category == c]
        base_per_cat[c] = (tokens_per_second(in_category), row_tokens_per_second(in_category))
    out: dict[str, dict[str, Any]] = {}
    for name in contestants:
        rows = by_contestant[name]
        out[name] = {
            "overall": aggregate(rows, base_by_key, base_overall[0], reproducible, references, base_overall[1],
                                 run_noise_sd),
            "per_category": {
                c: aggregate([r for r in rows if r.category == c], base_by_key, base_per_cat[c][0], reproducible, references,
                             base_per_cat[c][1], run_noise_sd)
                for c in categories
            },
        }
    return out
