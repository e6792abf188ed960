"""Statistics that tell signal from noise in clarify-or-answer evals (pure numpy/scipy, seeded).

Why: a Macro F1 of 0.62 vs 0.58 on 400 tasks can be noise, and a policy that asks on every turn
(or at random) can post a respectable Macro F1 without knowing *when* to ask. Everything here
resamples **tasks** (the unit the eval samples), never turns of one task separately.

Conventions
* A *statistic* is a function of task indices: `stat(idx)` with `idx` an int array of shape
  (n,) or (B, n) returns a scalar or shape (B,) (vectorised over B bootstrap resamples).
  `index_mean`, `index_macro_f1`, `index_ask_rates` build them from per-task arrays.
* Percentile bootstrap: B resamples of the n task indices with replacement (default B=2000,
  95%); the interval is the 2.5/97.5 percentiles of the resampled statistic (NaN resamples,
  e.g. one with no gold-CLARIFY task, are dropped).
* Paired bootstrap (two runs on the same task ids): the *same* resampled indices feed both
  runs; the p-value is two-sided, from the bootstrap distribution shifted to the null:
  p = (1 + #{|d* - d| >= |d|}) / (B + 1)  (Efron & Tibshirani 1993, section 16.4).
* "When" numbers: ask rate on gold-CLARIFY turns (TPR), on gold-ANSWER turns (FPR) and their
  difference J = TPR - FPR (Youden's J): 0 for any asker that ignores the input (always, never,
  at random), 1 for a perfect one.
* Random-asker null: ask independently with probability q (the run's own overall ask rate) on
  each task; its Macro F1 (and J, centred on 0) over seeded draws shows what the run's ask
  *rate* alone buys.
* Pooling seeds (several training seeds of one configuration): each metric is computed per
  seed; the row reports mean, sd (ddof=1), min and max across seeds; its CI is the pooled
  bootstrap: resample tasks once per draw, compute the metric for every seed on those tasks,
  average over seeds.
* Paired comparison of two configurations with several seeds (`pair_indices`): seed i of one is
  paired with seed i of the other where both exist (when one side has a single run, that run
  is paired with every seed of the other); the difference is averaged over the pairs per
  bootstrap draw (for a per-task mean this is the per-task difference averaged over seeds) and
  bootstrapped over tasks.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

IndexStat = Callable[[np.ndarray], "np.ndarray | float"]
N_BOOT, LEVEL, DRAWS = 2000, 0.95, 2000


@dataclass
class Estimate:
    """A point value with a percentile interval (None where undefined)."""

    value: float | None
    lo: float | None = None
    hi: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass
class PairedDiff:
    """A - B: the point difference, its bootstrap interval and two-sided p-value."""

    diff: float | None
    lo: float | None
    hi: float | None
    p: float | None
    n_pairs: int = 1

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _f(x: float | np.floating | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) task indices drawn with replacement (the same seed, the same draws)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), int)


def _interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if not s.size:
        return None, None
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- statistics of indices
def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def index_mean(x: Sequence[float | None] | np.ndarray) -> IndexStat:
    """Mean of a per-task value over the resampled tasks; None/NaN tasks are left out."""
    v = np.array([np.nan if a is None else a for a in x], float) if not isinstance(x, np.ndarray) else x.astype(float)
    ok, val = np.isfinite(v), np.nan_to_num(v)

    def stat(idx: np.ndarray) -> np.ndarray:
        return _safe_div(val[idx].sum(-1), ok[idx].sum(-1).astype(float))
    return stat


def macro_f1_arrays(gold_c: np.ndarray, pred_c: np.ndarray) -> np.ndarray:
    """Macro F1 over {CLARIFY, ANSWER} along the last axis (F1 = 2tp / (2tp + fp + fn), 0 where
    undefined, as sklearn's zero_division=0 and `metrics.prf`)."""
    g, p = gold_c.astype(bool), pred_c.astype(bool)
    tp, tn = (g & p).sum(-1), (~g & ~p).sum(-1)
    fp, fn = (~g & p).sum(-1), (g & ~p).sum(-1)
    f_c = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    f_a = np.where(tn > 0, 2 * tn / np.maximum(2 * tn + fp + fn, 1), 0.0)
    return (f_c + f_a) / 2


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], clarify: str = "CLARIFY") -> float:
    """Macro F1 of predicted actions; a missing prediction counts as the other action (wrong)."""
    g = np.array([a == clarify for a in gold], bool)
    p = np.array([(not gc) if a is None else a == clarify for a, gc in zip(pred, g)], bool)
    return float(macro_f1_arrays(g, p))


