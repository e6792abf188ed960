"""The durable pair queue (simkit.queue): the contract runs over both backends — real SQLite files
in tmp_path and a real redis-server (AOF on) per test — with real separate processes where
crashes and concurrency matter."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from simkit.queue import AsyncPairQueue, Lease, PairQueue, SQLiteQueue, VersionInfo, open_queue
from simkit.types import Message, PreferencePair

REPO = Path(__file__).resolve().parent.parent


def _pair(i: int, version: int = 0, tag: str = "") -> PreferencePair:
    return PreferencePair(
        prompt=[Message(role="user", content=f"question {i} {tag}")],
        chosen=[Message(role="assistant", content=f"which {i} do you mean?"),
                Message(role="user", content="the first"), Message(role="assistant", content=f"answer {i}")],
        rejected=[Message(role="assistant", content=f"a guess {i}")],
        gold_action="CLARIFY", rejected_action="ANSWER", policy_version=version, task_id=f"t{i}{tag}",
        env="toy", phase=2, source="simulated", meta={"i": i})


def _run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run python code in a fresh interpreter (a real separate process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def url(backend, tmp_path, request) -> str:
    """Where the queue of this test lives: a SQLite path or a redis:// URL (a fresh server)."""
    if backend == "redis":
        return request.getfixturevalue("redis_server").url("act")
    return str(tmp_path / "q.db")


@pytest.fixture
def open_q(url):
    """Opens another handle on the test's queue (as another process would); all closed after."""
    opened: list[PairQueue] = []

    def make() -> PairQueue:
        opened.append(open_queue(url))
        return opened[-1]

    yield make
    for h in opened:
        h.close()


@pytest.fixture
def q(open_q):
    return open_q()


@pytest.fixture
def sq(tmp_path):
    """SQLite only: tests of its storage details."""
    queue = SQLiteQueue(tmp_path / "q.db")
    yield queue
    queue.close()


# --------------------------------------------------------------------------- basics
def test_append_dedups_by_id_and_counts(q):
    pairs = [_pair(i) for i in range(5)]
    assert q.append(pairs) == 5
    assert q.append(pairs[:3]) == 0  # the same content again: same ids, no-op
    assert q.append([_pair(5), _pair(5), _pair(1)]) == 1  # duplicate inside a batch and an old one
    assert q.append([]) == 0
    s = q.stats()
    assert (s["appended"], s["duplicates"], s["depth"], s["available"], s["in_flight"]) == (6, 5, 6, 6, 0)
    assert q.depth() == 6 and s["version"] is None
    assert isinstance(q, PairQueue)


def test_lease_is_oldest_first_exclusive_and_round_trips(q):
    pairs = [_pair(i) for i in range(10)]
    q.append(pairs[:4])
    q.append(pairs[4:])
    a = q.lease(3, consumer="a")
    assert isinstance(a, Lease) and a.consumer == "a" and len(a) == 3 and a
    assert a.pairs == pairs[:3]  # decoded back to equal models, oldest first
    assert a.pairs[0].to_trl() == pairs[0].to_trl()
    assert a.expires_at == pytest.approx(time.time() + 600, abs=5)
    b = q.lease(100, consumer="b")  # leased pairs are invisible to every other lease
    assert b.ids == [p.id for p in pairs[3:]]
    c = q.lease(5, consumer="a")  # even to the same consumer
    assert not c and c.pairs == [] and q.lease(0).pairs == []
    assert q.depth() == 10 and q.stats()["in_flight"] == 10 and q.stats()["available"] == 0


def test_acked_pairs_never_come_back_nor_reappend(q):
    pairs = [_pair(i) for i in range(6)]
    q.append(pairs)
    lease = q.lease(4, consumer="t")
    assert q.ack(lease) == 4
    assert q.ack(lease) == 0  # idempotent
    assert q.depth() == 2
    assert q.append(pairs) == 0  # acked ids are remembered forever
    assert q.release("t") == 0  # nothing unacked left in that lease
    rest = q.lease(100, consumer="t")
    assert rest.ids == [p.id for p in pairs[4:]]
    assert q.ack([p.id for p in rest.pairs[:1]]) == 1  # ids work too
    assert q.ack(rest) == 1  # only the one still unacked counts
    assert q.lease(100).pairs == [] and q.depth() == 0
    s = q.stats()
    assert (s["appended"], s["acked"], s["duplicates"], s["depth"]) == (6, 6, 6, 0)


