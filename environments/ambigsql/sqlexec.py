"""Sandboxed SQLite execution and Spider-style execution match.

Policy SQL is untrusted. Every query runs on its own connection that is

* opened read-only at the OS level (`file:...?mode=ro&immutable=1`, URI form), so SQLite
  never takes a write lock, writes a journal, or creates a -wal/-shm file;
* set `PRAGMA query_only=ON` and then locked by an authorizer that allows only SELECT,
  reads, recursive CTEs and an allow-list of pure built-in functions: no INSERT/UPDATE/
  DELETE/DDL, no ATTACH/DETACH, no PRAGMA (also blocks `pragma_*` table-valued functions
  and turning query_only back off), no transactions, no VACUUM [INTO], no load_extension;
* limited (`sqlite3.setlimit`): no attached databases, 100 kB strings/blobs, 64 result
  columns, bounded SQL text and expression depth, no sorter helper threads;
* run against a deadline (progress handler every 1000 VM steps, plus a watchdog thread that
  calls `Connection.interrupt()` for anything the handler cannot reach), with a row cap and
  a result-size cap checked row by row while fetching;
* single statement only (checked on tokens; Python's sqlite3 refuses a second one too);
* for untrusted SQL (`SQLRunner`, what the env uses) in a separate stdlib-only worker process
  with a memory cap (RLIMIT_AS), no file growth (RLIMIT_FSIZE=0, in-memory temp store), which
  is killed and replaced when it overruns the time limit by a grace period: a C-level runaway
  (e.g. `printf('%.*c', 1e9, 'x')`, which never yields to the progress handler) cannot stall
  a worker. Pool threads wait on the worker pipe with `select`, never on SQLite.

A query that breaks any rule gets an `ExecResult` with `error` set: it scores zero.

Execution match has two modes. `official` (the default for reported numbers) is Spider's
test-suite evaluator exactly (`spider_eval`: DISTINCT removed, first statement only, `> =`
repairs, YEAR(CURDATE()) = 2020, substring "order by", lenient text decoding, every database
of the folder); the one deviation is this sandbox. `strict` is the older rule below.

Strict execution match follows Spider's test-suite evaluation (Zhong et al. 2020): the two results
are equal when both are empty, or when they have the same number of rows and columns and
some permutation of the predicted columns makes the row multisets equal (row lists equal,
in order, when the gold query has an ORDER BY). One deliberate difference: order matters
only for a *top-level* ORDER BY of the gold query (the test-suite looks for the substring
"order by" anywhere, including subqueries, whose order cannot reach the output).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

try:  # the package import; the sandbox worker runs this file as a script, without the package
    from . import spider_eval
except ImportError:  # pragma: no cover - worker process
    spider_eval = None  # type: ignore[assignment]

EXEC_MATCH_MODES = ("official", "strict")

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # approximate size of all fetched values
MAX_VALUE_BYTES = 100_000  # SQLITE_LIMIT_LENGTH: any one string/blob
MAX_COLUMNS = 64
MAX_SQL_CHARS = 20_000

# --------------------------------------------------------------------------- tokens
SQLITE_KEYWORDS = frozenset("""
ABORT ACTION ADD AFTER ALL ALTER ALWAYS ANALYZE AND AS ASC ATTACH AUTOINCREMENT BEFORE BEGIN
BETWEEN BY CASCADE CASE CAST CHECK COLLATE COLUMN COMMIT CONFLICT CONSTRAINT CREATE CROSS
CURRENT CURRENT_DATE CURRENT_TIME CURRENT_TIMESTAMP DATABASE DEFAULT DEFERRABLE DEFERRED
DELETE DESC DETACH DISTINCT DO DROP EACH ELSE END ESCAPE EXCEPT EXCLUDE EXCLUSIVE EXISTS
EXPLAIN FAIL FILTER FIRST FOLLOWING FOR FOREIGN FROM FULL GENERATED GLOB GROUP GROUPS HAVING
IF IGNORE IMMEDIATE IN INDEX INDEXED INITIALLY INNER INSERT INSTEAD INTERSECT INTO IS ISNULL
JOIN KEY LAST LEFT LIKE LIMIT MATCH MATERIALIZED NATURAL NO NOT NOTHING NOTNULL NULL NULLS OF
OFFSET ON OR ORDER OTHERS OUTER OVER PARTITION PLAN PRAGMA PRECEDING PRIMARY QUERY RAISE RANGE
RECURSIVE REFERENCES REGEXP REINDEX RELEASE RENAME REPLACE RESTRICT RETURNING RIGHT ROLLBACK
ROW ROWS SAVEPOINT SELECT SET TABLE TEMP TEMPORARY THEN TIES TO TRANSACTION TRIGGER UNBOUNDED
UNION UNIQUE UPDATE USING VACUUM VALUES VIEW VIRTUAL WHEN WHERE WINDOW WITH WITHOUT
""".split())

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
  | (?P<str>'(?:[^']|'')*'?)
  | (?P<qid>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+)
  | (?P<word>[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*)
  | (?P<op>\|\||<<|>>|<=|>=|==|!=|<>|->>|->|[-+*/%<>=~&|!])
  | (?P<punct>[(),;.])
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


@dataclass(frozen=True)
class Tok:
    kind: str  # ws comment str qid num word op punct other
    text: str

    @property
    def upper(self) -> str:
        return self.text.upper()

    def is_kw(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words


def tokenize(sql: str) -> list[Tok]:
    return [Tok(m.lastgroup or "other", m.group()) for m in _TOKEN_RE.finditer(sql)]


def untokenize(toks: Iterable[Tok]) -> str:
    return "".join(t.text for t in toks)


def ident_name(tok: Tok) -> str:
    """An identifier token's name without quotes ("x", `x`, [x], x)."""
    t = tok.text
    if tok.kind == "qid" and len(t) >= 2:
        return t[1:-1].replace(t[0] * 2, t[0]) if t[0] in "\"`" else t[1:-1]
    return t


