"""`simkit textclf`: TF-IDF + logistic regression learns a separable toy and writes per-task rows."""
import json

import simkit
from simkit.evaluation.results import read_rows
from simkit.sampling import sample_conversations
from simkit.evaluation.textclf import TextActionClassifier, text_of
from simkit.types import ANSWER, CLARIFY, Message, Task


def _task(i: int, text: str, gold: str, **meta) -> Task:
    return Task(id=f"s{i}", env="toy", prompt=[Message(role="user", content="schema noise " + text)],
                reference="r", gold_action=gold, meta=meta)


def test_text_is_the_question_when_the_task_has_one():
    t = _task(1, "Question: how many?", CLARIFY, question="How many records do we have?")
    assert text_of(t) == "How many records do we have?"
    u = Task(id="x", env="toy", gold_action=ANSWER, reference="r",
             prompt=[Message(role="user", content="first"), Message(role="assistant", content="a"),
                     Message(role="user", content="last one")])
    assert text_of(u) == "last one"


def test_classifier_learns_synthetic_cue_and_one_class_sample():
    train = [_task(i, "show the details of it" if i % 2 else "show the name of the singer", CLARIFY if i % 2 else ANSWER)
             for i in range(20)]
    clf = TextActionClassifier().fit(train)
    test = [_task(100, "give the details of it", CLARIFY), _task(101, "give the name of the singer", ANSWER)]
    assert clf.predict(test) == [CLARIFY, ANSWER]
    p = clf.p_clarify(test)
    assert p[0] > 0.5 > p[1]
    only = TextActionClassifier().fit([t for t in train if t.gold_action == ANSWER])
    assert only.predict(test) == [ANSWER, ANSWER]


def test_cli_on_toy_trains_on_the_sft_sample_and_writes_rows(tmp_path, capsys):
    from simkit.cli import main

    out = tmp_path / "clf"
    assert main(["textclf", "--env", "toy", "--n-conversations", "40", "--seed", "3", "--split", "train",
                 "--n-tasks", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| textclf n=40 |" in printed and "Macro F1" in printed
    env = simkit.make("toy")
    expected = sample_conversations(env.tasks("train"), 40, 3).conversation_ids  # as `trainer sft` samples
    assert json.loads((out / "conversations.json").read_text())["conversation_ids"] == expected
    meta, rows = read_rows(out / "per_task.jsonl")
    assert len(rows) == 30 and meta["n_train"] == 40 and meta["model"].startswith("tfidf")
    assert all(r["first_action"] == r["gold_action"] for r in rows)  # "it" vs a named referent: separable
    assert all(r["answer_exec"] is None and r["traj_score"] is None for r in rows)
    assert all(r["ask_credit"] == 1 for r in rows if r["gold_action"] == CLARIFY)
    m = json.loads((out / "metrics.json").read_text())
    assert m["macro_f1"] == 1.0 and m["ask_rate_diff"] == 1.0 and m["trajectory_score"] is None


def test_cli_with_tasks_file_on_test_is_logged(tmp_path, monkeypatch):
    from simkit.cli import main

    ids = ["toy-test-5", "toy-test-1", "toy-test-8"]
    f = tmp_path / "ids.json"
    f.write_text(json.dumps({"task_ids": ids}))
    monkeypatch.setenv("SIMKIT_TEST_LOG", str(tmp_path / "log.jsonl"))
    assert main(["textclf", "--env", "toy", "--n-conversations", "20", "--tasks-file", str(f),
                 "--out", str(tmp_path / "o")]) == 0
    _, rows = read_rows(tmp_path / "o" / "per_task.jsonl")
    assert [r["task_id"] for r in rows] == ids
    assert json.loads((tmp_path / "log.jsonl").read_text())["n_tasks"] == 3
