"""AmbigSQL's SQL sandbox and execution match, on real SQLite and the shared Spider databases."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time

import pytest

from environments.ambigsql import sqlexec
from environments.ambigsql.sqlexec import SQLRunner, execute, extract_sql, has_top_level_order_by, results_match


@pytest.fixture(scope="module")
def spider_db(data_dir):
    path = data_dir / "spider" / "database" / "concert_singer" / "concert_singer.sqlite"
    assert path.is_file(), path
    return path


@pytest.fixture()
def writable_db(spider_db, tmp_path):
    """A writable copy, so that only the sandbox stands between a hostile query and the file."""
    dst = tmp_path / "db" / "concert_singer.sqlite"
    dst.parent.mkdir()
    shutil.copyfile(spider_db, dst)
    os.chmod(dst, 0o644)
    return dst


def _fingerprint(path):
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------- exec match
def test_results_match_semantics():
    a = [(1, "x"), (2, "y"), (2, "y")]
    assert results_match(a, [(2, "y"), (1, "x"), (2, "y")], order_matters=False)  # rows as a multiset
    assert not results_match(a, [(2, "y"), (1, "x"), (2, "y")], order_matters=True)  # order counts with ORDER BY
    assert not results_match(a, [(1, "x"), (2, "y")], order_matters=False)  # duplicates count
    assert not results_match(a, [(1, "x"), (1, "x"), (2, "y")], order_matters=False)
    assert results_match(a, [("x", 1), ("y", 2), ("y", 2)], order_matters=True)  # columns up to permutation
    assert not results_match(a, [(1,), (2,), (2,)], order_matters=False)  # column count differs
    assert results_match([], [], order_matters=True)
    assert not results_match([(1,)], [], order_matters=False)
    assert results_match([(1,)], [(1.0,)], order_matters=False)  # 1 == 1.0, as in the test-suite
    # a permutation must hold for whole rows, not column by column
    assert not results_match([(1, 2), (2, 1)], [(1, 1), (2, 2)], order_matters=False)
    assert results_match([(1, 2, None), (3, 4, "a")], [(None, 2, 1), ("a", 4, 3)], order_matters=True)


def test_order_by_detection_is_top_level():
    assert has_top_level_order_by("SELECT a FROM t ORDER BY a DESC")
    assert not has_top_level_order_by("SELECT a FROM t WHERE b = (SELECT b FROM u ORDER BY c LIMIT 1)")
    assert not has_top_level_order_by("SELECT 'order by' FROM t")


def test_exec_match_on_real_database(spider_db):
    gold = "SELECT name FROM singer WHERE age > 30 ORDER BY age DESC"
    assert sqlexec.exec_match(spider_db, "select Name from singer where Age > 30 order by Age desc", gold)
    assert not sqlexec.exec_match(spider_db, "SELECT name FROM singer WHERE age > 30 ORDER BY age ASC", gold)
    unordered = "SELECT name, country FROM singer WHERE age > 30"
    assert sqlexec.exec_match(spider_db, "SELECT country, name FROM singer WHERE age > 30 ORDER BY name", unordered)
    assert not sqlexec.exec_match(spider_db, "SELECT name FROM singer", unordered)
    assert not sqlexec.exec_match(spider_db, "SELECT nosuchcolumn FROM singer", unordered)
    assert not sqlexec.exec_match(spider_db, None, unordered)


def test_extract_sql_from_responses():
    assert extract_sql("```sql\nSELECT name FROM singer;\n```\nThis lists names.") == "SELECT name FROM singer"
    assert extract_sql("Sure! Here it is: select count(*) from singer") == "select count(*) from singer"
    assert extract_sql("I will select the names.\nSELECT name FROM singer\n\nDone.") == "SELECT name FROM singer"
    assert extract_sql("SELECT count(*) FROM singer; it counts singers") == "SELECT count(*) FROM singer"
    assert extract_sql("WITH x AS (SELECT 1) SELECT * FROM x") == "WITH x AS (SELECT 1) SELECT * FROM x"
    # a second statement stays, so that the sandbox refuses the whole thing
    assert extract_sql("SELECT 1; DROP TABLE singer") == "SELECT 1; DROP TABLE singer"
    for question in ("Do you want the ones with the highest price?", "Which records do you mean: singers or stadiums?",
                     "Should I select them by country or by age?", ""):
        assert extract_sql(question) is None


# --------------------------------------------------------------------------- hostile SQL
HOSTILE = [
    "DROP TABLE singer",
    "DELETE FROM singer",
    "UPDATE singer SET Name = 'x'",
    "INSERT INTO singer (Name) VALUES ('x')",
    "REPLACE INTO singer (Singer_ID, Name) VALUES (1, 'x')",
    "CREATE TABLE evil (a)",
    "CREATE TEMP TABLE evil (a)",
    "CREATE VIEW evil AS SELECT 1",
    "CREATE TRIGGER evil AFTER INSERT ON singer BEGIN DELETE FROM singer; END",
    "ALTER TABLE singer RENAME TO evil",
    "ATTACH DATABASE '{tmp}/attached.db' AS evil",
    "PRAGMA journal_mode = WAL",
    "PRAGMA writable_schema = ON",
    "PRAGMA query_only = OFF",
    "PRAGMA user_version = 7",
    "SELECT * FROM pragma_table_info('singer')",
    "SELECT load_extension('{tmp}/evil.so')",
    "SELECT writefile('{tmp}/written.txt', 'x')",
    "VACUUM",
    "VACUUM INTO '{tmp}/copy.db'",
    "BEGIN IMMEDIATE",
    "SAVEPOINT s",
    "REINDEX",
    "ANALYZE",
    "SELECT 1; DROP TABLE singer",
    "SELECT 1; ATTACH DATABASE '{tmp}/attached2.db' AS evil",
    "SELECT sqlite_compileoption_get(0)",
    "SELECT zeroblob(2000000000)",
    "SELECT randomblob(1000000000)",
    "SELECT group_concat(a.Name) FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",  # row cap
    "",
]
RUNAWAY = [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "SELECT count(*) FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g, singer h, "
    "singer i, singer j, singer k",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c ORDER BY x DESC LIMIT 1",
]


def _check_untouched(db, before, tmp_path):
    assert _fingerprint(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]  # no -journal / -wal / -shm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # nothing attached / vacuumed / written


def test_hostile_queries_are_refused_and_leave_the_file_alone(writable_db, tmp_path):
    before = _fingerprint(writable_db)
    for q in HOSTILE:
        res = execute(writable_db, q.format(tmp=tmp_path), timeout_s=1.0)
        assert not res.ok, (q, res.rows)
    for q in RUNAWAY:
        t0 = time.monotonic()
        res = execute(writable_db, q, timeout_s=0.3)
        assert not res.ok and "timed out" in res.error, (q, res.error)
        assert time.monotonic() - t0 < 1.5, q
    # the database still answers normally, and nothing changed on disk
    assert execute(writable_db, "SELECT count(*) FROM singer").rows == [(6,)]
    _check_untouched(writable_db, before, tmp_path)


async def test_worker_pool_survives_hostile_and_runaway_sql(writable_db, tmp_path):
    before = _fingerprint(writable_db)
    runner = SQLRunner(workers=2, timeout_s=0.3)
    try:
        hostile = [q.format(tmp=tmp_path) for q in HOSTILE]
        # a C-level runaway that never yields to the progress handler: the worker is killed
        c_runaway = "SELECT printf('%.*c', 1000000000, 'x')"
        t0 = time.monotonic()
        results = await asyncio.gather(*(runner.execute(writable_db, q) for q in hostile + RUNAWAY + [c_runaway]))
        elapsed = time.monotonic() - t0
        assert all(not r.ok for r in results), [(q, r.rows) for q, r in zip(hostile + RUNAWAY, results) if r.ok]
        assert "timed out" in results[-1].error
        assert elapsed < 8, elapsed  # every runaway returned near its 0.3 s limit (+1 s grace when killed)
        # the pool still serves, and exec match through it works
        assert await runner.exec_match(writable_db, "SELECT name FROM singer", "SELECT Name FROM singer")
        assert not await runner.exec_match(writable_db, "SELECT 1; DROP TABLE singer", "SELECT 1")
    finally:
        runner.close()
    _check_untouched(writable_db, before, tmp_path)
