"""Redis Streams backend of the PairQueue: for serve and trainer on different machines.

Open it with `open_queue("redis://host:6379/0?stream=act")`. Keys (one Redis, not Cluster):
`act` the stream (one entry per live pair: id, version), consumer group `simkit`;
`act:bodies` hash pair id → JSON (live pairs only); `act:seen` hash pair id → stream entry id
while live, "a" acked, "d" dropped (the dedup set, kept forever, ~100 B per pair); `act:stats`
counters; `act:versions` + `act:vmax` the versions. Every state change is one Lua script
(atomic); the JSON never passes through Lua (which costs ~8 µs per 4 KB pair): append sends it
with HSETNX in the same MULTI as its script, lease reads it with HMGET after its script.

Leases are the group's pending entries (XREADGROUP / XCLAIM / XACK). A lease's expiry is kept
in the entry's idle time: leasing sets it to `_H - lease_s`, so the entry is expired once its
idle time reaches `_H` whatever `lease_s` each consumer uses; `nack` / `release` set it to
`2 * _H` (given back). `lease` first reclaims expired and given-back entries (oldest first),
then reads new ones; stale pairs it meets (`min_version`) are dropped and counted, never
handed out. `drop_stale` scans the available entries (not on a hot path).

Persistence: run redis-server with `appendonly yes`. `appendfsync everysec` (Redis default)
loses nothing acknowledged when redis-server is killed, and up to ~1 s of writes on power loss
or an OS crash; `appendfsync always` loses nothing but fsyncs every write. Without AOF (RDB
snapshots only) a restart rolls back to the last snapshot: appended pairs vanish (serve
re-appends what its journal says is missing), acks vanish (committed pairs are trained again),
and the dedup set forgets ids. The data set is the live pairs plus the dedup hash: size
`maxmemory` accordingly, with `maxmemory-policy noeviction`. Opening a queue on a server
without AOF logs a warning.

Outages (a restart, AOF loading): every call is retried for `outage_s` (simkit/queue/outage.py).
Redoing a call is safe: scripts and MULTIs are atomic, settles and re-times idempotent, and a
lease records the ids it handed out under `act:lease:<lease id>` (for the lease's duration), so a
lease whose reply was lost hands out the same pairs when redone instead of hiding them until
they expire.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from simkit.queue.base import Lease, PairQueue, VersionInfo, _ids_of, decode_pairs, riding
from simkit.queue.outage import Outage
from simkit.types import PreferencePair

__all__ = ["RedisQueue"]
log = logging.getLogger("simkit.queue")

_H = 100_000_000_000  # ms (~3 years): an entry whose idle time reached this is expired
_GROUP = "simkit"
_COUNTERS = ("appended", "duplicates", "leased", "acked", "dropped_stale", "released", "expired")

# KEYS: stream, seen, stats, bodies. ARGV: (pair id, version) * n. Runs in the MULTI right after
# the bodies' HSETNX: a new id gets its stream entry, an acked / dropped one loses its body again.
_APPEND = """
local new = 0
for i = 1, #ARGV, 2 do
  local pid = ARGV[i]
  local st = redis.call('HGET', KEYS[2], pid)
  if not st then
    local eid = redis.call('XADD', KEYS[1], '*', 'i', pid, 'v', ARGV[i + 1])
    redis.call('HSET', KEYS[2], pid, eid)
    new = new + 1
  elseif st == 'a' or st == 'd' then
    redis.call('HDEL', KEYS[4], pid)
  end
end
local n = #ARGV / 2
redis.call('HINCRBY', KEYS[3], 'appended', new)
redis.call('HINCRBY', KEYS[3], 'duplicates', n - new)
return new
"""

# KEYS: stream, seen, stats, bodies, this lease's record. ARGV: group, consumer, n, H, lease idle,
# min_version ('' = none), record ttl ms. Returns the ids of the pairs handed out; a lease id seen
# before (the reply was lost, the call redone) returns its recorded ids and changes nothing.
_LEASE = """
if redis.call('EXISTS', KEYS[5]) == 1 then return redis.call('LRANGE', KEYS[5], 0, -1) end
local s, g, c, n, H = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local idle, minv = ARGV[5], tonumber(ARGV[6])
local out, got, expired, dropped, seen_count = {}, 0, 0, 0, 0
local function field(kv, name)  -- entries are written as i, v: try that order first
  local pos = name == 'i' and 1 or 3
  if kv[pos] == name then return kv[pos + 1] end
  for j = 1, #kv, 2 do if kv[j] == name then return kv[j + 1] end end
