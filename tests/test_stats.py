"""simkit.evaluation.stats against known cases: bootstrap coverage, paired tests, McNemar, the random asker."""
import numpy as np
import pytest

from simkit.evaluation import stats
from simkit.evaluation.metrics import confusion, macro_f1 as metrics_macro_f1


def test_bootstrap_ci_of_a_constant_is_exact_and_seeded():
    e = stats.bootstrap_mean([0.7] * 50)
    assert (e.value, e.lo, e.hi) == pytest.approx((0.7, 0.7, 0.7))
    x = np.random.default_rng(1).normal(size=80)
    assert stats.bootstrap_mean(x, seed=3) == stats.bootstrap_mean(x, seed=3)
    assert stats.bootstrap_mean(x, seed=3) != stats.bootstrap_mean(x, seed=4)
    assert stats.bootstrap_mean([]).value is None
    # None values are left out of the mean (null = does not apply)
    assert stats.bootstrap_mean([1.0, None, 0.0, None]).value == pytest.approx(0.5)


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval_and_covers():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=1.0, size=4000)
    e = stats.bootstrap_mean(x, seed=0)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert e.lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert e.hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    # coverage of the true mean over repeated samples is near 95%
    hits = 0
    for s in range(200):
        y = rng.normal(loc=2.0, scale=1.0, size=100)
        c = stats.bootstrap_mean(y, n_boot=500, seed=s)
        hits += c.lo <= 2.0 <= c.hi
    assert 0.89 <= hits / 200 <= 0.99


def test_paired_bootstrap_nonzero_and_zero_differences():
    rng = np.random.default_rng(2)
    base = rng.random(300) < 0.5
    better = base | (rng.random(300) < 0.4)  # strictly more right answers on the same tasks
    d = stats.paired_bootstrap(stats.index_mean(better.astype(float)), stats.index_mean(base.astype(float)), 300)
    assert d.diff == pytest.approx(better.mean() - base.mean())
    assert d.lo > 0 and d.p < 0.001
    same = stats.paired_bootstrap(stats.index_mean(base.astype(float)), stats.index_mean(base.astype(float)), 300)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    # two unrelated runs with equal accuracy: CI straddles 0, p large
    other = np.roll(base, 1)
    null = stats.paired_bootstrap(stats.index_mean(other.astype(float)), stats.index_mean(base.astype(float)), 300)
    assert null.lo < 0 < null.hi and null.p > 0.2


def test_mcnemar_exact_against_hand_computation():
    # b=10, c=2: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096 = 0.03857
    assert stats.mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert round(stats.mcnemar_exact(10, 2), 4) == 0.0386
    assert stats.mcnemar_exact(2, 10) == stats.mcnemar_exact(10, 2)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0
    a = [1] * 10 + [0] * 2 + [1] * 5
    b = [0] * 10 + [1] * 2 + [1] * 5
    assert stats.mcnemar(a, b) == {"b": 10, "c": 2, "p": pytest.approx(0.03857, abs=1e-5)}


def test_macro_f1_matches_the_confusion_matrix_definition():
    gold = ["CLARIFY"] * 10 + ["ANSWER"] * 40
    pred = ["CLARIFY"] * 8 + ["ANSWER"] * 2 + ["CLARIFY"] * 4 + ["ANSWER"] * 35 + [None]
    assert stats.macro_f1(gold, pred) == pytest.approx(metrics_macro_f1(confusion(gold, pred)))
    assert stats.macro_f1(["ANSWER"] * 3, ["ANSWER"] * 3) == pytest.approx(0.5)  # CLARIFY F1 undefined -> 0


def test_ask_rates_and_j():
    g = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    asked = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    idx = np.arange(10)
    assert stats.index_ask_rate(g, asked, "clarify")(idx) == pytest.approx(0.75)
    assert stats.index_ask_rate(g, asked, "answer")(idx) == pytest.approx(1 / 6)
    assert stats.index_ask_rate(g, asked, "j")(idx) == pytest.approx(0.75 - 1 / 6)
    w = stats.when_summary(g, asked, n_boot=200)
    assert w["ask_rate"] == pytest.approx(0.4) and w["ask_rate_diff"] == pytest.approx(0.75 - 1 / 6)
    lo, hi = w["ask_rate_diff_ci"]
    assert lo <= w["ask_rate_diff"] <= hi
    always = stats.when_summary(g, np.ones(10, bool), n_boot=200)
    assert always["ask_rate_diff"] == 0.0 and always["ask_rate_diff_ci"] == [0.0, 0.0]


@pytest.mark.parametrize("pi,q", [(0.3, 0.3), (0.4, 0.8), (0.5, 0.1)])
def test_random_asker_centres_on_the_analytic_macro_f1_and_zero_j(pi, q):
    n = 2000
    g = np.zeros(n, bool)
    g[: int(pi * n)] = True
    r = stats.random_asker(g, q, draws=1000, seed=1)
    assert r["macro_f1"] == pytest.approx(stats.random_asker_macro_f1_expected(pi, q), abs=0.01)
    assert r["macro_f1_lo"] < r["macro_f1"] < r["macro_f1_hi"]
    assert abs(r["j"]) < 0.01 and r["j_lo"] < 0 < r["j_hi"]
    assert stats.random_asker(g, q, draws=50, seed=1) == stats.random_asker(g, q, draws=50, seed=1)


def test_pooled_seeds_and_pairing():
    rng = np.random.default_rng(5)
    runs = [(rng.random(200) < p).astype(float) for p in (0.5, 0.6, 0.7)]
    pooled = stats.pooled_seeds([stats.index_mean(r) for r in runs], 200, n_boot=500)
    per = [r.mean() for r in runs]
    assert pooled["per_seed"] == pytest.approx(per) and pooled["value"] == pytest.approx(np.mean(per))
    assert pooled["sd"] == pytest.approx(np.std(per, ddof=1))
    assert (pooled["min"], pooled["max"]) == (min(per), max(per))
    assert pooled["lo"] < pooled["value"] < pooled["hi"]
    assert stats.pair_indices(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert stats.pair_indices(3, 1) == [(0, 0), (1, 0), (2, 0)]
    assert stats.pair_indices(1, 2) == [(0, 0), (0, 1)]
    assert stats.pair_indices(3, 2) == [(0, 0), (1, 1)]
    # a pooled paired difference of a mean = the per-task difference averaged over seed pairs
    base = (rng.random(200) < 0.4).astype(float)
    d = stats.paired_bootstrap_pooled([(stats.index_mean(r), stats.index_mean(base)) for r in runs], 200, n_boot=500)
    assert d.diff == pytest.approx(np.mean([r - base for r in runs])) and d.n_pairs == 3
