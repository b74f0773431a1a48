"""Task quality: an answer's text against the reference answers its question carries (Spec-Bench's `reference`).

A reference (one per turn) is a string, or a tuple of acceptable strings (Spec-Bench's rag, Natural
Questions' short answers); eej.bench.questions parses them. Three scores, each where it means something:

  reference_rouge_l      ROUGE-L F1 of the answer text against the reference text: Google's rouge-score
                         (the reference implementation of ROUGE-1.5.5: lower-cased, non-alphanumerics as
                         spaces, Porter stemming), `rougeL` (LCS over the whole text, no sentence split).
                         With several acceptable strings, the best of them. Every answer with a reference.
  reference_bleu         corpus BLEU (sacrebleu, its defaults: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp,
                         0-100) of the answers against their references, for BLEU_CATEGORIES (translation).
  reference_exact_match  for GSM8K-style references (a line `#### <answer>`): whether the answer's final
                         number equals the reference's, as numbers (`final_number` gives the rule).
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

# A turn's reference: one text, or the acceptable texts (any of them is right).
Reference = str | tuple[str, ...]
# Categories whose answers are translations, scored with BLEU (Spec-Bench's name for WMT14 de-en).
BLEU_CATEGORIES = ("translation",)
GSM8K_MARK = "####"
# A number: digits with optional thousands commas and decimals ("1,234.5"), negative after a minus that does not
# follow a letter or digit ("x = -3", but "10-12" is 10 and 12).
_NUMBER = re.compile(r"(?:(?<!\w)-)?\d+(?:,\d{3})*(?:\.\d+)?")


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def texts(reference: Reference) -> tuple[str, ...]:
    """The acceptable texts of a reference."""
    return (reference,) if isinstance(reference, str) else tuple(reference)


def reference_rouge_l(answer: str, reference: Reference) -> float:
    """ROUGE-L F1 (rouge-score, stemmed) of `answer` against `reference`: the best over its acceptable texts."""
    return max(_scorer().score(target, answer)["rougeL"].fmeasure for target in texts(reference))


def corpus_bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 0-100) of `answers` against one reference each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(answers), [list(references)]).score)


def final_number(text: str) -> Decimal | None:
    """The answer's final number: the last number in the text after its last `####` (the whole text when it has
    none), thousands commas dropped ("$1,000." -> 1000, "x = -3.5" -> -3.5). None when there is no number."""
    tail = text.rsplit(GSM8K_MARK, 1)[-1]
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # the pattern only matches numbers, so this is a safeguard
        return None


def is_gsm8k(reference: Reference) -> bool:
    """Whether a reference is a GSM8K solution (a string with a `#### <answer>` line)."""
    return isinstance(reference, str) and GSM8K_MARK in reference and final_number(reference) is not None


def exact_match(answer: str, reference: str) -> bool:
    """Whether the answer's final number equals the GSM8K reference's (numerically: 1000.00 == 1000)."""
    got = final_number(answer)
    return got is not None and got == final_number(reference)
