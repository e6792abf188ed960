"""Fault soak of the whole ACT loop: every process killed with SIGKILL at random moments, the
simulator and classifier failing, and afterwards every count must reconcile.

    .venv/bin/python bench/soak_faults.py --duration 300            # 5 minutes of chaos
    .venv/bin/python bench/soak_faults.py --duration 45 --json s.json   # what tests/test_soak.py runs
    .venv/bin/python bench/soak_faults.py --queue-backend redis --duration 90   # over Redis Streams

Processes (all real subprocesses, in a scratch directory):
- the embedded model server (tiny random Llama): the policy, loads each published adapter;
- a fake OpenAI server for the simulator and the classifier with 10% HTTP 500s and 1% requests
  that never answer (`simkit.loadtools.fakeserver`; the one process never killed: it *is* the fault);
- `simkit serve --env toy --workers 2` (async schedule; the trainer leases with --max-staleness 2);
- `trainer run --publish-every 3` (batch 2, never-ending --max-steps).
A chaos loop kills one target every few seconds and restarts it: the model server, serve (the
whole process group), one serve worker (the pool restarts it), the trainer, and the trainer in
the middle of a publish (as soon as a new adapter directory appears). With `--queue-backend
redis` the queue is a real redis-server (AOF on, `appendfsync always`, in the scratch directory)
and redis-server is one more target: SIGKILLed, down for 0.2-3 s, restarted on the same AOF
(always once, past half the duration). Serve's workers and the trainer ride through it (their
queue calls are retried: simkit/queue/outage.py); none of them may exit. The model server's
restarts start it without adapters: serve's follower loads the current one again. For a process kill `everysec` would lose nothing either (the AOF
write() precedes each reply; only the fsync differs); `always` also covers a power loss. At the end serve and the
trainer get SIGTERM (clean stop), and the checks below run on the queue, the trainer's ledger
and serve's state files.

Reconciliation (each check is named in the output; exit status 1 if any fails):
- `queue_balance`: appended = acked + dropped + pending, with pending counted by leasing every
  live pair (no pair vanished);
- `lineage`: the trainer's commits form one chain (each commit's parent is the previous commit);
- `trained_once`: no pair id in two commits;
- `acked_is_trained`: the queue's acked count equals the pairs the commits trained plus the pairs
  the trainer consumed untrained and acked (its log's "pair X skipped:" lines: leased pairs that
  went stale before their step, by design): nothing acked is unaccounted for;
- `trained_not_pending`: no trained pair is still pending or dropped (per id: `PairQueue.states`);
- `serve_pairs`: the queue's appended pairs are covered by serve's episodes (Σ state.json
  pairs), up to the in-flight episodes lost per serve kill that were redone with another
  outcome.
- `redis_durable` (Redis only): every queue counter (appended, acked, dropped, …) read just before
  redis-server was killed is still there, or higher, after it replayed its AOF.
- `no_unkilled_exits`: no process exited that the chaos loop did not kill (the trainer, serve, a
  serve worker or the model server ending on its own, e.g. on a Redis restart, is a failure), and
  the logs of serve and the trainer hold no traceback;
- `failures_bounded`: every failed episode (serve's workers' metrics) happened within
  `--failure-window` seconds (default 45) after a model-server kill: the restarted server gets
  the current adapter back and episodes stop failing.
All checks read the queue through `open_queue` (the PairQueue API): both backends, one code.
Under the queue rule "a leased pair is never dropped stale; staleness applies when leasing",
all of these hold. A queue that drops leased pairs breaks `acked_is_trained` and
`trained_not_pending` (a trained pair is acked after it was dropped: the ack is a no-op).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simkit.loadtools.testing import RedisServer, free_port, wait_http  # noqa: E402

PY = sys.executable
WORKERS, CONCURRENCY = 2, 8  # serve's --workers and --concurrency (per worker)


@dataclass
class Proc:
    """One restartable process (its own process group), its log, its kills."""

    name: str
    cmd: Callable[[], list[str]]
    log: Path
    env: dict = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    kills: int = 0
    starts: int = 0
    started_at: float = 0.0
    started_wall: float = 0.0

    def start(self) -> None:
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(self.cmd(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", **self.env})
        out.close()
        self.starts += 1
        self.started_at = time.monotonic()
        self.started_wall = time.time()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.kills += 1
        self.popen.wait()

    def stop(self, timeout: float = 120) -> int:
        if not self.alive():
            return self.popen.returncode
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()


def _starts(train_dir: Path) -> int:
    """`start` / `resume` events in the trainer's metrics: written once its SIGTERM handler is in."""
    path = train_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"event": "start"' in line or '"event": "resume"' in line)


