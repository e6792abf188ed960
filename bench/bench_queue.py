"""Queue throughput: append and consume (lease + ack) pairs/s of the SQLite PairQueue, against a
plain SQLite baseline in the same run (same file system, WAL, synchronous=NORMAL):

* append  — queue.append(batch) (includes model_dump_json) vs. executemany of the same,
            already-serialised JSON into a bare (rowid, body) table, one transaction per batch;
* consume — queue.lease(batch) + queue.ack(lease) (includes model_validate_json) vs. a bare
            SELECT … ORDER BY rowid LIMIT batch + DELETE of those rows, one transaction per batch.

The Redis backend (RedisQueue over a real redis-server with AOF on, appendfsync everysec,
started in a temp dir unless --redis-url names one) runs the same append and consume loops in
the same run; its rates and the Redis / SQLite-queue ratios get a table of their own
(--no-redis skips it).

Extra columns show where the time goes: pre-serialised (the queue's append_json, no
model_dump_json) and plain+decode (the bare consume loop plus the queue's decode_pairs).
Both sides use the same SQLite settings (WAL, synchronous=NORMAL, secure_delete=FAST, 16 KiB
pages); runs are interleaved and the median is shown, with a CPU-time rate beside each.

    .venv/bin/python bench/bench_queue.py                    # table
    .venv/bin/python bench/bench_queue.py --json             # one JSON object
    .venv/bin/python bench/bench_queue.py -n 20000 --batch 64 256 512 --repeat 3
    .venv/bin/python bench/bench_queue.py --redis-url redis://127.0.0.1:6379/0   # an existing Redis
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simkit.queue import PairQueue, SQLiteQueue, decode_pairs  # noqa: E402
from simkit.types import Message, PreferencePair  # noqa: E402

TARGET = 20_000  # pairs/s, each way

_WORDS = ("the a of to and in is for that with on as table column query user order customer "
          "date total amount product region value report month year price account status "
          "which do you mean could clarify please answer result rows filter group by count "
          "average list show find between recent last first top name id number").split()


def _text(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(_WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def make_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """Multi-turn pairs: a ~0.8 KB prompt; chosen = clarify / user reply / answer (~1.5 KB);
    rejected = a direct answer, sometimes two turns (~1–1.5 KB). ~3.5–4 KB of JSON each."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [Message(role="user", content=_text(rng, rng.randint(600, 1000)))]
        chosen = [Message(role="assistant", content=_text(rng, rng.randint(150, 300))),
                  Message(role="user", content=_text(rng, rng.randint(100, 250))),
                  Message(role="assistant", content=_text(rng, rng.randint(800, 1400)))]
        rejected = [Message(role="assistant", content=_text(rng, rng.randint(800, 1400)))]
        if rng.random() < 0.5:
            rejected += [Message(role="user", content=_text(rng, rng.randint(50, 150))),
                         Message(role="assistant", content=_text(rng, rng.randint(100, 300)))]
        pairs.append(PreferencePair(
            prompt=prompt, chosen=chosen, rejected=rejected, gold_action="CLARIFY",
            rejected_action="ANSWER", policy_version=i // 5000, adapter=f"policy-v{i // 5000}",
            env="bench", task_id=f"task-{i}", phase=1 + (i % 2), source="simulated",
            score=rng.random(), meta={"turns": 3, "seed": seed}))
    return pairs


