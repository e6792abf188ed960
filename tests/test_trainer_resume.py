"""`trainer run` as a real subprocess: SIGKILL between versions, restart, exactly-once training;
SIGTERM stops cleanly (commit, publish, leases back, exit 0)."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from simkit.queue import open_queue
from trainer.ledger import MARKER, checkpoints, read_marker
from trainer.metrics import read_metrics
from trainer.synthetic import toy_pairs


def _start(tmp_path, tiny_model, run_dir, *extra, log_name="trainer.log", queue=None):
    queue = queue or str(tmp_path / "q.db")
    args = [sys.executable, "-m", "trainer.cli", "run", "--queue", queue, "--model", str(tiny_model),
            "--out", str(run_dir), "--batch-size", "2", "--max-length", "256", "--no-tensorboard", "--poll-s", "0.1",
            "--lr", "1e-3", *extra]
    log = open(tmp_path / log_name, "ab")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small shared CI CPU: see conftest.one_torch_thread
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_for(pred, proc, timeout=180, what="condition", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n{log.read_text() if log else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text() if log else ''}")


def _rows(run_dir, event):
    try:
        return [r for r in read_metrics(run_dir) if r["event"] == event]
    except FileNotFoundError:
        return []


def _audit(run_dir):
    return [json.loads(line) for line in (run_dir / "trained_pairs.jsonl").read_text().splitlines()]


def test_sigkill_between_versions_then_resume_exactly_once(tiny_model, model_server, tmp_path):
    pairs = toy_pairs(30)
    with open_queue(tmp_path / "q.db") as q:
        q.append(pairs)
    run_dir = tmp_path / "run"
    cmd = ("--policy-url", model_server.url, "--publish-every", "3", "--max-steps", "8", "--adapter-name", "killtest")
    log = tmp_path / "trainer.log"
    try:
        # ---- run 1: killed with SIGKILL after step 4, i.e. between version 1 (step 3) and version 2 (step 6)
        proc = _start(tmp_path, tiny_model, run_dir, *cmd)
        _wait_for(lambda: any(r["step"] == 4 for r in _rows(run_dir, "step")), proc, what="step 4", log=log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        run1 = [r["step"] for r in _rows(run_dir, "step")]
        assert run1 in ([1, 2, 3, 4], [1, 2, 3, 4, 5])  # killed before step 6 (version 2)
        with open_queue(tmp_path / "q.db") as q:
            at_kill = q.stats()
            assert q.current_version().version == 1 and q.current_version().meta["step"] == 3
        committed = [read_marker(p) for _, p in checkpoints(run_dir / "checkpoints") if read_marker(p)]
        assert committed[-1]["step"] == 3
        assert at_kill["acked"] == committed[-1]["committed_total"] == 6  # 3 steps x 2 pairs
        assert at_kill["in_flight"] >= 2  # step 4's pairs (and maybe step 5's): trained or not, never acked

        # ---- run 2: the same command again resumes from checkpoint-3 and finishes
        proc = _start(tmp_path, tiny_model, run_dir, *cmd)
        _wait_for(lambda: _rows(run_dir, "resume"), proc, what="resume", log=log)
        resume = _rows(run_dir, "resume")[0]
        assert resume["step"] == 3 and resume["committed_total"] == 6 and resume["released"] == at_kill["in_flight"]
        with open_queue(tmp_path / "q.db") as q:
            assert q.stats()["acked"] == at_kill["acked"]  # acknowledged-pair count unchanged by the restart
        assert proc.wait(timeout=180) == 0, log.read_text()

        steps = _rows(run_dir, "step")
        # steps 1-4 from run 1, then 4..8 again from run 2 (step 4 redone from checkpoint-3's state)
        assert [r["step"] for r in steps] == run1 + [4, 5, 6, 7, 8]
        # model, optimizer, scheduler and RNG came back from checkpoint-3: step 4 is redone on the same
        # (released, re-leased) pairs with the same dropout masks, so it gives the very same numbers
        first, again = steps[3], steps[len(run1)]
        for key in ("loss", "rewards/margins", "logps/chosen", "learning_rate"):
            assert abs(first[key] - again[key]) < 1e-5 * max(1.0, abs(first[key])), (key, first[key], again[key])
        with open_queue(tmp_path / "q.db") as q:
            end = q.stats()
            versions = q.versions()
        assert end["acked"] == 16 and end["in_flight"] == 0 and end["depth"] == 30 - 16
        assert [v.meta["step"] for v in versions] == [3, 6, 8]
        # exactly once: the checkpoint lineage holds 16 distinct pairs, the first 16 of the queue
        audit = _audit(run_dir)
        assert [a["step"] for a in audit] == [3, 6, 8] and [a["parent_step"] for a in audit] == [0, 3, 6]
        trained = [i for a in audit for i in a["pair_ids"]]
        assert len(trained) == len(set(trained)) == 16
        assert set(trained) == {p.id for p in pairs[:16]}
        assert (run_dir / "checkpoints" / "checkpoint-8" / MARKER).exists()
        assert not (run_dir / "checkpoints" / "checkpoint-3").exists()  # rotated (keep 2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for v in (1, 2, 3):
            httpx.post(model_server.url + "/unload_lora_adapter", json={"lora_name": f"killtest-v{v}"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(tiny_model, tmp_path, sig):
    with open_queue(tmp_path / "q.db") as q:
        q.append(toy_pairs(40))
    run_dir = tmp_path / "run"
    log = tmp_path / "trainer.log"
    proc = _start(tmp_path, tiny_model, run_dir, "--publish-every", "50", "--max-steps", "100")
    try:
        _wait_for(lambda: len(_rows(run_dir, "step")) >= 2, proc, what="2 steps", log=log)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = _rows(run_dir, "step")[-1]["step"]
    stop = _rows(run_dir, "stop")[-1]
    assert stop["reason"] == "signal" and stop["step"] == last
    with open_queue(tmp_path / "q.db") as q:
        st = q.stats()
        cur = q.current_version()
    assert st["acked"] == 2 * last and st["in_flight"] == 0  # everything trained is committed, the rest returned
    assert cur.version == 1 and cur.meta["step"] == last  # the final state was published
    assert read_marker(run_dir / "checkpoints" / f"checkpoint-{last}")["committed_total"] == 2 * last


def test_sigkill_then_resume_exactly_once_over_redis(tiny_model, tmp_path, redis_server):
    """The same exactly-once ledger over a Redis queue: a real `trainer run`, SIGKILLed after a
    commit, restarted; every pair is trained once in the checkpoint lineage and acked once."""
    url = redis_server.url("act")
    pairs = toy_pairs(12)
    with open_queue(url) as q:
        q.append(pairs)
    run_dir, log = tmp_path / "run", tmp_path / "trainer.log"
    cmd = ("--publish-every", "2", "--max-steps", "6", "--max-staleness", "100")
    proc = _start(tmp_path, tiny_model, run_dir, *cmd, queue=url)
    try:
        _wait_for(lambda: any(r["step"] == 3 for r in _rows(run_dir, "step")), proc, what="step 3", log=log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with open_queue(url) as q:
            at_kill = q.stats()
        committed = [read_marker(p) for _, p in checkpoints(run_dir / "checkpoints") if read_marker(p)]
        assert at_kill["acked"] == committed[-1]["committed_total"] and at_kill["in_flight"] >= 2
        proc = _start(tmp_path, tiny_model, run_dir, *cmd, queue=url)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with open_queue(url) as q:
        end = q.stats()
        assert q.current_version().meta["step"] == 6
    assert end["acked"] == 12 and end["in_flight"] == 0 and end["depth"] == 0
    trained = [i for a in _audit(run_dir) for i in a["pair_ids"]]
    assert len(trained) == len(set(trained)) == 12 and set(trained) == {p.id for p in pairs}
