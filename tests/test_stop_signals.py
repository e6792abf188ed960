"""Process hygiene: a command that starts child processes stops them all when it gets SIGINT or
SIGTERM, fails, or is killed outright (SIGKILL: its children get SIGTERM from the kernel, see
`simkit.loadtools.testing.popen_group`). Checked on `simkit serve --workers 2`, `simkit loadtest` with its
fake server process (2 forked workers) and recipes/act_recipe.sh (with a stub for Python)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.procs import descendants, process_table, still_running

REPO = Path(__file__).resolve().parent.parent
STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


def _wait_for(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def _stop_and_check(proc: subprocess.Popen, sig: int, expected_rc: int, log: Path) -> None:
    """Send `sig` to `proc` alone; it exits with `expected_rc` and leaves no descendant running."""
    children = descendants(proc.pid)
    try:
        proc.send_signal(sig)
        assert proc.wait(60) == expected_rc, log.read_text()[-3000:]
        alive = still_running(children, timeout=30)
        assert not alive, f"still running after {signal.Signals(sig).name}: " + "; ".join(
            Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in alive)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in still_running(children):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def slow_fake():
    # slow replies: the rollouts below are long-lived and cost next to no CPU
    with start_fake_server(FakeConfig(latency_ms=200)) as srv:
        yield srv.url


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_serve_workers_stop_with_parent(slow_fake, tmp_path, sig):
    url, log = slow_fake, tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(tmp_path / "q.db"),
           "--run-dir", str(tmp_path / "run"), "--policy", url, "--simulator", url, "--classifier", url,
           "--workers", "2", "--max-epochs", "1000", "--concurrency", "1", "--poll-s", "0.2"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    # both workers are serving (past PR_SET_PDEATHSIG) once each has opened its D_pref file
    _wait_for(lambda: all((tmp_path / "run" / f"worker-{g}" / "dpref.jsonl").exists() for g in (0, 1)),
              proc, log, "running workers")
    workers = {int((tmp_path / "run" / f"worker-{g}" / "pid").read_text()) for g in (0, 1)}
    assert workers <= {pid for pid, _ in descendants(proc.pid)}
    # SIGINT / SIGTERM: forwarded, the workers stop cleanly and so does the parent; SIGKILL: the
    # kernel sends each worker SIGTERM (the multiprocessing resource tracker follows on EOF)
    _stop_and_check(proc, sig, 0 if sig != signal.SIGKILL else -signal.SIGKILL, log)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_loadtest_stops_its_fake_server(tmp_path, sig):
    log = tmp_path / "loadtest.log"
    cmd = [sys.executable, "-m", "simkit.cli", "loadtest", "--duration", "600", "--concurrency", "1",
           "--fake-latency-ms", "200", "--fake-workers", "2", "--no-live", "--no-plot", "--out", str(tmp_path / "out")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def fake_up() -> bool:  # the fake server and its two forked workers
        return sum("simkit.loadtools.fakeserver" in _cmdline(p) for p, _ in descendants(proc.pid)) == 3

    _wait_for(fake_up, proc, log, "fake server")
    time.sleep(1.5)  # past its health check: in the episodes loop
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}[sig]
    _stop_and_check(proc, sig, expected, log)
    if sig != signal.SIGKILL:
        assert f"simkit loadtest: stopped by {signal.Signals(sig).name}" in log.read_text()


# a stand-in for Python: the model server has a child of its own (stopped with its process group),
# `eval` runs until stopped (or fails at once with STUB_FAIL), the recipe's inline scripts succeed
STUB = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$$ $*" >> "$STUB_LOG"
    case " $* " in
      *" model-server "*) sleep 300 & echo "$! grandchild" >> "$STUB_LOG"; wait ;;
      *" eval "*) if [[ -n ${STUB_FAIL:-} ]]; then exit 3; fi; exec sleep 300 ;;
      *) exit 0 ;;
    esac
""")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "failing-step"])
def test_recipe_stops_its_children(tmp_path, how):
    stub, stub_log, log = tmp_path / "python", tmp_path / "stub.log", tmp_path / "recipe.out"
    stub.write_text(STUB)
    stub.chmod(0o755)
    stub_log.touch()
    (tmp_path / "model").mkdir()
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(stub_log), "CHILD_GRACE": "5", "PORT": "1",
           **({"STUB_FAIL": "1"} if how == "failing-step" else {})}
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(REPO / "recipes" / "act_recipe.sh"), str(tmp_path / "model"),
                                 str(tmp_path / "out")], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        if how == "failing-step":
            assert proc.wait(60) == 3, log.read_text()
            assert "FAIL  eval base rc=3" in log.read_text()
        else:
            _wait_for(lambda: " eval " in stub_log.read_text() and "grandchild" in stub_log.read_text(),
                      proc, log, "the eval step")
            time.sleep(0.3)
            assert len(descendants(proc.pid)) == 3  # model server (and its child), eval
            sig = signal.Signals[how]
            _stop_and_check(proc, sig, 128 + sig, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    started = [int(line.split()[0]) for line in stub_log.read_text().splitlines()]
    assert len(started) >= 4  # health check, model server, its child, eval
    deadline = time.monotonic() + 10
    while set(started) & set(process_table()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(started) & set(process_table()), stub_log.read_text()


def test_a_child_started_from_a_short_lived_thread_outlives_that_thread():
    """The parent-death signal follows the starting thread: popen_group must not arm it off the main
    thread, or a server restarted from a Timer (tests/test_queue_outage.py) dies with the Timer."""
    import threading

    from simkit.loadtools.testing import popen_group, stop_process

    box = []
    t = threading.Thread(target=lambda: box.append(popen_group(["sleep", "30"])))
    t.start()
    t.join()
    proc = box[0]
    try:
        time.sleep(0.5)
        assert proc.poll() is None, "the child died with the thread that started it"
    finally:
        stop_process(proc)