def _plain_db(path: str, page_size: int) -> sqlite3.Connection:
    """The baseline gets the same settings as SQLiteQueue: WAL, synchronous=NORMAL,
    secure_delete=FAST, the same page size."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size = {page_size}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 30000")
    db.execute("PRAGMA secure_delete = FAST")
    db.execute("CREATE TABLE IF NOT EXISTS bare (rowid_ INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    return db


def _batches(seq: list, b: int) -> list[list]:
    return [seq[i:i + b] for i in range(0, len(seq), b)]


class _Clock:
    """Wall and process-CPU time of a block: on a shared machine the CPU rate shows what the code
    costs, the wall rate what it got."""

    def __enter__(self) -> "_Clock":
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _plain_consume(db: sqlite3.Connection, batch: int, decode: bool) -> int:
    got = 0
    while True:
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute("SELECT rowid_, body FROM bare ORDER BY rowid_ LIMIT ?", (batch,)).fetchall()
        if rows:
            db.execute(f"DELETE FROM bare WHERE rowid_ IN ({','.join('?' * len(rows))})", [r[0] for r in rows])
        db.execute("COMMIT")
        if not rows:
            return got
        if decode:
            decode_pairs([r[1] for r in rows])
        got += len(rows)


def _plain_append(db: sqlite3.Connection, batches: list[list[str]]) -> None:
    for chunk in batches:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO bare(body) VALUES (?)", [(j,) for j in chunk])
        db.execute("COMMIT")


def _queue_loops(q: PairQueue, pb: list[list[PreferencePair]], batch: int, n: int) -> tuple["_Clock", "_Clock"]:
    """append every batch, then lease + ack until empty: the two clocks."""
    with _Clock() as ca:
        for chunk in pb:
            q.append(chunk)
    assert q.depth() == n
    got = 0
    with _Clock() as cc:
        while True:
            lease = q.lease(batch, consumer="bench")
            if not lease:
                break
            q.ack(lease)
            got += len(lease)
    assert got == n and q.depth() == 0, (got, q.depth())
    return ca, cc


def run_once(pairs: list[PreferencePair], bodies: list[str], batch: int, tmp: str, page_size: int,
             redis_url: str | None = None) -> dict:
    n = len(pairs)
    res: dict[str, float] = {}

    def rate(key: str, clock: _Clock, count: int = n) -> None:
        res[key] = count / clock.wall
        res[key + "_cpu"] = count / clock.cpu if clock.cpu > 0 else float("inf")

    pb, bb = _batches(pairs, batch), _batches(bodies, batch)
    rb = _batches([(p.id, p.policy_version, p.created_at, j) for p, j in zip(pairs, bodies)], batch)

    # ---- plain SQLite: insert loop, select+delete loop, and the same with decoding
    db = _plain_db(os.path.join(tmp, "plain.db"), page_size)
    with _Clock() as c:
        _plain_append(db, bb)
    rate("plain_append", c)
    with _Clock() as c:
        got = _plain_consume(db, batch, decode=False)
    assert got == n, (got, n)
    rate("plain_consume", c)
    _plain_append(db, bb)
    with _Clock() as c:
        got = _plain_consume(db, batch, decode=True)
    rate("plain_consume_decode", c)
    db.close()

    # ---- the queue: append (model_dump_json included), then lease + ack (decoding included)
    q = SQLiteQueue(os.path.join(tmp, "queue.db"), page_size=page_size)
    ca, cc = _queue_loops(q, pb, batch, n)
    rate("queue_append", ca)
    rate("queue_consume", cc)
    q.close()

    # ---- the Redis backend, same loops; a fresh stream per run
    if redis_url is not None:
        from simkit.queue.redis import RedisQueue

        stream = f"bench-{os.path.basename(tmp)}-{time.time_ns()}"
        rq = RedisQueue(redis_url, stream=stream)

        def server_cpu() -> float:
            info = rq._r.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

        s0 = server_cpu()
        with _Clock() as ca:
            for chunk in pb:
                rq.append(chunk)
        s1 = server_cpu()
        with _Clock() as cc:
            got = 0
            while lease := rq.lease(batch, consumer="bench"):
                rq.ack(lease)
                got += len(lease)
        s2 = server_cpu()
        assert got == n and rq.depth() == 0, (got, rq.depth())
        rate("redis_append", ca)
        rate("redis_consume", cc)
        # both processes' CPU: what the pair costs the machine (the server's from INFO cpu)
        res["redis_append_cpu_both"] = n / max(1e-9, ca.cpu + s1 - s0)
        res["redis_consume_cpu_both"] = n / max(1e-9, cc.cpu + s2 - s1)
        with _Clock() as c:
            for chunk in rb:
                rq.append_json([(r[0] + "-j", *r[1:]) for r in chunk])  # new ids: not duplicates
        rate("redis_append_json", c)
        rq._r.delete(stream, *(f"{stream}:{k}" for k in ("seen", "stats", "bodies", "versions", "vmax")))
        rq.close()

    # ---- the queue, JSON already serialised (what model_dump_json costs)
    q = SQLiteQueue(os.path.join(tmp, "queue-json.db"), page_size=page_size)
    with _Clock() as c:
        for chunk in rb:
            q.append_json(chunk)
    rate("queue_append_json", c)
    q.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="pairs per run (default 20000)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--repeat", type=int, default=3, help="runs per batch size; the median is shown")
    ap.add_argument("--page-size", type=int, default=16384, help="SQLite page size, both sides")
    ap.add_argument("--dir", default=None, help="where the SQLite files go (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--redis-url", default=None, help="use this Redis (default: start redis-server with AOF "
                                                      "everysec in a temp dir)")
    ap.add_argument("--no-redis", action="store_true", help="SQLite only")
    args = ap.parse_args(argv)

    pairs = make_pairs(args.n)
    bodies = [p.model_dump_json() for p in pairs]
    # The inputs (n pairs, ~30 GC-tracked objects each) would otherwise make every full GC pass,
    # set off by the objects the runs create, scan them: freeze them out, as a long-running
    # process does with what it loads at start-up. Both sides benefit alike.
    gc.collect()
    gc.freeze()
    avg_kb = sum(map(len, bodies)) / len(bodies) / 1024
    runs: dict[int, list[dict]] = {b: [] for b in args.batch}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-queue-") as tmp, \
            contextlib.ExitStack() as stack:
        redis_url = None if args.no_redis else args.redis_url
        if not args.no_redis and redis_url is None:
            from simkit.loadtools.testing import RedisServer

            redis_url = stack.enter_context(RedisServer(os.path.join(tmp, "redis"))).url()
        for r in range(args.repeat):  # interleaved, so a busy spell on a shared box hits every size
            for b in args.batch:
                sub = os.path.join(tmp, f"b{b}-r{r}")
                os.makedirs(sub)
                runs[b].append(run_once(pairs, bodies, b, sub, args.page_size, redis_url))
    results = []
    for b, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        med["batch"] = b
        med["append_ratio"] = med["queue_append"] / med["plain_append"]
        med["consume_ratio"] = med["queue_consume"] / med["plain_consume"]
        if "redis_append" in med:
            med["redis_append_ratio"] = med["redis_append"] / med["queue_append"]
            med["redis_consume_ratio"] = med["redis_consume"] / med["queue_consume"]
        results.append(med)

    ok = all(r["queue_append"] >= TARGET and r["queue_consume"] >= TARGET for r in results)
    redis_ok = all(r.get("redis_append", 0) >= TARGET and r.get("redis_consume", 0) >= TARGET for r in results)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"n": args.n, "repeat": args.repeat, "avg_pair_kb": round(avg_kb, 2),
                          "page_size": args.page_size, "target_pairs_per_s": TARGET, "meets_target": ok,
                          "redis_meets_target": None if args.no_redis else redis_ok,
                          "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(), "loadavg_1m": load,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                      for r in results]}, indent=2))
        return 0
    print(f"queue throughput: {args.n} pairs of {avg_kb:.1f} KB JSON, median of {args.repeat}, SQLite "
          f"{sqlite3.sqlite_version}, {args.page_size // 1024} KiB pages, {os.cpu_count()} CPUs, "
          f"load {load:.1f}; target {TARGET:,} pairs/s each way")
    print("pairs/s by wall clock; 'cpu' = pairs per CPU-second of this process (steadier on a busy box)")
    hdr = (f"{'op':<8} {'batch':>5} {'queue':>8} {'plain':>8} {'ratio':>5} {'queue cpu':>9} "
           f"{'plain cpu':>9}  {'extra (wall)':<24}")
    print(hdr)
    print("-" * len(hdr))
    for op, extra, label in (("append", "queue_append_json", "pre-serialised"),
                             ("consume", "plain_consume_decode", "plain+decode")):
        for r in results:
            print(f"{op:<8} {r['batch']:>5} {r['queue_' + op]:>8,.0f} {r['plain_' + op]:>8,.0f} "
                  f"{r[op + '_ratio']:>5.2f} {r['queue_' + op + '_cpu']:>9,.0f} {r['plain_' + op + '_cpu']:>9,.0f}  "
                  f"{label} {r[extra]:>8,.0f}")
    print(f"target {'met' if ok else 'NOT met'} (wall clock, every batch size, both ways)")
    if not args.no_redis:
        print()
        print("Redis Streams backend (RedisQueue, AOF everysec) vs the SQLite queue, same pairs, same run")
        print("'redis cpu' = pairs per CPU-second of this process; 'cpu+server' adds redis-server's CPU")
        hdr = (f"{'op':<8} {'batch':>5} {'redis':>8} {'sqlite':>8} {'ratio':>5} {'redis cpu':>9} "
               f"{'cpu+server':>10} {'sqlite cpu':>10}  {'extra (wall)':<24}")
        print(hdr)
        print("-" * len(hdr))
        for op in ("append", "consume"):
            for r in results:
                extra = f"pre-serialised {r['redis_append_json']:>8,.0f}" if op == "append" else ""
                print(f"{op:<8} {r['batch']:>5} {r['redis_' + op]:>8,.0f} {r['queue_' + op]:>8,.0f} "
                      f"{r['redis_' + op + '_ratio']:>5.2f} {r['redis_' + op + '_cpu']:>9,.0f} "
                      f"{r['redis_' + op + '_cpu_both']:>10,.0f} {r['queue_' + op + '_cpu']:>10,.0f}  {extra}")
        print(f"Redis target {'met' if redis_ok else 'NOT met'} (wall clock, every batch size, both ways)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
