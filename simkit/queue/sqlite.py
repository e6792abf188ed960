"""`SQLiteQueue`: the embedded default backend of the pair queue (one WAL-mode file, safe for
several processes at once)."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from simkit.queue.base import ACKED, DROPPED, Lease, PairQueue, VersionInfo, _ids_of, decode_pairs, riding
from simkit.queue.outage import Outage
from simkit.types import PreferencePair

log = logging.getLogger("simkit.queue")

# --------------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    seq            INTEGER PRIMARY KEY,         -- arrival order (rows are never deleted)
    id             TEXT NOT NULL UNIQUE,        -- PreferencePair.id: the dedup key, kept forever
    policy_version INTEGER NOT NULL,
    done           INTEGER,                     -- NULL while live, 2 acked, 3 dropped
    consumer       TEXT,
    lease_id       TEXT,
    lease_until    REAL,                        -- NULL: available, else leased until then
    attempts       INTEGER NOT NULL DEFAULT 0,  -- deliveries so far
    created_at     REAL NOT NULL
);
-- the pair as JSON, apart so that state updates never rewrite it; deleted once acked / dropped
CREATE TABLE IF NOT EXISTS bodies (
    seq  INTEGER PRIMARY KEY,                   -- = pairs.seq
    body TEXT NOT NULL
);
-- live rows only: available ones in arrival order (lease_until IS NULL), leased ones by expiry.
-- A lease changes no column of pairs_live_version, so only pairs_live is rewritten by it.
CREATE INDEX IF NOT EXISTS pairs_live ON pairs(lease_until) WHERE done IS NULL;
CREATE INDEX IF NOT EXISTS pairs_live_version ON pairs(policy_version) WHERE done IS NULL;
CREATE TABLE IF NOT EXISTS counters (
    k             INTEGER PRIMARY KEY CHECK (k = 0),
    appended      INTEGER NOT NULL DEFAULT 0,
    duplicates    INTEGER NOT NULL DEFAULT 0,
    leased        INTEGER NOT NULL DEFAULT 0,
    acked         INTEGER NOT NULL DEFAULT 0,
    dropped_stale INTEGER NOT NULL DEFAULT 0,
    released      INTEGER NOT NULL DEFAULT 0,
    expired       INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO counters(k) VALUES (0);
CREATE TABLE IF NOT EXISTS versions (
    version      INTEGER PRIMARY KEY,
    adapter      TEXT NOT NULL,
    path         TEXT,
    published_at REAL NOT NULL,
    meta         TEXT NOT NULL DEFAULT '{}'
);
"""
_SCHEMA_VERSION = 2
_COUNTERS = ("appended", "duplicates", "leased", "acked", "dropped_stale", "released", "expired")
_FREE = "consumer = NULL, lease_id = NULL, lease_until = NULL"
# partial indexes are only used when their WHERE term appears verbatim in the query
_LIVE = "done IS NULL"


def _sqlite_transient(e: BaseException) -> bool:
    """'database is locked' / busy past the busy timeout: another process holds the write lock."""
    return isinstance(e, sqlite3.OperationalError) and any(w in str(e).lower() for w in ("locked", "busy"))


