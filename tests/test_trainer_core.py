"""trainer: config (YAML + CLI), --help, ledger commit semantics, tokenisation = TRL's, SFT data."""
import json
import subprocess
import sys

import pytest

from simkit.queue import open_queue
from trainer.cli import build_parser
from trainer.config import RunConfig, SFTRunConfig, config_from_args
from trainer.ledger import MARKER, Ledger, latest_committed
from trainer.synthetic import toy_pairs


def test_config_yaml_then_cli_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("queue: q.db\nmodel: m\nout: o\nbeta: 0.2\npublish-every: 7\nloss_type: [sigmoid, sft]\n"
                        "loss_weights: [1.0, 0.5]\n")
    parser = build_parser()
    args = parser.parse_args(["run", "--config", str(cfg_file), "--beta", "0.1", "--policy-url", "http://a/v1",
                              "http://b/v1", "--no-tensorboard"])
    cfg = config_from_args(RunConfig, args)
    assert cfg.beta == 0.1 and cfg.publish_every == 7 and cfg.commit_every == 7  # flag beats YAML
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.policy_url == ["http://a/v1", "http://b/v1"] and cfg.tensorboard is False
    assert cfg.lr == 5e-4 and cfg.lr_scheduler == "cosine"  # defaults (LoRA, from recipes/lora_sweep.sh)
    assert RunConfig(queue="q", model="m", out="o").beta == 0.05  # the authors' beta


