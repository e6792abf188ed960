"""The short fault soak (bench/soak_faults.py, ~45 s of chaos) over each queue backend: model
server, serve (2 workers) and trainer killed with SIGKILL at random moments (a publish included)
against a simulator / classifier that fails 10% of calls and hangs 1%; then every count must
reconcile. Over Redis (AOF, appendfsync always) redis-server itself is also SIGKILLed and
restarted mid-soak: no counter may go back (nothing appended or acked is lost), and serve and the
trainer ride through it (issue 23). No process may exit that was not killed, no log may hold a
traceback, and episodes fail only within a bounded window after a model-server kill (the
restarted server gets the current adapter back from serve's follower).
Among the checks: a trained pair is acked, never "dropped stale" (the queue never drops a pair
its consumer holds on lease; staleness is enforced only where the trainer leases)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend,duration", [("sqlite", 45), ("redis", 40)])
def test_soak_reconciles(tmp_path, backend, duration):
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "soak_faults.py"), "--duration", str(duration),
                          "--queue-backend", backend, "--kill-every", "4", "8", "--failure-window", "60", "--work", str(tmp_path / "work"),
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-3000:]
    s = json.loads(out.read_text())
    report = res.stdout
    assert s["stop_codes"] == {"serve": 0, "trainer": 0}, report
    assert sum(s["kills"].values()) >= 4 and s["trainer"]["commits"] >= 2, report  # it did soak
    assert s["queue"]["appended"] > 0 and s["serve"]["restarts"] >= 1, report
    assert s["chaos_kills"]["model-server"] >= 1 and {"no_unkilled_exits", "failures_bounded"} <= set(s["checks"]), report
    if backend == "redis":
        assert s["kills"]["redis"] >= 1 and "redis_durable" in s["checks"], report
    for name, c in s["checks"].items():
        assert c["ok"], f"{name}: {c['detail']}\n{report}"
