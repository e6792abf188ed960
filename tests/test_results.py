"""Per-task rows (results.py) and `simkit compare` over run dirs built from synthetic trajectories."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from simkit.datafile import DataError
from simkit.evaluation.metrics import summarize
from simkit.evaluation.results import export_run, read_rows, rows_from_episodes, run_rows, write_rows
from simkit.types import ANSWER, CLARIFY, Trajectory

REPO = Path(__file__).resolve().parent.parent
N = 120


def _trajs(seed: int, skill: float, n: int = N, offset: int = 0) -> list[Trajectory]:
    """Synthetic episodes: first half gold CLARIFY; `skill` = chance the first action is right."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gold = CLARIFY if i < n // 2 else ANSWER
        right = rng.random() < skill
        first = gold if right else (ANSWER if gold == CLARIFY else CLARIFY)
        turn = float(rng.random() < 0.6) if gold == ANSWER else float(first == CLARIFY)
        out.append(Trajectory(task_id=f"t{i + offset:04d}", env="toy", prompt=[], gold_action=gold, first_action=first,
                              turn_score=turn, reward=float(rng.random() < 0.5), terminated=True))
    return out


def _run_dir(root: Path, name: str, trajs, label: str | None = None, **metrics) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "episodes.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in trajs))
    (d / "metrics.json").write_text(json.dumps({"label": label or name, "metric": "Exec Match", **metrics}))
    (d / "config.json").write_text(json.dumps({"seed": 0, "split": "test", "policy_model": "m"}))
    return d


def test_rows_of_episodes_follow_the_field_definitions():
    t = _trajs(0, 0.5, n=8)
    t[0].first_action, t[0].reward = CLARIFY, 1.0  # gold CLARIFY, asked, solved
    t[1].first_action = ANSWER  # gold CLARIFY, guessed
    t[6].first_action, t[6].turn_score = ANSWER, 1.0  # gold ANSWER, answered right
    t[7].status, t[7].first_action, t[7].terminated, t[7].turn_score = "failed", None, False, None
    rows = rows_from_episodes(t)
    r0, r1, r6, r7 = rows[0], rows[1], rows[6], rows[7]
    assert (r0["asked"], r0["ask_credit"], r0["answer_exec"], r0["post_clarify_exec"]) == (True, 1, None, 1.0)
    assert (r1["asked"], r1["ask_credit"], r1["post_clarify_exec"]) == (False, 0, None)
    assert (r6["answer_exec"], r6["ask_credit"], r6["post_clarify_exec"]) == (1.0, None, None)
    assert (r7["first_action"], r7["answer_exec"], r7["traj_score"], r7["status"]) == (None, 0.0, 0.0, "failed")
    s = summarize(t)  # the rows reproduce the run's summary numbers
    assert np.mean([r["traj_score"] for r in rows]) == pytest.approx(s["trajectory_score"])
    assert np.mean([r["answer_exec"] for r in rows if r["answer_exec"] is not None]) == pytest.approx(s["answer_exec"])


