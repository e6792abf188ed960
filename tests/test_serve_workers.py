"""`simkit serve --workers N` against the fake server: the workers partition the tasks (their
union is exactly one worker's work), and a worker killed with SIGKILL is restarted by the parent
and resumes from its own watermark with nothing lost or duplicated."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.queue import open_queue
from simkit.serving.shard import parse_shard, shard_of, split_budget
from simkit.serving.status import aggregate


@pytest.fixture(scope="module")
def fake():
    with start_fake_server(FakeConfig(latency_ms=20)) as srv:
        yield f"http://127.0.0.1:{srv.port}/v1"


def _cmd(url, tmp_path, name, *extra):
    return [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(tmp_path / f"{name}.db"),
            "--run-dir", str(tmp_path / name), "--policy", url, "--simulator", url, "--classifier", url,
            "--max-epochs", "1", "--concurrency", "4", "--poll-s", "0.2",
            "--pairs-per-conversation", "one", *extra]  # one episode per task: 200


def _pairs(tmp_path, name):
    with open_queue(tmp_path / f"{name}.db") as q:
        pairs = list(q.lease(100_000, consumer="check").pairs)
        stats = q.stats()
    ids = [p.id for p in pairs]
    assert len(ids) == len(set(ids)) == stats["appended"]
    assert len({(p.meta["epoch"], p.task_id) for p in pairs}) == len(pairs)  # one pair per task per epoch
    return set(ids), {p.task_id for p in pairs}


def test_partition_helpers():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    items = list(range(10))
    parts = [shard_of(items, g, 4) for g in range(4)]
    assert sorted(x for p in parts for x in p) == items
    assert sum(split_budget(10, g, 4) for g in range(4)) == 10
    row = aggregate([{"episodes": 3, "right_action": 3, "version": 2}, {"episodes": 1, "version": 1}])
    assert row["episodes"] == 4 and row["version"] == 2 and row["version_min"] == 1 and row["action_accuracy"] == 0.75


def test_workers_partition_and_survive_sigkill(fake, tmp_path):
    one = subprocess.run(_cmd(fake, tmp_path, "one"), capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    ref_ids, ref_tasks = _pairs(tmp_path, "one")
    assert len(ref_tasks) > 150  # toy: 200 train tasks, nearly all give a pair

    two = subprocess.run(_cmd(fake, tmp_path, "two", "--workers", "2"), capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["episodes"] == 200 and summary["worker_restarts"] == 0
    assert _pairs(tmp_path, "two") == (ref_ids, ref_tasks)  # the union of the workers' shards, no overlap
    w0 = [json.loads(line)["task_id"] for line in (tmp_path / "two" / "worker-0" / "dpref.jsonl").read_text().splitlines()]
    w1 = [json.loads(line)["task_id"] for line in (tmp_path / "two" / "worker-1" / "dpref.jsonl").read_text().splitlines()]
    assert not set(w0) & set(w1)

    # two "hosts" (--shard 0/2 and 1/2) against one queue: the same union again
    hosts = [subprocess.Popen(_cmd(fake, tmp_path, f"host{i}", "--shard", f"{i}/2") + ["--queue", str(tmp_path / "hosts.db")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for h in hosts:
        assert h.wait(timeout=180) == 0, h.stderr.read()[-3000:]
    assert _pairs(tmp_path, "hosts") == (ref_ids, ref_tasks)

    # kill -9 one worker mid-run: the parent restarts it, it resumes from its own state.json
    run = tmp_path / "kill"
    proc = subprocess.Popen(_cmd(fake, tmp_path, "kill", "--workers", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state = run / "worker-1" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if state.exists() and json.loads(state.read_text())["episodes"] >= 20:
            break
        time.sleep(0.05)
    before = json.loads(state.read_text())
    assert before["epoch"] == 0, "worker 1 finished before it could be killed"
    os.kill(int((run / "worker-1" / "pid").read_text()), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "worker 1 killed by SIGKILL; restarting it" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["worker_restarts"] == 1 and summary["worker_exits"] == {"1": [-9]}
    after = json.loads(state.read_text())
    assert after["restarts"] == 1 and after["epoch"] == 1
    assert _pairs(tmp_path, "kill") == (ref_ids, ref_tasks)  # nothing lost, nothing twice

    # a different layout on the same run dir is refused
    bad = subprocess.run(_cmd(fake, tmp_path, "kill", "--workers", "3"), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "needs the same --workers" in bad.stderr
