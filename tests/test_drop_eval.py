"""Plain DROP EM/F1 (environments/pacific/drop_eval.py) against a hand-written table.

Every expected (EM, F1) below was worked out by hand from the definition of allennlp's
`drop_eval.get_metrics`, quirks included; the comment says which rule the case exercises.
"""
import math

import pytest

from environments.pacific.drop_eval import get_metrics, max_over_golds, normalize_answer

CASES = [
    # (predicted, gold, EM, F1)  -- single spans
    ("Paris", "Paris", 1.0, 1.0),                                   # identical
    ("paris", "PARIS", 1.0, 1.0),                                   # lower-casing
    ("The Eiffel Tower", "eiffel tower", 1.0, 1.0),                 # article "the" dropped
    ("an apple", "apple", 1.0, 1.0),                                # article "an" dropped
    ("a dog", "the dog", 1.0, 1.0),                                 # articles either side
    ("theater", "theater", 1.0, 1.0),                               # "the" only as a whole word
    ("theater", "ater", 0.0, 0.0),                                  # ... so no partial strip
    ("Hello, world!", "hello world", 1.0, 1.0),                     # punctuation removed
    ("New York City", "New York", 0.0, 0.8),                        # P=2/3 R=1
    ("York", "New York", 0.0, 0.67),                                # P=1 R=1/2 -> 0.666.. -> 0.67
    ("dogs and cats", "cats and dogs", 0.0, 1.0),                   # bag of tokens: order-free
    ("the the dog", "dog dog", 0.0, 1.0),                           # sets: duplicates count once
    ("", "", 1.0, 1.0),                                             # empty vs empty
    ("", "something", 0.0, 0.0),                                    # empty prediction
    ("something", "", 0.0, 0.0),                                    # empty gold
    ("a", "the", 1.0, 1.0),                                         # both normalise to ""
    ("x y z", "a b c", 0.0, 0.0),                                   # nothing in common
    ("well-known", "well known", 1.0, 1.0),                         # hyphen splits tokens
    ("state of the art", "state-of-the-art", 1.0, 1.0),             # ... both sides
    # numbers
    ("5", "5.0", 1.0, 1.0),                                         # float canonical form
    ("1,000", "1000", 1.0, 1.0),                                    # comma stripped, then float
    ("$5", "5", 1.0, 1.0),                                          # "$" is punctuation
    ("5%", "5", 1.0, 1.0),                                          # "%" is punctuation
    ("-5", "5", 1.0, 1.0),                                          # hyphen split: sign lost
    ("1e3", "1000", 1.0, 1.0),                                      # float("1e3") == 1000.0
    ("Infinity", "inf", 1.0, 1.0),                                  # str(float("Infinity"))
    ("3.50", "3.5", 1.0, 1.0),
    ("$1,234.50", "1234.5", 0.0, 0.0),                              # "$1,234.50" -> "123450.0"
    ("$1,234", "1234", 1.0, 1.0),                                   # ... but "$1,234" -> "1234.0"                                      # dot kept inside a number
    ("3.5.", "3.5", 0.0, 0.0),                                      # "3.5." -> "35": numbers differ
    ("12 apples", "12", 0.0, 0.67),                                 # number present: P=1/2 R=1
    ("13 apples", "12 apples", 0.0, 0.0),                           # gold number missing -> 0
    ("12", "12 apples", 0.0, 0.67),                                 # shares the number: R=1/2
    ("apples", "12 apples", 0.0, 0.0),                              # number gate: no 12 -> 0
    ("12 13", "12 apples", 0.0, 0.5),                               # gate passes on 12: P=R=1/2
    ("12 apples", "apples", 0.0, 0.67),                             # gold has no number: no gate
    ("1 2 3 4 5 6", "1 2 3 4 5 6 7", 0.0, 0.92),                    # 12/13 = 0.923 -> 0.92
    ("a b c d e f g h", "a b c d e f g h i", 0.0, 0.93),            # articles: 7 vs 8 -> 14/15
    # multi-span
    (["Paris", "London"], ["London", "Paris"], 1.0, 1.0),           # span order free
    (["Paris"], ["Paris", "London"], 0.0, 0.5),                     # missing span counts 0
    (["Paris", "London", "Rome"], ["Paris", "London"], 0.0, 0.67),  # extra span: 2 / 3 slots
    (["Paris London"], ["Paris", "London"], 0.0, 0.33),             # one bag vs two: 2/3 / 2
    ("Paris", ["Paris", "London"], 0.0, 0.5),                       # string vs list
    (["New York", "Boston"], ["Boston", "New York City"], 0.0, 0.9),  # (1 + 0.8) / 2
    (["a cat", "the cat"], ["cat"], 0.0, 0.5),                      # two spans normalise the same
    (["cat"], ["a cat", "the cat"], 0.0, 0.5),                      # EM needs equal counts
    (["cat", "cat"], ["cat", "cat"], 1.0, 1.0),                     # duplicates on both sides
    (["7 dogs", "8 cats"], ["8 cats", "7 dogs"], 1.0, 1.0),         # numbers + alignment
    (["7 dogs", "8 cats"], ["7 cats", "8 dogs"], 0.0, 0.5),         # number gate picks pairs
    (["1", "2", "3"], ["3", "2", "1"], 1.0, 1.0),
    (("x", "y"), ("x",), 0.0, 0.5),                                 # tuple; extra span: 1 / 2 slots
    ("the 2019", "2019.00", 1.0, 1.0),                              # article then number
]


@pytest.mark.parametrize("pred,gold,em,f1", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_drop_table(pred, gold, em, f1):
    assert get_metrics(pred, gold) == (em, f1)


def test_table_is_big_enough():
    assert len(CASES) >= 40


def test_normalize_answer_examples():
    assert normalize_answer("The  Eiffel-Tower, Paris!") == "eiffel tower paris"
    assert normalize_answer("$1,234.50") == "123450.0"  # not a float as a whole: the dot goes too
    assert normalize_answer("-12.6 million") == "12.6 million"
    assert normalize_answer("a\tb") == "b"  # article regex sees "a" inside a tab-joined token


def test_empty_answer_lists_give_nan_f1():
    em, f1 = get_metrics([], [])
    assert em == 1.0 and math.isnan(f1)


def test_rounding_is_numpy_rounding_of_the_binary_value():
    # F1 of "t0" vs a 19-token span is 2*(1*1/19)/(1+1/19) = 0.1; with 3 unmatched gold spans the
    # mean is 0.025, which numpy rounds to 0.02 (Python's round() would give 0.03)
    long_span = " ".join(f"t{i}" for i in range(19))
    assert get_metrics(["t0"], [long_span, "u", "v", "w"]) == (0.0, 0.02)
    # 1/8 = 0.125 is exact in binary: half to even -> 0.12
    assert get_metrics(["b c"], ["b c", "x", "y", "z", "w", "v", "u", "t"]) == (0.0, 0.12)


def test_max_over_golds_skips_blank_golds():
    assert max_over_golds("Paris", ["London", "Paris"]) == (1.0, 1.0)
    assert max_over_golds("x", ["", "y"]) == (0.0, 0.0)
    assert max_over_golds("", [""]) == (0.0, 0.0)
