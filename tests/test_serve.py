"""`simkit serve` as a real subprocess against the embedded model server: SIGKILL mid-run,
restart, and check the queue holds only complete, well-formed, uniquely identified pairs and
that work resumed where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time

from simkit.queue import open_queue
from simkit.types import PreferencePair

ENV = os.environ.get("SIMKIT_SERVE_TEST_ENV", "ambigsql")


def _serve_cmd(model_server, queue, run_dir, max_episodes):
    return [sys.executable, "-m", "simkit.cli", "serve", "--env", ENV, "--limit", "40", "--queue", str(queue),
            "--run-dir", str(run_dir), "--policy", model_server.url, "--max-tokens", "12",
            "--concurrency", "16", "--max-episodes", str(max_episodes), "--poll-s", "0.2"]


def test_serve_survives_sigkill_and_resumes(model_server, tmp_path):
    queue, run_dir = tmp_path / "q.sqlite", tmp_path / "run"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(_serve_cmd(model_server, queue, run_dir, 100_000), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    state_file = run_dir / "state.json"
    while time.monotonic() < deadline:  # wait until Phase 2 pairs are flowing
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        if state_file.exists() and json.loads(state_file.read_text())["episodes"] >= 60:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(state_file.read_text())
    assert before["episodes"] >= 60

    q = open_queue(str(queue))
    depth_before = q.depth()
    assert depth_before >= 40
    q.close()

    target = before["episodes"] + 80
    res = subprocess.run(_serve_cmd(model_server, queue, run_dir, target), stdout=log, stderr=subprocess.STDOUT,
                         timeout=300)
    log.close()
    assert res.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    after = json.loads(state_file.read_text())
    assert after["restarts"] == 1 and after["episodes"] >= target
    assert (after["epoch"], after["position"]) > (before["epoch"], before["position"])  # resumed, moved on

    q = open_queue(str(queue))
    lease = q.lease(100_000, consumer="check")
    pairs = list(lease.pairs)
    assert len(pairs) == q.depth() and len(pairs) > depth_before
    assert len({p.id for p in pairs}) == len(pairs)
    for p in pairs:  # complete and well-formed
        PreferencePair.model_validate_json(p.model_dump_json())
        assert p.phase == 2 and p.env == ENV and p.prompt and p.chosen and p.rejected
        assert p.prompt[0].role == "system" and p.chosen[0].role == "assistant" and p.rejected[0].role == "assistant"
        assert p.adapter and p.source in {"wrong-action", "trajectory-success", "trajectory-failure"}
    epochs = {(p.meta["epoch"], p.task_id) for p in pairs}
    assert len(epochs) == len(pairs)  # one pair per task per epoch, even across the crash
    q.close()