def split_statements(sql: str) -> list[str]:
    """Statements of `sql` (comments and empty statements dropped)."""
    out, cur = [], []
    for t in tokenize(sql):
        if t.kind == "punct" and t.text == ";":
            out.append(cur)
            cur = []
        elif t.kind != "comment":
            cur.append(t)
    out.append(cur)
    return [untokenize(s).strip() for s in out if untokenize(s).strip()]


def has_top_level_order_by(sql: str) -> bool:
    depth = 0
    prev = None
    for t in tokenize(sql):
        if t.kind in ("ws", "comment"):
            continue
        if t.text == "(":
            depth += 1
        elif t.text == ")":
            depth -= 1
        elif depth == 0 and prev is not None and prev.is_kw("ORDER") and t.is_kw("BY"):
            return True
        prev = t
    return False


# --------------------------------------------------------------------------- extraction
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


def _sql_start(case_insensitive: bool) -> re.Pattern:
    sel, wi = ("(?i:select)", "(?i:with)") if case_insensitive else ("SELECT", "WITH")
    return re.compile(rf"\b(?:{sel}\b(?=(?s:.*?)\b(?i:from)\b)|{sel}\s+(?=[\d'\"(*-])"
                      rf"|{wi}(?:\s+(?i:recursive))?\s+\w+\s*(?:\([^)]*\))?\s+(?i:as)\s*\()")


_SQL_UPPER = _sql_start(False)
_SQL_ANY = _sql_start(True)
_LINE_START = re.compile(r"(?:^|\n|:)\s*$")
_STATEMENT_KW = re.compile(
    r"^\s*(SELECT|WITH|INSERT|UPDATE|DELETE|REPLACE|DROP|CREATE|ALTER|ATTACH|DETACH|PRAGMA|VACUUM|"
    r"BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|REINDEX|ANALYZE|EXPLAIN|VALUES)\b", re.IGNORECASE)


def extract_sql(text: str) -> str | None:
    """The SQL query in a policy response, or None when there is none.

    Looks for something shaped like a query (SELECT ... FROM, SELECT <literal>, WITH x AS (),
    so prose such as "the ones with the highest price" is not SQL): first inside ``` fences;
    else from an upper-case SELECT/WITH, then any case at a line start or after a colon, then
    anywhere — up to the first blank line. Prose after a `;` is cut; a further SQL statement
    after a `;` is kept, so the sandbox rejects the multi-statement query.
    """
    if not text:
        return None
    body = None
    for m in _FENCE_RE.finditer(text):
        found = _SQL_ANY.search(m.group(2))
        if found:
            body = m.group(2)[found.start():]
            break
    if body is None:
        start = None
        m = _SQL_UPPER.search(text)
        if m:
            start = m.start()
        else:
            for m in _SQL_ANY.finditer(text):
                if _LINE_START.search(text[:m.start()]):
                    start = m.start()
                    break
            else:
                m = _SQL_ANY.search(text)
                start = m.start() if m else None
        if start is None:
            return None
        body = re.split(r"\n\s*\n", text[start:], maxsplit=1)[0]
    body = body.strip().strip("`").strip()
    # cut prose after the first statement; keep a following statement so it is refused
    toks = tokenize(body)
    for i, t in enumerate(toks):
        if t.kind == "punct" and t.text == ";":
            rest = untokenize(toks[i + 1:])
            if _STATEMENT_KW.match(rest):
                break
            body = untokenize(toks[:i])
            break
    body = body.strip().rstrip(";").strip()
    return body or None