end
local function take(eid, kv)  -- a pending entry now held by c: hand out or drop
  local pid = field(kv, 'i')
  if minv and tonumber(field(kv, 'v')) < minv then
    redis.call('XACK', s, g, eid); redis.call('XDEL', s, eid)
    redis.call('HSET', KEYS[2], pid, 'd'); redis.call('HDEL', KEYS[4], pid); dropped = dropped + 1
  else
    out[#out + 1] = pid; got = got + 1
  end
end
-- 1. expired or given-back leases, oldest first
local start = '-'
while got < n do
  local pend = redis.call('XPENDING', s, g, 'IDLE', H, start, '+', math.min(n - got, 4000))
  if #pend == 0 then break end
  for _, p in ipairs(pend) do
    local eid = p[1]
    if tonumber(p[3]) < 2 * H then expired = expired + 1 end
    local claimed = redis.call('XCLAIM', s, g, c, 0, eid, 'IDLE', idle)
    for _, e in ipairs(claimed) do take(e[1], e[2]) end
    start = '(' .. eid
  end
end
-- 2. never delivered: read, set their lease time in one XCLAIM, hand out or drop
while got < n do
  local r = redis.call('XREADGROUP', 'GROUP', g, c, 'COUNT', math.min(n - got, 4000), 'STREAMS', s, '>')
  if not r or #r == 0 or #r[1][2] == 0 then break end
  local args = {'XCLAIM', s, g, c, 0}
  for _, e in ipairs(r[1][2]) do args[#args + 1] = e[1] end
  args[#args + 1] = 'IDLE'; args[#args + 1] = idle; args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
  for _, e in ipairs(r[1][2]) do take(e[1], e[2]) end
end
redis.call('HINCRBY', KEYS[3], 'leased', got)
redis.call('HINCRBY', KEYS[3], 'expired', expired)
redis.call('HINCRBY', KEYS[3], 'dropped_stale', dropped)
if got > 0 then
  for i = 1, got, 4000 do redis.call('RPUSH', KEYS[5], unpack(out, i, math.min(i + 3999, got))) end
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
end
return out
"""

# KEYS: stream, seen, stats, bodies. ARGV: group, mark ('a' acked / 'd' dropped), counter, pair ids...
_SETTLE = """
local eids, marks, pids = {}, {}, {}
for i = 4, #ARGV do
  local eid = redis.call('HGET', KEYS[2], ARGV[i])
  if eid and eid ~= 'a' and eid ~= 'd' then
    eids[#eids + 1] = eid; pids[#pids + 1] = ARGV[i]
    marks[#marks + 1] = ARGV[i]; marks[#marks + 1] = ARGV[2]
  end
end
if #eids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(eids))
  redis.call('XDEL', KEYS[1], unpack(eids))
  redis.call('HSET', KEYS[2], unpack(marks))
  redis.call('HDEL', KEYS[4], unpack(pids))
end
redis.call('HINCRBY', KEYS[3], ARGV[3], #eids)
return #eids
"""

# KEYS: stream, seen, stats. ARGV: group, H, new idle, consumer ('' = any), count as released (0/1),
# pair ids... Re-times the still-held leases among the ids (nack: idle 2H; renew: H - lease).
_RETIME = """
local s, g, H, idle, c = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n = 0
for i = 6, #ARGV do
  local eid = redis.call('HGET', KEYS[2], ARGV[i])
  if eid and eid ~= 'a' and eid ~= 'd' then
    local p = redis.call('XPENDING', s, g, eid, eid, 1)
    if #p == 1 and tonumber(p[1][3]) < 2 * H and (c == '' or p[1][2] == c) then
      redis.call('XCLAIM', s, g, p[1][2], 0, eid, 'IDLE', idle, 'JUSTID'); n = n + 1
    end
  end
end
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], 'released', n) end
return n
"""

# KEYS: stream, stats. ARGV: group, H, consumer. Gives back every held lease of the consumer.
_RELEASE = """
local s, g, H = KEYS[1], ARGV[1], tonumber(ARGV[2])
local n, start = 0, '-'
while true do
  local pend = redis.call('XPENDING', s, g, start, '+', 1000, ARGV[3])
  if #pend == 0 then break end
  for _, p in ipairs(pend) do
    if tonumber(p[3]) < 2 * H then
      redis.call('XCLAIM', s, g, ARGV[3], 0, p[1], 'IDLE', 2 * H, 'JUSTID'); n = n + 1
    end
    start = '(' .. p[1]
  end
end
redis.call('HINCRBY', KEYS[2], 'released', n)
return n
"""

# KEYS: stream, seen, stats, bodies. ARGV: group, H, min_version. Drops stale available pairs.
_DROP = """
local s, g, H, minv = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = 0
local function drop(eid, kv)
  local pid, v
  for j = 1, #kv, 2 do
    if kv[j] == 'i' then pid = kv[j + 1] elseif kv[j] == 'v' then v = tonumber(kv[j + 1]) end
  end
  if v < minv then
    redis.call('XACK', s, g, eid); redis.call('XDEL', s, eid)
    redis.call('HSET', KEYS[2], pid, 'd'); redis.call('HDEL', KEYS[4], pid); n = n + 1
  end
end
local start = '-'
while true do  -- given back or expired
  local pend = redis.call('XPENDING', s, g, 'IDLE', H, start, '+', 1000)
  if #pend == 0 then break end
  for _, p in ipairs(pend) do
    local e = redis.call('XRANGE', s, p[1], p[1])
    if #e == 1 then drop(e[1][1], e[1][2]) end
    start = '(' .. p[1]
  end
end
local info = redis.call('XINFO', 'GROUPS', s)
local last = '0-0'
for _, gi in ipairs(info) do
  for j = 1, #gi, 2 do if gi[j] == 'name' and gi[j + 1] == g then
    for k = 1, #gi, 2 do if gi[k] == 'last-delivered-id' then last = gi[k + 1] end end
  end end
end
start = '(' .. last
while true do  -- never delivered
  local r = redis.call('XRANGE', s, start, '+', 'COUNT', 1000)
  if #r == 0 then break end
  for _, e in ipairs(r) do drop(e[1], e[2]); start = '(' .. e[1] end
end
redis.call('HINCRBY', KEYS[3], 'dropped_stale', n)
return n
"""

# KEYS: versions, vmax. ARGV: version, record JSON
_PUBLISH = """
local cur = redis.call('GET', KEYS[2])
if cur and tonumber(ARGV[1]) < tonumber(cur) then
  return redis.error_reply('policy version ' .. ARGV[1] .. ' is older than the published ' .. cur)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS: versions, vmax
_CURRENT = """
local cur = redis.call('GET', KEYS[2])
if not cur then return false end
return redis.call('HGET', KEYS[1], cur)
"""


def parse_url(url: str) -> tuple[str, str]:
    """redis://host:port/db?stream=act → (the URL without our parameters, the stream key)."""
    parts = urlsplit(url)
    qs = parse_qs(parts.query, keep_blank_values=True)
    stream = qs.pop("stream", ["act"])[-1]
    if not stream:
        raise ValueError(f"empty stream name in {url!r}")
    rest = urlencode({k: v[-1] for k, v in qs.items()})
    return urlunsplit(parts._replace(query=rest)), stream


class RedisQueue(PairQueue):
    """The PairQueue over Redis Streams. Thread- and fork-safe (redis-py's pool)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, stream: str | None = None,
                 chunk: int = 512, outage_s: float | None = None) -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("the Redis queue needs redis-py: pip install -e '.[redis]'") from e
        base, from_url = parse_url(url)
        self.url, self.stream = url, stream or from_url
        self.chunk = chunk  # pairs per append script (one pipeline carries them all)
        self._r = redis.Redis.from_url(base)
        self._error, self._noscript = redis.ResponseError, redis.exceptions.NoScriptError
        self.k_seen, self.k_stats = f"{self.stream}:seen", f"{self.stream}:stats"
        self.k_bodies = f"{self.stream}:bodies"
        self.k_versions, self.k_vmax = f"{self.stream}:versions", f"{self.stream}:vmax"
        self._s = {name: self._r.register_script(src) for name, src in (
            ("append", _APPEND), ("lease", _LEASE), ("settle", _SETTLE), ("retime", _RETIME),
            ("release", _RELEASE), ("drop", _DROP), ("publish", _PUBLISH), ("current", _CURRENT))}
        self._closed = False
        transient = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
        parts = urlsplit(base)  # no credentials in logs
        self._outage = Outage(f"redis://{parts.hostname}:{parts.port or 6379}{parts.path}?stream={self.stream}",
                              lambda e: isinstance(e, transient), outage_s)
        self._outage.call("open", self._create_group)
        self._outage.call("open", self._warn_without_aof)

    def _create_group(self) -> None:
        try:
            self._r.xgroup_create(self.stream, _GROUP, id="0", mkstream=True)
        except self._error as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _warn_without_aof(self) -> None:
        try:
            aof = self._r.config_get("appendonly").get("appendonly")
        except self._error:  # CONFIG disabled (managed Redis): nothing to check
            return
        if aof == "no" or aof == b"no":
            log.warning("Redis at %s runs without AOF (appendonly no): a restart loses appended pairs, "
                        "acks and the dedup set since the last snapshot; see simkit/queue/redis.py", self.url)

    def _keys(self) -> list[str]:
        return [self.stream, self.k_seen, self.k_stats, self.k_bodies]

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"queue {self.url} is closed")

    # ---- pairs
    def append(self, pairs: Sequence[PreferencePair]) -> int:
        return self.append_json([(p.id, p.policy_version, p.created_at, p.model_dump_json()) for p in pairs])

    def append_json(self, rows: Sequence[tuple[str, int, float, str]]) -> int:
        """Append pre-serialised pairs: (id, policy_version, created_at, pair JSON) tuples."""
        self._check()
        if not rows:
            return 0
        new = 0
        for i in range(0, len(rows), self.chunk):  # one MULTI per chunk: bodies, then the script
            part = rows[i:i + self.chunk]
            # redone after an outage: the MULTI applied whole or not at all, known ids are no-ops
            new += self._outage.call("append", lambda: self._append_chunk(part))
        return new

    def _append_chunk(self, part: Sequence[tuple[str, int, float, str]]) -> int:
        for attempt in (0, 1):
            pipe = self._r.pipeline(transaction=True)
            for pid, _, _, body in part:
                pipe.hsetnx(self.k_bodies, pid, body)
            self._s["append"](keys=self._keys(), args=[x for pid, v, _, _ in part for x in (pid, int(v))],
                              client=pipe)
            try:
                return int(pipe.execute()[-1])
            except self._noscript:  # a restarted server lost the script: load it, run it again
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def lease(self, n: int, consumer: str = "trainer", lease_s: float = 600.0,
              min_version: int | None = None) -> Lease:
        self._check()
        expires_at = time.time() + float(lease_s)
        lease_id = uuid.uuid4().hex
        if n <= 0:
            return Lease(lease_id, consumer, [], expires_at)
        idle = max(0, _H - int(float(lease_s) * 1000))
        args = [_GROUP, consumer, int(n), _H, idle, "" if min_version is None else int(min_version),
                max(1000, int(float(lease_s) * 1000))]
        keys = [*self._keys(), f"{self.stream}:lease:{lease_id}"]
        pids = self._outage.call("lease", lambda: self._s["lease"](keys=keys, args=args))
        # a body gone already means another consumer acked the pair (our lease ran out meanwhile)
        raw = self._outage.call("lease", lambda: self._r.hmget(self.k_bodies, pids)) if pids else []
        bodies = [b for b in raw if b is not None]
        try:
            pairs = decode_pairs(bodies)
        except Exception:  # e.g. written by an incompatible simkit: give them back, then fail
            self.nack([pid.decode() for pid in pids])
            raise
        return Lease(lease_id, consumer, pairs, expires_at)

    def _settle(self, ids: list[str], mark: str, counter: str) -> int:
        self._check()
        n = 0
        for i in range(0, len(ids), 2000):  # Lua's unpack() takes ~8000 values at most
            args = [_GROUP, mark, counter, *ids[i:i + 2000]]
            # idempotent: redone after a lost reply, the chunk's ids are settled already (counted 0)
            n += int(self._outage.call(counter, lambda: self._s["settle"](keys=self._keys(), args=args)))
        return n

    def ack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        return self._settle(_ids_of(lease_or_ids), "a", "acked")

    @riding('retime')
    def _retime(self, ids: list[str], idle: int, consumer: str, released: bool) -> int:
        self._check()
        if not ids:
            return 0
        return int(self._s["retime"](keys=self._keys(),
                                     args=[_GROUP, _H, idle, consumer, int(released), *ids]))

    def nack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        """Give leased pairs back now, untrained: they are next in line."""
        return self._retime(_ids_of(lease_or_ids), 2 * _H, "", True)

    def renew(self, lease: Lease, lease_s: float = 600.0) -> int:
        """Push back the expiry of the pairs this lease's consumer still holds; returns how many."""
        n = self._retime(lease.ids, max(0, _H - int(float(lease_s) * 1000)), lease.consumer, False)
        lease.expires_at = time.time() + float(lease_s)
        return n

    @riding('release', cleanup=True)
    def release(self, consumer: str) -> int:
        self._check()
        return int(self._s["release"](keys=[self.stream, self.k_stats], args=[_GROUP, _H, consumer]))

    @riding('depth')
    def depth(self) -> int:
        self._check()
        a, k, d = self._r.hmget(self.k_stats, "appended", "acked", "dropped_stale")
        return int(a or 0) - int(k or 0) - int(d or 0)

    @riding('drop_stale')
    def drop_stale(self, min_version: int) -> int:
        """Drop available (not leased) pairs older than `min_version`. Scans them: O(available).
        A backend extra for tests, not part of `PairQueue`."""
        self._check()
        return int(self._s["drop"](keys=self._keys(), args=[_GROUP, _H, int(min_version)]))

    @riding('missing')
    def missing(self, ids: Sequence[str]) -> list[str]:
        self._check()
        ids = list(ids)
        out: list[str] = []
        for i in range(0, len(ids), 10_000):
            part = ids[i:i + 10_000]
            out += [pid for pid, v in zip(part, self._r.hmget(self.k_seen, part)) if v is None]
        return out

    @riding('states')
    def states(self, ids: Sequence[str]) -> dict[str, str]:
        """As `SQLiteQueue.states`: a backend extra for audits, not part of `PairQueue`."""
        self._check()
        ids, out = list(ids), {}
        names = {b"a": "acked", b"d": "dropped"}
        for i in range(0, len(ids), 10_000):
            part = ids[i:i + 10_000]
            out.update((pid, names.get(v, "live")) for pid, v in zip(part, self._r.hmget(self.k_seen, part))
                       if v is not None)
        return out

    # ---- policy versions
    @riding('publish_version')
    def publish_version(self, version: int, adapter: str, path: str | None = None,
                        meta: dict | None = None) -> None:
        self._check()
        rec = json.dumps({"version": int(version), "adapter": adapter, "path": None if path is None else str(path),
                          "published_at": time.time(), "meta": meta or {}}, default=str)
        try:
            self._s["publish"](keys=[self.k_versions, self.k_vmax], args=[int(version), rec])
        except self._error as e:
            if "older" in str(e):
                raise ValueError(str(e)) from None
            raise

    @staticmethod
    def _info(raw: bytes) -> VersionInfo:
        d = json.loads(raw)
        return VersionInfo(int(d["version"]), d["adapter"], d["path"], d["published_at"], d["meta"])

    @riding('current_version')
    def current_version(self) -> VersionInfo | None:
        self._check()
        raw = self._s["current"](keys=[self.k_versions, self.k_vmax])
        return None if raw is None else self._info(raw)

    @riding('versions')
    def versions(self) -> list[VersionInfo]:
        """Every published version, oldest first. A backend extra for audits and tests, not
        part of `PairQueue`."""
        self._check()
        items = self._r.hgetall(self.k_versions)
        return [self._info(v) for _, v in sorted(items.items(), key=lambda kv: int(kv[0]))]

    # ---- observability
    @riding('stats')
    def stats(self) -> dict:
        """The same keys as SQLiteQueue.stats()."""
        self._check()
        pipe = self._r.pipeline(transaction=True)
        pipe.hmget(self.k_stats, *_COUNTERS)
        pipe.xpending(self.stream, _GROUP)
        pipe.xpending_range(self.stream, _GROUP, "-", "+", 1_000_000, idle=_H)
        pipe.get(self.k_vmax)
        row, summary, expired, vmax = pipe.execute()
        out: dict[str, Any] = {k: int(v or 0) for k, v in zip(_COUNTERS, row)}
        out["depth"] = out["appended"] - out["acked"] - out["dropped_stale"]
        out["in_flight"] = int(summary["pending"]) - len(expired)
        out["available"] = out["depth"] - out["in_flight"]
        out["version"] = None if vmax is None else int(vmax)
        return out

    def close(self) -> None:
        """Idempotent; never raises (it runs in cleanup, often because the server is gone)."""
        if not self._closed:
            self._closed = True
            try:
                self._r.close()
            except Exception as e:  # pragma: no cover - redis-py closes sockets quietly today
                log.debug("closing %s: %s", self.url, e)

    def __repr__(self) -> str:
        return f"RedisQueue({self.url!r})"