def _wait_ready(trainer: "Proc", train_dir: Path, before: int, timeout: float = 120) -> None:
    """Before the final SIGTERM: a trainer restarted a moment ago may still be importing torch, and
    a SIGTERM then just ends it (-15; harmless, nothing leased). Wait until it is up."""
    deadline = time.monotonic() + timeout
    while trainer.alive() and _starts(train_dir) <= before and time.monotonic() < deadline:
        time.sleep(0.2)


def _wait_serve_ready(serve: "Proc", serve_dir: Path, timeout: float = 120) -> None:
    """Before the final SIGTERM: serve restarted a moment ago may still be importing, and a SIGTERM
    then just ends it (-15). Its parent writes each worker's pid file after its handlers are in."""
    deadline = time.monotonic() + timeout
    while serve.alive() and time.monotonic() < deadline:
        pids = list(serve_dir.glob("worker-*/pid"))
        if pids and min(p.stat().st_mtime for p in pids) >= serve.started_wall:
            return
        time.sleep(0.2)


def _in_phase2(serve_dir: Path) -> bool:
    """Some serve worker has finished Phase 2 episodes (its D_pref is built)."""
    for f in serve_dir.glob("worker-*/state.json"):
        try:
            if json.loads(f.read_text()).get("episodes", 0) > 0:
                return True
        except (OSError, ValueError):
            continue
    return False


def _adapters(run: Path) -> set[str]:
    d = run / "adapters"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def _counters(queue: str) -> dict:
    from simkit.queue import open_queue

    with open_queue(queue) as q:
        return {k: v for k, v in q.stats().items() if k not in ("depth", "in_flight", "available", "version")}


def soak(work: Path, duration: float, seed: int, kill_every: tuple[float, float], max_staleness: int = 2,
         backend: str = "sqlite", failure_window: float = 45.0) -> dict:
    from simkit.modelserver.tiny import init_tiny

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(work / "redis", appendfsync="always").start() if backend == "redis" else None
    try:
        return _soak(work, duration, rng, kill_every, max_staleness, redis, init_tiny(work / "tiny"),
                     failure_window) | {"seed": seed}
    finally:
        if redis is not None:
            redis.stop()


