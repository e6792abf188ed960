"""The PACIFIC score: DROP EM/F1 with TAT-QA's scale-aware number normalisation.

This is the metric the ACT authors use for PACIFIC (`learning_to_clarify` ...
`act/metrics/pacific_metrics.py`, "refactored from the official evaluation code",
`dengyang17/PACIFIC` `UniPCQA/tatqa_metric.py` + `tatqa_utils.py`). Written here from those
definitions; the tests pin its behaviour.

Two levels:

* `get_metrics(pred, gold)` / `pacific_f1` -- what ACT's PACIFIC heuristic H computes on two
  strings (the final answer text vs the gold target). `PacificEnv.score` uses this, with the
  authors' tolerance epsilon = 0.9.
* `official_em_f1(...)` -- UniPCQA's per-question evaluation (`TaTQAEmAndF1.__call__`): gold
  answers and prediction are first rendered with their scale (`get_answer_str`), a bare numeric
  prediction also gets a percent reading (`add_percent_pred`), and for arithmetic/count questions
  F1 is replaced by EM.

Differences from plain DROP (`drop_eval.py`), all tested in tests/test_pacific_metric.py:

1. Tokens are split on spaces only, not hyphens: "-12.6" keeps its sign, "fixed-price" stays one
   token ("fixedprice").
2. Number test: a token is a number if, after removing the characters ``'"\\$€£¥%(),[]``, its first
   word parses as a (non-NaN) float and any second word is a scale word. So "$1,496.5", "12%",
   "(1,234)" and "[5]" are numbers (DROP: only what float() accepts; "$5" loses its "$" as
   punctuation and "5%" its "%").
3. Number canonical form: the first number in the token (regex ``[+-]?\\d+(\\.\\d+)?``) times a
   scale (a number directly followed by hundred/thousand/million/billion/percent), times 0.01 when
   the token has a "%" after digits, times -1 for an accounting negative "(123)" (digits, dots and
   spaces only: "(1,234)" stays positive), rounded to 4 places, then ``str()``. An integer stays an
   int, so "1234" != "1234.0" (DROP maps both to "1234.0"); "12%" == "0.12"; "1e5" -> "1".
   Quirk kept: a number written ".5" (no leading digit) normalises to the token "None".
4. No number-match gate in the alignment: a predicted span that misses the gold's numbers still
   earns partial F1 from its other tokens (DROP scores such a pair 0).
5. Official per-question scoring only: the scale is applied to numbers before comparison
   ("-12.6" with scale million == "-12,600,000"), numbers are rounded to 2 places before scaling,
   multi-span answers are sorted and joined into one string, and arithmetic/count F1 = EM.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any, Sequence

from .drop_eval import Answer, em_f1

_SCALE_WORDS = (("hundred", 100), ("thousand", 1000), ("million", 1_000_000),
                ("billion", 1_000_000_000), ("percent", 0.01))
_NUM_EXCLUDE = frozenset("'\"\\$€£¥%(),[]")
_FIRST_NUMBER = re.compile(r"([+-]?\d+(\.\d+)?)|([+-]?\.\d+)")
_ACCOUNTING_NEGATIVE = re.compile(r"\([\d.\s]+\)")
_PERCENT = re.compile(r"[\d.\s]+%")
_NUMBER_WITH_WORD = re.compile(r"[\d.]+\s?[a-zA-Z]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)

SCALES = ("", "thousand", "million", "billion", "percent")


def scale_to_num(scale: str) -> float:
    """Multiplier for a scale word (substring test, first hit in hundred..percent; else 1)."""
    s = scale.lower()
    for word, value in _SCALE_WORDS:
        if word in s:
            return value
    return 1


def _clean_num(text: Any) -> str:
    return "".join(ch for ch in str(text) if ch not in _NUM_EXCLUDE)


def is_number(text: str) -> bool:
    words = " ".join(_clean_num(w) for w in text.split()).split()
    if not words:
        return False
    try:
        value = float(words[0])
    except ValueError:
        return False
    if math.isnan(value):
        return False
    return len(words) < 2 or scale_to_num(words[1]) != 1


def _first_number(text: str) -> int | float | None:
    match = _FIRST_NUMBER.search(_clean_num(text))
    if match is None or not match.group(1):  # ".5" matches only the third alternative: None
        return None
    num = match.group(1)
    return float(num) if "." in num else int(num)


def _word_scale(text: str) -> float:
    match = _NUMBER_WITH_WORD.search(text)
    return scale_to_num(match.group(0).lower()) if match else 1


def to_number(text: str) -> int | float | None:
    """The signed, scaled value of the first number in `text` (None if there is none)."""
    num = _first_number(text)
    if num is None:
        return None
    sign = -1 if _ACCOUNTING_NEGATIVE.search(text.strip()) else 1
    percent = 0.01 if _PERCENT.search(text.strip()) else 1
    return round(num * _word_scale(text) * sign * percent, 4)


def normalize_token(token: str) -> str:
    tok = token.lower()
    if not is_number(tok):
        tok = "".join(ch for ch in tok if ch not in _PUNCTUATION)
    if is_number(tok):
        tok = str(to_number(tok))
    return " ".join(_ARTICLES.sub(" ", tok).split())


def normalize_answer(text: Any) -> str:
    parts = (normalize_token(tok) for tok in str(text).split(" "))
    return " ".join(p for p in parts if p.strip()).strip()


def get_metrics(predicted: Answer, gold: Answer) -> tuple[float, float]:
    """(EM, F1) as ACT's PacificMetrics: DROP's alignment, TAT-QA normalisation, no number gate."""
    return em_f1(predicted, gold, normalize=normalize_answer, match_numbers=False)


def pacific_f1(prediction: str, gold: str, scale_aware: bool = False) -> float:
    """ACT's PACIFIC heuristic on two texts. `scale_aware` also credits a bare number written in
    another scale ("12,600,000" vs "12.6 million") via UniPCQA's `get_answer_str` rendering."""
    f1 = get_metrics(prediction, gold)[1]
    if scale_aware and f1 < 1.0:
        f1 = max(f1, get_metrics(get_answer_str([prediction], ""), get_answer_str([gold], ""))[1])
    return f1


