"""Spider's official execution match, as taoyds/test-suite-sql-eval `exec_eval.py` computes it.

`eval_exec_match(db, p_str, g_str, plug_value=False, keep_distinct=False)`, rule by rule:

* both queries: `postprocess` repairs `> =`, `< =`, `! =`; `remove_distinct` keeps only the FIRST
  statement (`sqlparse.parse(s)[0]`) and drops every token that is `distinct` in any case, also
  inside `count(DISTINCT x)`; at execution `YEAR(CURDATE())` becomes `2020` (`replace_cur_year`);
* row order is significant iff the processed gold query, lower-cased, contains `order by`
  (anywhere, subqueries included);
* text is decoded with `errors="ignore"` (its `text_factory`);
* the prediction must match on every `*.sqlite` database in the gold database's folder;
* `result_eq`: two empty results match; otherwise the row counts and the FIRST rows' widths must
  agree, the rows with their values sorted by `str(v) + str(type(v))` must agree (as lists when
  order matters, else as sets: `quick_rej`), and some column permutation of the prediction must
  equal the gold (as lists, or as sets and multisets). Values compare with Python equality, so
  6 == 6.0 and True == 1.

The one deviation is the sandbox (`sqlexec`): queries run read-only under its limits (time, rows,
size), so data-changing SQL never runs and a query over those limits fails, where the evaluator
would execute anything for up to 60 s. (Same verdict, different route: for results wider than 3
columns the evaluator narrows the column permutations with 20 randomly sampled rows; here every
row narrows them. A permutation either rule removes cannot match, so the answer is the same, and
it is deterministic.)
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from itertools import product
from typing import Any, Iterable, Sequence

import sqlparse


def postprocess(query: str) -> str:
    return query.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")


def remove_distinct(s: str) -> str:
    """The first statement of `s` without its `distinct` tokens (test-suite parse.py)."""
    statements = sqlparse.parse(s)
    if not statements:
        return ""
    return "".join(t.value for t in statements[0].flatten() if t.value.lower() != "distinct")


def replace_cur_year(query: str) -> str:
    return re.sub(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", "2020", query, flags=re.IGNORECASE)


def prepare(pred: str, gold: str, keep_distinct: bool = False) -> tuple[str, str, bool]:
    """(pred, gold, order_matters) as eval_exec_match runs them (replace_cur_year included)."""
    pred, gold = postprocess(pred), postprocess(gold)
    if not keep_distinct:
        pred, gold = remove_distinct(pred), remove_distinct(gold)
    return replace_cur_year(pred), replace_cur_year(gold), "order by" in gold.lower()


def sibling_databases(db_path: str | os.PathLike) -> list[str]:
    """Every database the evaluator checks: files with '.sqlite' in their name beside `db_path`."""
    d = os.path.dirname(os.fspath(db_path))
    return sorted(os.path.join(d, b) for b in os.listdir(d) if ".sqlite" in b)


def unorder_row(row: Sequence[Any]) -> tuple:
    return tuple(sorted(row, key=lambda x: str(x) + str(type(x))))


def quick_rej(result1: list, result2: list, order_matters: bool) -> bool:
    s1 = [unorder_row(row) for row in result1]
    s2 = [unorder_row(row) for row in result2]
    return s1 == s2 if order_matters else set(s1) == set(s2)


def multiset_eq(l1: list, l2: list) -> bool:
    if len(l1) != len(l2):
        return False
    d: dict = defaultdict(int)
    for e in l1:
        d[e] += 1
    for e in l2:
        d[e] -= 1
        if d[e] < 0:
            return False
    return True


def constraint_permutations(tab1_sets_by_columns: list[set], result2: list) -> Iterable[tuple]:
    num_cols = len(result2[0])
    allowed = [set(range(num_cols)) for _ in range(num_cols)]
    if num_cols > 3:  # the evaluator samples 20 rows here; every row gives the same verdict, always
        for row in result2:
            for c1 in range(num_cols):
                for c2 in list(allowed[c1]):
                    if row[c2] not in tab1_sets_by_columns[c1]:
                        allowed[c1].discard(c2)
    return product(*allowed)


def result_eq(result1: list, result2: list, order_matters: bool) -> bool:
    """The test-suite's denotation equality (result1 = gold, result2 = prediction)."""
    result1, result2 = [tuple(r) for r in result1], [tuple(r) for r in result2]
    if len(result1) == 0 and len(result2) == 0:
        return True
    if len(result1) != len(result2):
        return False
    num_cols = len(result1[0])
    if len(result2[0]) != num_cols:
        return False
    if not quick_rej(result1, result2, order_matters):
        return False
    tab1_sets_by_columns = [{row[i] for row in result1} for i in range(num_cols)]
    for perm in constraint_permutations(tab1_sets_by_columns, result2):
        if len(perm) != len(set(perm)):
            continue
        result2_perm = result2 if num_cols == 1 else [tuple(e[i] for i in perm) for e in result2]
        if order_matters:
            if result1 == result2_perm:
                return True
        elif set(result1) == set(result2_perm) and multiset_eq(result1, result2_perm):
            return True
    return False
