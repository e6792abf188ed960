"""AmbigSQL's `official` execution match: Spider's test-suite evaluator (taoyds/test-suite-sql-eval
exec_eval.py, parse.py) rule by rule, with cases taken from what that code does."""
from __future__ import annotations

import shutil
import sqlite3

import pytest

from environments.ambigsql import sqlexec
from environments.ambigsql.env import AmbigSQLConfig
from environments.ambigsql.spider_eval import (postprocess, prepare, remove_distinct, replace_cur_year, result_eq,
                                               sibling_databases)
from environments.ambigsql.sqlexec import SQLRunner


@pytest.fixture()
def db_dir(data_dir, tmp_path):
    """A folder holding a writable copy of concert_singer (the sandbox alone protects it)."""
    d = tmp_path / "concert_singer"
    d.mkdir()
    shutil.copyfile(data_dir / "spider" / "database" / "concert_singer" / "concert_singer.sqlite",
                    d / "concert_singer.sqlite")
    return d


def official(db, pred, gold):
    return sqlexec.exec_match(db, pred, gold, mode="official")


def strict(db, pred, gold):
    return sqlexec.exec_match(db, pred, gold, mode="strict")


# --------------------------------------------------------------------------- query rewriting
def test_remove_distinct_drops_every_distinct_token_and_keeps_the_first_statement():
    """parse.py remove_distinct: ''.join of sqlparse.parse(s)[0].flatten() minus tokens equal to
    'distinct' in any case — also inside count(DISTINCT x); strings and other statements untouched/gone."""
    assert remove_distinct("SELECT DISTINCT name FROM t") == "SELECT  name FROM t"
    assert remove_distinct("SELECT count(DISTINCT x) FROM t") == "SELECT count( x) FROM t"
    assert remove_distinct("select Distinct a, count(distinct b) from t") == "select  a, count( b) from t"
    assert remove_distinct("SELECT 'distinct' FROM t") == "SELECT 'distinct' FROM t"
    assert remove_distinct("SELECT 1; DROP TABLE t") == "SELECT 1; "  # sqlparse keeps the space
    assert remove_distinct("") == ""


def test_operator_repairs_and_current_year():
    """exec_eval.py postprocess and replace_cur_year (the regex also eats the spaces after it)."""
    assert postprocess("a > = 1 AND b < = 2 AND c ! = 3") == "a >= 1 AND b <= 2 AND c != 3"
    assert replace_cur_year("SELECT year(curdate ( ) ) - age FROM t") == "SELECT 2020- age FROM t"


def test_order_matters_iff_the_lowercased_gold_contains_order_by():
    """exec_eval.py: order_matters = 'order by' in g_str.lower() — any 'order by', subqueries and
    strings included, but not 'ORDER  BY' with two spaces."""
    assert prepare("x", "SELECT a FROM t ORDER BY a")[2]
    assert prepare("x", "SELECT a FROM t WHERE b = (SELECT b FROM u ORDER BY c LIMIT 1)")[2]
    assert prepare("x", "SELECT 'order by' FROM t")[2]
    assert not prepare("SELECT a FROM t ORDER BY a", "SELECT a FROM t")[2]
    assert not prepare("x", "SELECT a FROM t ORDER  BY a")[2]


# --------------------------------------------------------------------------- result_eq
def test_result_eq_rules():
    """exec_eval.py result_eq: empty = empty; counts and first-row widths; quick_rej on rows with
    their values sorted by str(v)+str(type(v)) (lists if order matters, else sets); then a column
    permutation equal as lists, or as sets and multisets."""
    assert result_eq([], [], order_matters=True)
    assert not result_eq([(1,)], [], order_matters=False)
    assert result_eq([(6,)], [(6.0,)], order_matters=False)  # Python equality
    assert result_eq([(True,)], [(1,)], order_matters=False)
    assert result_eq([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], order_matters=False)
    assert not result_eq([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], order_matters=True)
    assert result_eq([(1, "a"), (2, "b")], [("a", 1), ("b", 2)], order_matters=True)
    # sets pass quick_rej, the multiset check does not
    assert not result_eq([(1,), (1,), (2,)], [(1,), (2,), (2,)], order_matters=False)
    # a permutation must hold for whole rows
    assert not result_eq([(1, 2), (2, 1)], [(1, 1), (2, 2)], order_matters=False)
    # wide results: column permutations narrowed by the rows' values
    gold = [(1, "x", 2.5, None, "y"), (2, "z", 3.5, None, "w")]
    pred = [("y", None, 2.5, "x", 1), ("w", None, 3.5, "z", 2)]
    assert result_eq(gold, pred, order_matters=True)
    assert not result_eq(gold, [pred[0], ("w", None, 3.5, "z", 3)], order_matters=False)
    # the evaluator's str-sort quirk: (1, 1.5) unorders to (1.5, 1) but (1.0, 1.5) to (1.0, 1.5)
    assert not result_eq([(1, 1.5)], [(1.0, 1.5)], order_matters=False)


