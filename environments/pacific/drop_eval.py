"""Plain DROP exact match and F1, behaving exactly like allennlp's evaluator.

Reference behaviour: `allenai/allennlp-reading-comprehension`, `allennlp_rc/eval/drop_eval.py`
(`get_metrics`). Written here from the metric's definition; tests/test_drop_eval.py pins the
behaviour on a hand-written table, quirks included:

* Tokens are split on single spaces **and hyphens** (so "-5" becomes "5": the sign is lost, and
  "fixed-price" becomes two tokens).
* Per token: lower-case; strip ASCII punctuation unless the token parses as a Python float
  (so "1,000" -> "1000", but "1.50" keeps its dot); a token that parses as a float is rewritten as
  ``str(float(tok))`` ("1000" -> "1000.0", "1e3" -> "1000.0", "Infinity" -> "inf"); then the
  articles a / an / the are dropped.
* An answer is one span (a string) or several (a list/tuple); each span becomes a *set* of tokens
  (duplicates count once). EM = 1 iff the normalised spans are equal as sets and as many.
* F1: predicted and gold spans are aligned one-to-one by an optimal assignment maximising the sum
  of per-span F1; a pair scores 0 unless, when the gold span contains numbers, at least one of them
  appears in the predicted span. F1 = mean over max(#gold, #pred) slots (unmatched slots count 0),
  rounded to 2 decimals with numpy's rounding.
* An empty span has precision/recall 1 by convention, so ("", "") scores (1.0, 1.0) and
  ([], []) scores (1.0, nan).
"""
from __future__ import annotations

import math
import re
import string
from typing import Callable, Sequence, Union

import numpy as np

Answer = Union[str, Sequence[str]]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_SPLIT = re.compile(" |-")


def is_number(text: str) -> bool:
    """DROP's number test: anything Python's float() accepts."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalize_token(token: str) -> str:
    tok = token.lower()
    if not is_number(tok):
        tok = "".join(ch for ch in tok if ch not in _PUNCTUATION)
    if is_number(tok):
        tok = str(float(tok))
    return " ".join(_ARTICLES.sub(" ", tok).split())


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (outside numbers) and articles, canonicalise numbers."""
    parts = (normalize_token(tok) for tok in _SPLIT.split(text))
    return " ".join(p for p in parts if p.strip()).strip()


def answer_to_bags(answer: Answer, normalize: Callable[[str], str] = normalize_answer
                   ) -> tuple[list[str], list[set[str]]]:
    spans = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    normalized = [normalize(str(s)) for s in spans]
    return normalized, [set(s.split()) for s in normalized]


def bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def numbers_match(gold: set[str], predicted: set[str], is_num: Callable[[str], bool] = is_number) -> bool:
    """True when the gold bag has no number, or shares at least one number with the prediction."""
    gold_numbers = {w for w in gold if is_num(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if is_num(w)})


def align_bags(predicted: list[set[str]], gold: list[set[str]], match_numbers: bool = True,
               is_num: Callable[[str], bool] = is_number) -> np.ndarray:
    """Per-slot F1 after the optimal one-to-one alignment (length max(#gold, #pred)).

    Only the assignment's total matters for the mean, so ties between equally good assignments
    cannot change the result.
    """
    scores = np.zeros((len(gold), len(predicted)))
    for g, gold_bag in enumerate(gold):
        for p, pred_bag in enumerate(predicted):
            if not match_numbers or numbers_match(gold_bag, pred_bag, is_num):
                scores[g, p] = bag_f1(pred_bag, gold_bag)
    slots = np.zeros(max(len(gold), len(predicted)))
    if scores.size:
        from scipy.optimize import linear_sum_assignment  # installed with sentence-transformers

        rows, cols = linear_sum_assignment(scores, maximize=True)
        for r, c in zip(rows, cols):
            slots[r] = max(slots[r], scores[r, c])
    return slots


def em_f1(predicted: Answer, gold: Answer, normalize: Callable[[str], str] = normalize_answer,
          match_numbers: bool = True, is_num: Callable[[str], bool] = is_number) -> tuple[float, float]:
    """The shared EM/F1 core (the TAT-QA variant reuses it with its own normaliser)."""
    pred_spans, pred_bags = answer_to_bags(predicted, normalize)
    gold_spans, gold_bags = answer_to_bags(gold, normalize)
    em = 1.0 if set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans) else 0.0
    slots = align_bags(pred_bags, gold_bags, match_numbers, is_num)
    if slots.size == 0:
        return em, math.nan  # the reference takes the mean of an empty array
    return em, float(np.round(np.mean(slots), 2))


def get_metrics(predicted: Answer, gold: Answer) -> tuple[float, float]:
    """(exact match, F1) of a predicted answer against a gold answer (string or list of spans)."""
    return em_f1(predicted, gold)


def max_over_golds(predicted: Answer, golds: Sequence[Answer]) -> tuple[float, float]:
    """Best EM and best F1 over several acceptable gold answers (DROP's validated answers)."""
    scores = [get_metrics(predicted, g) for g in golds
              if str(g if isinstance(g, str) else (list(g) or [""])[0]).strip()]  # as evaluate_json
    if not scores:
        return 0.0, 0.0
    return max(s[0] for s in scores), max(s[1] for s in scores)