def test_config_errors_name_the_flag(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        args = parser.parse_args(["run", "--model", "m", "--out", "o"])
        config_from_args(RunConfig, args, args.parser)
    assert "--queue" in capsys.readouterr().err
    with pytest.raises(Exception):
        SFTRunConfig(model="m", out="o")  # neither data nor env


def test_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in RunConfig.model_fields:
        assert "--" + flag.replace("_", "-") in out, flag
    for cmd in ("sft", "plot"):
        assert subprocess.run([sys.executable, "-m", "trainer.cli", cmd, "--help"], capture_output=True,
                              text=True).returncode == 0


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_ledger_commit_protocol_survives_crash_points(tmp_path, backend, request):
    """Marker = commit point: ack after it, repair on restart, drop checkpoints without one."""
    url = request.getfixturevalue("redis_server").url() if backend == "redis" else str(tmp_path / "q.db")
    q = open_queue(url)
    q.append(toy_pairs(6))
    ckpts = tmp_path / "run" / "checkpoints"
    ledger = Ledger(q, tmp_path / "run", lease_s=60)
    lease = q.lease(4, consumer="trainer")
    ledger.on_lease(lease)
    ledger.on_micro_batch([(p.id, 0) for p in lease.pairs[:2]])
    ledger.on_step_end()
    (ckpts / "checkpoint-1").mkdir(parents=True)
    marker = ledger.commit(ckpts / "checkpoint-1", 1)
    assert q.stats()["acked"] == 2 and marker["committed_total"] == 2
    # step 2 trained, its checkpoint written, marker written, but the process dies before the ack
    ledger.on_micro_batch([(p.id, 0) for p in lease.pairs[2:]])
    ledger.on_step_end()
    (ckpts / "checkpoint-2").mkdir()
    (ckpts / "checkpoint-2" / MARKER).write_text(json.dumps(
        {"step": 2, "parent_step": 1, "pair_ids": [p.id for p in lease.pairs[2:]], "committed_total": 4}))
    (ckpts / "checkpoint-3").mkdir()  # died while saving step 3: no marker
    q.close()

    q = open_queue(url)
    path, found = latest_committed(ckpts)
    assert path.name == "checkpoint-2" and not (ckpts / "checkpoint-3").exists()
    fresh = Ledger(q, tmp_path / "run", lease_s=60)
    fresh.restore(found, "trainer")
    st = q.stats()
    assert st["acked"] == 4 and st["in_flight"] == 0 and fresh.committed_total == 4
    audit = [json.loads(l) for l in (tmp_path / "run" / "trained_pairs.jsonl").read_text().splitlines()]
    ids = [i for row in audit for i in row["pair_ids"]]
    assert len(ids) == len(set(ids)) == 4
    assert {p.id for p in q.lease(10).pairs} == {p.id for p in toy_pairs(6)} - set(ids)
    q.close()


def test_tokenisation_matches_trl(tiny_model, tmp_path):
    """QueueSource tokenises a pair exactly like DPOTrainer tokenises its dataset."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trainer.data import tokenize_pair
    from trainer.models import load_model, load_tokenizer

    pairs = toy_pairs(6)
    tok = load_tokenizer(str(tiny_model))
    trainer = DPOTrainer(model=load_model(str(tiny_model)), processing_class=tok,
                         args=DPOConfig(output_dir=str(tmp_path), max_length=512, report_to="none", bf16=False,
                                        max_steps=1),
                         train_dataset=Dataset.from_list([p.to_trl() for p in pairs]))
    ref = trainer.train_dataset
    assert len(ref) == len(pairs)
    for row, pair in zip(ref, pairs):
        mine = tokenize_pair(tok, pair.to_trl(), 512)
        assert mine == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    assert tokenize_pair(tok, pairs[0].to_trl(), max_length=4) is None  # TRL drops prompt-only rows


def test_sft_rows_from_env_and_jsonl(tmp_path):
    from trainer.sft import build_rows

    rows = build_rows(SFTRunConfig(model="m", out="o", env="toy", limit=4))
    # 2 CLARIFY tasks (each + a follow-up row) and 2 ANSWER tasks
    assert len(rows) == 6
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["completion"][0]["role"] == "assistant"
    follow = rows[1]
    assert [m["role"] for m in follow["prompt"]][-2:] == ["assistant", "user"]
    assert len(build_rows(SFTRunConfig(model="m", out="o", env="toy", limit=4, followup=False))) == 4
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                             {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]})
                    + "\n")
    rows = build_rows(SFTRunConfig(model="m", out="o", data=str(data)))
    assert [len(r["prompt"]) for r in rows] == [1, 3]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_queue_source_never_yields_a_pair_older_than_the_floor(tiny_model, tmp_path, backend, request):
    """One staleness rule, at consume: no pair older than current version - max_staleness reaches
    training, whether the queue drops it at lease or the source skips a batch leased before a publish."""
    import threading

    from trainer.data import QueueSource
    from trainer.models import load_tokenizer

    url = request.getfixturevalue("redis_server").url() if backend == "redis" else str(tmp_path / "q.db")
    q = open_queue(url)
    q.append(toy_pairs(4, version=0) + toy_pairs(4, version=3, offset=4) + toy_pairs(4, version=1, offset=8)
             + toy_pairs(4, version=5, offset=12))
    state = {"version": 3}
    max_staleness = 1
    floor = lambda: max(0, state["version"] - max_staleness)  # noqa: E731
    skipped: list[str] = []

    def on_skip(pair, reason):
        skipped.append(pair.id)
        q.ack([pair.id])

    src = QueueSource(q, load_tokenizer(str(tiny_model)), lease_n=2, budget=lambda: 100, stop=threading.Event(),
                      on_lease=lambda lease: None, on_skip=on_skip, poll_s=0.05, idle_timeout_s=1.0,
                      min_version=floor, max_length=512)
    got = []
    for ex in src:
        assert ex["policy_version"] >= floor(), ex["policy_version"]
        got.append(ex["policy_version"])
        q.ack([ex["pair_id"]])
        if len(got) == 1:
            state["version"] = 5  # a publish: the floor rises from 2 to 4
    src.close()
    assert got == [3, 5, 5, 5, 5] and len(skipped) >= 1  # the batch leased ahead was stale by then
    s = q.stats()
    assert s["dropped_stale"] + len(skipped) + len(got) == 16 and s["depth"] == 0
    q.close()


def test_queue_source_budget_counts_trained_examples_and_returns_the_rest(tiny_model, tmp_path):
    """One iteration yields exactly `budget()` examples however many leased pairs are skipped as too
    long (a budget spent on skipped pairs ended the Trainer's epoch mid-step, again and again, until
    every live pair was leased and nothing trained: the real-vLLM demo hang); the lookahead and the
    rest of a lease cut by the budget go back to the queue at once."""
    import threading

    from trainer.data import QueueSource
    from trainer.models import load_tokenizer

    q = open_queue(str(tmp_path / "q.db"))
    pairs = toy_pairs(16)
    for i in (0, 2):  # leases of 2: [long, ok], [long, ok], [ok, ok], ...
        last = pairs[i].prompt[-1]
        long = last.model_copy(update={"content": last.content + " filler" * 400})
        pairs[i] = pairs[i].model_copy(update={"prompt": [*pairs[i].prompt[:-1], long]})
    q.append(pairs)
    skipped, returned = [], []

    def on_skip(pair, reason):
        skipped.append(pair.id)
        q.ack([pair.id])

    def on_return(ids):
        returned.extend(ids)
        q.nack(ids)

    src = QueueSource(q, load_tokenizer(str(tiny_model)), lease_n=2, budget=lambda: 3, stop=threading.Event(),
                      on_lease=lambda lease: None, on_skip=on_skip, on_return=on_return, poll_s=0.05,
                      max_length=512)
    got = [ex["pair_id"] for ex in src]  # one iteration (one Trainer epoch)
    src.close()
    assert got == [pairs[1].id, pairs[3].id, pairs[4].id] and skipped == [pairs[0].id, pairs[2].id]
    assert pairs[5].id in returned  # cut by the budget (and any lookahead lease goes back too)
    assert not set(returned) & (set(got) | set(skipped))
    s = q.stats()
    assert s["in_flight"] == len(got)  # nothing else stays leased
    assert s["depth"] == 16 - len(skipped) and s["available"] == s["depth"] - len(got)
    q.close()


def test_action_tokens_keeps_the_opening_of_action_pairs_only(tiny_model):
    """`--action-tokens K`: an action pair is scored on the first K tokens of each side (where the
    action is decided); a content pair keeps its whole completions."""
    import threading

    from trainer.data import QueueSource, tokenize_pair
    from trainer.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    action = toy_pairs(1)[0]
    content = action.model_copy(update={"rejected": [action.chosen[0].model_copy(update={"content": "Something else."})],
                                        "rejected_action": action.gold_action, "id": "content-pair"})
    assert (action.kind, content.kind) == ("action", "content")
    full = {p.id: tokenize_pair(tok, p.to_trl(), 512) for p in (action, content)}
    assert min(len(full[action.id]["chosen_ids"]), len(full[action.id]["rejected_ids"])) > 3
    src = QueueSource(None, tok, lease_n=2, budget=lambda: 2, stop=threading.Event(), on_lease=None, on_skip=None,
                      max_length=512, action_tokens=3)
    got = {ex["pair_id"]: ex for ex in src.load([action, content])[0]}
    assert got[action.id]["chosen_ids"] == full[action.id]["chosen_ids"][:3]
    assert got[action.id]["rejected_ids"] == full[action.id]["rejected_ids"][:3]
    assert got[action.id]["prompt_ids"] == full[action.id]["prompt_ids"]
    assert got["content-pair"]["chosen_ids"] == full["content-pair"]["chosen_ids"]
    assert got["content-pair"]["rejected_ids"] == full["content-pair"]["rejected_ids"]
