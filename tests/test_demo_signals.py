"""`simkit demo` stops every child process it started when it gets SIGTERM, and `--resume` then
reuses the stages finished before the signal (tiny model, the sizes of tests/test_demo.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["--model", "tiny", "--n", "16", "--sft-epochs", "1", "--act-steps", "4", "--publish-every", "2",
         "--eval-tasks", "8", "--icl-shots", "1", "--max-tokens", "16", "--max-length", "512",
         "--train-dtype", "float32", "--rollout-concurrency", "16"]


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process now."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(d.name)] = (int(fields[1]), fields[19])
    return out


def _descendants(root: int) -> set[tuple[int, str]]:
    procs = _procs()
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start) in procs.items():
            if ppid == parent:
                found.add((pid, start))
                todo.append(pid)
    return found


def test_sigterm_stops_every_child_then_resume_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "simkit.cli", "demo", "--out", str(out), *SMALL]
    with open(tmp_path / "first.log", "w") as log:
        demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        # wait for the SFT stage: the model server and `trainer sft` (each with their own children) are running
        while not (out / "logs" / "sft.log").exists() or len(_descendants(demo.pid)) < 2:
            assert demo.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not reach the SFT stage"
            time.sleep(0.5)
        time.sleep(2)
        children = _descendants(demo.pid)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(120) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
    deadline = time.monotonic() + 30
    while {p for p, s in children if _procs().get(p, (0, None))[1] == s} and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = {p for p, s in children if _procs().get(p, (0, None))[1] == s}
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