def test_lease_expiry_redelivers_unacked(q):
    q.append([_pair(i) for i in range(4)])
    first = q.lease(4, consumer="dead", lease_s=0.2)
    q.ack(first.ids[:1])
    assert q.lease(4, consumer="other").pairs == []  # still under lease
    time.sleep(0.3)
    again = q.lease(4, consumer="other")
    assert again.ids == first.ids[1:]
    s = q.stats()
    assert s["expired"] == 3 and s["leased"] == 7 and s["acked"] == 1


def test_release_nack_and_renew(q):
    pairs = [_pair(i) for i in range(6)]
    q.append(pairs)
    a = q.lease(2, consumer="trainer")
    b = q.lease(2, consumer="trainer")
    other = q.lease(2, consumer="other")
    assert q.release("trainer") == 4  # restart: every lease of that consumer back at once
    assert q.release("trainer") == 0
    again = q.lease(10, consumer="trainer2")
    assert again.ids == a.ids + b.ids  # back in arrival order, ahead of anything newer
    assert q.nack(again.ids[:1]) == 1 and q.nack(again.ids[:1]) == 0
    assert q.lease(10).ids == again.ids[:1]
    # renew pushes expiry out for what the lease still holds
    old = other.expires_at
    assert q.renew(other, lease_s=1200) == 2 and other.expires_at > old + 500
    q.ack(other.ids[:1])
    assert q.renew(other, lease_s=1200) == 1  # only what the lease still holds
    assert q.stats()["released"] == 5


def test_state_survives_reopen(tmp_path, backend, url):
    path = tmp_path / "sub" / "q.db"  # parent dirs are created
    spec = str(path) if backend == "sqlite" else url
    with open_queue(spec) as q1:
        q1.append([_pair(i) for i in range(3)])
        held = q1.lease(2, consumer="t")
        q1.ack(held.ids[:1])
        q1.publish_version(1, "policy-v1", "/adapters/v1", meta={"step": 10})
    assert backend == "redis" or (tmp_path / "sub" / "q.db").exists()
    with open_queue(spec) as q2:
        assert q2.depth() == 2 and q2.stats()["in_flight"] == 1
        assert q2.lease(10).ids == [_pair(2).id]  # the leased one stays hidden across reopen
        assert q2.release("t") == 1 and q2.lease(10).ids == [held.ids[1]]
        assert q2.current_version().meta == {"step": 10}
        assert q2.append([_pair(0)]) == 0
    with pytest.raises(RuntimeError, match="closed"):
        q2.depth()
    q2.close()  # idempotent


# --------------------------------------------------------------------------- crash recovery
CONSUMER = """
import os, signal, sys
from simkit.queue import open_queue
q = open_queue(sys.argv[1])
lease = q.lease(10, consumer="trainer", lease_s=float(sys.argv[2]))
q.ack(lease.ids[:4])
print(",".join(lease.ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # die before acknowledging the rest: no cleanup, no close
"""


@pytest.mark.parametrize("recovery", ["release", "expiry"])
def test_consumer_dying_before_ack_gets_same_pairs_again(q, url, recovery):
    """A consumer which dies before acknowledging gets the same pairs again, and acknowledged
    pairs never come back."""
    path = url
    pairs = [_pair(i) for i in range(15)]
    q.append(pairs)
    lease_s = 600.0 if recovery == "release" else 1.0
    res = _run_py(CONSUMER, str(path), str(lease_s))
    assert res.returncode == -signal.SIGKILL, res.stderr
    leased = res.stdout.strip().split(",")
    assert leased == [p.id for p in pairs[:10]]
    acked, unacked = leased[:4], leased[4:]

    # while the dead consumer's lease stands, others only see the never-leased pairs
    assert q.lease(100, consumer="other").ids == [p.id for p in pairs[10:]]
    if recovery == "release":
        assert q.release("trainer") == 6  # the restarted trainer gives back its old leases
    else:
        time.sleep(lease_s + 0.1)  # the lease runs out: the pairs are free again
    again = q.lease(100, consumer="trainer")
    assert again.ids == unacked  # exactly the unacked ones, in order
    assert not set(again.ids) & set(acked)
    assert q.ack(again) == 6
    q.release("other")
    rest = q.lease(100, consumer="trainer")
    assert not set(rest.ids) & set(leased)  # acked pairs never come back
    assert q.append(pairs) == 0
    s = q.stats()
    assert s["acked"] == 10 and s["depth"] == 5
    assert s["released" if recovery == "release" else "expired"] >= 6