def test_rows_round_trip_and_a_corrupt_row_is_named(tmp_path):
    rows = rows_from_episodes(_trajs(1, 0.7, n=10))
    p = write_rows(tmp_path / "r.jsonl", rows, {"label": "A", "seed": 1})
    meta, back = read_rows(p)
    assert back == rows and meta["label"] == "A" and meta["n"] == 10 and len(meta["task_ids_sha256"]) == 64
    lines = p.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:4] + ['{"task_id": "x", "gold_action": "ANSWER"'] + lines[4:]))
    with pytest.raises(DataError, match=r"bad\.jsonl:5: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "miss.jsonl").write_text("\n".join(lines[:2] + ['{"task_id": "x"}']))
    with pytest.raises(DataError, match=r"miss\.jsonl:3: row lacks gold_action, first_action"):
        read_rows(tmp_path / "miss.jsonl")
    (tmp_path / "dup.jsonl").write_text("\n".join(lines + [lines[1]]))
    with pytest.raises(DataError, match=r"dup\.jsonl:12: task 't0000' appears twice"):
        read_rows(tmp_path / "dup.jsonl")


def test_export_old_run_dir_and_cli(tmp_path):
    from simkit.cli import main

    d = _run_dir(tmp_path, "old", _trajs(2, 0.8), label="SFT n=50", n_train=50)
    meta, rows = run_rows(d)  # no per_task.jsonl: derived from episodes.jsonl
    assert len(rows) == N and meta["label"] == "SFT n=50" and meta["n_train"] == 50 and meta["model"] == "m"
    out = tmp_path / "bench" / "sft.jsonl"
    assert main(["results", "export", str(d), "--out", str(out), "--meta", "seed=3", "adapter=sft"]) == 0
    meta2, rows2 = read_rows(out)
    assert rows2 == rows and meta2["seed"] == 3 and meta2["adapter"] == "sft" and meta2["split"] == "test"
    assert export_run(d, tmp_path / "again.jsonl").exists()


def test_compare_pools_seeds_pairs_runs_and_writes_json(tmp_path, capsys):
    from simkit.cli import main
    from simkit.evaluation.compare import compare

    base = _run_dir(tmp_path, "base", _trajs(10, 0.55), label="SFT")
    act = [_run_dir(tmp_path, f"act{s}", _trajs(20 + s, 0.9), label="ACT") for s in range(3)]
    # ACT's seeds are grouped by their shared label; the base is the default --vs
    table = compare([str(base), *map(str, act)], json_out=tmp_path / "cmp.json", n_boot=300)
    head, _, sft_row, act_row = table.splitlines()[:4]
    assert "ask rate \\| gold CLARIFY" in head and "J = ask-rate difference" in head
    assert "Exec Match on gold-ANSWER turns (first reply)" in head and "random-asker Macro F1" in head
    assert sft_row.startswith("| SFT |") and sft_row.endswith(f"| {N} | 1 |")
    assert act_row.startswith("| ACT |") and " ± " in act_row and act_row.endswith(f"| {N} | 3 |")
    assert "| ACT | SFT |" in table and "McNemar" in table
    doc = json.loads((tmp_path / "cmp.json").read_text())
    a = doc["rows"][1]["metrics"]["accuracy"]
    assert len(a["per_seed"]) == 3 and a["min"] <= a["value"] <= a["max"] and a["lo"] < a["value"] < a["hi"]
    d = doc["paired"][0]
    assert (d["label"], d["vs"], d["seed_pairs"]) == ("ACT", "SFT", 3)
    assert d["accuracy"]["diff"] > 0.2 and d["accuracy"]["lo"] > 0 and d["accuracy"]["p"] < 0.01
    assert d["macro_f1"]["lo"] > 0 and d["ask_rate_diff"]["diff"] > 0.4 and d["mcnemar"]["p"] < 0.001
    # --group pools explicit paths under a label; --vs picks the baseline; rows files work as inputs
    rows_file = tmp_path / "base.jsonl"
    export_run(base, rows_file, {"label": "SFT-file"})
    assert main(["compare", str(rows_file), "--group", "ACT2=" + ",".join(map(str, act[:2])), "--vs", "ACT2",
                 "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "| SFT-file | ACT2 |" in out and "| ACT2 |" in out


def test_compare_requires_the_same_tasks(tmp_path):
    from simkit.evaluation.compare import compare

    a = _run_dir(tmp_path, "a", _trajs(1, 0.6))
    b = _run_dir(tmp_path, "b", _trajs(2, 0.6, offset=5))  # 5 ids differ each way
    with pytest.raises(SystemExit, match=r"same task ids: b .* has 5 task ids that a .* lacks and lacks 5 of its 120"):
        compare([a, b], n_boot=50)


def test_compare_reads_per_task_rows_written_by_eval_and_plots(tmp_path):
    from simkit.evaluation.compare import compare

    dirs = []
    for label, n_train, skill in (("SFT n=50", 50, 0.6), ("ACT n=50", 50, 0.8), ("SFT n=100", 100, 0.7),
                                  ("ACT n=100", 100, 0.9)):
        d = tmp_path / label.replace(" ", "_")
        trajs = _trajs(n_train, skill)
        write_rows(d / "per_task.jsonl", rows_from_episodes(trajs), {"label": label, "n_train": n_train})
        dirs.append(d)
    table = compare(dirs, tmp_path / "vs_n.png", n_boot=100)
    assert (tmp_path / "vs_n.png").stat().st_size > 1000 and table.count("| SFT n=50 |") == 4  # 1 row + 3 pairs


def test_action_first_token_merges_p_question_by_task(tmp_path):
    spec = importlib.util.spec_from_file_location("aft", REPO / "bench" / "action_first_token.py")
    aft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aft)
    rows = rows_from_episodes(_trajs(3, 0.7, n=4))
    path = write_rows(tmp_path / "r.jsonl", rows, {"label": "A"})
    gold = {r["task_id"]: r["gold_action"] for r in rows} | {"new": ANSWER}
    assert aft.merge_p_question(path, {"t0001": 0.25, "new": 0.5}, gold, {"p_question_policy": "act"}) == (1, 1)
    meta, back = read_rows(path)
    assert meta["label"] == "A" and meta["p_question_policy"] == "act"
    assert back[1]["p_question"] == 0.25 and back[1]["first_action"] == rows[1]["first_action"]
    assert back[-1]["task_id"] == "new" and back[-1]["status"] == "p_question_only"


def test_action_first_token_when_numbers():
    """AUROC of P(question) and the first-token decision's J, on a hand-checked case."""
    spec = importlib.util.spec_from_file_location("aft", REPO / "bench" / "action_first_token.py")
    aft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aft)
    clarify = [(0.9, 0.1), (0.3, 0.6)]           # asks on 1 of 2
    answer = [(0.2, 0.7), (0.3, 0.5), (0.05, 0.9)]  # asks on 0 of 3
    w = aft.when_numbers(clarify, answer)
    # 0.9 beats all 3; 0.3 beats 0.2 and 0.05 and ties 0.3: (3 + 2.5) / 6
    assert w["auroc"] == pytest.approx(5.5 / 6) and w["ask_clarify"] == 0.5 and w["ask_answer"] == 0.0
    assert w["j"] == 0.5
    blind = aft.when_numbers([(0.1, 0.9)] * 2, [(0.1, 0.9)] * 3)
    assert blind["auroc"] == 0.5 and blind["j"] == 0.0