# --------------------------------------------------------------------------- sandbox
SAFE_FUNCTIONS = frozenset("""
abs char coalesce concat concat_ws format glob hex ifnull iif instr length like likelihood likely
lower ltrim max min nullif octet_length printf quote random randomblob replace round rtrim sign
soundex substr substring trim typeof unhex unicode unlikely upper zeroblob
avg count group_concat string_agg sum total
date time datetime julianday unixepoch strftime timediff
acos acosh asin asinh atan atan2 atanh ceil ceiling cos cosh degrees exp floor ln log log10 log2
mod pi pow power radians sin sinh sqrt tan tanh trunc
row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
json json_array json_array_length json_extract json_insert json_object json_patch json_remove
json_replace json_set json_type json_valid json_quote json_group_array json_group_object
""".split())

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}


def _authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and isinstance(arg2, str) and arg2.lower() in SAFE_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class SQLRejected(Exception):
    """The query was refused before it ran (empty, too long, several statements)."""


@dataclass
class ExecResult:
    rows: list[tuple] | None = None
    columns: int = 0
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class _Watchdog:
    """One daemon thread that interrupts connections whose deadline passed (a backstop for
    work the progress handler does not see)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, sqlite3.Connection]] = []
        self._live: set[int] = set()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, conn: sqlite3.Connection, deadline: float) -> int:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ambigsql-watchdog", daemon=True)
                self._thread.start()
            token = next(self._ids)
            heapq.heappush(self._heap, (deadline, token, conn))
            self._live.add(token)
            self._cv.notify()
            return token

    def done(self, token: int) -> None:
        with self._cv:
            self._live.discard(token)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, token, conn = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if token in self._live:  # still running: interrupt under the lock
                    try:
                        conn.interrupt()
                    except sqlite3.Error:
                        pass


_WATCHDOG = _Watchdog()


def _uri(path: str | os.PathLike) -> str:
    return "file:" + quote(str(Path(path).resolve())) + "?mode=ro&immutable=1"


def open_readonly(db_path: str | os.PathLike, temp_store_memory: bool = False,
                  lenient_text: bool = False) -> sqlite3.Connection:
    """A locked-down read-only connection (see the module docstring). `lenient_text`: decode text
    with errors="ignore", as Spider's evaluator does, instead of failing on invalid UTF-8."""
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"database not found: {db_path}")
    conn = sqlite3.connect(_uri(db_path), uri=True, isolation_level=None, check_same_thread=False)
    if lenient_text:
        conn.text_factory = lambda b: b.decode(errors="ignore")
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
        if temp_store_memory:
            conn.execute("PRAGMA temp_store = MEMORY")
        for limit, value in ((sqlite3.SQLITE_LIMIT_ATTACHED, 0), (sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES),
                             (sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS),
                             (sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000), (sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS),
                             (sqlite3.SQLITE_LIMIT_EXPR_DEPTH, 200), (sqlite3.SQLITE_LIMIT_COMPOUND_SELECT, 64),
                             (sqlite3.SQLITE_LIMIT_VDBE_OP, 250_000), (sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0),
                             (sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH, 0)):
            conn.setlimit(limit, value)
        if hasattr(conn, "enable_load_extension"):  # absent when built without extension support
            conn.enable_load_extension(False)
        conn.set_authorizer(_authorizer)
    except BaseException:
        conn.close()
        raise
    return conn


def _value_size(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes)) else 8


