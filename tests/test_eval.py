"""`simkit eval` against the embedded tiny model: artefacts, ICL shots, resume after interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import simkit
from simkit.evaluation.compare import compare
from simkit.evaluation.icl import ShotSelector
from simkit.evaluation.results import read_episodes

ENVS = ["ambigsql", "pacific", "abgcoqa"]


def _eval_cmd(model_server, env, out, *extra):
    return [sys.executable, "-m", "simkit.cli", "eval", "--env", env, "--out", str(out), "--policy",
            model_server.url, "--max-tokens", "12", "--temperature", "0", *extra]


@pytest.mark.parametrize("env", ENVS)
def test_eval_each_env_writes_every_artefact(model_server, tmp_path, env):
    out = tmp_path / env
    res = subprocess.run(_eval_cmd(model_server, env, out, "--n-tasks", "12", "--icl-shots", "1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("episodes.jsonl", "metrics.json", "table.md", "confusion.png", "usage.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 12 and m["env"] == env and sum(map(sum, m["confusion"]["matrix"])) == 12
    assert len(read_episodes(out / "episodes.jsonl")) == 12
    usage = json.loads((out / "usage.json").read_text())["policy"]
    assert "| run |" in res.stdout and m["failed"] <= 1 and usage["successes"] >= 12 - m["failed"]
    assert m.get("exec_match") == ("official" if env == "ambigsql" else None)  # the reported numbers say which


def test_interrupted_eval_resumes_to_the_same_table(model_server, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--n-tasks", "16", "--concurrency", "1", "--seed", "3")
    assert subprocess.run(_eval_cmd(model_server, "toy", full, *args), capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen(_eval_cmd(model_server, "toy", part, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ep = part / "episodes.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not ep.exists() or len(ep.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    n_before = len(read_episodes(ep))
    assert 5 <= n_before < 16  # really interrupted
    assert subprocess.run(_eval_cmd(model_server, "toy", part, *args), capture_output=True, timeout=300).returncode == 0
    assert len(read_episodes(ep)) == 16
    strip = lambda d: (d / "table.md").read_text().replace(d.name, "RUN")  # noqa: E731
    assert strip(part) == strip(full)
    table = compare([full, part], n_boot=200)
    assert "| full |" in table and "| part |" in table and "| part | full |" in table


def test_icl_shot_selection_is_seeded_and_similarity_ranked():
    env = simkit.make("toy", size=40)
    pool, task = env.tasks("train"), env.tasks("test")[1]
    r1 = ShotSelector(pool, 3, "random", seed=1).select(task)
    assert [t.id for t in r1] == [t.id for t in ShotSelector(pool, 3, "random", seed=1).select(task)]
    sim = ShotSelector(pool, 3, "similar").select(task)
    query = task.prompt[-1].content.split("\n")[-1]
    assert query in sim[0].prompt[-1].content  # the best shot asks about the same thing
    assert sim[0].gold_action == task.gold_action and len(sim) == 3
    msgs = ShotSelector.as_messages(sim)
    assert [m.role for m in msgs][:2] == ["user", "assistant"]


def test_eval_defaults_greedy_and_names_its_roles(tmp_path):
    """Greedy decoding with 128 new tokens by default; metrics and tables name the simulator and the
    classifier (with its precision/recall on the references); --n-tasks counts tasks (turns)."""
    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server

    train = tmp_path / "conversations.json"
    train.write_text(json.dumps({"conversation_ids": ["a", "b", "c"]}))
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        out = tmp_path / "run"
        res = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "pacific", "--out", str(out),
                              "--policy", srv.url, "--n-tasks", "6", "--train-conversations", str(train),
                              "--clarify-rounds", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["decoding"] == {"temperature": 0.0, "max_tokens": 128}
    assert m["simulator"].startswith("grounded") and m["classifier"].startswith("rule")
    assert m["classifier_check"]["n"] == m["n"] and m["classifier_check"]["clarify_recall"] == 1.0
    assert m["n_train"] == 3 and m["clarify_rounds"] == 2
    for key in ("turn_score", "turn_score_question_only", "post_clarify_score", "post_clarify_score_asked"):
        assert key in m
    assert m["n"] == 6 and not (out / "eval_conversations.json").exists()  # one task-count flag: turns
    table = (out / "table.md").read_text()
    assert "Post-Clarify (asked)" in table and "grounded" in table and "on references" in table
    assert "simulator: grounded" in res.stdout


def test_compare_plots_one_line_per_method(tmp_path):
    from simkit.evaluation.plots import method_of

    assert method_of("ACT (sync) n=50") == "ACT (sync)" and method_of("SFT n=100") == "SFT"
    runs = []
    for label, n, f1 in (("SFT n=50", 50, 0.5), ("ACT n=50", 50, 0.6), ("SFT n=100", 100, 0.55), ("ACT n=100", 100, 0.7)):
        d = tmp_path / label.replace(" ", "_")
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"label": label, "n_train": n, "macro_f1": f1, "metric": "F1",
                                                    "n": 10, "failed": 0}))
        runs.append(d)
    table = compare(runs, tmp_path / "vs_n.png")  # equal n for two methods must not break the plot
    assert (tmp_path / "vs_n.png").stat().st_size > 1000 and "| train n |" in table and "| 100 |" in table


def test_eval_tasks_file_rows_when_columns_and_test_log(tmp_path):
    """--tasks-file evaluates exactly its ids in order; per_task.jsonl and the "when" keys are written;
    an eval on the test split is logged to OUT/test_evals.jsonl and the project log; unknown ids fail."""
    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
    from simkit.evaluation.results import ids_sha, read_rows

    ids = ["toy-test-7", "toy-test-2", "toy-test-11", "toy-test-4", "toy-test-0", "toy-test-9"]
    tasks_file = tmp_path / "sealed.json"
    tasks_file.write_text(json.dumps({"env": "toy", "split": "test", "task_ids": ids}))
    log = tmp_path / "project" / "test_log.jsonl"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simkit.cli", "eval", "--env", "toy", "--out", str(out), "--tasks-file",
           str(tasks_file), "--label", "sealed", "--no-classifier-check"]
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        res = subprocess.run(cmd + ["--policy", srv.url, "--test-log", str(log)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"task_ids": ["toy-test-1", "toy-nope-3"]}))
        res_bad = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "toy", "--tasks-file", str(bad),
                                  "--out", str(tmp_path / "bad"), "--policy", srv.url], capture_output=True, text=True,
                                 timeout=300)
    assert res_bad.returncode != 0 and "toy-nope-3" in res_bad.stderr and "1 task ids not in the split" in res_bad.stderr
    meta, rows = read_rows(out / "per_task.jsonl")
    assert [r["task_id"] for r in rows] == ids and meta["label"] == "sealed" and meta["split"] == "test"
    assert meta["sample_file"] == str(tasks_file) and meta["wall_s"] is not None
    m = json.loads((out / "metrics.json").read_text())
    for key in ("ask_rate_gold_clarify", "ask_rate_gold_answer", "ask_rate_diff", "ask_rate_diff_ci",
                "random_asker_macro_f1", "answer_exec", "macro_f1", "post_clarify_score_asked"):
        assert key in m
    assert "J = ask-rate difference" in (out / "table.md").read_text() and "ask rate \\| gold CLARIFY" in res.stdout
    for path in (out / "test_evals.jsonl", log):
        (entry,) = [json.loads(x) for x in path.read_text().splitlines()]
        assert entry["split"] == "test" and entry["n_tasks"] == 6 and entry["label"] == "sealed"
        assert entry["task_ids_sha256"] == ids_sha(ids) and entry["out"] == str(out) and entry["time_utc"].endswith("Z")
        assert "--tasks-file" in entry["command"]
    assert "test-split evaluation logged" in res.stdout


def test_eval_on_train_split_is_not_logged(tmp_path):
    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server

    out = tmp_path / "run"
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        res = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "toy", "--split", "train",
                              "--n-tasks", "4", "--out", str(out), "--policy", srv.url, "--no-classifier-check"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "SIMKIT_TEST_LOG": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "test_evals.jsonl").exists() and "logged" not in res.stdout
    assert (out / "per_task.jsonl").exists()
