"""The paper's evaluation metrics over finished trajectories (pure functions, no I/O).

Action level: accuracy, macro F1 over {CLARIFY, ANSWER}, CLARIFY precision/recall, confusion
matrix (rows = gold, columns = predicted first action).
Content level, with each env's own metric (DROP F1, embedding similarity, execution match):
- turn (`turn_score`): the first response against the reference winner — for a CLARIFY turn the
  whole gold continuation (question, user's reply, answer), as the authors' metrics score it;
- turn, question only (`turn_score_question_only`): against the reference response alone (for a
  CLARIFY turn the clarifying question) — the older form;
- trajectory: the final answer after simulated clarification against the goal, over all tasks;
- post-clarify, two ways: over tasks whose gold action is CLARIFY (`post_clarify_score`, docs/ACT.md's
  definition) and over tasks where the model asked, i.e. its first action was CLARIFY
  (`post_clarify_score_asked`, the authors' evaluate code).
When to ask (`stats.when_summary`): ask rate on gold-CLARIFY turns, on gold-ANSWER turns, their
difference J (Youden's J, with a bootstrap CI; 0 for an asker that ignores the input) and the
Macro F1 of a random asker at the run's own ask rate (mean and 95% range): a Macro F1 inside that
range says the run learnt how often to ask, not when. `answer_exec`: the content score of the
first reply on gold-ANSWER turns only (AmbigSQL: execution match), free of ask credit.
Failed episodes (a role gave up) score 0 and are counted separately.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from simkit.types import ANSWER, CLARIFY, Trajectory

LABELS = (CLARIFY, ANSWER)


def confusion(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] = LABELS) -> list[list[int]]:
    """counts[i][j] = #(gold == labels[i] and pred == labels[j]); a missing prediction counts
    as the other action (the policy did not do what was asked)."""
    idx = {a: i for i, a in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        if p not in idx:
            p = next(a for a in labels if a != g)
        m[idx[g]][idx[p]] += 1
    return m


def prf(m: list[list[int]], i: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of class i (0 where undefined, as sklearn's zero_division=0)."""
    tp = m[i][i]
    pred = sum(row[i] for row in m)
    gold = sum(m[i])
    p = tp / pred if pred else 0.0
    r = tp / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def macro_f1(m: list[list[int]]) -> float:
    return sum(prf(m, i)[2] for i in range(len(m))) / len(m)


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """Every number of the paper's tables for one run, as a flat dict (scores in [0, 1])."""
    gold = [t.gold_action for t in trajs]
    pred = [t.first_action for t in trajs]
    m = confusion(gold, pred)
    p_c, r_c, f_c = prf(m, 0)
    ok = [t for t in trajs if t.status == "ok"]
    turn = [t.turn_score or 0.0 for t in trajs]
    turn_q = [(t.turn_score if t.turn_score_question_only is None else t.turn_score_question_only) or 0.0
              for t in trajs]
    traj = [t.reward if t.terminated else 0.0 for t in trajs]
    pc = [t.reward if t.terminated else 0.0 for t in trajs if t.gold_action == CLARIFY]
    pc_asked = [t.reward if t.terminated else 0.0 for t in trajs if t.first_action == CLARIFY]
    answer_exec = [t.turn_score or 0.0 for t in trajs if t.gold_action != CLARIFY]
    return {
        "n": len(trajs), "failed": len(trajs) - len(ok),
        "accuracy": _mean(g == p for g, p in zip(gold, pred)) if trajs else None,
        "macro_f1": macro_f1(m) if trajs else None,
        "clarify_precision": p_c, "clarify_recall": r_c, "clarify_f1": f_c,
        "confusion": {"labels": list(LABELS), "matrix": m},
        "turn_score": _mean(turn), "turn_score_question_only": _mean(turn_q), "trajectory_score": _mean(traj),
        "post_clarify_score": _mean(pc), "post_clarify_score_asked": _mean(pc_asked),
        "n_clarify_gold": sum(g == CLARIFY for g in gold), "n_clarify_asked": len(pc_asked),
        "truncated": sum(t.truncated for t in trajs),
        "avg_assistant_turns": _mean(len(t.assistant_turns) for t in trajs),
        "answer_exec": _mean(answer_exec), "n_answer_gold": len(answer_exec),
        **when(gold, pred),
    }