# --------------------------------------------------------------------------- concurrency
APPENDER = """
import sys
from simkit.queue import open_queue
from simkit.types import Message, PreferencePair
import time
path, who, n, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def pair(i, tag):
    return PreferencePair(prompt=[Message(role="user", content=f"q{i}{tag}")],
                          chosen=[Message(role="assistant", content="c")],
                          rejected=[Message(role="assistant", content="r")],
                          gold_action="ANSWER", task_id=f"{tag}-{i}")
time.sleep(max(0.0, start_at - time.time()))  # all processes open the new file at once
q = open_queue(path)
new = 0
for start in range(0, n, 7):
    batch = [pair(i, who) for i in range(start, min(n, start + 7))]
    batch += [pair(i, "shared") for i in range(start, min(n, start + 7))]  # both processes send these
    new += q.append(batch)
print(new)
"""


def test_two_appenders_and_a_leaser_lose_and_duplicate_nothing(url):
    path = url  # SQLite: not created yet, three processes race to create it
    n = 120
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start_at = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), who, str(n), str(start_at)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    time.sleep(max(0.0, start_at - time.time()))
    q = open_queue(path)  # the consumer: this process, leasing while the others append
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lease = q.lease(16, consumer="trainer")
        if lease:
            seen.extend(lease.ids)
            q.ack(lease)
        elif all(p.poll() is not None for p in procs) and q.depth() == 0:
            break
        else:
            time.sleep(0.01)
    outs = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    new_per_proc = [int(o[0]) for o in outs]
    assert sum(new_per_proc) == 3 * n  # a: n, b: n, shared: n (whoever came first)
    assert len(seen) == len(set(seen)) == 3 * n  # nothing lost, nothing twice
    s = q.stats()
    assert (s["appended"], s["duplicates"], s["acked"], s["depth"], s["leased"]) == (3 * n, n, 3 * n, 0, 3 * n)
    q.close()


def test_fork_reopens_connection(tmp_path):
    q = SQLiteQueue(tmp_path / "q.db")
    q.append([_pair(0)])
    pid = os.fork()
    if pid == 0:  # child: the inherited object must open its own connection
        try:
            ok = q.append([_pair(1)]) == 1 and q.depth() == 2
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.depth() == 2 and q.lease(5).ids == [_pair(0).id, _pair(1).id]
    q.close()


# --------------------------------------------------------------------------- versions, staleness
def test_policy_version_channel(open_q, tmp_path):
    trainer, serve = open_q(), open_q()
    assert serve.current_version() is None
    trainer.publish_version(1, "policy-v1", tmp_path / "v1")
    trainer.publish_version(2, "policy-v2", None, meta={"servers": ["http://x"]})
    cur = serve.current_version()
    assert isinstance(cur, VersionInfo)
    assert (cur.version, cur.adapter, cur.path, cur.meta) == (2, "policy-v2", None, {"servers": ["http://x"]})
    assert cur.published_at == pytest.approx(time.time(), abs=5)
    with pytest.raises(ValueError, match="older"):
        trainer.publish_version(1, "policy-v1")
    trainer.publish_version(2, "policy-v2b", "/p")  # re-publishing the current one replaces it
    assert serve.current_version().adapter == "policy-v2b"
    assert serve.stats()["version"] == 2
    assert [v.version for v in serve.versions()] == [1, 2]


def test_staleness_is_enforced_at_lease_and_spares_leased_pairs(q):
    old = [_pair(i, version=0) for i in range(3)]
    mid = [_pair(i, version=1) for i in range(3)]
    new = [_pair(i, version=2) for i in range(3)]
    q.append(old + mid + new)
    q.ack([old[0].id])
    held = q.lease(1, consumer="t")  # old[1], leased when it goes stale
    assert q.drop_stale(1) == 1  # old[2] only: a leased pair is never dropped under its consumer
    assert q.ack(held) == 1  # ...so its ack counts
    assert q.depth() == 6
    got = q.lease(10, min_version=2)  # the stale ones are dropped, counted, never handed out
    assert got.ids == [p.id for p in new]
    s = q.stats()
    assert s["dropped_stale"] == 4 and s["depth"] == 3 and s["in_flight"] == 3 and s["acked"] == 2
    assert q.append(old + mid) == 0  # dropped ids stay known: a stale pair is not queued again
    assert q.drop_stale(0) == 0 and q.drop_stale(-5) == 0
    assert q.drop_stale(3) == 0  # all three new ones are leased: spared