def run_query(conn: sqlite3.Connection, sql: str, timeout_s: float = DEFAULT_TIMEOUT_S,
              max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES) -> ExecResult:
    """Run one untrusted statement on a connection from `open_readonly` (blocking)."""
    t0 = time.monotonic()
    try:
        stmts = split_statements(sql or "")
        if not stmts:
            raise SQLRejected("empty query")
        if len(stmts) > 1:
            raise SQLRejected("only one statement is allowed")
        if len(stmts[0]) > MAX_SQL_CHARS:
            raise SQLRejected("query too long")
    except SQLRejected as e:
        return ExecResult(error=f"rejected: {e}", elapsed_s=time.monotonic() - t0)
    deadline = t0 + timeout_s
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    token = _WATCHDOG.add(conn, deadline + 0.05)
    rows: list[tuple] = []
    size = 0
    try:
        cur = conn.execute(stmts[0])
        ncols = len(cur.description or ())
        for row in cur:
            rows.append(row)
            if len(rows) > max_rows:
                return ExecResult(error=f"too many rows (> {max_rows})", elapsed_s=time.monotonic() - t0)
            size += sum(_value_size(v) for v in row)
            if size > max_bytes:
                return ExecResult(error=f"result too large (> {max_bytes} bytes)", elapsed_s=time.monotonic() - t0)
        cur.close()
        return ExecResult(rows=rows, columns=ncols, elapsed_s=time.monotonic() - t0)
    except sqlite3.OperationalError as e:
        msg = str(e)
        if "interrupt" in msg.lower():
            msg = f"timed out after {timeout_s:g} s"
        return ExecResult(error=msg, elapsed_s=time.monotonic() - t0)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError, RecursionError) as e:
        return ExecResult(error=f"{type(e).__name__}: {e}", elapsed_s=time.monotonic() - t0)
    finally:
        _WATCHDOG.done(token)
        conn.set_progress_handler(None, 0)


def execute(db_path: str | os.PathLike, sql: str, timeout_s: float = DEFAULT_TIMEOUT_S,
            max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
            temp_store_memory: bool = False, lenient_text: bool = False) -> ExecResult:
    """Open the database read-only, run one untrusted query, close (blocking, in-process;
    ~0.1 ms to open). For untrusted SQL off the event loop use `SQLRunner`."""
    try:
        conn = open_readonly(db_path, temp_store_memory, lenient_text)
    except (sqlite3.Error, OSError) as e:
        return ExecResult(error=f"cannot open database: {e}")
    try:
        return run_query(conn, sql, timeout_s, max_rows, max_bytes)
    finally:
        conn.close()


# --------------------------------------------------------------------------- exec match
def _sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0)
    if isinstance(v, (int, float)):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    return (3, bytes(v))


def _unorder(row: Sequence[Any]) -> tuple:
    return tuple(sorted(row, key=_sort_key))


def _permutations(cands: list[list[int]], limit: int = 20_000) -> Iterable[tuple[int, ...]]:
    """Injective choices perm[i] in cands[i] (backtracking, at most `limit` yielded)."""
    n, used, perm, count = len(cands), set(), [0] * len(cands), 0

    def rec(i: int):
        nonlocal count
        if count >= limit:
            return
        if i == n:
            count += 1
            yield tuple(perm)
            return
        for j in cands[i]:
            if j not in used:
                used.add(j)
                perm[i] = j
                yield from rec(i + 1)
                used.discard(j)

    yield from rec(0)


def results_match(gold: Sequence[Sequence[Any]], pred: Sequence[Sequence[Any]], order_matters: bool) -> bool:
    """Spider test-suite denotation equality (columns up to permutation, rows as multisets
    or, when `order_matters`, as lists)."""
    if len(gold) == 0 and len(pred) == 0:
        return True
    if len(gold) != len(pred):
        return False
    ncols = len(gold[0])
    if len(pred[0]) != ncols or any(len(r) != ncols for r in gold) or any(len(r) != ncols for r in pred):
        return False
    g_unordered = [_unorder(r) for r in gold]
    p_unordered = [_unorder(r) for r in pred]
    if order_matters:
        if g_unordered != p_unordered:
            return False
    elif Counter(g_unordered) != Counter(p_unordered):
        return False
    if ncols == 1:
        return True  # the quick check above already compared the rows themselves
    g_cols = [Counter(r[i] for r in gold) for i in range(ncols)]
    p_cols = [Counter(r[j] for r in pred) for j in range(ncols)]
    cands = [[j for j in range(ncols) if p_cols[j] == g_cols[i]] for i in range(ncols)]
    if any(not c for c in cands):
        return False
    gold_list = [tuple(r) for r in gold]
    gold_bag = None if order_matters else Counter(gold_list)
    for perm in _permutations(cands):
        permuted = [tuple(r[j] for j in perm) for r in pred]
        if order_matters:
            if permuted == gold_list:
                return True
        elif Counter(permuted) == gold_bag:
            return True
    return False


