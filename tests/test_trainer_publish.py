"""Publishing against vLLM's rules: a refused adapter stops the run (never retried), the LoRA config
is checked before step 1, and every run's adapter names and paths are its own."""
import json
import shutil
import time

import pytest

from simkit.modelserver import info as server_info
from simkit.queue import open_queue
from trainer.config import RunConfig
from trainer.dpo import DPORun, run_id
from simkit.modelserver.info import is_rejection
from trainer.publish import Publisher, PublishRejected
from trainer.synthetic import toy_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(base_dir, out_dir, r=4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out_dir)
    return out_dir


def test_a_rejected_adapter_is_not_retried_and_says_what_to_change(tiny_model, model_server, tmp_path):
    """vllm/lora/peft_helper.py refuses DoRA; vllm/entrypoints/openai/models/serving.py answers 500.
    The publisher treats that as final: one attempt, PublishRejected naming the fix, no version."""
    src = _adapter(tiny_model, tmp_path / "ckpt")
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    q = open_queue(tmp_path / "q.db")
    pub = Publisher(q, [model_server.url], tmp_path / "adapters", retries=5, backoff_s=5.0, run_id="r1")
    t0 = time.monotonic()
    try:
        with pytest.raises(PublishRejected) as e:
            pub.publish(src)
    finally:
        pub.close()
    assert time.monotonic() - t0 < 4  # a retry would have slept 5 s first
    assert "vLLM does not yet support DoRA." in str(e.value) and "To fix: train without DoRA" in str(e.value)
    assert q.current_version() is None
    q.close()


def test_rejection_statuses():
    """500 is vLLM's answer to an adapter it cannot load; 502/503/504/429/408 are transient."""
    assert all(is_rejection(s) for s in (400, 404, 422, 500))
    assert not any(is_rejection(s) for s in (None, 408, 429, 502, 503, 504))


def test_run_stops_before_step_1_when_the_server_cannot_take_the_rank(tiny_model, model_server, tmp_path):
    """The stand-in lists max_lora_rank (16, vLLM's default): a rank-32 run stops before training,
    with the flag to change; its leases go back to the queue."""
    with open_queue(tmp_path / "q.db") as q:
        q.append(toy_pairs(4))
    cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(tiny_model), out=str(tmp_path / "run"),
                    policy_url=[model_server.url], max_steps=2, batch_size=2, lora_r=32, log_level="warning",
                    tensorboard=False)
    with pytest.raises(PublishRejected) as e:
        DPORun(cfg).main()
    msg = str(e.value)
    assert "LoRA rank 32 is greater than the server's max_lora_rank 16" in msg
    assert "lower --lora-r" in msg and "--max-lora-rank 32" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()
    with open_queue(tmp_path / "q.db") as q:
        assert q.stats()["in_flight"] == 0 and q.current_version() is None


def test_lora_checks_without_server_limits_fall_back_to_vllms_rules():
    """A vLLM model card has no max_lora_rank: ranks up to 512 (vllm/config/lora.py MaxLoRARanks) pass
    with a hint naming the --max-lora-rank the server needs; above 512 nothing can serve it."""
    assert server_info.lora_problems({}, 64, ["q_proj"]) == []
    assert "--max-lora-rank >= 64" in server_info.rank_hint({}, 40)
    assert server_info.lora_problems({}, 1024, ["q_proj"])
    card = {"max_lora_rank": 16, "lora_target_modules": ["q_proj", "v_proj"]}
    assert server_info.lora_problems(card, 16, ["all-linear"]) == []
    assert "['w_fused']" in server_info.lora_problems(card, 8, ["q_proj", "w_fused"])[0]


def test_adapter_names_and_paths_carry_the_run_id(tmp_path, tiny_model):
    """A run redone into the same folder gets a new id (names and paths never repeat, so vLLM's
    prefix cache and adapter registry never mix two runs); a resumed run keeps its id."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rid = run_id(run_dir)
    assert run_id(run_dir) == rid  # resume: the stored id
    q = open_queue(tmp_path / "q.db")
    pub = Publisher(q, [], tmp_path / "adapters", adapter_name="act", run_id=rid)
    try:
        assert pub.name_for(3) == f"act-{rid}-v3"
        res = pub.publish(_adapter(tiny_model, tmp_path / "ckpt"))
        assert res.adapter == f"act-{rid}-v1" and res.path == str((tmp_path / "adapters" / rid / "v000001").resolve())
    finally:
        pub.close()
        q.close()
    shutil.rmtree(run_dir)  # redo into the same folder: a fresh id
    run_dir.mkdir()
    assert run_id(run_dir) != rid


def test_trainer_run_cli_stops_with_the_fix(tiny_model, model_server, tmp_path):
    """`trainer run` itself: exit status 2 and one line saying what to change, no traceback."""
    import subprocess
    import sys

    with open_queue(tmp_path / "q.db") as q:
        q.append(toy_pairs(2))
    res = subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--model", str(tiny_model), "--queue",
                          str(tmp_path / "q.db"), "--out", str(tmp_path / "run"), "--policy-url", model_server.url,
                          "--max-steps", "1", "--lora-r", "64", "--no-tensorboard"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "trainer run: stopped:" in res.stderr and "--max-lora-rank 64" in res.stderr
    assert "Traceback" not in res.stderr
