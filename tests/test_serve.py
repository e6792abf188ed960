"""`simkit serve` as a real subprocess against the embedded model server: SIGKILL mid-run,
restart, and check the queue holds only complete, well-formed, uniquely identified pairs and
that work resumed where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from simkit.queue import open_queue
from simkit.types import PreferencePair

ENV = os.environ.get("SIMKIT_SERVE_TEST_ENV", "ambigsql")


def _serve_cmd(model_server, queue, run_dir, max_episodes):
    return [sys.executable, "-m", "simkit.cli", "serve", "--env", ENV, "--n-conversations", "40", "--queue", str(queue),
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


SINK_THEN_DIE = """
import asyncio, os, signal, sys
from pathlib import Path
from types import SimpleNamespace
from simkit.queue import AsyncPairQueue, SQLiteQueue
from simkit.serving import PairSink
from trainer.synthetic import toy_pairs

async def main():
    q = SQLiteQueue(sys.argv[1])
    sink = PairSink(AsyncPairQueue(q), journal=Path(sys.argv[2]))
    pairs = toy_pairs(30)
    await sink.write([SimpleNamespace(pair=p) for p in pairs[:10]])
    q._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the first batch reaches the main file
    for i in (10, 20):
        await sink.write([SimpleNamespace(pair=p) for p in pairs[i:i + 10]])
    os.kill(os.getpid(), signal.SIGKILL)  # no close: the last 20 pairs live only in the -wal file

asyncio.run(main())
"""


async def test_resume_reappends_pairs_a_truncated_wal_lost(tmp_path, caplog):
    """A truncated SQLite WAL silently rolls the queue back; serve's resume check finds the pairs its
    journal says it appended that the queue lacks, appends them again and says how many."""
    from simkit.queue import AsyncPairQueue
    from simkit.serving import PairSink
    from trainer.synthetic import toy_pairs

    db, journal = tmp_path / "q.db", tmp_path / "queued.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([sys.executable, "-c", SINK_THEN_DIE, str(db), str(journal)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    wal = Path(str(db) + "-wal")
    assert wal.stat().st_size > 0
    with open(wal, "r+b") as f:  # no process running: cut the WAL in half, as a bad disk or copy would
        f.truncate(wal.stat().st_size // 2)
    Path(str(db) + "-shm").unlink(missing_ok=True)
    ids = [p.id for p in toy_pairs(30)]
    with open_queue(db) as q:
        lost = q.missing(ids)
        assert q.stats()["appended"] == 30 - len(lost)  # SQLite reopened an older state, no error
    assert 10 <= len(lost) <= 20 and not set(lost) & set(ids[:10])
    async with AsyncPairQueue(open_queue(db)) as aq:
        sink = PairSink(aq, journal=journal)
        with caplog.at_level("WARNING", logger="simkit.serving.serve"):
            assert await sink.recover() == len(lost)
        assert f"lost {len(lost)} of the 30 pairs" in caplog.text
        assert await aq.missing(ids) == [] and (await aq.stats())["appended"] == 30
        assert await sink.recover() == 0 and sink.recovered == len(lost)  # idempotent


async def test_sink_journal_keeps_two_segments_and_recovers_from_both(tmp_path):
    from types import SimpleNamespace

    from simkit.queue import AsyncPairQueue
    from simkit.serving import PairSink
    from trainer.synthetic import toy_pairs

    pairs, journal = toy_pairs(30), tmp_path / "queued.jsonl"
    async with AsyncPairQueue(open_queue(tmp_path / "a.db")) as aq:
        sink = PairSink(aq, journal=journal, journal_mb=4000 / 2**20)  # ~4 KB segments
        for i in range(0, 30, 5):
            await sink.write([SimpleNamespace(pair=p) for p in pairs[i:i + 5]])
    kept = [PreferencePair.model_validate_json(ln).id for seg in (Path(str(journal) + ".1"), journal)
            for ln in seg.read_text().splitlines()]
    assert 5 <= len(kept) < 30 and kept == [p.id for p in pairs][-len(kept):]  # the newest, in order
    async with AsyncPairQueue(open_queue(tmp_path / "b.db")) as fresh:  # a queue that lost everything
        assert await PairSink(fresh, journal=journal).recover() == len(kept)
        assert (await fresh.stats())["appended"] == len(kept)
