"""One `trainer run` per run directory (two real processes), the lock released by the OS after
kill -9, and a finished run that says so when run again."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from simkit.queue import open_queue
from trainer.lock import LOCK_NAME, RunDirLocked, RunLock
from trainer.synthetic import toy_pairs


def _cmd(tmp_path, tiny_model, run_dir, *extra):
    return [sys.executable, "-m", "trainer.cli", "run", "--queue", str(tmp_path / "q.db"), "--model", str(tiny_model),
            "--out", str(run_dir), "--batch-size", "2", "--max-length", "256", "--no-tensorboard", "--poll-s", "0.1",
            *extra]


def test_lock_in_process(tmp_path):
    with RunLock(tmp_path):
        try:
            RunLock(tmp_path).acquire()  # flock is per open file: a second open in one process conflicts too
        except RunDirLocked as e:
            assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e)
        else:
            raise AssertionError("second lock acquired")
    RunLock(tmp_path).acquire().release()  # free again


def test_second_trainer_fails_fast_and_kill9_frees_the_lock(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    open_queue(tmp_path / "q.db").close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cmd(tmp_path, tiny_model, run_dir, "--max-steps", "1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        lock = run_dir / LOCK_NAME
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(lock.read_text())["pid"] == first.pid
        t0 = time.monotonic()
        second = subprocess.run(_cmd(tmp_path, tiny_model, run_dir, "--max-steps", "1"), capture_output=True,
                                text=True, env=env, timeout=60)
        assert second.returncode == 2
        assert f"is in use by another trainer: pid {first.pid} on host {socket.gethostname()}, started " in second.stderr
        assert time.monotonic() - t0 < 10  # before torch is even imported
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no clean-up: the kernel drops the flock with the process
        first.wait()

    with open_queue(tmp_path / "q.db") as q:
        q.append(toy_pairs(4))
    done = subprocess.run(_cmd(tmp_path, tiny_model, run_dir, "--max-steps", "1"), capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    again = subprocess.run(_cmd(tmp_path, tiny_model, run_dir, "--max-steps", "1"), capture_output=True, text=True,
                           env=env, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trainer run: {run_dir.resolve()} already finished (step 1 of 1)" in again.stdout
    assert "not a single sample" not in again.stdout + again.stderr