def exec_match(db_path: str | os.PathLike, pred_sql: str | None, gold_sql: str,
               timeout_s: float = DEFAULT_TIMEOUT_S, gold: ExecResult | None = None, mode: str = "strict") -> bool:
    """Blocking execution match of `pred_sql` against `gold_sql` (`mode`: official or strict)."""
    if not pred_sql:
        return False
    if mode == "official":
        pred_sql, gold_sql, order = spider_eval.prepare(pred_sql, gold_sql)
        if not pred_sql.strip():
            return False
        for db in spider_eval.sibling_databases(db_path):
            g = execute(db, gold_sql, timeout_s, lenient_text=True)
            p = execute(db, pred_sql, timeout_s, lenient_text=True)
            if not (g.ok and p.ok and spider_eval.result_eq(g.rows or [], p.rows or [], order)):
                return False
        return True
    _check_mode(mode)
    gold = gold or execute(db_path, gold_sql, timeout_s)
    if not gold.ok:
        return False
    pred = execute(db_path, pred_sql, timeout_s)
    return pred.ok and results_match(gold.rows or [], pred.rows or [], has_top_level_order_by(gold_sql))


def _check_mode(mode: str) -> None:
    if mode not in EXEC_MATCH_MODES:
        raise ValueError(f"exec match mode must be one of {EXEC_MATCH_MODES}, not {mode!r}")


# --------------------------------------------------------------------------- process isolation
WORKER_GRACE_S = 1.0  # a worker that overruns timeout + grace is killed (SIGKILL)
WORKER_MEMORY_BYTES = 1 << 30  # RLIMIT_AS of a worker process


def _encode_value(v: Any) -> Any:
    return {"b": bytes(v).hex()} if isinstance(v, (bytes, bytearray, memoryview)) else v


def _decode_value(v: Any) -> Any:
    return bytes.fromhex(v["b"]) if isinstance(v, dict) else v


