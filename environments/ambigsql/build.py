"""Build AmbigSQL conversations from Spider (ACT, ICLR 2025, section 5: AmbigSQL).

The paper's AmbigSQL is not public; this builder re-derives it from Spider with templates:

* sources: `spiderman_train_queries.csv` (6,726 Spider-train questions, MySQL dialect,
  converted to SQLite) -> split `train`; `dev.json` (1,034 questions) -> split `test`.
  Questions whose database is missing from `database/` are skipped and counted, as are gold
  queries that do not execute in the sandbox (or return more than the row cap).
* every usable question yields one **unambiguous** conversation (gold action ANSWER,
  reference = gold SQL) and, when a template applies and survives verification, one
  **ambiguous** conversation (gold action CLARIFY) of one of three types:

  - information / select_column: the selected attribute becomes vague ("the names of all
    singers" -> "the details of all singers"; aggregates: "the average age" -> "the average
    value"); alternatives select other attributes of the same table.
  - information / where_value: an equality constant becomes "a specific <column>" ("singers
    from France" -> "singers from a specific country"); alternatives use other values of
    that column taken from the database.
  - information / where_threshold: a comparison threshold becomes "a certain threshold";
    alternatives use quartiles of the column's values.
  - population / table: the only table's name becomes "records" ("How many singers do we
    have?" -> "How many records do we have?"); alternatives run the query on other tables
    that have the columns it uses.
  - presentation / order_direction: the sort direction is dropped ("in descending order of
    age" -> "in order of age"); alternative: the other direction.
  - presentation / limit: the count of "top N" / "the N oldest" is dropped; alternatives:
    other LIMITs.
  - presentation / group_by: the grouping key becomes "category" ("for each country" ->
    "for each category"); alternatives group by other attributes of the same table.

  Each ambiguous conversation carries the ambiguous question, a reference clarifying
  question, the user's clarification, the disambiguated question (the original Spider
  question) and the gold SQL. It is kept only if the gold SQL's result differs from at least
  one alternative reading's result (both executed; Spider exec-match semantics), and only
  the alternatives that run and differ are kept. The words the user must supply (the
  column, value, count, table ...) are recorded as `hidden` and must not occur in the
  ambiguous question.
* which template a question gets is chosen with a seeded RNG, preferring the type that is
  rarest so far in the split (so the three types stay balanced); the same inputs and seed
  always give the same file.

An optional LLM pass (`rewrite_with_llm`) may polish the wording of ambiguous questions;
a rewrite is kept only when it still hides every `hidden` term. The template path needs no
model and no network.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import sqlexec
from .schema import Column, Schema, load_schemas, pluralize, quote_ident, singularize, word_forms
from .sqlparse import ColRef, Query, double_quoted_strings, mysql_to_sqlite, normalize_whitespace, parse

BUILDER_VERSION = "1"
FORMAT = "simkit-ambigsql"
TYPES = ("information", "population", "presentation")
SPLIT_SOURCES = {"train": "spiderman_train_queries.csv", "test": "dev.json"}
BUILD_TIMEOUT_S = 2.0
MAX_ALTERNATIVES = 3

_NUM_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
              20: "twenty"}


# --------------------------------------------------------------------------- records
@dataclass
class Source:
    split: str
    index: int  # position in the source file
    db_id: str
    question: str
    sql: str  # SQLite gold query


@dataclass
class Candidate:
    type: str
    subtype: str
    question: str  # ambiguous question
    clarifying_question: str
    clarification: str  # the user's answer
    alternatives: list[str]  # SQL of other readings (verified before use)
    hidden: list[str] = field(default_factory=list)


@dataclass
class Example:
    id: str
    split: str
    source: int
    db_id: str
    gold_action: str  # "CLARIFY" | "ANSWER"
    question: str  # what the user asks first (ambiguous for CLARIFY)
    original_question: str
    disambiguated_question: str
    gold_sql: str
    ambiguity: str = "none"  # none | information | population | presentation
    subtype: str = ""
    clarifying_question: str | None = None
    clarification: str | None = None
    alternatives: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    rewritten: bool = False


# --------------------------------------------------------------------------- db access
class Databases:
    """Read-only sandboxed connections, one per database, for trusted builder queries."""

    def __init__(self, database_dir: Path, timeout_s: float = BUILD_TIMEOUT_S):
        self.dir = Path(database_dir)
        self.timeout_s = timeout_s
        self._conns: dict[str, sqlite3.Connection] = {}
        self.queries = 0

    def path(self, db_id: str) -> Path:
        return self.dir / db_id / f"{db_id}.sqlite"

    def exists(self, db_id: str) -> bool:
        return self.path(db_id).is_file()

    def run(self, db_id: str, sql: str) -> sqlexec.ExecResult:
        conn = self._conns.get(db_id)
        if conn is None:
            conn = self._conns[db_id] = sqlexec.open_readonly(self.path(db_id))
        self.queries += 1
        return sqlexec.run_query(conn, sql, self.timeout_s)

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


# --------------------------------------------------------------------------- sources
def load_sources(spider_dir: Path, schemas: dict[str, Schema], splits: Iterable[str] = ("train", "test")
                 ) -> tuple[dict[str, list[Source]], dict[str, Counter]]:
    """Gold questions per split, SQL in SQLite dialect, plus conversion counts."""
    out: dict[str, list[Source]] = {}
    notes: dict[str, Counter] = {}
    for split in splits:
        fixes: Counter = Counter()
        items: list[Source] = []
        if split == "train":
            with open(spider_dir / SPLIT_SOURCES["train"], newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f)):
                    sql, fx = mysql_to_sqlite(row["sql"], row["database"])
                    fixes.update(fx)
                    items.append(Source(split, i, row["database"], row["question"].strip(), sql))
        elif split == "test":
            for i, d in enumerate(json.loads((spider_dir / SPLIT_SOURCES["test"]).read_text(encoding="utf-8"))):
                schema = schemas.get(d["db_id"])
                sql = double_quoted_strings(d["query"], schema) if schema else d["query"]
                items.append(Source(split, i, d["db_id"], d["question"].strip(), normalize_whitespace(sql)))
        else:
            raise ValueError(f"unknown split {split!r}; AmbigSQL has {list(SPLIT_SOURCES)}")
        out[split] = items
        notes[split] = fixes
    return out, notes


# --------------------------------------------------------------------------- text helpers
def _spans(text: str, forms: Iterable[str]) -> list[tuple[int, int]]:
    """Non-overlapping whole-word matches of any form (longest forms win)."""
    taken: list[tuple[int, int]] = []
    for form in sorted(set(forms), key=len, reverse=True):
        if not form.strip():
            continue
        pat = r"(?<![\w-])" + r"\s+".join(map(re.escape, form.split())) + r"(?![\w-])"
        for m in re.finditer(pat, text, re.IGNORECASE):
            if all(m.end() <= a or m.start() >= b for a, b in taken):
                taken.append((m.start(), m.end()))
    return sorted(taken)


def _mentions(text: str, term: str) -> bool:
    return bool(_spans(text, [term])) if term else False


def _sub(text: str, start: int, end: int, new: str) -> str:
    s = text[:start] + new + text[end:]
    s = re.sub(r"\s{2,}", " ", s)
    s = re.sub(r"\s+([,.?!;])", r"\1", s)
    s = re.sub(r",\s*([.?!])", r"\1", s)
    return s.strip()


_FUNCTION_WORDS = frozenset("""
of in with who whom that which whose do does did are is have has were was and or for from by on at to sorted
ordered listed where when there we exist exists having whether if not than per each all since during among
across under over between into onto as
""".split())
_SELECT_FOLLOW = frozenset("of for from in among across".split())


def _followed_by(text: str, end: int, words: frozenset[str]) -> bool:
    """True if `end` is followed by punctuation, the end, or one of `words`."""
    m = re.match(r"\s*([A-Za-z']+|[^\sA-Za-z']|$)", text[end:])
    nxt = m.group(1).lower() if m else ""
    return nxt == "" or not nxt[0].isalpha() or nxt in words


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _options(rng: random.Random, gold: str, alts: list[str], k: int = 2) -> str:
    """'a, b or c' with the gold option at a random place."""
    opts = [gold] + [a for a in alts if a != gold][:k]
    rng.shuffle(opts)
    return opts[0] if len(opts) == 1 else ", ".join(opts[:-1]) + " or " + opts[-1]


def _natural(col: Column) -> str:
    return " ".join(col.natural.lower().split())


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _sql_literal(v: Any) -> str:
    if isinstance(v, (int, float)):
        return _fmt_value(v)
    return "'" + str(v).replace("'", "''") + "'"


def _value_span(text: str, q: Query, tok: Any, value: str) -> tuple[int, int] | None:
    """Where the question names a WHERE value (with its quotes), if it names it once and whole."""
    spans = _spans(text, [value])
    if len(spans) != 1:
        return None
    a, b = spans[0]
    while a > 0 and text[a - 1] in "\"'“‘`":
        a -= 1
    while b < len(text) and text[b] in "\"'”’`":
        b += 1
    if tok.kind == "num" and not _followed_by(text, b, _FUNCTION_WORDS):
        return None  # "customers who have 0 loans": a count, not a value to pick
    others = [t.text[1:-1] if t.kind == "str" else t.text for t in q.toks
              if t.kind in ("str", "num") and t is not tok]
    if any(o and any(abs(x - b) <= 3 or abs(y - a) <= 3 for x, y in _spans(text, [o])) for o in others):
        return None  # "Lucas Mancini": the value is half of a longer mention
    return a, b


def _value_phrase(text: str, a: int, b: int, nat: str, table: Any) -> tuple[str, str]:
    """(the question with the value replaced by "a specific <what>", that <what>): the words
    naming the column around the value become part of the phrase."""
    words = nat.split() + table.natural.lower().split()
    vocab = set(words) | {pluralize(w) for w in words} | {singularize(w) for w in words}
    vocab -= _FUNCTION_WORDS | {"the", "a", "an"}
    desc: list[str] = []
    m = re.search(r"\b(named|called|titled|with\s+(?:the\s+)?name|whose\s+name\s+is)\s+$", text[:a], re.I)
    if m:
        return _sub(text, m.start(), b, f"with a specific {nat}"), nat
    pos = a  # absorb the words naming the column right before the value ("the institution X")
    m = re.search(r"\b([A-Za-z]+)\s+of\s+$", text[:pos])
    if m and m.group(1).lower() in vocab:  # "the state of Hawaii"
        desc, pos = [m.group(1).lower()], m.start()
    while len(desc) < 3:
        m = re.search(r"([A-Za-z]+)\s+$", text[:pos])
        if not m or m.group(1).lower() not in vocab:
            break
        desc.insert(0, m.group(1).lower())
        pos = m.start()
    if desc:
        a = pos
    else:  # ... or right after it ("the 'Herbs' category")
        pos = b
        while len(desc) < 2:
            m = re.match(r"\s+([A-Za-z]+)\b", text[pos:])
            if not m or m.group(1).lower() not in vocab:
                break
            desc.append(m.group(1).lower())
            pos += m.end()
        b = pos
        if desc:
            desc[-1] = singularize(desc[-1])
    m = re.search(r"\b(the|a|an)\s+$", text[:a], re.I)
    a = m.start() if m else a  # the phrase brings its own article
    if not desc and nat in ("name", "title"):  # "Which continent is Anguilla in?" -> "... a specific country ..."
        desc = singularize(table.natural.lower()).split()
    return _sub(text, a, b, "a specific " + (" ".join(desc) or nat)), " ".join(desc) or nat


TemplateFn = Callable[["Deriver", "Source", Query, Schema], "list[Candidate]"]
_TEMPLATES: dict[str, list[TemplateFn]] = {t: [] for t in TYPES}


def template(ambiguity: str) -> Callable[[TemplateFn], TemplateFn]:
    """Register a `Deriver` method as an ambiguity template of type `ambiguity` (information,
    population or presentation). Registration order is the order the build tries them in
    (before its seeded shuffle), so it is part of what makes a build reproducible."""
    if ambiguity not in _TEMPLATES:
        raise ValueError(f"unknown ambiguity type {ambiguity!r}; one of {TYPES}")

    def deco(fn: TemplateFn) -> TemplateFn:
        _TEMPLATES[ambiguity].append(fn)
        return fn

    return deco


# --------------------------------------------------------------------------- templates
class Deriver:
    """The ambiguity templates. Each `derive_*` returns candidates (unverified)."""

    def __init__(self, dbs: Databases, rng: random.Random):
        self.dbs, self.rng = dbs, rng

    # ---------------------------------------------------------- presentation
    _DIR = (r"(?:descending|ascending|decreasing|increasing|reverse(?:d)?\s+alphabetical|alphabetical|alphabetic"
            r"|reverse(?:d)?\s+lexicographic(?:al)?|lexicographic(?:al)?|reverse|reversed)")
    _DIRW = (r"(?:descending(?:ly)?|ascending(?:ly)?|decreasing(?:ly)?|increasing(?:ly)?|(?:reverse\s+)?alphabetical(?:ly)?"
             r"|(?:reverse\s+)?lexicographical(?:ly)?|lexicographically|asc|desc)")
    _EXT = (r"(?:\w+est|high|low|most|least|large|small|old|young|big|first|last|top|bottom|a|z|best|worst|early|late"
            r"|recent|new|short|long|cheap|expensive|many|few|more|less)")
    _ORDER_CUE = re.compile(r"\b(order|ordered|ordering|sort|sorted|sorting|rank|ranked|arrange|arranged|listed\s+by)\b",
                            re.I)

    @template("presentation")
    def derive_order_direction(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        if q.compound or "ORDER" not in q.clauses or "LIMIT" in q.clauses:
            return []
        osig = q.clause_sig("ORDER")[2:]  # after ORDER BY
        if not osig or any(q.toks[i].text == "," and q.depth[i] == 0 for i in osig):
            return []
        last = osig[-1]
        has_dir = q.toks[last].is_kw("ASC", "DESC")
        desc = q.toks[last].is_kw("DESC")
        key = [i for i in osig if not q.toks[i].is_kw("ASC", "DESC")]
        if not key or any(q.toks[i].is_kw("NULLS", "COLLATE") for i in osig):
            return []
        text = src.question
        matches: list[tuple[int, int, str]] = []  # start, end, replacement
        for m in re.finditer(r",?\s*\b(?:in|by)\s+(?:the\s+)?(?:an?\s+)?" + self._DIR + r"\s+(?:alphabetical\s+)?order\b",
                             text, re.I):
            follows = re.match(r"\s+(of|by|according\s+to|on)\b", text[m.end():], re.I)
            matches.append((m.start(), m.end(), " in order" if follows else ""))
        for m in re.finditer(r",?\s*\bfrom\s+(?:the\s+)?" + self._EXT + r"\s+to\s+(?:the\s+)?" + self._EXT + r"\b",
                             text, re.I):
            matches.append((m.start(), m.end(), ""))
        for m in re.finditer(r"\s*\b(?:in\s+)?" + self._DIRW + r"\b", text, re.I):
            if not any(a <= m.start() < b for a, b, _ in matches):
                matches.append((m.start(), m.end(), ""))
        if len(matches) != 1:
            return []
        a, b, rep = matches[0]
        amb = _sub(text, a, b, rep)
        if not self._ORDER_CUE.search(amb):
            amb = re.sub(r"\s*([.?!]?)\s*$", r", sorted\1", amb, count=1)
        if re.search(self._DIRW + r"|\bfrom\s+(?:the\s+)?" + self._EXT + r"\s+to\b", amb, re.I):
            return []
        key_nat = self._expr_natural(q, key)
        textual = bool(re.search(r"alphabet|lexicograph", text[a:b], re.I))
        word = "descending" if desc else "ascending"
        if textual:
            word = "reverse alphabetical" if desc else "alphabetical"
        flip = dict()
        if has_dir:
            flip[last] = "ASC" if desc else "DESC"
        else:
            flip[key[-1]] = q.toks[key[-1]].text + " DESC"
        key_in_q = bool(key_nat) and _mentions(amb, key_nat)
        if key_in_q or re.search(r"\b(order|sorted|ordered)\s+(of|by)\b", amb, re.I):
            cq = self.rng.choice(["Should the results be in ascending or descending order?",
                                  "Do you want them sorted from lowest to highest, or from highest to lowest?"])
        else:
            cq = self.rng.choice(["How would you like the results sorted?",
                                  "In what order should I sort the results?"])
        reply = f"In {word} order" + (f" of {key_nat}" if key_nat else "") + ", please."
        return [Candidate("presentation", "order_direction", amb, cq, reply, [q.replace(flip)])]

    @template("presentation")
    def derive_limit(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        if q.compound or "LIMIT" not in q.clauses or "ORDER" not in q.clauses:
            return []
        lsig = q.clause_sig("LIMIT")
        if len(lsig) != 2 or q.toks[lsig[1]].kind != "num":
            return []
        try:
            n = int(q.toks[lsig[1]].text)
        except ValueError:
            return []
        if n < 2:
            return []
        num = r"(?:" + str(n) + (r"|" + _NUM_WORDS[n] if n in _NUM_WORDS else "") + r")"
        text = src.question
        if len(re.findall(r"(?<![\w.])" + num + r"(?![\w.])", text, re.I)) != 1:
            return []
        amb = None
        m = re.search(r"\b(top|first|last|bottom)\s+" + num + r"\b", text, re.I)
        if m:
            amb = _sub(text, m.start(), m.end(), m.group(1))
        else:
            m = re.search(r"(?<![\w.])" + num + r"\s+(?=(?:most|least|\w+est|top|best|worst)\b)", text, re.I)
            if m:
                amb = _sub(text, m.start(), m.end(), "")
        if amb is None:
            return []
        alts = [q.replace({lsig[1]: str(k)}) for k in (1, 3, 5, 10) if k != n][:3]
        cq = self.rng.choice(["How many results would you like to see?", "How many of them should I list?"])
        return [Candidate("presentation", "limit", amb, cq, f"I want {n} of them.", alts,
                          hidden=[str(n)] + ([_NUM_WORDS[n]] if n in _NUM_WORDS else []))]

    @template("presentation")
    def derive_group_by(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        if q.compound or "GROUP" not in q.clauses:
            return []
        gsig = q.clause_sig("GROUP")[2:]
        refs = [r for r in q.colrefs if r.start == gsig[0] and r.end == gsig[-1]] if gsig else []
        if len(refs) != 1:
            return []
        ref = refs[0]
        col = ref.column
        table = schema.table(col.table)
        assert table is not None
        forms = word_forms(_natural(col))
        if col.primary or _natural(col) in ("name", f"{table.natural.lower()} name"):
            forms += word_forms(table.natural)
        text = src.question
        spans = _spans(text, forms)
        if len(spans) != 1:
            return []
        a, b = spans[0]
        before = text[:a]
        if not re.search(r"\b(each|every|per|different|grouped\s+by|group\s+by|broken\s+down\s+by|categorized\s+by)\s+$",
                         before, re.I) or not _followed_by(text, b, _FUNCTION_WORDS):
            return []
        said = text[a:b]
        plural = said.lower().endswith("s") and singularize(said.lower()) != said.lower()
        amb = _sub(text, a, b, "categories" if plural else "category")
        same_refs = [r for r in q.colrefs if r.column is col]
        cands = [c for c in table.columns if c is not col and not c.is_id and c.type in ("text", "number", "time")
                 and len(_natural(c)) >= 3 and not any(_mentions(text, f) for f in word_forms(_natural(c)))]
        self.rng.shuffle(cands)
        alts, names = [], []
        for c in cands[:4]:
            edits = {r.end: quote_ident(c.name) for r in same_refs}
            alts.append(q.replace(edits))
            names.append(_natural(c))
        if not alts:
            return []
        cq = self.rng.choice([f"What should I group the results by, for example {_options(self.rng, said.lower(), names, 1)}?",
                              "How should the results be grouped?"])
        return [Candidate("presentation", "group_by", amb, _cap(cq), f"Group them by {said.lower()}.", alts,
                          hidden=[said.lower()])]

    # ---------------------------------------------------------- information
    @template("information")
    def derive_select_column(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        if q.compound or "SELECT" not in q.clauses:
            return []
        ssig = q.clause_sig("SELECT")[1:]
        if any(q.toks[i].text == "," and q.depth[i] == 0 for i in ssig):
            return []
        body = [i for i in ssig if not q.toks[i].is_kw("DISTINCT")]
        agg = None
        if len(body) >= 4 and q.toks[body[0]].upper in ("AVG", "SUM", "MIN", "MAX") and q.toks[body[1]].text == "(" \
                and q.toks[body[-1]].text == ")":
            agg = q.toks[body[0]].upper
            body = [i for i in body[2:-1] if not q.toks[i].is_kw("DISTINCT")]
        refs = [r for r in q.colrefs if body and r.start == body[0] and r.end == body[-1]]
        if len(refs) != 1:
            return []
        col = refs[0].column
        table = schema.table(col.table)
        assert table is not None
        text = src.question
        spans = _spans(text, word_forms(_natural(col)))
        if len(spans) != 1 or col.is_id or not _followed_by(text, spans[0][1], _SELECT_FOLLOW) \
                or text[:spans[0][0]].rstrip().endswith("("):
            return []  # "miles per gallon (mpg)": the attribute is named twice
        cands = [c for c in table.columns if c is not col and not c.is_id and len(_natural(c)) >= 3
                 and (c.type == "number" if agg else c.type in ("text", "number", "time"))]
        cands = [c for c in cands if not any(_mentions(text, f) for f in word_forms(_natural(c)))]
        if not cands:
            return []
        a, b = spans[0]
        if agg:
            vague = "value"
        else:
            vague = "details"
            m = re.search(r"\b(is|was)\s+(the\s+)?$", text[:a], re.I)
            if m:
                a = m.start()
                vague = ("are the " if m.group(2) else "are ") + vague
        amb = _sub(text, a, b, vague)
        self.rng.shuffle(cands)
        alts, names = [], []
        for c in cands[:4]:
            alts.append(q.replace({refs[0].end: quote_ident(c.name)}))
            names.append(_natural(c))
        nat = _natural(col)
        cq = f"Which {'value' if agg else 'information'} do you need: the {_options(self.rng, nat, names)}?"
        return [Candidate("information", "select_column", amb, cq, f"I want the {nat}.", alts, hidden=[nat])]

    def _where_literals(self, q: Query) -> list[tuple[ColRef, str, int]]:
        """(column, operator, literal token index) for `col OP literal` in the outer WHERE."""
        if q.compound or "WHERE" not in q.clauses:
            return []
        wsig = [i for i in q.clause_sig("WHERE") if q.depth[i] == 0]
        out = []
        for k in range(len(wsig) - 2):
            i, j, v = wsig[k], wsig[k + 1], wsig[k + 2]
            op = q.toks[j].text
            if q.toks[j].kind != "op" or op not in ("=", "==", "!=", "<>", ">", "<", ">=", "<="):
                continue
            if q.toks[v].kind not in ("str", "num"):
                continue
            if k + 3 < len(wsig) and q.toks[wsig[k + 3]].kind == "op":
                continue  # part of a larger expression
            ref = next((r for r in q.colrefs if r.end == i), None)
            if ref is not None:
                out.append((ref, op, v))
        return out

    @template("information")
    def derive_where_value(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        """`col = 'value'` whose value the question names: the question says "a specific <col>"
        instead, and the user names the value when asked."""
        out = []
        literals = self._where_literals(q)
        for ref, op, vi in literals:
            if op not in ("=", "==") or sum(1 for r, _, _ in literals if r.column is ref.column) != 1:
                continue  # "the state of Hawaii or the state of Wisconsin": one value of several
            if not _natural(ref.column) or _natural(ref.column).split()[-1] in _FUNCTION_WORDS:
                continue  # "directed by": no noun to say "a specific ..." with
            tok = q.toks[vi]
            value = tok.text[1:-1].replace("''", "'") if tok.kind == "str" else tok.text
            if not value.strip() or "%" in value or sum(1 for t in q.toks if t.text == tok.text) != 1:
                continue
            span = _value_span(src.question, q, tok, value)
            if span is None:
                continue
            col = ref.column
            nat = _natural(col)
            table = schema.table(col.table)
            assert table is not None
            amb, label = _value_phrase(src.question, *span, nat, table)
            values = self._other_values(src.db_id, col.name, table.name, value, tok.kind)
            if values is None:
                continue
            self.rng.shuffle(values)
            alts = [q.replace({vi: _sql_literal(v)}) for v in values[:5]]
            if not alts:
                continue
            cq = self.rng.choice([f"Which {label} do you mean?", f"Which {label} are you interested in?"])
            out.append(Candidate("information", "where_value", amb, cq, f"I mean the {label} {value}.", alts,
                                 hidden=[value]))
        return out[:1]

    def _other_values(self, db_id: str, column: str, table: str, value: str, kind: str) -> list[Any] | None:
        """The column's other values in the database (None if the query fails)."""
        res = self.dbs.run(db_id, f"SELECT DISTINCT {quote_ident(column)} FROM {quote_ident(table)} "
                                  f"WHERE {quote_ident(column)} IS NOT NULL LIMIT 200")
        if not res.ok:
            return None
        values = [r[0] for r in res.rows or [] if str(r[0]).strip().lower() != value.strip().lower()
                  and not isinstance(r[0], bytes)]
        if kind == "num":
            values = [v for v in values if isinstance(v, (int, float))]
        return values

    _COMPARE = {"than", "over", "under", "above", "below", "after", "before", "least", "most", "at", "exceeding",
                "exceeds", "exceed", "beyond", "since", "until", "within", "more", "less", "fewer", "greater",
                "larger", "smaller", "higher", "lower", "bigger", "older", "younger", "longer", "shorter", "or",
                "equal", "to", "later", "earlier", "heavier", "lighter", "cheaper", "wider", "taller", "bigger",
                "newer", "faster", "slower", "louder", "richer", "deeper", "hotter", "colder", "warmer"}
    _UNIT_STOP = {"is", "was", "has", "as", "this", "its", "plus", "us", "yes", "less", "times"}

    @template("information")
    def derive_where_threshold(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        out = []
        for ref, op, vi in self._where_literals(q):
            tok = q.toks[vi]
            if op not in (">", "<", ">=", "<=") or tok.kind != "num":
                continue
            value = tok.text
            if sum(1 for t in q.toks if t.text == value) != 1:
                continue
            text = src.question
            hits = list(re.finditer(r"(?<![\w.$])\$?" + re.escape(value) + r"(?![\w.]\d|\w)", text))
            if len(hits) != 1:
                continue
            a, b = hits[0].start(), hits[0].end()
            unit = re.match(r"\s+([A-Za-z]+s)\b", text[b:])
            if unit and unit.group(1).lower() not in self._UNIT_STOP:
                phrase, b2 = f"a certain number of {unit.group(1)}", b + unit.end()
            else:
                phrase, b2 = "a certain threshold", b
            start = a
            while True:  # the comparison words right before the number ("more than", "over", "after")
                m = re.search(r"\b([A-Za-z]+)\s+$", text[:start])
                if not m or m.group(1).lower() not in self._COMPARE:
                    break
                start = m.start()
            said = text[start:b2].strip().rstrip(".,?!")
            amb = _sub(text, a, b2, phrase)
            col = ref.column
            table = schema.table(col.table)
            assert table is not None
            res = self.dbs.run(src.db_id, f"SELECT {quote_ident(col.name)} FROM {quote_ident(table.name)} WHERE "
                                          f"typeof({quote_ident(col.name)}) IN ('integer', 'real') "
                                          f"ORDER BY {quote_ident(col.name)} LIMIT 5000")
            if not res.ok or not res.rows:
                continue
            vals = [r[0] for r in res.rows]
            picks = []
            for f in (0.25, 0.5, 0.75):
                v = vals[min(len(vals) - 1, int(f * len(vals)))]
                v = int(v) if isinstance(v, float) and v.is_integer() else v
                if _fmt_value(v) != value and v not in picks:
                    picks.append(v)
            alts = [q.replace({vi: _fmt_value(v)}) for v in picks]
            if not alts:
                continue
            nat = _natural(col)
            cq = self.rng.choice([f"What threshold for {nat} do you have in mind?", f"Which {nat} cut-off should I use?"])
            out.append(Candidate("information", "where_threshold", amb, cq, f"I mean {said}.", alts, hidden=[value]))
        return out[:1]

    # ---------------------------------------------------------- population
    @template("population")
    def derive_table(self, src: Source, q: Query, schema: Schema) -> list[Candidate]:
        names = q.table_names()
        if len(names) != 1 or not q.tables or q.tables[0][1].name.lower().startswith("sqlite_"):
            return []
        table = q.tables[0][1]
        text = src.question
        forms = word_forms(table.natural) + word_forms(table.name.replace("_", " "))
        spans = _spans(text, forms)
        if len(spans) != 1:
            return []
        a, b = spans[0]
        if not _followed_by(text, b, _FUNCTION_WORDS):
            return []  # "the staff member": the table name is a modifier, not the entity
        said = text[a:b].lower()
        plural = said.endswith("s") or pluralize(said) == said
        amb = _sub(text, a, b, "records" if plural else "record")
        # qualifiers naming the table itself must follow it
        qual_toks = {r.start for r in q.colrefs if r.qualifier and r.qualifier.lower() == table.name.lower()}
        others = [t for t in schema.tables if t is not table and not t.name.lower().startswith("sqlite_")]
        self.rng.shuffle(others)
        alts, alt_names = [], []
        for other in others[:6]:
            edits = {i: quote_ident(other.name) for i, _ in q.tables}
            edits.update({i: quote_ident(other.name) for i in qual_toks})
            alts.append(q.replace(edits))
            alt_names.append(pluralize(other.natural.lower()))
        if not alts:
            return []
        gold_name = pluralize(table.natural.lower())
        return [Candidate("population", "table", amb, f"Which records do you mean: {_options(self.rng, gold_name, alt_names)}?",
                          f"I mean the {gold_name}.", alts, hidden=forms)]

    # ---------------------------------------------------------- helpers
    def _expr_natural(self, q: Query, idx: list[int]) -> str:
        if len(idx) == 1:
            ref = next((r for r in q.colrefs if r.end == idx[0]), None)
            return _natural(ref.column) if ref else ""
        first = q.toks[idx[0]]
        if first.kind == "word" and first.upper in ("COUNT", "AVG", "SUM", "MIN", "MAX") and q.toks[idx[1]].text == "(":
            inner = [i for i in idx[2:-1] if not q.toks[i].is_kw("DISTINCT")]
            ref = next((r for r in q.colrefs if inner and r.start == inner[0] and r.end == inner[-1]), None)
            word = {"COUNT": "the number", "AVG": "the average", "SUM": "the total", "MIN": "the minimum",
                    "MAX": "the maximum"}[first.upper]
            if first.upper == "COUNT":
                return "the count" if not ref else f"the number of {pluralize(_natural(ref.column))}"
            return f"{word} {_natural(ref.column)}" if ref else ""
        if len(idx) == 3:
            ref = next((r for r in q.colrefs if r.start == idx[0] and r.end == idx[2]), None)
            return _natural(ref.column) if ref else ""
        return ""

    def templates(self, ambiguity: str) -> list[Callable[[Source, Query, Schema], list[Candidate]]]:
        """The registered templates of one type, bound to this deriver, in registration order."""
        return [fn.__get__(self) for fn in _TEMPLATES[ambiguity]]


# --------------------------------------------------------------------------- verification
def verify(dbs: Databases, db_id: str, gold_sql: str, gold: sqlexec.ExecResult, cand: Candidate,
           original: str) -> Candidate | None:
    """Keep the alternatives that run and differ from the gold result; None if none does, or
    if the ambiguous question still gives away a hidden term or did not change."""
    if cand.question.strip().lower() == original.strip().lower() or not cand.question.strip():
        return None
    if any(_mentions(cand.question, h) for h in cand.hidden if h):
        return None
    if not cand.clarifying_question.rstrip().endswith("?"):
        return None
    order = sqlexec.has_top_level_order_by(gold_sql)
    kept = []
    for alt in cand.alternatives:
        if alt == gold_sql:
            continue
        res = dbs.run(db_id, alt)
        if res.ok and not sqlexec.results_match(gold.rows or [], res.rows or [], order):
            kept.append(alt)
        if len(kept) >= MAX_ALTERNATIVES:
            break
    if not kept:
        return None
    cand.alternatives = kept
    return cand


# --------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    stats: dict[str, Any]
    examples: list[Example]
    schemas: dict[str, str]


def build(spider_dir: str | os.PathLike, seed: int = 0, splits: Iterable[str] = ("train", "test"),
          limit: int | None = None, progress: Callable[[str], None] | None = None) -> BuildReport:
    """Build the conversations (deterministic for the same inputs and seed)."""
    spider_dir = Path(spider_dir)
    t0 = time.time()
    schemas = load_schemas(spider_dir / "tables.json")
    sources, fixes = load_sources(spider_dir, schemas, splits)
    dbs = Databases(spider_dir / "database")
    examples: list[Example] = []
    stats: dict[str, Any] = {"seed": seed, "splits": {}}
    try:
        for split, items in sources.items():
            split_examples, split_stats = _build_split(dbs, schemas, split, items, seed, limit)
            examples += split_examples
            stats["splits"][split] = {**split_stats, "sql_fixes": dict(fixes[split])}
            if progress:
                progress(f"{split}: {split_stats['conversations']} conversations")
    finally:
        stats["queries_executed"] = dbs.queries
        dbs.close()
    used = sorted({e.db_id for e in examples})
    stats["build_seconds"] = round(time.time() - t0, 2)
    return BuildReport(stats=stats, examples=examples, schemas={d: schemas[d].text() for d in used})


def _build_split(dbs: Databases, schemas: dict[str, Schema], split: str, items: list[Source], seed: int,
                 limit: int | None) -> tuple[list[Example], dict[str, Any]]:
    """One split: an ANSWER conversation per question whose gold SQL runs, plus a CLARIFY one
    where a template makes a verified ambiguity. The split's stats come with them."""
    rng = random.Random(f"ambigsql-{seed}-{split}")
    if limit is not None and limit < len(items):
        items = sorted(rng.sample(items, limit), key=lambda s: s.index)
    deriver = Deriver(dbs, rng)
    examples: list[Example] = []
    st: Counter = Counter()
    types: Counter = Counter({t: 0 for t in TYPES})
    subtypes: Counter = Counter()
    missing_dbs: set[str] = set()
    for src in items:
        st["questions"] += 1
        schema = schemas.get(src.db_id)
        if schema is None or not dbs.exists(src.db_id):
            st["skipped_missing_db"] += 1
            missing_dbs.add(src.db_id)
            continue
        gold = dbs.run(src.db_id, src.sql)
        if not gold.ok:
            st["skipped_gold_error"] += 1
            continue
        base = f"ambigsql-{split}-{src.index:05d}"
        examples.append(Example(id=f"{base}-orig", split=split, source=src.index, db_id=src.db_id,
                                gold_action="ANSWER", question=src.question, original_question=src.question,
                                disambiguated_question=src.question, gold_sql=src.sql))
        st["answer"] += 1
        chosen = _first_ambiguity(deriver, dbs, src, schema, gold, types, rng)
        if chosen is None:
            st["no_ambiguity"] += 1
            continue
        types[chosen.type] += 1
        subtypes[f"{chosen.type}/{chosen.subtype}"] += 1
        st["clarify"] += 1
        examples.append(Example(
            id=f"{base}-amb", split=split, source=src.index, db_id=src.db_id, gold_action="CLARIFY",
            question=chosen.question, original_question=src.question, disambiguated_question=src.question,
            gold_sql=src.sql, ambiguity=chosen.type, subtype=chosen.subtype,
            clarifying_question=chosen.clarifying_question, clarification=chosen.clarification,
            alternatives=chosen.alternatives, hidden=chosen.hidden))
    stats = {
        "source": SPLIT_SOURCES[split], **{k: st[k] for k in ("questions", "skipped_missing_db", "skipped_gold_error",
                                                              "answer", "clarify", "no_ambiguity")},
        "conversations": st["answer"] + st["clarify"], "missing_dbs": sorted(missing_dbs),
        "types": dict(types), "subtypes": dict(sorted(subtypes.items())),
    }
    return examples, stats


def _first_ambiguity(deriver: Deriver, dbs: Databases, src: Source, schema: Schema, gold: sqlexec.ExecResult,
                     types: Counter, rng: random.Random) -> Candidate | None:
    """The first verified candidate, trying the least-used ambiguity type first (balance) and
    its templates in a seeded order; None when the question has no ambiguity to make."""
    try:
        q = parse(src.sql, schema)
    except Exception:  # pragma: no cover - parser gaps only cost a candidate
        return None
    for typ in sorted(TYPES, key=lambda t: (types[t], rng.random())):
        fns = deriver.templates(typ)
        rng.shuffle(fns)
        for fn in fns:
            for cand in fn(src, q, schema):
                chosen = verify(dbs, src.db_id, src.sql, gold, cand, src.question)
                if chosen:
                    return chosen
    return None


DEV_FRACTION = 0.12


def dev_databases(db_ids: Iterable[str], seed: int = 0, fraction: float = DEV_FRACTION) -> set[str]:
    """The databases of the `dev` split: a seeded ~`fraction` of the train databases (by db_id).

    Why by database: Spider's test split has databases training never saw; a dev split drawn from
    training questions on *trained* databases would overstate what carries over. Carved at load
    time from the built `train` examples (the built file is unchanged), so `train` + `dev` is the
    old `train` and no database is in both."""
    dbs = sorted(set(db_ids))
    if fraction <= 0 or len(dbs) < 2:
        return set()
    k = min(len(dbs) - 1, max(1, round(fraction * len(dbs))))
    return set(random.Random(f"ambigsql-dev-{seed}").sample(dbs, k))


def input_fingerprint(spider_dir: str | os.PathLike, seed: int, splits: Iterable[str] = ("train", "test"),
                      limit: int | None = None) -> str:
    """Hash of the builder version, options and inputs (source files, tables.json, db list)."""
    spider_dir = Path(spider_dir)
    h = hashlib.sha256(f"{FORMAT}:{BUILDER_VERSION}:{seed}:{sorted(splits)}:{limit}".encode())
    for name in ("tables.json", *sorted(SPLIT_SOURCES.values())):
        h.update(name.encode())
        h.update(hashlib.sha256((spider_dir / name).read_bytes()).digest())
    db_dir = spider_dir / "database"
    for p in sorted(db_dir.glob("*/*.sqlite")):
        st = p.stat()
        h.update(f"{p.relative_to(db_dir)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


def save(report: BuildReport, out: str | os.PathLike, fingerprint: str = "") -> Path:
    """Write the dataset as one JSON file (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": BUILDER_VERSION, "fingerprint": fingerprint, "stats": report.stats,
           "schemas": report.schemas, "examples": [asdict(e) for e in report.examples]}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out)
    return out


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A dataset file; a corrupt one is a `DataError` naming the file and where."""
    from simkit.datafile import DataError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{path} is not an AmbigSQL dataset (format={fmt!r})")
    for key, kind in (("examples", list), ("schemas", dict), ("stats", dict)):
        if not isinstance(doc.get(key), kind):
            raise DataError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return doc


def cache_dir() -> Path:
    return Path(os.environ.get("SIMKIT_CACHE_DIR") or Path.home() / ".cache" / "simkit")


def build_cached(spider_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The dataset file for these inputs and seed, built once and cached under
    $SIMKIT_CACHE_DIR (default ~/.cache/simkit)."""
    fp = input_fingerprint(spider_dir, seed)
    path = cache_dir() / f"ambigsql-{fp}.json"
    if not path.is_file():
        save(build(spider_dir, seed), path, fp)
    return path


# --------------------------------------------------------------------------- reporting
def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"AmbigSQL build (seed {stats.get('seed')}, {stats.get('build_seconds', '?')} s, "
             f"{stats.get('queries_executed', '?')} queries executed)"]
    head = f"{'split':6s} {'questions':>9s} {'missing-db':>10s} {'gold-err':>8s} {'ANSWER':>7s} {'CLARIFY':>7s} " \
           f"{'info':>6s} {'popul':>6s} {'present':>7s}"
    lines.append(head)
    for split, s in stats["splits"].items():
        t = s["types"]
        lines.append(f"{split:6s} {s['questions']:9d} {s['skipped_missing_db']:10d} {s['skipped_gold_error']:8d} "
                     f"{s['answer']:7d} {s['clarify']:7d} {t.get('information', 0):6d} {t.get('population', 0):6d} "
                     f"{t.get('presentation', 0):7d}")
    for split, s in stats["splits"].items():
        sub = ", ".join(f"{k.split('/')[1]}={v}" for k, v in s["subtypes"].items())
        lines.append(f"  {split} subtypes: {sub}")
        if s["missing_dbs"]:
            lines.append(f"  {split} missing databases: {', '.join(s['missing_dbs'])}")
        if s.get("sql_fixes"):
            lines.append(f"  {split} MySQL->SQLite fixes: {s['sql_fixes']}")
    return "\n".join(lines)


def format_example(e: dict[str, Any]) -> str:
    if e["gold_action"] == "ANSWER":
        return f"[{e['id']}] ANSWER ({e['db_id']})\n  User: {e['question']}\n  Gold: {e['gold_sql']}"
    return (f"[{e['id']}] CLARIFY {e['ambiguity']}/{e['subtype']} ({e['db_id']})\n"
            f"  User: {e['question']}\n  Assistant: {e['clarifying_question']}\n  User: {e['clarification']}\n"
            f"  Gold: {e['gold_sql']}\n  Original: {e['original_question']}\n"
            + "".join(f"  Alternative: {a}\n" for a in e["alternatives"])).rstrip()


def sample_examples(examples: list[dict[str, Any]], k: int, seed: int = 0) -> list[dict[str, Any]]:
    """k examples for printing: one of each ambiguity type first, then an unambiguous one."""
    rng = random.Random(f"show-{seed}")
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in examples:
        by_type[e["ambiguity"]].append(e)
    out: list[dict[str, Any]] = []
    order = [*TYPES, "none"]
    while len(out) < k and any(by_type[t] for t in order):
        for t in order:
            if by_type[t] and len(out) < k:
                out.append(by_type[t].pop(rng.randrange(len(by_type[t]))))
    return out


# --------------------------------------------------------------------------- LLM rewriting
async def rewrite_with_llm(examples: list[Example], client: Any, model: str | None = None,
                           concurrency: int = 16) -> int:
    """Optional: let an LLM polish the wording of ambiguous questions (prompt
    `prompts/ambigsql/build/rewrite_question.txt`). A rewrite is kept only if it is a single short
    question that still hides every hidden term; returns how many were kept."""
    import asyncio

    from simkit import prompts
    sem = asyncio.Semaphore(concurrency)
    kept = 0

    async def one(e: Example) -> None:
        nonlocal kept
        prompt = prompts.render("build/rewrite_question", env="ambigsql", question=e.question,
                                original=e.original_question, clarifying_question=e.clarifying_question or "")
        async with sem:
            try:
                reply = await client.complete([{"role": "user", "content": prompt}], model=model,
                                              temperature=0.0, max_tokens=96)
            except Exception:
                return
        text = reply.text.strip().strip('"').splitlines()[0].strip() if reply.text.strip() else ""
        if (not text or len(text) > 3 * len(e.question) + 40 or "select " in text.lower()
                or any(_mentions(text, h) for h in e.hidden if h) or text.lower() == e.original_question.lower()):
            return
        e.question, e.rewritten = text, True
        kept += 1

    await asyncio.gather(*(one(e) for e in examples if e.gold_action == "CLARIFY"))
    return kept
