"""The PACIFIC score (TAT-QA variant of DROP F1) and how it differs from plain DROP."""
import pytest

from environments.pacific import drop_eval
from environments.pacific.tatqa_metric import (get_answer_str, get_metrics, normalize_answer, official_em_f1,
                                               pacific_f1, to_number)

# (predicted, gold, plain DROP (EM, F1), TAT-QA (EM, F1), the difference exercised)
DIFFERENCES = [
    ("-12.6", "12.6", (1.0, 1.0), (0.0, 0.0), "DROP splits on '-': the sign is lost"),
    ("fixed-price type", "fixed price type", (1.0, 1.0), (0.0, 0.4), "TAT-QA keeps hyphenated words whole"),
    ("$1,496.5", "1496.5", (0.0, 0.0), (1.0, 1.0), "currency and thousands separators inside numbers"),
    ("12%", "0.12", (0.0, 0.0), (1.0, 1.0), "a percent sign scales by 0.01"),
    ("-22.22%", "-0.2222", (0.0, 0.0), (1.0, 1.0), "signed percentage"),
    ("1234", "1234.0", (1.0, 1.0), (0.0, 0.0), "TAT-QA keeps ints and floats apart"),
    ("13 apples", "12 apples", (0.0, 0.0), (0.0, 0.5), "no number-match gate in TAT-QA"),
    ("(134)", "134", (1.0, 1.0), (0.0, 0.0), "accounting negative (134) = -134"),
    ("(1,234)", "(1234)", (1.0, 1.0), (0.0, 0.0), "quirk: a comma defeats the accounting negative"),
    (".5", ".7", (0.0, 0.0), (1.0, 1.0), "quirk: a leading-dot number normalises to 'None'"),
    ("1e5", "1", (0.0, 0.0), (1.0, 1.0), "float() reads 1e5; TAT-QA takes the first digits"),
    ("Paris", "the Paris", (1.0, 1.0), (1.0, 1.0), "shared: articles dropped"),
    (["b", "a"], ["a", "b"], (1.0, 1.0), (1.0, 1.0), "shared: span order free"),
    ("York", "New York", (0.0, 0.67), (0.0, 0.67), "shared: 2-decimal rounding"),
]


@pytest.mark.parametrize("pred,gold,drop,tatqa,why", DIFFERENCES, ids=[d[4] for d in DIFFERENCES])
def test_tatqa_vs_plain_drop(pred, gold, drop, tatqa, why):
    assert drop_eval.get_metrics(pred, gold) == drop
    assert get_metrics(pred, gold) == tatqa


def test_normalisation_examples():
    assert normalize_answer("$1,496.5 million") == "1496.5 million"
    # a full stop glued to a number makes it a non-number, so its punctuation is stripped (both metrics)
    assert normalize_answer("The change is -12.6.") == "change is 126"
    assert normalize_answer("The change is -12.6 .") == "change is -12.6"
    assert to_number("12.6 million") == 12_600_000.0 and to_number("(5.5)") == -5.5
    assert to_number("4") == 4 and isinstance(to_number("4"), int)
    assert to_number("no digits") is None


def test_get_answer_str_scales_and_sorts():
    assert get_answer_str([-12.6], "million") == ["-12600000.0000"]
    assert get_answer_str(["73,260", "57,768"], "thousand") == ["57768000.0000 73260000.0000"]
    assert get_answer_str(["-22.22"], "percent") == ["-0.2222"]
    assert get_answer_str(["fixed-price type"], "million") == ["fixed-price type million"]
    assert get_answer_str(["1.2345"], "") == ["1.2300"]  # rounded to 2 places before scaling


@pytest.mark.parametrize("pred,answer,scale,atype,pred_scale,expected", [
    ("-12,600,000", -12.6, "million", "arithmetic", "", (1.0, 1.0)),   # scale applied to the gold
    ("-12.6", -12.6, "million", "arithmetic", "million", (1.0, 1.0)),  # ... and to the prediction
    ("-12.6", -12.6, "million", "arithmetic", "", (0.0, 0.0)),         # missing scale: wrong number
    ("-22.22%", -22.22, "percent", "arithmetic", "", (1.0, 1.0)),
    ("-0.2222", -22.22, "percent", "arithmetic", "", (1.0, 1.0)),     # the extra percent reading
    ("44.1 dollars", 44.1, "", "arithmetic", "", (0.0, 0.0)),         # arithmetic: F1 := EM
    ("44.1 dollars", ["44.1"], "", "span", "", (0.0, 0.67)),           # span: partial F1 stays
    (["57,768", "73,260"], ["73,260", "57,768"], "thousand", "multi-span", "thousand", (1.0, 1.0)),
    ("4", "4", "", "count", "", (1.0, 1.0)),
    ("", ["x"], "", "span", "", (0.0, 0.0)),                           # empty prediction
])
def test_official_per_question_scoring(pred, answer, scale, atype, pred_scale, expected):
    assert official_em_f1(pred, answer, scale, atype, pred_scale) == expected


def test_plain_string_metric_is_not_scale_resolving_but_the_option_is():
    assert pacific_f1("-12,600,000", "-12.6 million") == 0.0
    assert pacific_f1("-12,600,000", "-12.6 million", scale_aware=True) == 1.0
    assert pacific_f1("$-12.6 million", "-12.6 million") == 1.0
    long = "The change in Other was -12.6 million."
    assert pacific_f1(long, "-12.6 million") == pacific_f1(long, "-12.6 million", scale_aware=True) == 0.5