def test_expired_or_released_pairs_are_stale_checked_again(q):
    q.append([_pair(i, version=1) for i in range(4)])
    a = q.lease(2, consumer="a", lease_s=0.2)
    b = q.lease(2, consumer="b")
    q.nack(b)
    time.sleep(0.3)  # a's lease expired: both batches are available again, and now stale
    assert q.lease(10, consumer="c", min_version=2).pairs == []
    assert q.stats()["dropped_stale"] == 4 and q.depth() == 0
    assert q.ack(a) == 0 and q.ack(b) == 0  # dropped while available: not theirs any more


def test_lease_never_hands_out_a_pair_older_than_the_floor(q):
    import random

    rng = random.Random(0)
    q.append([_pair(i, version=rng.randint(0, 9)) for i in range(200)])
    floor, seen = 0, 0
    while True:
        lease = q.lease(7, consumer="t", min_version=floor)
        if not lease:
            break
        assert all(p.policy_version >= floor for p in lease)
        seen += len(lease)
        q.ack(lease)
        floor += 1
    s = q.stats()
    assert seen + s["dropped_stale"] == 200 and s["depth"] == 0


def test_missing_lists_ids_never_seen(q):
    pairs = [_pair(i) for i in range(5)]
    q.append(pairs[:3])
    q.ack(q.lease(1))
    q.drop_stale(1)  # acked and dropped ids still count as seen
    ids = [p.id for p in pairs]
    assert q.missing(ids) == ids[3:]
    assert q.missing([]) == []


def test_states_per_id(q):
    pairs = [_pair(i) for i in range(5)]
    q.append(pairs[:4])
    q.ack(q.lease(1))  # pair 0
    q.lease(1)  # pair 1: leased, still live
    q.drop_stale(1)  # pairs 2 and 3 (available, version 0); the leased one stays
    ids = [p.id for p in pairs]
    assert q.states(ids) == {ids[0]: "acked", ids[1]: "live", ids[2]: "dropped", ids[3]: "dropped"}
    assert q.states([]) == {}


def test_stats_keys_are_the_same_for_every_backend(q):
    q.append([_pair(0)])
    assert set(q.stats()) == {"appended", "duplicates", "leased", "acked", "dropped_stale", "released",
                              "expired", "depth", "in_flight", "available", "version"}


