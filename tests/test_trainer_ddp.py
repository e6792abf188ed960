"""`trainer run` data-parallel: 2 CPU processes (gloo) under `accelerate launch`, fed by the queue,
publishing into the embedded model server; SIGKILL of the whole launch mid-run, then the same
command resumes, and the ledger shows every trained pair exactly once. Over each queue backend
(SQLite file; real redis-server with AOF)."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from simkit.queue import open_queue
from trainer.ledger import checkpoints, read_marker
from trainer.metrics import read_metrics
from trainer.synthetic import toy_pairs

WORLD, BATCH = 2, 2
PER_STEP = WORLD * BATCH


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path) -> str:
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url("ddp")
    return str(tmp_path / "q.db")


def _launch(queue_url, tiny_model, model_server, run_dir, log):
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "trainer.cli", "run", "--queue", queue_url, "--model", str(tiny_model),
            "--out", str(run_dir), "--batch-size", str(BATCH), "--max-length", "256", "--no-tensorboard",
            "--poll-s", "0.1", "--lr", "1e-3", "--policy-url", model_server.url, "--publish-every", "2",
            "--max-steps", "6", "--adapter-name", "ddptest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _steps(run_dir):
    try:
        return [r["step"] for r in read_metrics(run_dir) if r["event"] == "step"]
    except FileNotFoundError:
        return []


def test_ddp_two_processes_exactly_once_across_sigkill(tiny_model, model_server, tmp_path, queue_url):
    pairs = toy_pairs(40)
    with open_queue(queue_url) as q:
        q.append(pairs)
    run_dir, log = tmp_path / "run", tmp_path / "ddp.log"
    proc = _launch(queue_url, tiny_model, model_server, run_dir, log)
    try:
        deadline = time.monotonic() + 240
        while 3 not in _steps(run_dir):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
        committed = [m for _, p in checkpoints(run_dir / "checkpoints") if (m := read_marker(p))]
        last = committed[-1]
        assert last["step"] in (2, 4) and last["committed_total"] == PER_STEP * last["step"]
        with open_queue(queue_url) as q:
            assert q.stats()["acked"] == last["committed_total"]  # only committed steps are acked

        proc = _launch(queue_url, tiny_model, model_server, run_dir, log)
        assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    ckpt = run_dir / "checkpoints" / "checkpoint-6"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()  # both ranks saved
    audit = [json.loads(line) for line in (run_dir / "trained_pairs.jsonl").read_text().splitlines()]
    assert [a["step"] for a in audit] == [2, 4, 6] and [a["parent_step"] for a in audit] == [0, 2, 4]
    trained = [i for a in audit for i in a["pair_ids"]]
    assert len(trained) == len(set(trained)) == PER_STEP * 6  # none twice, each step all ranks' pairs
    assert set(trained) == {p.id for p in pairs[:PER_STEP * 6]}  # none lost: the queue's first 24, in order
    with open_queue(queue_url) as q:
        st, cur = q.stats(), q.current_version()
    assert st["acked"] == 24 and st["in_flight"] == 0 and st["depth"] == 16
    run_id = (run_dir / "run_id").read_text().strip()  # names carry the run id (vLLM's prefix cache)
    assert cur.meta["step"] == 6 and cur.adapter == f"ddptest-{run_id}-v{cur.version}"
    listed = {m["id"] for m in httpx.get(model_server.url + "/models").json()["data"]}
    assert cur.adapter in listed
    r = httpx.post(model_server.url + "/chat/completions", timeout=60,
                   json={"model": cur.adapter, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["model"] == cur.adapter
    for v in range(1, cur.version + 1):
        httpx.post(model_server.url + "/unload_lora_adapter", json={"lora_name": f"ddptest-{run_id}-v{v}"})