# --------------------------------------------------------------------------- on a real database
def test_official_mode_on_spider(db_dir):
    db = db_dir / "concert_singer.sqlite"
    # DISTINCT is removed from both queries (keep_distinct=False)
    assert official(db, "SELECT DISTINCT country FROM singer", "SELECT country FROM singer")
    assert not strict(db, "SELECT DISTINCT country FROM singer", "SELECT country FROM singer")
    assert official(db, "SELECT count(DISTINCT country) FROM singer", "SELECT count(*) FROM singer")
    assert not strict(db, "SELECT count(DISTINCT country) FROM singer", "SELECT count(*) FROM singer")
    # operator repairs, YEAR(CURDATE()) in either query
    assert official(db, "SELECT name FROM singer WHERE age > = 41", "SELECT name FROM singer WHERE age >= 41")
    assert official(db, "SELECT 2020 - age FROM singer", "SELECT YEAR(CURDATE()) - age FROM singer")
    # order by anywhere in the gold makes order count
    gold = "SELECT name FROM singer WHERE age > (SELECT min(age) FROM singer ORDER BY age)"
    assert official(db, "SELECT name FROM singer WHERE age > 25 ORDER BY singer_id", gold)
    assert not official(db, "SELECT name FROM singer WHERE age > 25 ORDER BY singer_id DESC", gold)
    assert strict(db, "SELECT name FROM singer WHERE age > 25 ORDER BY singer_id DESC", gold)
    # two empty results match, whatever their columns
    assert official(db, "SELECT name, age FROM singer WHERE age > 99", "SELECT country FROM singer WHERE age < 0")


def test_official_runs_only_the_first_statement_and_never_changes_data(db_dir):
    """Only the first statement runs (remove_distinct keeps statement 0); the sandbox still refuses
    data-changing SQL: the one deviation from the evaluator, which would execute it."""
    db = db_dir / "concert_singer.sqlite"
    before = db.read_bytes()
    assert official(db, "SELECT name FROM singer; DROP TABLE singer", "SELECT name FROM singer")
    assert not strict(db, "SELECT name FROM singer; DROP TABLE singer", "SELECT name FROM singer")
    assert not official(db, "DELETE FROM singer", "SELECT name FROM singer WHERE age > 99")
    assert not official(db, "UPDATE singer SET age = 1", "SELECT name FROM singer WHERE age > 99")
    assert db.read_bytes() == before and sorted(p.name for p in db_dir.iterdir()) == ["concert_singer.sqlite"]


def test_official_checks_every_database_in_the_folder(db_dir):
    """exec_eval.py: db_paths = every file with '.sqlite' in its name beside the gold database."""
    db = db_dir / "concert_singer.sqlite"
    pred, gold = "SELECT name FROM singer WHERE singer_id < 100", "SELECT name FROM singer"
    assert official(db, pred, gold)
    other = db_dir / "concert_singer_2.sqlite"
    shutil.copyfile(db, other)
    with sqlite3.connect(other) as c:
        c.execute("INSERT INTO singer (Singer_ID, Name, Country, Song_Name, Song_release_year, Age, Is_male) "
                  "VALUES (200, 'New', 'X', 'S', '2000', 30, 'T')")
    assert sibling_databases(db) == [str(db), str(other)]
    assert not official(db, pred, gold)  # differs on the second database
    assert strict(db, pred, gold)  # strict looks at the task's database only


def test_official_decodes_text_leniently(tmp_path):
    """exec_eval.py get_cursor_from_path: text_factory = lambda b: b.decode(errors='ignore')."""
    d = tmp_path / "db"
    d.mkdir()
    with sqlite3.connect(d / "t.sqlite") as c:
        c.execute("CREATE TABLE t (v TEXT)")
        c.execute("INSERT INTO t VALUES (CAST(x'61ff62' AS TEXT))")
    assert official(d / "t.sqlite", "SELECT 'ab'", "SELECT v FROM t")
    assert not strict(d / "t.sqlite", "SELECT 'ab'", "SELECT v FROM t")  # the gold fails to decode


async def test_runner_official_mode_in_worker_processes(db_dir):
    runner = SQLRunner(workers=1, timeout_s=2.0)
    db = db_dir / "concert_singer.sqlite"
    try:
        assert await runner.exec_match(db, "SELECT DISTINCT country FROM singer", "SELECT country FROM singer",
                                       "official")
        assert not await runner.exec_match(db, "SELECT DISTINCT country FROM singer", "SELECT country FROM singer",
                                           "strict")
        with pytest.raises(ValueError):
            await runner.exec_match(db, "SELECT 1", "SELECT 1", "loose")
    finally:
        runner.close()


def test_official_is_the_default_for_reported_numbers():
    assert AmbigSQLConfig().exec_match == "official"
    assert AmbigSQLConfig(exec_match="strict").exec_match == "strict"
