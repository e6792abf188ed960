"""Just enough SQL structure for deriving ambiguities: clauses of the outer query, table
references and aliases, column references resolved against the schema. Works on tokens, so
a rewrite changes only the tokens it targets and keeps the rest of the text as it was."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .schema import Column, Schema, Table, quote_ident
from .sqlexec import SQLITE_KEYWORDS, Tok, ident_name, tokenize, untokenize

CLAUSES = ("SELECT", "FROM", "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT")
SET_OPS = ("UNION", "INTERSECT", "EXCEPT")
AGGREGATES = ("AVG", "SUM", "MIN", "MAX", "COUNT")


@dataclass
class ColRef:
    start: int  # token index of the qualifier (or the column when unqualified)
    end: int  # token index of the column name
    qualifier: str | None
    column: Column
    depth: int


@dataclass
class Query:
    sql: str
    toks: list[Tok]
    depth: list[int]
    compound: bool
    clauses: dict[str, tuple[int, int]]  # outer-query clause -> [start, end) token range
    tables: list[tuple[int, Table]] = field(default_factory=list)
    aliases: dict[str, Table] = field(default_factory=dict)
    colrefs: list[ColRef] = field(default_factory=list)

    def sig(self, lo: int = 0, hi: int | None = None) -> list[int]:
        """Indices of significant tokens (no whitespace/comments) in [lo, hi)."""
        hi = len(self.toks) if hi is None else hi
        return [i for i in range(lo, hi) if self.toks[i].kind not in ("ws", "comment")]

    def clause_sig(self, name: str) -> list[int]:
        if name not in self.clauses:
            return []
        lo, hi = self.clauses[name]
        return self.sig(lo, hi)

    def table_names(self) -> set[str]:
        return {t.name for _, t in self.tables}

    def replace(self, edits: dict[int, str]) -> str:
        """The SQL text with token i replaced by edits[i]."""
        return "".join(edits.get(i, t.text) for i, t in enumerate(self.toks))


def parse(sql: str, schema: Schema) -> Query:
    """Tokens, their depth, the outer clauses, then tables and aliases, then the column references
    (resolving a column needs every table and alias of the query first)."""
    toks = tokenize(sql)
    q = Query(sql=sql, toks=toks, depth=_paren_depth(toks), compound=False, clauses={})
    sig = q.sig()
    _outer_clauses(q, sig)
    _tables(q, sig, schema)
    _colrefs(q, sig, schema)
    return q


def _paren_depth(toks: list[Tok]) -> list[int]:
    """Parenthesis nesting of each token; a ")" counts at the depth it closes back to."""
    depth, d = [], 0
    for t in toks:
        if t.text == ")" and t.kind == "punct":
            d -= 1
        depth.append(d)
        if t.text == "(" and t.kind == "punct":
            d += 1
    return depth


def _outer_clauses(q: Query, sig: list[int]) -> None:
    """Fills q.clauses and q.compound: the [start, end) token range of each outer-query clause; in a
    compound query, those of its first SELECT only (up to the first set operator)."""
    toks, depth = q.toks, q.depth
    starts: list[tuple[str, int]] = []
    for k, i in enumerate(sig):
        t = toks[i]
        if depth[i] != 0 or t.kind != "word":
            continue
        u = t.upper
        if u in SET_OPS:
            q.compound = True
        if u in CLAUSES and not q.compound:
            if u in ("GROUP", "ORDER") and not (k + 1 < len(sig) and toks[sig[k + 1]].is_kw("BY")):
                continue
            starts.append((u, i))
    end_outer = len(toks)
    if q.compound:
        end_outer = next(i for i in sig if depth[i] == 0 and toks[i].upper in SET_OPS)
    for n, (name, i) in enumerate(starts):
        hi = starts[n + 1][1] if n + 1 < len(starts) else end_outer
        q.clauses.setdefault(name, (i, hi))


def _tables(q: Query, sig: list[int], schema: Schema) -> None:
    """Fills q.tables and q.aliases (any depth): a schema table named after FROM / JOIN / a comma
    inside FROM, and the alias that follows it, if any."""
    toks, depth = q.toks, q.depth
    context: dict[int, str] = {}
    for k, i in enumerate(sig):
        t = toks[i]
        if t.kind == "word" and t.upper in CLAUSES + SET_OPS + ("ON", "USING"):
            context[depth[i]] = t.upper
        prev = toks[sig[k - 1]] if k else None
        if t.kind not in ("word", "qid") or prev is None:
            continue
        after_from = prev.is_kw("FROM", "JOIN") or (prev.text == "," and context.get(depth[i]) == "FROM")
        if not after_from:
            continue
        nxt = toks[sig[k + 1]] if k + 1 < len(sig) else None
        if nxt is not None and nxt.text == ".":  # db.table
            continue
        table = schema.table(ident_name(t))
        if table is None:
            continue
        q.tables.append((i, table))
        q.aliases.setdefault(table.name.lower(), table)
        j = k + 1
        if j < len(sig) and toks[sig[j]].is_kw("AS"):
            j += 1
        if j < len(sig):
            a = toks[sig[j]]
            if a.kind in ("word", "qid") and a.upper not in SQLITE_KEYWORDS:
                q.aliases[ident_name(a).lower()] = table


def _colrefs(q: Query, sig: list[int], schema: Schema) -> None:
    """Fills q.colrefs: each identifier that is not a keyword, table, function, qualifier or alias
    definition, resolved by its qualifier, else against the tables of the query in order."""
    toks, depth = q.toks, q.depth
    table_tok = {i for i, _ in q.tables}
    in_query = [t for _, t in q.tables]
    for k, i in enumerate(sig):
        t = toks[i]
        if t.kind not in ("word", "qid") or i in table_tok:
            continue
        if t.kind == "word" and t.upper in SQLITE_KEYWORDS:
            continue
        prev = toks[sig[k - 1]] if k else None
        nxt = toks[sig[k + 1]] if k + 1 < len(sig) else None
        if nxt is not None and nxt.text == "(":
            continue  # function
        if nxt is not None and nxt.text == ".":
            continue  # qualifier: handled with its column
        if prev is not None and prev.is_kw("AS"):
            continue  # alias definition
        name = ident_name(t)
        if prev is not None and prev.text == "." and k >= 2:
            qual_tok = toks[sig[k - 2]]
            qual = ident_name(qual_tok)
            table = q.aliases.get(qual.lower()) or schema.table(qual)
            col = table.column(name) if table else None
            if col is not None:
                q.colrefs.append(ColRef(sig[k - 2], i, qual, col, depth[i]))
            continue
        if name.lower() in q.aliases and prev is not None and (prev.kind in ("word", "qid") or prev.is_kw("AS")):
            continue  # alias definition without AS
        for table in in_query:
            col = table.column(name)
            if col is not None:
                q.colrefs.append(ColRef(i, i, None, col, depth[i]))
                break


def colref_text(ref: ColRef, column_name: str) -> dict[int, str]:
    """Edits that point `ref` at another column of the same table."""
    return {ref.end: quote_ident(column_name)}


def normalize_whitespace(sql: str) -> str:
    out = []
    for t in tokenize(sql):
        if t.kind == "ws":
            out.append(" ")
        elif t.kind == "comment":
            continue
        else:
            out.append(t.text)
    s = "".join(out).strip()
    s = re.sub(r"\s*;\s*$", "", s)
    s = re.sub(r"\(\s+", "(", s)
    s = re.sub(r"\s+\)", ")", s)
    s = re.sub(r"\s+,", ",", s)
    return s


def mysql_to_sqlite(sql: str, db_id: str, unquote: bool = True) -> tuple[str, list[str]]:
    """Spiderman's MySQL dialect to SQLite: backticks -> plain (or double-quoted) identifiers,
    `db`.`table` -> table, STR_TO_DATE(x, fmt) -> x. Returns (sql, fixes applied)."""
    fixes: list[str] = []
    toks = tokenize(sql)
    out: list[str] = []
    skip_next_dot = False
    for n, t in enumerate(toks):
        if skip_next_dot and t.text == ".":
            skip_next_dot = False
            continue
        if t.kind == "qid" and t.text.startswith("`"):
            name = ident_name(t)
            nxt = next((x for x in toks[n + 1:] if x.kind != "ws"), None)
            if name.lower() == db_id.lower() and nxt is not None and nxt.text == ".":
                skip_next_dot = True
                fixes.append("db-qualifier")
                continue
            out.append(quote_ident(name) if unquote else '"' + name.replace('"', '""') + '"')
        else:
            out.append(t.text)
    s = "".join(out)
    s2 = re.sub(r"STR_TO_DATE\(\s*('(?:[^']|'')*')\s*,\s*'(?:[^']|'')*'\s*\)", r"\1", s, flags=re.IGNORECASE)
    if s2 != s:
        fixes.append("str_to_date")
    return normalize_whitespace(s2), fixes


def double_quoted_strings(sql: str, schema: Schema) -> str:
    """Spider's dev SQL writes some string literals in double quotes ("France"); make them
    standard single-quoted literals unless they name a table, column or alias."""
    names = {t.name.lower() for t in schema.tables} | {c.name.lower() for t in schema.tables for c in t.columns}
    toks = tokenize(sql)
    aliases = {ident_name(toks[i]).lower() for i in range(len(toks)) if toks[i].kind == "word"
               and re.fullmatch(r"T\d+", toks[i].text, re.IGNORECASE)}
    out = []
    for t in toks:
        if t.kind == "qid" and t.text.startswith('"') and ident_name(t).lower() not in names | aliases:
            out.append("'" + ident_name(t).replace("'", "''") + "'")
        else:
            out.append(t.text)
    return untokenize(Tok("x", s) for s in out)