class SQLiteQueue(PairQueue):
    """The embedded backend: one SQLite file in WAL mode shared by serve and trainer processes.

    One connection per object (re-opened after a fork), guarded by a lock so the object may be
    used from any thread (AsyncPairQueue uses one worker thread).
    `synchronous` NORMAL (default): in WAL mode a commit survives any process crash; a power
    loss or OS crash (or a lost -wal file) can roll back the last transactions. Every writer
    can redo those: serve re-appends the pairs its journal lists that `missing()` reports, the
    trainer re-acks its last commit marker on restart. FULL fsyncs the WAL on each commit
    instead (one fsync per append / lease / ack) for those who cannot redo.
    `page_size` applies when the file is created.
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 30.0,
                 synchronous: str = "NORMAL", cache_mb: int = 32, page_size: int = 16384,
                 outage_s: float | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._sync = synchronous.upper()
        if self._sync not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous must be OFF/NORMAL/FULL/EXTRA, not {synchronous!r}")
        self._cache_kib = cache_mb * 1024
        self._page_size = int(page_size)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._abandoned: list[sqlite3.Connection] = []  # inherited over fork: never touched again
        self._closed = False
        self._outage = Outage(self.path, _sqlite_transient, outage_s)
        self._outage.call("open", self._connect)

    # ---- connection handling
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        # a new file only (a no-op on an existing one): 16 KiB pages hold a few ~4 KB pair bodies
        # each instead of spilling every one onto an overflow page: ~1.5x the append throughput
        conn.execute(f"PRAGMA page_size = {self._page_size}")
        if self.path != ":memory:":
            mode = self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise RuntimeError(f"could not put {self.path} in WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self._sync}")
        conn.execute(f"PRAGMA cache_size = -{self._cache_kib}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # shrink the WAL after a huge append
        # Debian-style builds default to secure_delete=ON, which zero-fills every freed page: acking
        # a batch then writes ~5x more WAL. FAST still scrubs b-tree pages, not the freelist.
        conn.execute("PRAGMA secure_delete = FAST")
        if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
            self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                have = conn.execute("PRAGMA user_version").fetchone()[0]
                if have not in (0, _SCHEMA_VERSION):
                    raise RuntimeError(f"{self.path}: queue schema v{have}, this simkit knows "
                                       f"v{_SCHEMA_VERSION}")
                for stmt in _SCHEMA.split(";\n"):  # statements end a line, comments never do
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _retry_locked(self, fn: Any) -> Any:
        """Run `fn`, retrying 'database is locked' for up to the busy timeout.

        Switching a brand-new file to WAL takes an exclusive lock, and SQLite does not call the
        busy handler for it: processes that open the same new file at once must retry by hand.
        """
        deadline = time.monotonic() + self._busy_ms / 1000
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"queue {self.path} is closed")
        if self._pid != os.getpid():  # forked: never use the parent's handle in the child
            if self._conn is not None:
                self._abandoned.append(self._conn)
            self._connect()
        assert self._conn is not None
        return self._conn

    def _write(self) -> "_Txn":
        return _Txn(self, "BEGIN IMMEDIATE")

    def _read(self) -> "_Txn":
        return _Txn(self, "BEGIN")

    # ---- pairs
    def append(self, pairs: Sequence[PreferencePair]) -> int:
        if not pairs:
            return 0
        rows = [(p.id, p.policy_version, p.created_at, p.model_dump_json()) for p in pairs]
        return self.append_json(rows)

    @riding('append_json')
    def append_json(self, rows: Sequence[tuple[str, int, float, str]]) -> int:
        """Append pre-serialised pairs: (id, policy_version, created_at, pair JSON) tuples.
        The JSON must be `PreferencePair.model_dump_json()` output with the same id."""
        if not rows:
            return 0
        with self._write() as db:
            seen = {r[0] for r in db.execute("SELECT id FROM pairs WHERE id IN "
                                             "(SELECT value FROM json_each(?))",
                                             (json.dumps([r[0] for r in rows]),))}
            fresh = []
            for r in rows:
                if r[0] not in seen:
                    seen.add(r[0])
                    fresh.append(r)
            if fresh:  # we hold the write lock: nobody else can take these seq numbers
                top = db.execute("SELECT coalesce(max(seq), 0) FROM pairs").fetchone()[0]
                db.executemany("INSERT INTO pairs(seq, id, policy_version, created_at) "
                               "VALUES (?, ?, ?, ?)",
                               [(top + i, r[0], r[1], r[2]) for i, r in enumerate(fresh, 1)])
                db.executemany("INSERT INTO bodies(seq, body) VALUES (?, ?)",
                               [(top + i, r[3]) for i, r in enumerate(fresh, 1)])
            new = len(fresh)
            db.execute("UPDATE counters SET appended = appended + ?, duplicates = duplicates + ? "
                       "WHERE k = 0", (new, len(rows) - new))
        return new

    @riding('lease')
    def lease(self, n: int, consumer: str = "trainer", lease_s: float = 600.0,
              min_version: int | None = None) -> Lease:
        lease_id = uuid.uuid4().hex
        now = time.time()
        expires_at = now + float(lease_s)
        if n <= 0:
            return Lease(lease_id, consumer, [], expires_at)
        with self._write() as db:
            expired = db.execute(f"UPDATE pairs SET {_FREE} WHERE {_LIVE} AND lease_until <= ?",
                                 (now,)).rowcount
            dropped = self._drop(db, min_version) if min_version is not None else 0
            rows = db.execute(
                f"UPDATE pairs SET consumer = ?, lease_id = ?, lease_until = ?, "
                f"attempts = attempts + 1 WHERE seq IN (SELECT seq FROM pairs "
                f"WHERE {_LIVE} AND lease_until IS NULL ORDER BY seq LIMIT ?) "
                f"RETURNING seq", (consumer, lease_id, expires_at, int(n))).fetchall()
            if rows:
                rows = db.execute("SELECT seq, body FROM bodies WHERE seq IN "
                                  "(SELECT value FROM json_each(?)) ORDER BY seq",
                                  (json.dumps([r[0] for r in rows]),)).fetchall()
            db.execute("UPDATE counters SET leased = leased + ?, expired = expired + ?, "
                       "dropped_stale = dropped_stale + ? WHERE k = 0", (len(rows), expired, dropped))
        try:
            pairs = decode_pairs([body for _, body in rows])  # outside the lock
        except Exception:  # e.g. rows written by an incompatible simkit: give them back, then fail
            self._nack_seqs([seq for seq, _ in rows], lease_id)
            raise
        return Lease(lease_id, consumer, pairs, expires_at)

    def _nack_seqs(self, seqs: list[int], lease_id: str) -> int:
        with self._write() as db:
            n = db.execute(f"UPDATE pairs SET {_FREE} WHERE seq IN (SELECT value FROM json_each(?)) "
                           f"AND {_LIVE} AND lease_id = ?",
                           (json.dumps(seqs), lease_id)).rowcount
            db.execute("UPDATE counters SET released = released + ? WHERE k = 0", (n,))
        return n

    @riding('ack')
    def ack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        ids = _ids_of(lease_or_ids)
        if not ids:
            return 0
        with self._write() as db:
            n = self._settle(db, db.execute(
                f"UPDATE pairs SET done = {ACKED}, {_FREE} WHERE id IN "
                f"(SELECT value FROM json_each(?)) AND {_LIVE} RETURNING seq",
                (json.dumps(ids),)))
            db.execute("UPDATE counters SET acked = acked + ? WHERE k = 0", (n,))
        return n

    @riding('nack')
    def nack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        """Give leased pairs back now, untrained (e.g. a failed step): they are next in line."""
        ids = _ids_of(lease_or_ids)
        if not ids:
            return 0
        with self._write() as db:
            n = db.execute(f"UPDATE pairs SET {_FREE} WHERE id IN (SELECT value FROM json_each(?)) "
                           f"AND {_LIVE} AND lease_until IS NOT NULL",
                           (json.dumps(ids),)).rowcount
            db.execute("UPDATE counters SET released = released + ? WHERE k = 0", (n,))
        return n

    @riding('renew')
    def renew(self, lease: Lease, lease_s: float = 600.0) -> int:
        """Push back the expiry of the pairs this lease still holds; returns how many."""
        expires_at = time.time() + float(lease_s)
        with self._write() as db:
            n = db.execute(f"UPDATE pairs SET lease_until = ? WHERE {_LIVE} AND lease_until IS NOT NULL AND "
                           f"lease_id = ? AND id IN (SELECT value FROM json_each(?))",
                           (expires_at, lease.id, json.dumps(lease.ids))).rowcount
        lease.expires_at = expires_at
        return n

    @riding('release', cleanup=True)
    def release(self, consumer: str) -> int:
        with self._write() as db:
            n = db.execute(f"UPDATE pairs SET {_FREE} WHERE {_LIVE} AND lease_until IS NOT NULL "
                           f"AND consumer = ?", (consumer,)).rowcount
            db.execute("UPDATE counters SET released = released + ? WHERE k = 0", (n,))
        return n

    @riding('depth')
    def depth(self) -> int:
        with self._lock:
            return self._db().execute(
                "SELECT appended - acked - dropped_stale FROM counters WHERE k = 0").fetchone()[0]

    @riding('drop_stale')
    def drop_stale(self, min_version: int) -> int:
        """Drop available (not leased) pairs older than `min_version`, as `lease(min_version=…)`
        does; returns how many. A backend extra for tests, not part of `PairQueue`."""
        with self._write() as db:
            n = self._drop(db, min_version)
            db.execute("UPDATE counters SET dropped_stale = dropped_stale + ? WHERE k = 0", (n,))
        return n

    @staticmethod
    def _drop(db: sqlite3.Connection, min_version: int) -> int:
        """Drop available pairs (never leased ones, or an expired lease's) older than min_version."""
        return SQLiteQueue._settle(db, db.execute(
            f"UPDATE pairs SET done = {DROPPED}, {_FREE} WHERE {_LIVE} AND policy_version < ? "
            f"AND (lease_until IS NULL OR lease_until <= ?) RETURNING seq",
            (int(min_version), time.time())))

    @riding('missing')
    def missing(self, ids: Sequence[str]) -> list[str]:
        ids = list(ids)
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(ids), 10_000):
                part = ids[i:i + 10_000]
                found.update(r[0] for r in self._db().execute(
                    "SELECT id FROM pairs WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(part),)))
        return [i for i in ids if i not in found]

    @riding('states')
    def states(self, ids: Sequence[str]) -> dict[str, str]:
        """Per id: "live" (available or leased), "acked" or "dropped"; ids never seen are left out.
        A backend extra for audits (the fault soak), not part of `PairQueue`: counters alone
        cannot tell a trained pair acked from one dropped stale whose ack was then a no-op."""
        ids, out = list(ids), {}
        names = {None: "live", ACKED: "acked", DROPPED: "dropped"}
        with self._lock:
            for i in range(0, len(ids), 10_000):
                out.update((r[0], names[r[1]]) for r in self._db().execute(
                    "SELECT id, done FROM pairs WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids[i:i + 10_000]),)))
        return out

    @staticmethod
    def _settle(db: sqlite3.Connection, returning: sqlite3.Cursor) -> int:
        """Delete the bodies of rows an `UPDATE … RETURNING seq` just acked or dropped."""
        seqs = [r[0] for r in returning.fetchall()]
        if seqs:
            db.execute("DELETE FROM bodies WHERE seq IN (SELECT value FROM json_each(?))",
                       (json.dumps(seqs),))
        return len(seqs)

    # ---- policy versions
    @riding('publish_version')
    def publish_version(self, version: int, adapter: str, path: str | None = None,
                        meta: dict | None = None) -> None:
        version = int(version)
        with self._write() as db:
            cur = db.execute("SELECT max(version) FROM versions").fetchone()[0]
            if cur is not None and version < cur:
                raise ValueError(f"policy version {version} is older than the published {cur}")
            db.execute("INSERT OR REPLACE INTO versions(version, adapter, path, published_at, meta) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (version, adapter, None if path is None else str(path), time.time(),
                        json.dumps(meta or {}, default=str)))

    @riding('current_version')
    def current_version(self) -> VersionInfo | None:
        with self._lock:
            row = self._db().execute("SELECT version, adapter, path, published_at, meta FROM versions "
                                     "ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else VersionInfo(row[0], row[1], row[2], row[3], json.loads(row[4]))

    @riding('versions')
    def versions(self) -> list[VersionInfo]:
        """Every published version, oldest first. A backend extra for audits and tests, not
        part of `PairQueue`."""
        with self._lock:
            rows = self._db().execute("SELECT version, adapter, path, published_at, meta FROM versions "
                                      "ORDER BY version").fetchall()
        return [VersionInfo(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    # ---- observability
    @riding('stats')
    def stats(self) -> dict:
        """Cumulative counters (appended, duplicates, leased — deliveries, re-deliveries included —,
        acked, dropped_stale, released, expired) plus the current depth, in_flight (pairs under
        an unexpired lease), available and the published version number (None before any)."""
        now = time.time()
        with self._read() as db:
            row = db.execute(f"SELECT {', '.join(_COUNTERS)} FROM counters WHERE k = 0").fetchone()
            in_flight = db.execute(f"SELECT count(*) FROM pairs WHERE {_LIVE} "
                                   f"AND lease_until > ?", (now,)).fetchone()[0]
            version = db.execute("SELECT max(version) FROM versions").fetchone()[0]
        out: dict[str, Any] = dict(zip(_COUNTERS, row))
        out["depth"] = out["appended"] - out["acked"] - out["dropped_stale"]
        out["in_flight"] = in_flight
        out["available"] = out["depth"] - in_flight
        out["version"] = version
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteQueue({self.path!r})"


class _Txn:
    """`with q._write() as db:` — lock, BEGIN IMMEDIATE (or BEGIN), COMMIT / ROLLBACK."""

    __slots__ = ("q", "begin", "db")

    def __init__(self, q: SQLiteQueue, begin: str) -> None:
        self.q, self.begin = q, begin

    def __enter__(self) -> sqlite3.Connection:
        self.q._lock.acquire()
        try:
            self.db = self.q._db()
            self.db.execute(self.begin)
        except BaseException:
            self.q._lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if self.db.in_transaction:
                if exc_type is None:
                    try:
                        self.db.execute("COMMIT")
                        return
                    except BaseException:
                        if self.db.in_transaction:
                            self.db.execute("ROLLBACK")
                        raise
                self.db.execute("ROLLBACK")
        finally:
            self.q._lock.release()