def test_hot_calls_do_not_scan_the_queue(tmp_path):
    """depth() and current_version() are O(1); lease / ack / drop_stale cost the same on a small
    and a 50x bigger queue (index lookups, not scans): counted in SQLite VM steps."""

    def vm_steps(q: SQLiteQueue, fn) -> int:
        steps = [0]

        def tick() -> int:
            steps[0] += 1
            return 0

        q._conn.set_progress_handler(tick, 1)
        try:
            fn()
        finally:
            q._conn.set_progress_handler(None, 1)
        return steps[0]

    costs = []
    for size in (40, 2000):
        q = SQLiteQueue(tmp_path / f"q{size}.db")
        q.append([_pair(i, version=1) for i in range(size)])
        acked = q.lease(size // 2)
        q.ack(acked)  # half the rows are acked history
        q.lease(3, consumer="other")  # and a few in flight
        q.publish_version(1, "v1")
        lease = q.lease(5)
        costs.append({
            "depth": vm_steps(q, q.depth),
            "current_version": vm_steps(q, q.current_version),
            "lease": vm_steps(q, lambda: q.lease(5, min_version=1)),
            "ack": vm_steps(q, lambda: q.ack(lease)),
            "drop_stale": vm_steps(q, lambda: q.drop_stale(0)),
        })
        assert q.depth() == size - size // 2 - 5
        q.close()
    small, big = costs
    for k in small:
        assert big[k] <= small[k] * 1.5 + 20, (k, small[k], big[k])


# --------------------------------------------------------------------------- asyncio
async def test_async_wrapper_runs_on_one_worker_thread(tmp_path):
    threads: set[int] = set()

    class Spy(SQLiteQueue):
        def append(self, pairs):
            threads.add(threading.get_ident())
            return super().append(pairs)

        def depth(self):
            threads.add(threading.get_ident())
            return super().depth()

        def lease(self, *a, **kw):
            threads.add(threading.get_ident())
            time.sleep(0.2)  # a slow call must not stall the event loop
            return super().lease(*a, **kw)

    aq = AsyncPairQueue(Spy(tmp_path / "q.db"))
    assert await aq.append([_pair(i) for i in range(4)]) == 4
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    lease = await aq.lease(3, consumer="t")
    t.cancel()
    assert ticks >= 5  # the loop kept running while lease() slept in the worker
    assert len(lease) == 3 and await aq.ack(lease) == 3
    assert await aq.depth() == 1
    await aq.publish_version(3, "v3", meta={"a": 1})
    assert (await aq.current_version()).version == 3
    assert (await aq.stats())["acked"] == 3
    assert await aq.release("t") == 0
    assert len(threads) == 1 and threading.get_ident() not in threads
    await aq.close()


async def test_async_cancelled_lease_gives_pairs_back(tmp_path):
    class Slow(SQLiteQueue):
        def lease(self, *a, **kw):
            out = super().lease(*a, **kw)
            time.sleep(0.3)
            return out

    aq = AsyncPairQueue(Slow(tmp_path / "q.db"))
    await aq.append([_pair(i) for i in range(3)])
    task = asyncio.create_task(aq.lease(3, consumer="t"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)
    assert (await aq.stats())["in_flight"] == 0  # nacked, not stuck until expiry
    await aq.close()


async def test_async_queue_has_and_runs_every_pairqueue_call(url):
    """AsyncPairQueue is generated from PairQueue: every call is there, with its signature, as a
    coroutine on the worker thread (outage_stats: plain, no I/O), and each one runs. A call added
    to PairQueue fails this test until it is exercised here too."""
    import inspect

    calls = {n for n, f in vars(PairQueue).items() if callable(f) and not n.startswith("_")}
    for n in calls:
        assert inspect.signature(getattr(AsyncPairQueue, n)) == inspect.signature(getattr(PairQueue, n)), n
    aq, ran = AsyncPairQueue(url), []  # opened by path or URL

    async def call(name, *args, **kw):
        out = getattr(aq, name)(*args, **kw)
        if name != "outage_stats":
            assert inspect.iscoroutine(out), name
            out = await out
        ran.append(name)
        return out

    pairs = [_pair(i) for i in range(3)]
    assert await call("append", pairs) == 3
    lease = await call("lease", 2, consumer="t")
    assert len(lease) == 2 and await call("renew", lease, 60.0) == 2
    assert await call("nack", lease.ids[:1]) == 1 and await call("ack", lease.ids[1:]) == 1
    assert len(await aq.lease(1, consumer="t")) == 1 and await call("release", "t") == 1
    assert await call("depth") == 2
    assert await call("publish_version", 1, "v1") is None and (await call("current_version")).version == 1
    assert await call("missing", ["nope", pairs[0].id]) == ["nope"]
    assert (await call("stats"))["acked"] == 1
    assert (await call("outage_stats"))["queue_outages"] == 0
    await call("close")
    assert sorted(ran) == sorted(calls)


# --------------------------------------------------------------------------- factory
def test_open_queue_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec, where in [(f"sqlite:///{tmp_path}/a.db", tmp_path / "a.db"),  # sqlite:////abs/a.db
                        ("sqlite:///rel/b.db", tmp_path / "rel" / "b.db"),
                        (str(tmp_path / "c.db"), tmp_path / "c.db"),
                        (tmp_path / "d.db", tmp_path / "d.db")]:
        q = open_queue(spec)
        assert isinstance(q, SQLiteQueue)
        q.append([_pair(0)])
        q.close()
        assert where.exists(), spec
        assert _sqlite_journal_mode(where) == "wal"
    with pytest.raises(ValueError):
        open_queue("postgres://x/y")
    with pytest.raises(ValueError):
        open_queue("sqlite://relative.db")


def _sqlite_journal_mode(path: Path) -> str:
    import sqlite3

    c = sqlite3.connect(path)
    try:
        return c.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        c.close()


def test_undecodable_rows_are_given_back_not_stuck(sq):
    q = sq
    q.append([_pair(0), _pair(1)])
    q._conn.execute("UPDATE bodies SET body = '{\"id\": \"broken\"}' WHERE seq = 2")
    with pytest.raises(Exception):
        q.lease(5, consumer="t")
    s = q.stats()
    assert s["in_flight"] == 0 and s["available"] == 2 and s["released"] == 2


def test_pairs_are_stored_as_json(sq):
    q = sq
    p = _pair(7)
    q.append([p])
    body = q._conn.execute("SELECT body FROM bodies").fetchone()[0]
    assert json.loads(body)["id"] == p.id and PreferencePair.model_validate_json(body) == p
    q.ack(q.lease(1))
    assert q._conn.execute("SELECT count(*) FROM bodies").fetchone()[0] == 0  # acked: id kept, JSON gone
    assert q._conn.execute("SELECT count(*) FROM pairs").fetchone()[0] == 1


# --------------------------------------------------------------------------- Redis specifics
def test_open_queue_redis_url_and_streams_are_separate(redis_server):
    from simkit.queue.redis import RedisQueue

    with open_queue(redis_server.url("a")) as a, open_queue(redis_server.url("b")) as b:
        assert isinstance(a, RedisQueue) and (a.stream, b.stream) == ("a", "b")
        assert a.append([_pair(0)]) == 1 and b.append([_pair(0)]) == 1  # one dedup set per stream
        assert a.depth() == b.depth() == 1


def test_redis_kill_9_with_aof_loses_nothing_appended_or_acked(redis_server):
    """SIGKILL redis-server mid-run, restart it on the same dir and port: every appended pair is
    still there, acked pairs never come back, dedup and leases and versions survive."""
    url = redis_server.url("act")
    q = open_queue(url)
    pairs = [_pair(i, version=1) for i in range(300)]
    for i in range(0, 300, 50):
        q.append(pairs[i:i + 50])
    q.publish_version(3, "policy-v3", meta={"step": 7})
    acked = q.lease(100, consumer="t")
    assert q.ack(acked) == 100
    held = q.lease(50, consumer="t", lease_s=600)  # in flight when Redis dies
    redis_server.kill()
    redis_server.start()  # replays the AOF (appendfsync everysec: the writes were in it already)
    q2 = open_queue(url)
    s = q2.stats()
    assert (s["appended"], s["acked"], s["depth"], s["in_flight"], s["version"]) == (300, 100, 200, 50, 3)
    assert q2.append(pairs) == 0  # the dedup set survived
    assert q2.missing([p.id for p in pairs]) == []
    rest = q2.lease(1000, consumer="t")
    assert rest.ids == [p.id for p in pairs[150:]]  # the held lease is still hidden
    assert q2.release("t") == 200
    again = q2.lease(1000, consumer="t2")
    assert again.ids == held.ids + rest.ids and not set(again.ids) & set(acked.ids)
    assert q2.ack(again) == 200 and q2.depth() == 0
    assert q2.current_version().meta == {"step": 7}
    q.close(), q2.close()


def test_redis_server_helper_says_how_to_install(tmp_path):
    from simkit.loadtools.testing import RedisServer

    with pytest.raises(RuntimeError, match="apt-get install -y redis-server"):
        RedisServer(tmp_path / "r", exe="redis-server-not-installed")


def test_redis_without_aof_is_warned_about(tmp_path, caplog):
    from simkit.loadtools.testing import RedisServer

    with RedisServer(tmp_path / "r", appendonly=False) as srv, caplog.at_level("WARNING", logger="simkit.queue"):
        open_queue(srv.url()).close()
    assert "without AOF" in caplog.text


def test_redis_depth_is_one_hash_read(redis_server):
    """Back-pressure polls depth(): on Redis it is one HMGET of three counters at any queue size."""
    with open_queue(redis_server.url()) as q:
        q.append([_pair(i) for i in range(500)])
        q.ack(q.lease(100))
        q._r.config_resetstat()
        assert q.depth() == 400
        calls = {k: v["calls"] for k, v in q._r.info("commandstats").items() if "config" not in k}
        assert calls == {"cmdstat_hmget": 1}, calls
