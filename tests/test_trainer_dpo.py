"""trainer run in-process: real TRL DPO steps on the tiny model, fed by the queue, publishing
each version into the embedded model server (a real subprocess); metrics, TensorBoard, plots."""
import json

import pytest

import httpx

from simkit.queue import open_queue
from trainer.config import RunConfig
from trainer.dpo import DPORun
from trainer.metrics import read_metrics
from trainer.plot import plot_run
from trainer.synthetic import toy_pairs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_queue_fed_dpo_publishes_new_adapter_dir_per_version(tiny_model, model_server, tmp_path):
    q = open_queue(tmp_path / "q.db")
    pairs = toy_pairs(14)
    q.append(pairs)
    q.close()
    run_dir = tmp_path / "run"
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(run_dir), policy_url=[model_server.url],
                    max_steps=5, batch_size=2, publish_every=2, max_length=256, lr=1e-3, log_level="warning",
                    adapter_name="dpotest")
    run = DPORun(cfg)
    try:
        assert run.main() == 0
        _check_run(tmp_path, run_dir, pairs, model_server, tiny_model)
    finally:
        rid = (run_dir / "run_id").read_text().strip()
        _unload(model_server, *(f"dpotest-{rid}-v{i}" for i in (1, 2, 3)))


def _unload(server, *names):
    """Leave the shared session server as we found it."""
    for name in names:
        httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": name})


def _check_run(tmp_path, run_dir, pairs, model_server, tiny_model):

    q = open_queue(tmp_path / "q.db")
    st = q.stats()
    assert st["acked"] == 10 and st["in_flight"] == 0 and st["depth"] == 4  # 5 steps x 2 pairs, rest given back
    versions = q.versions()
    q.close()
    # v1 at step 2, v2 at step 4, v3 = the final step 5
    assert [v.version for v in versions] == [1, 2, 3]
    assert [v.meta["step"] for v in versions] == [2, 4, 5]
    rid = (run_dir / "run_id").read_text().strip()
    assert [v.adapter for v in versions] == [f"dpotest-{rid}-v1", f"dpotest-{rid}-v2", f"dpotest-{rid}-v3"]
    paths = [v.path for v in versions]
    assert all(p.startswith(str(run_dir / "adapters" / rid) + "/v00000") for p in paths)
    assert len(set(paths)) == 3  # a new directory per version ...
    weights = [open(f"{p}/adapter_model.safetensors", "rb").read() for p in paths]
    assert len(set(weights)) == 3  # ... holding different weights

    listed = {m["id"]: m for m in httpx.get(model_server.url + "/models").json()["data"]}
    for v in versions:  # the server lists every version under its name, at its path
        assert listed[v.adapter]["root"] == v.path and listed[v.adapter]["parent"] == str(tiny_model)
    r = httpx.post(model_server.url + "/chat/completions", timeout=60, json={
        "model": f"dpotest-{rid}-v3", "messages": [{"role": "user", "content": "How tall is it?"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["model"] == f"dpotest-{rid}-v3"

    rows = read_metrics(run_dir)
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for r in steps:
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "pairs_per_s",
                    "staleness_mean", "staleness_max", "policy_version", "learning_rate"):
            assert key in r, key
        assert r["pairs"] == 2
    # pairs were made by version 0: staleness = the version in force when they were trained
    assert [r["staleness_mean"] for r in steps] == [0, 0, 1, 1, 2]
    assert steps[-1]["rewards/margins"] > 0  # the policy moved toward the chosen replies
    pubs = [r for r in rows if r["event"] == "publish"]
    assert [p["version"] for p in pubs] == [1, 2, 3] and all(p["total_s"] > 0 for p in pubs)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    audit = [json.loads(l) for l in (run_dir / "trained_pairs.jsonl").read_text().splitlines()]
    trained = [i for row in audit for i in row["pair_ids"]]
    assert len(trained) == len(set(trained)) == 10 and set(trained) <= {p.id for p in pairs}

    pngs = plot_run(run_dir)
    names = {p.stem for p in pngs}
    assert {"loss", "rewards", "logps", "throughput", "staleness"} <= names
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_inplace_naming_reuses_the_name_with_new_paths(tiny_model, model_server, tmp_path):
    """--adapter-naming inplace: one server name, load_inplace, still a new directory per version."""
    from trainer.publish import Publisher

    q = open_queue(tmp_path / "q.db")
    q.append(toy_pairs(4))
    q.close()
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(tmp_path / "run"),
                    policy_url=[model_server.url], max_steps=2, batch_size=2, publish_every=1, max_length=256,
                    adapter_name="act-inplace", adapter_naming="inplace", log_level="warning", tensorboard=False)
    try:
        assert DPORun(cfg).main() == 0
        listed = {m["id"]: m for m in httpx.get(model_server.url + "/models").json()["data"]}
    finally:
        _unload(model_server, "act-inplace")
    q = open_queue(tmp_path / "q.db")
    versions = q.versions()
    assert [v.adapter for v in versions] == ["act-inplace", "act-inplace"]
    assert versions[0].path != versions[1].path
    assert listed["act-inplace"]["root"] == versions[1].path  # the second load replaced the first

    # a server that is down: retries, then PublishError, and no version is announced
    pub = Publisher(q, ["http://127.0.0.1:9/v1"], tmp_path / "adapters", retries=2, backoff_s=0.01)
    try:
        pub.publish(versions[1].path)
        raise AssertionError("publish to a dead server must fail")
    except Exception as e:
        from trainer.publish import PublishError  # = simkit.modelserver.info.AdapterLoadError

        assert isinstance(e, PublishError) and "after 2 attempts" in str(e)
    assert q.current_version().version == 2
    pub.close()
    q.close()


def test_idle_timeout_trains_the_tail_and_skips_overlong_pairs(tiny_model, tmp_path):
    """3 pairs, batch 2: step 1 full, step 2 with the last pair once the queue stays empty; a pair whose
    prompt alone exceeds max_length is consumed without training (acked, counted), never retried."""
    from simkit.types import Message

    pairs = toy_pairs(3)
    long = pairs[0].model_copy(update={"id": "", "task_id": "long",
                                       "prompt": [Message(role="user", content="word " * 400)]})
    long = type(long)(**long.model_dump(exclude={"id"}))
    with open_queue(tmp_path / "q.db") as q:
        q.append([pairs[0], long, *pairs[1:]])
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(tmp_path / "run"), max_steps=10,
                    batch_size=2, publish_every=5, max_length=256, idle_timeout_s=1.0, poll_s=0.05,
                    log_level="warning", tensorboard=False)
    assert DPORun(cfg).main() == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["pairs"] for r in rows if r["event"] == "step"] == [2, 1]
    stop = [r for r in rows if r["event"] == "stop"][0]
    assert stop["reason"] == "idle" and stop["committed_total"] == 3 and stop["skipped_total"] == 1
    with open_queue(tmp_path / "q.db") as q:
        st = q.stats()
        assert st["acked"] == 4 and st["depth"] == 0 and q.current_version().meta["step"] == 2


