"""Metric tests with hand-computed expected values."""
import pytest

from simkit.evaluation.metrics import confusion, macro_f1, markdown_table, prf, summarize
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


def test_turn_both_ways_and_post_clarify_both_ways():
    t = [
        _traj(1, CLARIFY, CLARIFY, 0.2, 1.0),  # asked, as it should
        _traj(2, CLARIFY, ANSWER, 0.5, 0.5),  # guessed
        _traj(3, ANSWER, CLARIFY, 0.0, 0.8),  # asked needlessly
        _traj(4, ANSWER, ANSWER, 1.0, 1.0),
    ]
    t[0].turn_score_question_only = 0.9  # the question alone matched better than the whole continuation
    s = summarize(t)
    assert s["turn_score"] == pytest.approx((0.2 + 0.5 + 0.0 + 1.0) / 4)
    assert s["turn_score_question_only"] == pytest.approx((0.9 + 0.5 + 0.0 + 1.0) / 4)  # unset: = turn_score
    assert s["post_clarify_score"] == pytest.approx((1.0 + 0.5) / 2)  # gold CLARIFY
    assert s["post_clarify_score_asked"] == pytest.approx((1.0 + 0.8) / 2)  # the model asked
    assert s["n_clarify_asked"] == 2
    s.update(classifier="rule", simulator="grounded",
             classifier_check={"n": 4, "clarify_precision": 1.0, "clarify_recall": 0.5})
    table = markdown_table([("run", s)], "F1")
    head, _, row = table.splitlines()
    for col in ("Turn F1", "Turn (question only) F1", "Post-Clarify (gold CLARIFY) F1", "Post-Clarify (asked) F1",
                "classifier", "simulator"):
        assert f"| {col} |" in head
    assert "| rule (on references: CLARIFY P 100.0 / R 50.0) | grounded |" in row


async def test_classifier_check_on_reference_responses():
    import simkit
    from simkit.roles.agents import RuleClassifier
    from simkit.evaluation.evaluate import classifier_check

    tasks = list(simkit.make("toy", size=8).tasks("train"))
    tasks[0] = tasks[0].model_copy(update={"reference": "Name the object, please."})  # a CLARIFY the rule misses
    r = await classifier_check(RuleClassifier(), tasks)
    assert r["n"] == 8 and r["clarify_recall"] == pytest.approx(3 / 4) and r["clarify_precision"] == 1.0
    assert r["classifier"].startswith("rule")