def index_macro_f1(gold_c: np.ndarray, pred_c: np.ndarray) -> IndexStat:
    return lambda idx: macro_f1_arrays(gold_c[idx], pred_c[idx])


def ask_rates_arrays(gold_c: np.ndarray, asked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ask rate on gold-CLARIFY tasks, ask rate on gold-ANSWER tasks) along the last axis."""
    g, a = gold_c.astype(bool), asked.astype(bool)
    tpr = _safe_div((g & a).sum(-1).astype(float), g.sum(-1).astype(float))
    fpr = _safe_div((~g & a).sum(-1).astype(float), (~g).sum(-1).astype(float))
    return tpr, fpr


def index_ask_rate(gold_c: np.ndarray, asked: np.ndarray, which: str) -> IndexStat:
    """`which`: 'clarify' (TPR), 'answer' (FPR) or 'j' (TPR - FPR, Youden's J)."""
    def stat(idx: np.ndarray) -> np.ndarray:
        tpr, fpr = ask_rates_arrays(gold_c[idx], asked[idx])
        return {"clarify": tpr, "answer": fpr, "j": tpr - fpr}[which]
    return stat


# --------------------------------------------------------------------------- bootstrap
def bootstrap_ci(stat: IndexStat, n: int, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Estimate:
    """Percentile bootstrap over tasks of any statistic of task indices."""
    if n == 0:
        return Estimate(None)
    point = _f(np.asarray(stat(np.arange(n))).item())
    lo, hi = _interval(np.asarray(stat(resample_indices(n, n_boot, seed)), float), level)
    return Estimate(point, lo, hi)


def bootstrap_mean(x: Sequence[float | None] | np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL,
                   seed: int = 0) -> Estimate:
    """Mean of per-task values with its percentile bootstrap interval."""
    return bootstrap_ci(index_mean(x), len(x), n_boot, level, seed)


def paired_bootstrap(stat_a: IndexStat, stat_b: IndexStat, n: int, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> PairedDiff:
    """A - B on the same n tasks: both statistics see the same resampled task indices."""
    return paired_bootstrap_pooled([(stat_a, stat_b)], n, n_boot, level, seed)


def paired_bootstrap_pooled(pairs: Sequence[tuple[IndexStat, IndexStat]], n: int, n_boot: int = N_BOOT,
                            level: float = LEVEL, seed: int = 0) -> PairedDiff:
    """Mean over (A_i, B_i) pairs of A_i - B_i, bootstrapped over tasks (see the module doc)."""
    if n == 0 or not pairs:
        return PairedDiff(None, None, None, None, len(pairs))

    def diff(idx: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack([np.asarray(a(idx), float) - np.asarray(b(idx), float) for a, b in pairs]), 0)

    d = _f(np.asarray(diff(np.arange(n))).item())
    boot = np.asarray(diff(resample_indices(n, n_boot, seed)), float)
    lo, hi = _interval(boot, level)
    if d is None:
        return PairedDiff(None, lo, hi, None, len(pairs))
    fin = boot[np.isfinite(boot)]
    p = (1 + int(np.sum(np.abs(fin - d) >= abs(d) - 1e-12))) / (fin.size + 1)
    return PairedDiff(d, lo, hi, min(1.0, p), len(pairs))


def pooled_seeds(stats: Sequence[IndexStat], n: int, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> dict[str, float | list[float | None] | None]:
    """One metric over several seeds' runs on the same n tasks: mean, sd, min, max across seeds
    and the pooled bootstrap CI (seeds averaged within each task resample)."""
    per = [_f(np.asarray(s(np.arange(n))).item()) if n else None for s in stats]
    vals = np.array([v for v in per if v is not None], float)
    out: dict[str, float | list[float | None] | None] = {
        "value": float(vals.mean()) if vals.size else None,
        "sd": float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else None),
        "min": float(vals.min()) if vals.size else None, "max": float(vals.max()) if vals.size else None,
        "per_seed": per, "lo": None, "hi": None}
    if n and stats:
        idx = resample_indices(n, n_boot, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            boot = np.nanmean(np.stack([np.asarray(s(idx), float) for s in stats]), 0)
        out["lo"], out["hi"] = _interval(boot, level)
    return out


def pair_indices(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Which runs of A and B are compared: i with i where both exist; a single run on one side is
    paired with every run of the other."""
    if n_a == 0 or n_b == 0:
        return []
    if n_b == 1:
        return [(i, 0) for i in range(n_a)]
    if n_a == 1:
        return [(0, j) for j in range(n_b)]
    return [(i, i) for i in range(min(n_a, n_b))]


# --------------------------------------------------------------------------- tests of paired accuracy
def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) McNemar p-value, two-sided: b = pairs only A got right, c = only B."""
    from scipy.stats import binom  # lazy: scipy.stats is slow to import

    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), n, 0.5)))


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Discordant counts and the exact McNemar p of two runs' per-task correctness."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    return {"b": b, "c": c, "p": mcnemar_exact(b, c)}


# --------------------------------------------------------------------------- when to ask
def random_asker(gold_c: np.ndarray, q: float, draws: int = DRAWS, level: float = LEVEL,
                 seed: int = 0) -> dict[str, float | None]:
    """Macro F1 and J of an asker that asks with probability q on each task, ignoring it."""
    g = np.asarray(gold_c, bool)
    if not g.size:
        return {"q": q, "macro_f1": None, "macro_f1_lo": None, "macro_f1_hi": None, "j": None, "j_lo": None,
                "j_hi": None}
    asked = np.random.default_rng(seed).random((draws, g.size)) < q
    f1 = macro_f1_arrays(np.broadcast_to(g, asked.shape), asked)
    tpr, fpr = ask_rates_arrays(np.broadcast_to(g, asked.shape), asked)
    j = tpr - fpr
    f_lo, f_hi = _interval(f1, level)
    j_lo, j_hi = _interval(j, level)
    return {"q": float(q), "macro_f1": float(f1.mean()), "macro_f1_lo": f_lo, "macro_f1_hi": f_hi,
            "j": _f(np.nanmean(j)) if np.isfinite(j).any() else None, "j_lo": j_lo, "j_hi": j_hi}


def random_asker_macro_f1_expected(base_rate: float, q: float) -> float:
    """Large-n Macro F1 of a random asker: CLARIFY F1 2πq/(π+q), ANSWER F1 2(1-π)(1-q)/(2-π-q)."""
    pi = base_rate
    f_c = 2 * pi * q / (pi + q) if pi + q else 0.0
    f_a = 2 * (1 - pi) * (1 - q) / (2 - pi - q) if 2 - pi - q else 0.0
    return (f_c + f_a) / 2


def when_summary(gold_c: np.ndarray, asked: np.ndarray, n_boot: int = N_BOOT, draws: int = DRAWS,
                 level: float = LEVEL, seed: int = 0) -> dict[str, object]:
    """The "when to ask" numbers of one run: ask rates by gold action, J with its CI, the run's
    overall ask rate q and the random asker at q."""
    g, a = np.asarray(gold_c, bool), np.asarray(asked, bool)
    n = g.size
    tpr, fpr = ask_rates_arrays(g, a) if n else (np.nan, np.nan)
    j = bootstrap_ci(index_ask_rate(g, a, "j"), n, n_boot, level, seed)
    q = float(a.mean()) if n else None
    rnd = random_asker(g, q, draws, level, seed) if n else random_asker(g, 0.0)
    return {"ask_rate": q, "ask_rate_gold_clarify": _f(tpr), "ask_rate_gold_answer": _f(fpr),
            "ask_rate_diff": j.value, "ask_rate_diff_ci": [j.lo, j.hi],
            "random_asker_macro_f1": {"mean": rnd["macro_f1"], "lo": rnd["macro_f1_lo"], "hi": rnd["macro_f1_hi"]},
            "random_asker_j": {"mean": rnd["j"], "lo": rnd["j_lo"], "hi": rnd["j_hi"]}}
