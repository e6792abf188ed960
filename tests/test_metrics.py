"""Metric tests with hand-computed expected values."""
import pytest

from simkit.metrics import confusion, macro_f1, prf, summarize
from simkit.types import ANSWER, CLARIFY, Trajectory, Turn


def test_macro_f1_on_fixed_confusion_matrix():
    # gold CLARIFY: 8 predicted CLARIFY, 2 ANSWER; gold ANSWER: 4 CLARIFY, 36 ANSWER
    m = [[8, 2], [4, 36]]
    p, r, f = prf(m, 0)
    assert (p, r) == (8 / 12, 8 / 10) and f == pytest.approx(2 * (2 / 3) * 0.8 / (2 / 3 + 0.8))  # 0.72727
    pa, ra, fa = prf(m, 1)
    assert (pa, ra) == (36 / 38, 36 / 40) and fa == pytest.approx(0.923077, abs=1e-6)
    assert macro_f1(m) == pytest.approx((0.727273 + 0.923077) / 2, abs=1e-6)


def test_confusion_counts_missing_prediction_as_wrong():
    gold = [CLARIFY, CLARIFY, ANSWER, ANSWER, ANSWER]
    pred = [CLARIFY, None, ANSWER, CLARIFY, None]
    assert confusion(gold, pred) == [[1, 1], [2, 1]]


def _traj(i, gold, first, turn, reward, terminated=True, status="ok"):
    return Trajectory(task_id=str(i), env="toy", prompt=[], gold_action=gold, first_action=first, turn_score=turn,
                      reward=reward, terminated=terminated, status=status,
                      turns=[Turn(role="assistant", text="x", action=first)] if first else [])


def test_summary_turn_vs_trajectory_and_post_clarify_subset():
    trajs = [
        _traj(1, CLARIFY, CLARIFY, 0.2, 1.0),       # clarified, then answered right
        _traj(2, CLARIFY, ANSWER, 0.5, 0.5),        # guessed: half right
        _traj(3, ANSWER, ANSWER, 1.0, 1.0),
        _traj(4, ANSWER, CLARIFY, 0.0, 0.8),
        _traj(5, CLARIFY, CLARIFY, 0.1, 0.9, terminated=False),  # truncated: trajectory scores 0
        _traj(6, ANSWER, None, None, 0.0, terminated=False, status="failed"),
    ]
    s = summarize(trajs)
    assert s["n"] == 6 and s["failed"] == 1 and s["n_clarify_gold"] == 3
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["confusion"]["matrix"] == [[2, 1], [2, 1]]  # failed ANSWER counted as CLARIFY (wrong)
    assert s["turn_score"] == pytest.approx((0.2 + 0.5 + 1.0 + 0.0 + 0.1 + 0.0) / 6)
    assert s["trajectory_score"] == pytest.approx((1.0 + 0.5 + 1.0 + 0.8 + 0 + 0) / 6)
    assert s["post_clarify_score"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # gold-CLARIFY tasks only
    assert s["clarify_precision"] == pytest.approx(2 / 4) and s["clarify_recall"] == pytest.approx(2 / 3)
