"""n counts CONVERSATIONS (dialogues), not turns, through one seeded, stratified helper that every
command uses (trainer sft, pairs build, serve, eval)."""
import json
import subprocess
import sys

import pytest

import simkit
from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.sampling import TooFewConversations, sample_conversations
from simkit.types import CLARIFY


def test_n_counts_dialogues_and_brings_all_their_turns():
    env = simkit.make("pacific")
    tasks = env.tasks("tune")
    s = sample_conversations(tasks, 20, seed=1, env="pacific", split="tune")
    dialogues = {t.meta["dialogue"] for t in s.tasks}
    assert len(s.conversation_ids) == 20 and dialogues == set(s.conversation_ids)
    assert len(s.tasks) > 20  # PACIFIC dialogues have several turns: n is not a turn count
    for d in dialogues:  # every turn of a chosen dialogue, none of the others
        assert [t.id for t in s.tasks if t.meta["dialogue"] == d] == [t.id for t in tasks if t.meta["dialogue"] == d]
    # stratified: the share of dialogues with a CLARIFY turn matches the split's (to one dialogue)
    rec = s.record()
    assert abs(rec["clarify_share_conversations"] - rec["split_clarify_share_conversations"]) <= 1 / 20
    assert rec["strata"]["CLARIFY"] + rec["strata"]["ANSWER"] == 20 and rec["n_turns"] == len(s.tasks)


@pytest.mark.parametrize("name,split", [("toy", "train"), ("abgcoqa", "tune"), ("ambigsql", "train")])
def test_one_turn_envs_sample_tasks_with_the_split_clarify_share(name, split):
    tasks = simkit.make(name).tasks(split)
    share = sum(t.gold_action == CLARIFY for t in tasks) / len(tasks)
    s = sample_conversations(tasks, 50, seed=0)
    assert len(s.tasks) == 50 and len({t.id for t in s.tasks}) == 50
    assert abs(sum(t.gold_action == CLARIFY for t in s.tasks) - 50 * share) <= 1


def test_same_seed_same_sample_and_too_many_is_an_error(tmp_path):
    tasks = simkit.make("pacific").tasks("tune")
    a, b = (sample_conversations(tasks, 15, seed=7) for _ in range(2))
    assert a.conversation_ids == b.conversation_ids
    assert sample_conversations(tasks, 15, seed=8).conversation_ids != a.conversation_ids
    everything = sample_conversations(tasks, None)
    with pytest.raises(TooFewConversations, match="cannot sample"):
        sample_conversations(tasks, everything.n_available + 1)
    path = a.write(tmp_path)
    rec = json.loads(path.read_text())
    assert path.name == "conversations.json" and rec["conversation_ids"] == a.conversation_ids and rec["seed"] == 7


def test_sft_rows_use_the_same_conversations_as_act(tmp_path):
    from trainer.config import SFTRunConfig
    from trainer.sft import build_rows

    cfg = SFTRunConfig(model="m", out=str(tmp_path), env="pacific", split="tune", n_conversations=12, seed=5)
    rows = build_rows(cfg, record_dir=tmp_path)
    rec = json.loads((tmp_path / "conversations.json").read_text())
    act = sample_conversations(simkit.make("pacific").tasks("tune"), 12, seed=5)
    assert rec["conversation_ids"] == act.conversation_ids
    turns = len(act.tasks)
    assert turns <= len(rows) <= 2 * turns  # one row per reference turn (+ CLARIFY follow-ups), deduplicated
    with pytest.raises(TooFewConversations):
        build_rows(SFTRunConfig(model="m", out="o", env="toy", n_conversations=10_000))
    assert SFTRunConfig(model="m", out="o", env="toy", limit=4).n_conversations == 4  # the old name still works


def test_pairs_build_cli_counts_conversations_and_records_them(tmp_path):
    out = tmp_path / "dpref.jsonl"
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        def cmd(n):
            return [sys.executable, "-m", "simkit.cli", "pairs", "build", "--env", "pacific", "--split", "tune",
                    "--n-conversations", str(n), "--seed", "2", "--out", str(out), "--policy", srv.url, "--contrast", "forced",
                    "--max-tokens", "8"]

        res = subprocess.run(cmd(3), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        rec = json.loads((tmp_path / "dpref.conversations.json").read_text())
        act = sample_conversations(simkit.make("pacific").tasks("tune"), 3, seed=2)
        assert rec["conversation_ids"] == act.conversation_ids and summary["conversations"] == 3
        assert summary["tasks"] == len(act.tasks) > 3
        p1 = summary["phase1"]
        assert p1["forced_ok"] + p1["retried_ok"] + p1["fallback"] == summary["new_pairs"] + p1["identical_dropped"]
        assert json.loads((tmp_path / "dpref.stats.json").read_text())["counts"] == p1
        big = subprocess.run(cmd(100_000), capture_output=True, text=True, timeout=120)
        assert big.returncode != 0 and "cannot sample 100000" in big.stderr
