"""The short fault soak (bench/soak_faults.py, ~45 s of chaos): model server, serve (2 workers)
and trainer killed with SIGKILL at random moments (a publish included) against a simulator /
classifier that fails 10% of calls and hangs 1%; then every count must reconcile.

Two checks depend on the queue's staleness rule. Under "a leased pair is never dropped stale"
they must hold; on a queue that still drops leased pairs (probed below) a trained pair can be
dropped before its ack, so there they are expected to fail, and only that way."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simkit.queue import open_queue
from trainer.synthetic import toy_pairs

ROOT = Path(__file__).resolve().parent.parent
STALE_RULE_CHECKS = ("acked_is_trained", "trained_not_pending")


def queue_drops_leased_pairs(tmp_path) -> bool:
    with open_queue(tmp_path / "probe.db") as q:
        q.append(toy_pairs(1))
        lease = q.lease(1, consumer="probe")
        q.drop_stale(10**6)
        return q.ack(lease) == 0


def test_soak_reconciles(tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "soak_faults.py"), "--duration", "45",
                          "--kill-every", "4", "8", "--work", str(tmp_path / "work"), "--json", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-3000:]
    s = json.loads(out.read_text())
    report = res.stdout
    assert s["stop_codes"] == {"serve": 0, "trainer": 0}, report
    assert sum(s["kills"].values()) >= 4 and s["trainer"]["commits"] >= 2, report  # it did soak
    assert s["queue"]["appended"] > 0 and s["serve"]["restarts"] >= 1, report
    checks = s["checks"]
    for name, c in checks.items():
        if name not in STALE_RULE_CHECKS:
            assert c["ok"], f"{name}: {c['detail']}\n{report}"
    if queue_drops_leased_pairs(tmp_path):
        failed = [n for n in STALE_RULE_CHECKS if not checks[n]["ok"]]
        if failed:  # only dropped (done = 3) trained pairs may explain it
            assert "states [3]" in checks["trained_not_pending"]["detail"], report
            pytest.xfail(f"queue drops leased pairs stale (fix pending in simkit/queue.py): {failed} fail\n{report}")
    for name in STALE_RULE_CHECKS:
        assert checks[name]["ok"], f"{name}: {checks[name]['detail']}\n{report}"