def _soak(work: Path, duration: float, rng: random.Random, kill_every: tuple[float, float], max_staleness: int,
          redis: RedisServer | None, tiny: Path, failure_window: float) -> dict:
    queue = redis.url("soak") if redis else str(work / "q.db")
    serve_dir, train_dir = work / "serve", work / "train"
    ms_port, fake_port = free_port(), free_port()
    ms_url, fake_url = f"http://127.0.0.1:{ms_port}/v1", f"http://127.0.0.1:{fake_port}/v1"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    fake = Proc("fake", lambda: [PY, "-m", "simkit.loadtools.fakeserver", "--port", str(fake_port), "--latency-ms", "5",
                                 "--error-rate", "0.1", "--stall-rate", "0.01"], logs / "fake.log")
    model = Proc("model-server", lambda: [PY, "-m", "simkit.cli", "model-server", "--model", str(tiny),
                                          "--port", str(ms_port)], logs / "model_server.log")
    serve = Proc("serve", lambda: [PY, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(queue),
                                   "--run-dir", str(serve_dir), "--policy", ms_url, "--simulator", fake_url,
                                   "--classifier", fake_url, "--workers", str(WORKERS), "--concurrency", str(CONCURRENCY),
                                   "--max-tokens", "8", "--timeout", "5", "--max-pending", "64",
                                   "--poll-s", "0.3"], logs / "serve.log")
    trainer = Proc("trainer", lambda: [PY, "-m", "trainer.cli", "run", "--queue", str(queue), "--model", str(tiny),
                                       "--out", str(train_dir), "--policy-url", ms_url, "--publish-every", "3",
                                       "--max-steps", "100000", "--batch-size", "2", "--max-length", "1024",
                                       "--no-tensorboard", "--poll-s", "0.2", "--lr", "1e-3", "--adapter-name", "soak",
                                       "--publish-retries", "2", "--publish-timeout-s", "10",
                                       "--max-staleness", str(max_staleness)], logs / "trainer.log")
    for p in (fake, model):
        p.start()
    wait_http(f"http://127.0.0.1:{fake_port}/health", 60, fake.popen)
    wait_http(f"http://127.0.0.1:{ms_port}/health", 180, model.popen)
    serve.start()
    trainer.start()

    events: list[dict] = []  # "t": seconds into the soak, "wall": time.time() (to match metrics rows)
    redis_restarts: list[dict] = []  # counters just before each kill, and after the AOF replay
    trainer_starts_before = 0
    t0 = time.monotonic()
    targets = ["serve", "serve-worker", "trainer", "trainer-publish"] + (["redis"] if redis else [])
    rng.shuffle(targets)
    targets.insert(1, "model-server")  # early in the rotation: a short soak restarts it too
    i = 0
    try:
        while time.monotonic() - t0 < duration:
            time.sleep(rng.uniform(*kill_every))
            for p in (model, serve, trainer):  # a process that exited on its own: note it, restart it
                if not p.alive():
                    events.append({"t": round(time.monotonic() - t0, 1), "wall": time.time(), "exited": p.name,
                                   "code": p.popen.returncode})
                    if p is trainer:
                        trainer_starts_before = _starts(train_dir)
                    p.start()
            if time.monotonic() - t0 >= duration:
                break
            if redis and not redis_restarts and time.monotonic() - t0 >= duration / 2:
                target = "redis"  # at least once, mid-soak
            else:
                k = i % len(targets)
                if targets[k] == "model-server" and not _in_phase2(serve_dir):
                    # a policy server down through all of Phase 1 ends serve ("no Phase 1 pairs"): later
                    targets[k], targets[(k + 1) % len(targets)] = targets[(k + 1) % len(targets)], targets[k]
                target = targets[k]
                i += 1
            ev = {"t": round(time.monotonic() - t0, 1), "wall": time.time(), "kill": target}
            if target == "redis":
                before = _counters(queue)
                redis.kill()
                ev["down_s"] = round(rng.uniform(0.2, 3.0), 2)  # clients see refused connections, then LOADING
                time.sleep(ev["down_s"])
                redis.start()
                redis_restarts.append({"before": before, "after": _counters(queue)})
            elif target == "model-server":
                model.kill9()
                model.start()
            elif target == "serve":
                serve.kill9()
                serve.start()
            elif target == "serve-worker":
                # one in Phase 2, so its restart resumes from a watermark (pid files of a serve killed just before are stale)
                deadline = time.monotonic() + 60
                while serve.alive() and not _in_phase2(serve_dir) and time.monotonic() < deadline:
                    time.sleep(0.2)
                _wait_serve_ready(serve, serve_dir, timeout=60)
                pids = sorted(d / "pid" for d in serve_dir.glob("worker-*") if (d / "state.json").exists())
                if pids:
                    pid = int(rng.choice(pids).read_text())
                    try:
                        os.kill(pid, signal.SIGKILL)
                        ev["pid"] = pid
                    except ProcessLookupError:
                        ev["missed"] = True
            elif target == "trainer":
                trainer.kill9()
                trainer_starts_before = _starts(train_dir)
                trainer.start()
            else:  # in the middle of a publish: as soon as a new adapter directory shows up
                seen = _adapters(train_dir)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and _adapters(train_dir) <= seen and trainer.alive():
                    time.sleep(0.01)
                ev["during_publish"] = bool(_adapters(train_dir) - seen)
                trainer.kill9()
                trainer_starts_before = _starts(train_dir)
                trainer.start()
            events.append(ev)
        elapsed = time.monotonic() - t0
        _wait_ready(trainer, train_dir, trainer_starts_before)
        _wait_serve_ready(serve, serve_dir)
        stop_codes = {"serve": serve.stop(), "trainer": trainer.stop()}
    finally:
        for p in (serve, trainer, model, fake):
            if p.popen is not None and p.alive():
                p.kill9()
    worker_kills = sum(1 for e in events if e.get("kill") == "serve-worker" and "pid" in e)
    summary = reconcile(queue, train_dir, serve_dir, workers_killed=WORKERS * serve.kills + worker_kills,
                        redis_restarts=redis_restarts if redis else None, trainer_log=trainer.log)
    summary["checks"].update(exit_checks(events, serve.log, trainer.log, serve_dir, failure_window))
    summary["ok"] = all(c["ok"] for c in summary["checks"].values())
    summary.update(duration_s=round(elapsed, 1), max_staleness=max_staleness, stop_codes=stop_codes, events=events,
                   backend="redis" if redis else "sqlite",
                   kills={p.name: p.kills for p in (model, serve, trainer)} | ({"redis": len(redis_restarts)} if redis else {}),
                   worker_kills=worker_kills,
                   chaos_kills={t: sum(1 for e in events if e.get("kill") == t) for t in targets},
                   publish_kills=sum(1 for e in events if e.get("during_publish")))
    return summary