class _Worker:
    """One sandbox worker process (stdlib only, `python -I -S sqlexec.py --worker`), spoken to
    with one JSON line per request. Killed and replaced when it overruns or dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _spawn(self) -> subprocess.Popen:
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0, close_fds=True, cwd="/")
        return self.proc

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.kill()
            except OSError:
                pass
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            proc.wait()

    def run(self, db_path: str, sql: str, timeout_s: float, max_rows: int, max_bytes: int,
            lenient_text: bool = False) -> ExecResult:
        t0 = time.monotonic()
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._spawn()
        req = json.dumps({"db": str(db_path), "sql": sql, "timeout_s": timeout_s, "max_rows": max_rows,
                          "max_bytes": max_bytes, "lenient_text": lenient_text}) + "\n"
        try:
            proc.stdin.write(req.encode())  # type: ignore[union-attr]
        except OSError:
            self.kill()
            return ExecResult(error="sandbox worker died", elapsed_s=time.monotonic() - t0)
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        hard = t0 + timeout_s + WORKER_GRACE_S
        buf = bytearray()
        while not buf.endswith(b"\n"):
            remaining = hard - time.monotonic()
            if remaining <= 0:
                self.kill()
                return ExecResult(error=f"timed out after {timeout_s:g} s (worker killed)",
                                  elapsed_s=time.monotonic() - t0)
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk or len(buf) + len(chunk) > 4 * max_bytes + (1 << 20):
                self.kill()  # died (e.g. memory limit) or talks too much
                return ExecResult(error="sandbox worker died", elapsed_s=time.monotonic() - t0)
            buf += chunk
        msg = json.loads(buf)
        rows = None if msg["rows"] is None else [tuple(_decode_value(v) for v in r) for r in msg["rows"]]
        return ExecResult(rows=rows, columns=msg["columns"], error=msg["error"], elapsed_s=time.monotonic() - t0)


def _worker_main() -> None:  # pragma: no cover - runs in the child process
    try:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file may grow: temp spills fail
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = WORKER_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(hard, WORKER_MEMORY_BYTES)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            res = execute(req["db"], req["sql"], req["timeout_s"], req["max_rows"], req["max_bytes"],
                          temp_store_memory=True, lenient_text=req.get("lenient_text", False))
        except MemoryError:
            res = ExecResult(error="out of memory")
        except Exception as e:  # a malformed request: answer, keep serving
            res = ExecResult(error=f"{type(e).__name__}: {e}")
        rows = None if res.rows is None else [[_encode_value(v) for v in r] for r in res.rows]
        out.write(json.dumps({"rows": rows, "columns": res.columns, "error": res.error}).encode() + b"\n")
        out.flush()


# --------------------------------------------------------------------------- async
class SQLRunner:
    """Runs sandboxed queries off the event loop. `isolation="process"` (default, for untrusted
    SQL): each pool thread drives its own worker process, killed and replaced when a query
    overruns its time limit by WORKER_GRACE_S (a runaway C-level function cannot stall a
    worker) or hits the worker's memory cap. `isolation="thread"`: in-process, cheaper, relies
    on the progress-handler deadline and the watchdog only. Gold results are cached."""

    def __init__(self, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
                 isolation: str = "process", gold_cache: int = 50_000):
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', not {isolation!r}")
        self.workers = workers or min(4, os.cpu_count() or 2)
        self.timeout_s, self.max_rows, self.max_bytes, self.isolation = timeout_s, max_rows, max_bytes, isolation
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._procs: list[_Worker] = []
        self._gold: dict[tuple[str, str, bool], ExecResult] = {}
        self._siblings: dict[str, list[str]] = {}
        self._gold_cap = gold_cache

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ambigsql-sql")
            return self._pool

    def execute_sync(self, db_path: str | os.PathLike, sql: str, lenient_text: bool = False) -> ExecResult:
        """Blocking; call from a worker thread (what `execute` does)."""
        if self.isolation == "thread":
            return execute(db_path, sql, self.timeout_s, self.max_rows, self.max_bytes, lenient_text=lenient_text)
        w = getattr(self._local, "worker", None)
        if w is None:
            w = self._local.worker = _Worker()
            with self._lock:
                self._procs.append(w)
        return w.run(str(db_path), sql, self.timeout_s, self.max_rows, self.max_bytes, lenient_text)

    async def execute(self, db_path: str | os.PathLike, sql: str, lenient_text: bool = False) -> ExecResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), self.execute_sync, db_path, sql, lenient_text)

    async def gold(self, db_path: str | os.PathLike, sql: str, lenient_text: bool = False) -> ExecResult:
        key = (str(db_path), sql, lenient_text)
        hit = self._gold.get(key)
        if hit is None:
            hit = await self.execute(db_path, sql, lenient_text)
            if len(self._gold) >= self._gold_cap:
                self._gold.clear()
            self._gold[key] = hit
        return hit

    async def exec_match(self, db_path: str | os.PathLike, pred_sql: str | None, gold_sql: str,
                         mode: str = "strict") -> bool:
        """`official`: Spider's test-suite evaluator (`spider_eval`); `strict`: the rule in the docstring."""
        if not pred_sql:
            return False
        if mode == "official":
            return await self._official(db_path, pred_sql, gold_sql)
        _check_mode(mode)
        gold, pred = await asyncio.gather(self.gold(db_path, gold_sql), self.execute(db_path, pred_sql))
        return (gold.ok and pred.ok
                and results_match(gold.rows or [], pred.rows or [], has_top_level_order_by(gold_sql)))

    async def _official(self, db_path: str | os.PathLike, pred_sql: str, gold_sql: str) -> bool:
        pred_sql, gold_sql, order = spider_eval.prepare(pred_sql, gold_sql)
        if not pred_sql.strip():
            return False
        dbs = self._siblings.get(str(db_path))
        if dbs is None:
            dbs = self._siblings[str(db_path)] = spider_eval.sibling_databases(db_path)
        for db in dbs:
            gold, pred = await asyncio.gather(self.gold(db, gold_sql, True), self.execute(db, pred_sql, True))
            if not (gold.ok and pred.ok and spider_eval.result_eq(gold.rows or [], pred.rows or [], order)):
                return False
        return True

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            procs, self._procs = self._procs, []
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in procs:
            w.kill()

    def __del__(self) -> None:  # best effort: never leave worker processes behind
        for w in getattr(self, "_procs", []):
            try:
                w.kill()
            except Exception:
                pass


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