# --------------------------------------------------------------------------- UniPCQA evaluation
def get_answer_str(answers: Sequence[Any], scale: str) -> list[str]:
    """UniPCQA's rendering: sorted answers, numbers scaled and printed with 4 decimals, joined."""
    rendered = []
    for ans in sorted(answers):
        text = str(ans)
        num = to_number(text) if is_number(text) else None
        if num is None:
            if scale:
                text = f"{text} {scale}"
        elif "%" in text:
            text = "%.4f" % num
        else:
            text = "%.4f" % (round(num, 2) * scale_to_num(scale))
        rendered.append(text)
    return [" ".join(rendered)]


def gold_answers(answer: Any, answer_type: str) -> list[str]:
    """UniPCQA's `extract_gold_answers`: a list of gold strings for a PACIFIC question."""
    if answer_type in ("multi-span", "span", "question"):
        if not isinstance(answer, list):
            raise TypeError(f"{answer_type} answer must be a list, got {answer!r}")
        return answer
    if answer_type == "count":
        return [str(int(answer))]
    return [str(answer)]


def official_em_f1(prediction: str | list[str], answer: Any, scale: str, answer_type: str,
                   pred_scale: str = "") -> tuple[float, float]:
    """UniPCQA's per-question EM/F1 (`TaTQAEmAndF1.__call__`) for one PACIFIC question."""
    if not prediction:
        return 0.0, 0.0
    golds = gold_answers(answer, answer_type)
    if not golds:
        return 0.0, 0.0
    gold_strings = get_answer_str(golds, scale)
    preds = prediction if isinstance(prediction, list) else [prediction]
    pred_strings = get_answer_str(preds, pred_scale)
    if len(preds) == 1 and not pred_scale and "%" not in str(preds[0]) and is_number(str(preds[0])):
        value = to_number(str(preds[0]))
        if value is not None:
            pred_strings.append("%.4f" % value)
    em, f1 = max(get_metrics(p, g) for p in pred_strings for g in gold_strings)
    if answer_type in ("arithmetic", "count"):
        f1 = em
    return em, f1
