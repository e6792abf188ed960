"""`simkit demo` stops every child process it started when it gets SIGTERM, and `--resume` then
reuses the stages finished before the signal (tiny model, the sizes of tests/test_demo.py)."""
import os
import signal
import subprocess
import sys
import time

from simkit.procs import descendants, still_running

SMALL = ["--model", "tiny", "--n", "16", "--sft-epochs", "1", "--act-steps", "4", "--publish-every", "2",
         "--eval-tasks", "8", "--icl-shots", "1", "--max-tokens", "16", "--max-length", "512",
         "--train-dtype", "float32", "--rollout-concurrency", "16"]


def test_sigterm_stops_every_child_then_resume_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "simkit.cli", "demo", "--out", str(out), *SMALL]
    with open(tmp_path / "first.log", "w") as log:
        demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        # wait for the SFT stage: the model server and `trainer sft` (each with their own children) are running
        while not (out / "logs" / "sft.log").exists() or len(descendants(demo.pid)) < 2:
            assert demo.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not reach the SFT stage"
            time.sleep(0.5)
        time.sleep(2)
        children = descendants(demo.pid)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(120) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
    alive = still_running(children, timeout=30)
    assert not alive, f"still running after SIGTERM: {alive}"
    first = (tmp_path / "first.log").read_text()
    assert "demo stopped by SIGTERM" in first
    assert (out / "stages" / "eval-zero-shot.json").is_file() and not (out / "stages" / "sft.json").exists()

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900,
                         env={**os.environ})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("reused: finished in an earlier run") >= 3  # model, zero-shot, ICL
    assert "| SFT (n=16) |" in res.stdout and "| ACT (n=16) |" in res.stdout
    summary = [line for line in res.stdout.splitlines() if line.startswith("stage wall times: ")]
    assert len(summary) == 1 and "zero-shot reused" in summary[0] and "act " in summary[0], summary
    # a second --resume with other settings is refused instead of mixing two runs
    bad = subprocess.run([*cmd, "--resume", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "other settings" in bad.stderr