def when(gold: Sequence[str], pred: Sequence[str | None], seed: int = 0) -> dict[str, Any]:
    """The "when to ask" keys (see the module doc) plus bootstrap CIs of accuracy and Macro F1."""
    import numpy as np

    from simkit.evaluation import stats
    g = np.array([a == CLARIFY for a in gold], bool)
    asked = np.array([p == CLARIFY for p in pred], bool)
    pred_c = np.array([(not gc) if p is None else p == CLARIFY for p, gc in zip(pred, g)], bool)
    correct = np.array([a == p for a, p in zip(gold, pred)], float)
    acc = stats.bootstrap_ci(stats.index_mean(correct), len(g), seed=seed)
    f1 = stats.bootstrap_ci(stats.index_macro_f1(g, pred_c), len(g), seed=seed)
    return {**stats.when_summary(g, asked, seed=seed), "accuracy_ci": [acc.lo, acc.hi], "macro_f1_ci": [f1.lo, f1.hi]}


COLUMNS = [("accuracy", "Acc"), ("macro_f1", "Macro F1"), ("clarify_precision", "CLARIFY P"),
           ("clarify_recall", "CLARIFY R"), ("turn_score", "Turn"),
           ("turn_score_question_only", "Turn (question only)"), ("trajectory_score", "Traj"),
           ("post_clarify_score", "Post-Clarify (gold CLARIFY)"), ("post_clarify_score_asked", "Post-Clarify (asked)")]
CONTENT = {"turn_score", "turn_score_question_only", "trajectory_score", "post_clarify_score",
           "post_clarify_score_asked"}


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def classifier_cell(s: dict[str, Any]) -> str:
    """The classifier that labelled the episodes, with its CLARIFY P/R on the reference responses."""
    name = s.get("classifier") or "?"
    chk = s.get("classifier_check") or {}
    if chk.get("n"):
        name += f" (on references: CLARIFY P {_pct(chk.get('clarify_precision'))} / R {_pct(chk.get('clarify_recall'))})"
    return name


def _ci(s: dict[str, Any], key: str, ci_key: str) -> str:
    lo, hi = (s.get(ci_key) or [None, None])[:2]
    return _pct(s.get(key)) + ("" if lo is None or hi is None else f" [{_pct(lo)}, {_pct(hi)}]")


def when_cells(s: dict[str, Any], metric_name: str = "score") -> list[tuple[str, str]]:
    """(column, cell) of the "when to ask" columns; "—" for metrics files written before them."""
    rnd = s.get("random_asker_macro_f1") or {}
    rnd_cell = "—" if rnd.get("mean") is None else f"{_pct(rnd['mean'])} [{_pct(rnd.get('lo'))}, {_pct(rnd.get('hi'))}]"
    return [("ask rate \\| gold CLARIFY", _pct(s.get("ask_rate_gold_clarify"))),
            ("ask rate \\| gold ANSWER", _pct(s.get("ask_rate_gold_answer"))),
            ("J = ask-rate difference [95% CI]", _ci(s, "ask_rate_diff", "ask_rate_diff_ci")),
            ("random-asker Macro F1 at same rate [95% range]", rnd_cell),
            (f"{metric_name} on gold-ANSWER turns (first reply)", _pct(s.get("answer_exec")))]


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]], metric_name: str = "score") -> str:
    """The paper's layout: one row per run, action metrics then content metrics (x100), the "when
    to ask" columns, then the eval size, failures, training conversations, and the classifier
    (with its precision/recall on the reference responses) and simulator it used."""
    head = ["run"] + [f"{label} {metric_name}" if key in CONTENT else label for key, label in COLUMNS] + \
        [c for c, _ in when_cells({}, metric_name)] + ["n", "failed", "train n", "classifier", "simulator"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows:
        cells = [name] + [_pct(s.get(k)) for k, _ in COLUMNS] + [c for _, c in when_cells(s, metric_name)]
        train_n = "—" if s.get("n_train") is None else str(s["n_train"])
        lines.append("| " + " | ".join(cells + [str(s.get("n", "")), str(s.get("failed", "")), train_n,
                                                 classifier_cell(s), str(s.get("simulator") or "?")]) + " |")
    return "\n".join(lines)


def action_report(gold: Sequence[str], pred: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy and CLARIFY precision/recall of predicted actions against gold labels."""
    m = confusion(gold, pred)
    p, r, f = prf(m, 0)
    return {"n": len(gold), "accuracy": _mean(g == q for g, q in zip(gold, pred)) if gold else None,
            "clarify_precision": p, "clarify_recall": r, "clarify_f1": f, "macro_f1": macro_f1(m) if gold else None,
            "confusion": {"labels": list(LABELS), "matrix": m}}
