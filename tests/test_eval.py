"""`simkit eval` against the embedded tiny model: artefacts, ICL shots, resume after interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import simkit
from simkit.eval import ShotSelector, compare, read_episodes

ENVS = ["ambigsql", "pacific", "abgcoqa"]


def _eval_cmd(model_server, env, out, *extra):
    return [sys.executable, "-m", "simkit.cli", "eval", "--env", env, "--out", str(out), "--policy",
            model_server.url, "--max-tokens", "12", "--temperature", "0", *extra]


@pytest.mark.parametrize("env", ENVS)
def test_eval_each_env_writes_every_artefact(model_server, tmp_path, env):
    out = tmp_path / env
    res = subprocess.run(_eval_cmd(model_server, env, out, "--limit", "12", "--icl-shots", "1"),
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
    args = ("--limit", "16", "--concurrency", "1", "--seed", "3")
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
    table = compare([full, part])
    assert table.count("\n") == 3 and "full" in table and "part" in table


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
    classifier (with its precision/recall on the references); n counts conversations."""
    from simkit.fakeserver import FakeConfig, start_fake_server

    train = tmp_path / "conversations.json"
    train.write_text(json.dumps({"conversation_ids": ["a", "b", "c"]}))
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        out = tmp_path / "run"
        res = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "pacific", "--out", str(out),
                              "--policy", srv.url, "--n-conversations", "4", "--train-conversations", str(train),
                              "--clarify-rounds", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["decoding"] == {"temperature": 0.0, "max_tokens": 128}
    assert m["simulator"].startswith("grounded") and m["classifier"].startswith("rule")
    assert m["classifier_check"]["n"] == m["n"] and m["classifier_check"]["clarify_recall"] == 1.0
    assert m["n_train"] == 3 and m["clarify_rounds"] == 2
    for key in ("turn_score", "turn_score_question_only", "post_clarify_score", "post_clarify_score_asked"):
        assert key in m
    conv = json.loads((out / "eval_conversations.json").read_text())
    assert conv["n_conversations"] == 4 and m["n"] == conv["n_turns"] > 4  # PACIFIC dialogues: several turns
    table = (out / "table.md").read_text()
    assert "Post-Clarify (asked)" in table and "grounded" in table and "on references" in table
    assert "simulator: grounded" in res.stdout


def test_compare_plots_one_line_per_method(tmp_path):
    from simkit.eval import method_of

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
