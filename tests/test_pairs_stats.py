"""`simkit pairs stats`, serve's mix counters, and the trainer's per-kind margins (issue 20, item 7)."""
import json
from collections import Counter
from types import SimpleNamespace

import simkit
from simkit.act.pairs import build_pairs, register_cli
from simkit.act.pairstats import format_stats, load_pairs, margins_by_kind, pair_stats
from simkit.queue import open_queue
from simkit.serving.status import MIX_KEYS, count_mix, status_line
from simkit.types import Reply


class Asks:
    async def respond(self, messages, instruction=None, task=None, **kw):
        return Reply(text="Which one do you mean?")


async def _built(tmp_path):
    env = simkit.make("toy", size=8)
    out = tmp_path / "dpref.jsonl"
    pairs, _ = await build_pairs(env, env.tasks("train"), Asks(), out=out)
    return out, pairs


async def test_pairs_stats_on_a_built_file_and_a_queue(tmp_path, capsys):
    out, pairs = await _built(tmp_path)
    report = pair_stats(load_pairs(str(out)))
    assert report["pairs"] == len(pairs) == 12 and report["mix"] == {"action": 12, "content": 0, "unknown": 0}
    assert report["by_gold_action"] == {"ANSWER": {"action": 8, "content": 0, "unknown": 0},
                                        "CLARIFY": {"action": 4, "content": 0, "unknown": 0}}
    sources = {(r["chosen_source"], r["rejected_source"]): r["action"] for r in report["by_source"]}
    assert sources == {("reference", "reference"): 4, ("reference", "generator"): 8}
    assert report["by_phase"]["phase 1 turn 1"]["action"] == 4
    text = format_stats(report)
    assert "by gold action" in text and "reference -> generator" in text

    q = open_queue(str(tmp_path / "q.db"))
    q.append(pairs[:5])
    q.close()
    assert pair_stats(load_pairs(str(tmp_path / "q.db")))["pairs"] == 5

    import argparse

    p = argparse.ArgumentParser()
    register_cli(p.add_subparsers())
    run = tmp_path / "train"
    run.mkdir()
    rows = [{"event": "step", "step": 1, "rewards/margins": 1.0, "pairs/action": 4, "pairs/content": 0},
            {"event": "step", "step": 2, "rewards/margins": 0.2, "pairs/action": 0, "pairs/content": 4},
            {"event": "step", "step": 3, "rewards/margins": 0.6, "pairs/action": 2, "pairs/content": 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    args = p.parse_args(["pairs", "stats", str(out), "--train-run", str(run), "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs"] == 12 and printed["train"]["pure"]["action"] == {"steps": 1, "margin_mean": 1.0}
    assert printed["train"]["fit"] == {"action": 1.0, "content": 0.2}


def test_margins_by_kind_without_kinds_or_one_kind():
    assert margins_by_kind([{"event": "step", "rewards/margins": 0.3}])["steps_with_kinds"] == 0
    one = margins_by_kind([{"event": "step", "rewards/margins": 0.3, "pairs/action": 2, "pairs/content": 0}])
    assert one["pure"]["action"]["margin_mean"] == 0.3 and "fit" not in one


async def test_serve_mix_counters_and_status_line(tmp_path):
    _, pairs = await _built(tmp_path)
    m = {k: 0 for k in MIX_KEYS}
    for p in pairs:
        count_mix(m, p)
    assert m["pairs_action"] == 12 and m["pairs_action_clarify"] == 4 and m["pairs_action_answer"] == 8
    line = status_line({"version": 1, "episodes": 12, "episodes_per_s": 1.0, "pairs": 12, "pairs_per_s": 1.0,
                        "action_accuracy": 0.5, "success_rate": 0.5, "queue_depth": 0, "failures": 0,
                        "dropped_stale": 0, **m})
    assert "mix action/content 12/0 (clarify 4/0, answer 8/0)" in line


async def test_trainer_logs_the_kind_mix_next_to_the_batch_margin(tmp_path):
    import pickle

    from trainer.data import META, PairCollator, PairRef
    from trainer.metrics import kind_logs

    coll = PairCollator(lambda examples: {"n": len(examples)})
    ex = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "pair_id": "a", "policy_version": 0,
          "kind": "action", "peers": [PairRef("b", 1, "content")]}
    batch = coll([ex])
    assert [tuple(r) for r in batch[META]] == [("a", 0), ("b", 1)] and [r.kind for r in batch[META]] == ["action",
                                                                                                          "content"]
    pid, version = batch[META][0]  # the ledger still unpacks two fields
    assert (pid, version) == ("a", 0) and pickle.loads(pickle.dumps(batch[META][1])).kind == "content"
    loader = SimpleNamespace(collate_fn=coll)
    assert kind_logs(loader, {"rewards/margins": 0.5}) == {"pairs/action": 1, "pairs/content": 1}
    coll([ex | {"peers": []}])
    assert kind_logs(loader, {"rewards/margins": 0.5}) == {"pairs/action": 1, "pairs/content": 0,
                                                          "rewards/margins_action": 0.5}
    assert coll.kinds == Counter() and kind_logs(None, {}) == {}

    from trainer.plot import plot_run

    rows = [{"event": "step", "step": i, "loss": 0.7, "rewards/chosen": 0.1 * i, "rewards/rejected": -0.1 * i,
             "rewards/margins": 0.2 * i, "pairs/action": i % 2, "pairs/content": 1 - i % 2,
             **({"rewards/margins_action": 0.2 * i} if i % 2 else {"rewards/margins_content": 0.2 * i})}
            for i in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {p.stem for p in plot_run(tmp_path)}
    assert {"rewards", "margins", "pair_mix"} <= names


def test_pairs_build_cli_options_then_stats(tmp_path, capsys):
    import argparse

    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server

    p = argparse.ArgumentParser()
    register_cli(p.add_subparsers())
    out = tmp_path / "d.jsonl"
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        for extra in ([], ["--contrast", "forced", "--out", str(tmp_path / "f.jsonl")]):
            args = p.parse_args(["pairs", "build", "--env", "toy", "--out", str(out), "--n", "4", "--policy", srv.url,
                                 "--loser-generator", srv.url, "--max-tokens", "8", *extra])
            assert args.func(args) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    authors, forced = summaries
    assert authors["contrast"] == "authors" and authors["phase1"]["turn1_pairs"] == 2
    assert authors["loser_generator"].startswith("few-shot (10)")
    assert forced["contrast"] == "forced" and forced["phase1"]["turn1_pairs"] == 0
    assert forced["phase1"]["forced_ok"] + forced["phase1"]["retried_ok"] + forced["phase1"]["fallback"] == 4
    args = p.parse_args(["pairs", "stats", str(out)])
    assert args.func(args) == 0
    assert "6 pairs: action 6" in capsys.readouterr().out