def test_init_adapter_is_trained_further_and_is_the_reference(tiny_model, tmp_path):
    """`--init-adapter` (SFT then preference tuning): the published versions continue that adapter
    (its rank, not --lora-r), and DPO's reference is the frozen starting adapter, so the implicit
    rewards start at exactly 0 (against the bare base they would not)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    init = tmp_path / "sft-adapter"
    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                       LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: it changes the model's outputs
    m.save_pretrained(init)
    q = open_queue(tmp_path / "q.db")
    q.append(toy_pairs(4))
    q.close()
    run_dir = tmp_path / "run"
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(run_dir), max_steps=2,
                    batch_size=2, publish_every=1, max_length=256, lr=1e-2, lora_r=16, log_level="warning",
                    init_adapter=str(init), adapter_name="initdpo", tensorboard=False)
    assert DPORun(cfg).main() == 0
    steps = [r for r in read_metrics(run_dir) if r["event"] == "step"]
    assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert steps[0]["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    q = open_queue(tmp_path / "q.db")
    last = q.current_version()
    q.close()
    assert json.loads(open(f"{last.path}/adapter_config.json").read())["r"] == 4
    start, trained = load_file(init / "adapter_model.safetensors"), load_file(f"{last.path}/adapter_model.safetensors")
    assert set(start) == set(trained)
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_init_adapter_must_exist(tiny_model, tmp_path):
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(tmp_path / "run"), max_steps=1,
                    init_adapter=str(tmp_path / "nowhere"), tensorboard=False)
    with pytest.raises(SystemExit, match="adapter_config.json"):
        DPORun(cfg).main()


def test_bf16_mixed_trains_on_cpu(tiny_model, tmp_path):
    """`--dtype bf16-mixed`: float32 weights with bfloat16 autocast, on CPU too (the published
    adapter stays float32, which every server loads)."""
    from safetensors.torch import load_file

    q = open_queue(tmp_path / "q.db")
    q.append(toy_pairs(4))
    q.close()
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(tmp_path / "run"), max_steps=2,
                    batch_size=2, publish_every=1, max_length=256, lr=1e-2, log_level="warning", dtype="bf16-mixed",
                    adapter_name="bf16mixed", tensorboard=False)
    assert DPORun(cfg).main() == 0
    steps = [r for r in read_metrics(tmp_path / "run") if r["event"] == "step"]
    assert len(steps) == 2 and all(r["loss"] == r["loss"] for r in steps)  # finite, not NaN
    q = open_queue(tmp_path / "q.db")
    weights = load_file(f"{q.current_version().path}/adapter_model.safetensors")
    q.close()
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
