"""Queue clients ride through an outage of their backend (issue 23): a redis-server SIGKILLed and
restarted on its AOF, a reply lost after a script ran, a SQLite file locked past its busy
timeout. Calls are retried, never half-applied, logged once, counted; past the window they stop
with what to do, and cleanup (release, close) never raises over the caller's error."""
import sqlite3
import threading
import time

import pytest
import redis

from simkit.queue import SQLiteQueue, open_queue
from simkit.queue.outage import Outage, QueueUnavailable
from simkit.loadtools.testing import free_port
from trainer.synthetic import toy_pairs


def _restart_later(srv, after_s: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(after_s), srv.start()), daemon=True)
    t.start()
    return t


def test_redis_restart_is_ridden_through_by_every_call(redis_server, monkeypatch, caplog):
    """The trainer's lease / ack / depth / release and serve's append / current_version all went
    through while redis-server was down for ~1 s (each one raised ConnectionError before)."""
    monkeypatch.setenv("SIMKIT_QUEUE_OUTAGE_S", "60")
    pairs = toy_pairs(20)
    q = open_queue(redis_server.url("ride"))
    q.append(pairs[:10])
    q.publish_version(1, "a-v1", "/adapters/v1")
    with caplog.at_level("WARNING", logger="simkit.queue"):
        for call in (lambda: q.lease(4, consumer="trainer"), lambda: q.depth(), lambda: q.append(pairs[10:]),
                     lambda: q.current_version(), lambda: q.release("trainer")):
            redis_server.kill()
            t = _restart_later(redis_server, 0.8)
            call()
            t.join()
        lease = q.lease(3, consumer="trainer")
        redis_server.kill()
        t = _restart_later(redis_server, 0.8)
        assert q.ack(lease) == 3
        t.join()
    s = q.stats()
    assert s["appended"] == 20 and s["acked"] == 3 and s["depth"] == 17 and s["version"] == 1
    o = q.outage_stats()
    assert o["queue_outages"] == 6 and o["queue_outage_s"] > 3 and not o["queue_down"]
    assert caplog.text.count("unreachable") == 6 and caplog.text.count("reachable again") == 6  # once each
    q.close()


def test_a_lease_whose_reply_was_lost_hands_out_the_same_pairs(redis_server, monkeypatch):
    """The lease script ran (pairs held by the consumer) but the reply never came: redone under the
    same lease id it returns those pairs, not new ones, and nothing stays hidden until expiry."""
    monkeypatch.setenv("SIMKIT_QUEUE_OUTAGE_S", "30")
    q = open_queue(redis_server.url("lost"))
    q.append(toy_pairs(10))
    real = q._s["lease"]
    calls = []

    def lose_first_reply(**kw):
        out = real(**kw)
        calls.append(out)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return out

    q._s["lease"] = lose_first_reply
    lease = q.lease(4, consumer="trainer")
    assert len(calls) == 2 and [p.decode() for p in calls[0]] == lease.ids and len(lease) == 4
    q._s["lease"] = real
    s = q.stats()
    assert s["leased"] == 4 and s["in_flight"] == 4 and s["available"] == 6
    assert len(q.lease(100, consumer="other")) == 6  # the rest, and only the rest
    assert q.ack(lease) == 4 and q.ack(lease) == 0  # a redone ack is a no-op
    q.close()


def test_an_append_whose_reply_was_lost_is_not_queued_twice(redis_server, monkeypatch):
    monkeypatch.setenv("SIMKIT_QUEUE_OUTAGE_S", "30")
    q = open_queue(redis_server.url("lost-append"))
    real, calls = redis.client.Pipeline.execute, []

    def lose_first_reply(pipe, *a, **kw):  # the MULTI ran, its reply never came
        out = real(pipe, *a, **kw)
        calls.append(out[-1])
        if len(calls) == 1:
            raise redis.TimeoutError("Timeout reading from socket")
        return out

    monkeypatch.setattr(redis.client.Pipeline, "execute", lose_first_reply)
    q.append(toy_pairs(5))
    monkeypatch.setattr(redis.client.Pipeline, "execute", real)
    s = q.stats()
    assert calls == [5, 0] and s["appended"] == 5 and s["depth"] == 5 and s["duplicates"] == 5
    q.close()


def test_busy_loading_is_waited_out_and_the_window_ends_with_what_to_do(caplog):
    """BusyLoadingError (Redis replaying its AOF) is transient; an outage longer than the window
    raises QueueUnavailable naming the fix."""
    fails = iter([redis.BusyLoadingError("Redis is loading the dataset in memory")] * 3)

    def flaky():
        e = next(fails, None)
        if e:
            raise e
        return "ok"

    o = Outage("redis://x", lambda e: isinstance(e, redis.ConnectionError), window_s=10, first_backoff_s=0.01)
    assert o.call("lease", flaky) == "ok" and o.stats()["queue_outages"] == 1
    with pytest.raises(ValueError):  # not transient: raised at once, no outage
        o.call("ack", lambda: (_ for _ in ()).throw(ValueError("bad")))
    down = Outage("redis://x", lambda e: True, window_s=0.2, first_backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(QueueUnavailable, match="run the same command again.*--queue-outage-s"):
        down.call("lease", lambda: (_ for _ in ()).throw(redis.ConnectionError("refused")))
    assert 0.2 <= time.monotonic() - t0 < 2 and down.stats()["queue_down"]


def test_past_the_window_cleanup_never_raises(tmp_path, monkeypatch):
    """A queue gone for good: calls stop with QueueUnavailable; release (the trainer's cleanup after
    that very error) logs and returns 0; close is quiet."""
    from simkit.loadtools.testing import RedisServer

    monkeypatch.setenv("SIMKIT_QUEUE_OUTAGE_S", "0.3")
    srv = RedisServer(tmp_path / "r").start()
    q = open_queue(srv.url("gone"))
    q.append(toy_pairs(2))
    srv.stop()
    with pytest.raises(QueueUnavailable):
        q.lease(2)
    t0 = time.monotonic()
    assert q.release("trainer") == 0 and time.monotonic() - t0 < 0.5  # the window is spent: at once
    q.close()
    with pytest.raises(QueueUnavailable, match="unreachable for 0s"):
        open_queue(f"redis://127.0.0.1:{free_port()}/0?stream=x", outage_s=0.2)  # the explicit window wins


def test_sqlite_locked_past_the_busy_timeout_is_retried(tmp_path, monkeypatch):
    """Another process holds the write lock longer than busy_timeout: the append waits it out
    (it raised 'database is locked' before)."""
    monkeypatch.setenv("SIMKIT_QUEUE_OUTAGE_S", "30")
    path = tmp_path / "q.db"
    q = SQLiteQueue(path, busy_timeout_s=0.1)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(1.0, lambda: holder.execute("COMMIT")).start()
    assert q.append(toy_pairs(3)) == 3
    assert q.outage_stats()["queue_outages"] == 1 and q.outage_stats()["queue_outage_s"] >= 0.5
    holder.close()
    q.close()