def failure_times(serve_dir: Path) -> list[float]:
    """Wall times at which serve's workers counted failed episodes (from their metrics rows; a
    worker's counters restart at 0 with each process, seen as elapsed_s going back)."""
    out: list[float] = []
    for path in sorted(serve_dir.glob("worker-*/metrics.jsonl")):
        prev_fail, prev_el = 0, -1.0
        for line in path.read_text(errors="replace").split("\n"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("elapsed_s", 0) < prev_el:  # a new process
                prev_fail = 0
            if r.get("failures", 0) > prev_fail:
                out += [r["time"]] * (r["failures"] - prev_fail)
            prev_fail, prev_el = r.get("failures", 0), r.get("elapsed_s", 0)
    return sorted(out)


def exit_checks(events: list[dict], serve_log: Path, trainer_log: Path, serve_dir: Path,
                window: float) -> dict[str, dict]:
    """`no_unkilled_exits` and `failures_bounded` (module docstring)."""
    text = {p.name: p.read_text(errors="replace") if p.exists() else "" for p in (serve_log, trainer_log)}
    exited = [f"{e['exited']} ({e['code']})" for e in events if "exited" in e]
    worker_exits = re.findall(r"worker \d+ exit code -?\d+", text[serve_log.name])  # pool: not a SIGKILL
    tracebacks = {name: t.count("Traceback") for name, t in text.items() if "Traceback" in t}
    ok = not exited and not worker_exits and not tracebacks
    kills = [e["wall"] for e in events if e.get("kill") == "model-server"]
    fails = failure_times(serve_dir)
    outside = [round(t, 1) for t in fails if not any(k <= t <= k + window for k in kills)]
    return {"no_unkilled_exits": {"ok": ok, "detail": f"exited unkilled: {exited or 'none'}; worker exits: "
                                                      f"{worker_exits or 'none'}; tracebacks: {tracebacks or 'none'}"},
            "failures_bounded": {"ok": not outside, "detail": f"{len(fails)} failed episodes, {len(outside)} more than "
                                                              f"{window:.0f}s after a model-server kill ({len(kills)} "
                                                              f"kills){f': at {outside[:5]}' if outside else ''}"}}


def _lineage(train_dir: Path) -> list[dict]:
    audit = train_dir / "trained_pairs.jsonl"
    return [json.loads(x) for x in audit.read_text().splitlines() if x.strip()] if audit.exists() else []


def _skipped(trainer_log: Path) -> set[str]:
    """Pairs the trainer consumed without training (logged before their ack, see trainer/ledger.py)."""
    text = trainer_log.read_text(errors="replace") if trainer_log.exists() else ""
    return set(re.findall(r"pair (\S+) skipped: ", text))


def reconcile(queue: str, train_dir: Path, serve_dir: Path, workers_killed: int,
              redis_restarts: list[dict] | None = None, trainer_log: Path | None = None) -> dict:
    """The checks of the module docstring; `checks` maps each name to (ok, detail)."""
    from simkit.queue import open_queue

    checks: dict[str, tuple[bool, str]] = {}
    with open_queue(queue) as q:
        q.release("trainer")  # the trainer stopped cleanly already; a no-op then
        stats = q.stats()
        pending = list(q.lease(10**9, consumer="soak-check", lease_s=60).pairs)
        q.release("soak-check")
        versions = q.versions()
        skipped = _skipped(trainer_log) if trainer_log else set()
        state = q.states({i for c in _lineage(train_dir) for i in c["pair_ids"]} | skipped)
    pending_ids = {p.id for p in pending}
    balance = stats["acked"] + stats["dropped_stale"] + len(pending)
    checks["queue_balance"] = (stats["appended"] == balance,
                               f"appended {stats['appended']} = acked {stats['acked']} + dropped "
                               f"{stats['dropped_stale']} + pending {len(pending)} ({balance})")

    commits = _lineage(train_dir)
    chain = all(c["parent_step"] == (commits[k - 1]["step"] if k else 0) for k, c in enumerate(commits))
    checks["lineage"] = (chain, f"{len(commits)} commits, steps {[c['step'] for c in commits][:6]}...")
    trained = [i for c in commits for i in c["pair_ids"]]
    checks["trained_once"] = (len(trained) == len(set(trained)), f"{len(trained)} trained, {len(set(trained))} distinct")
    # [stale-drop rule] fails on a queue that drops leased pairs: the ack of a trained, dropped pair is a no-op
    consumed = {i for i in set(trained) | skipped if state.get(i) == "acked"}
    checks["acked_is_trained"] = (stats["acked"] == len(consumed),
                                  f"queue acked {stats['acked']} vs trained {len(set(trained))} + skipped by the "
                                  f"trainer (acked, untrained) {len(consumed - set(trained))} = {len(consumed)}")
    bad = [i for i in set(trained) if state.get(i) != "acked"]
    # [stale-drop rule] idem, per id: a trained pair must be acked, never dropped, live or unknown
    checks["trained_not_pending"] = (not bad and not (pending_ids & set(trained)),
                                     f"{len(bad)} trained pairs not acked (e.g. {bad[:3]}; states "
                                     f"{sorted({state.get(i) for i in bad}, key=str)})")

    states = [json.loads(p.read_text()) for p in sorted(serve_dir.glob("worker-*/state.json"))]
    episodes, pairs = sum(s["episodes"] for s in states), sum(s["pairs"] for s in states)
    slack = workers_killed * CONCURRENCY  # episodes in flight in a worker when it died
    checks["serve_pairs"] = (stats["appended"] <= pairs + slack,
                             f"queue appended {stats['appended']} <= serve pairs {pairs} + lost in-flight "
                             f"<= {slack} ({episodes} episodes, {stats['duplicates']} duplicate appends)")
    if redis_restarts is not None:
        lost = [f"{k}: {r['before'][k]} -> {r['after'][k]}" for r in redis_restarts for k in r["before"]
                if r["after"][k] < r["before"][k]]
        first = redis_restarts[0] if redis_restarts else None
        checks["redis_durable"] = (bool(redis_restarts) and not lost,
                                   f"{len(redis_restarts)} redis-server SIGKILL + AOF restart(s); " + (
                                       f"counters went back: {lost}" if lost else
                                       f"no counter went back (appended {first['before']['appended']} -> "
                                       f"{first['after']['appended']}, acked {first['before']['acked']} -> "
                                       f"{first['after']['acked']})" if first else "none done"))
    return {"ok": all(ok for ok, _ in checks.values()),
            "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()},
            "queue": stats, "serve": {"episodes": episodes, "pairs": pairs,
                                      "restarts": sum(s["restarts"] for s in states)},
            "trainer": {"commits": len(commits), "last_step": commits[-1]["step"] if commits else 0,
                        "trained": len(trained), "versions": len(versions)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300, help="seconds of chaos (default 300)")
    p.add_argument("--kill-every", type=float, nargs=2, default=(4.0, 9.0), metavar=("MIN", "MAX"),
                   help="seconds between kills, uniform (default 4 9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-staleness", type=int, default=2,
                   help="the trainer's --max-staleness (default 2; a large value means no stale drops: a control run)")
    p.add_argument("--queue-backend", choices=("sqlite", "redis"), default="sqlite",
                   help="the queue: a SQLite file, or a redis-server started here (AOF, appendfsync always) "
                        "that is also SIGKILLed and restarted mid-soak, at least once (default sqlite)")
    p.add_argument("--failure-window", type=float, default=45.0,
                   help="failed episodes must fall within this many seconds after a model-server kill (default 45)")
    p.add_argument("--work", help="scratch directory (default: a new temporary one, kept)")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args()
    import tempfile

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="soak-"))
    s = soak(work, a.duration, a.seed, tuple(a.kill_every), a.max_staleness, a.queue_backend, a.failure_window)
    print(f"# soak ({s['backend']} queue) {s['duration_s']}s in {work}: kills {s['kills']}, worker kills {s['worker_kills']}, "
          f"kills during publish {s['publish_kills']}, chaos kills {s['chaos_kills']}")
    print(f"queue: {s['queue']}")
    print(f"serve: {s['serve']}  trainer: {s['trainer']}  stop codes: {s['stop_codes']}")
    for name, c in s["checks"].items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=2))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
