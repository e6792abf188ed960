"""Spider schemas (`tables.json`): lookup, natural-language names and the compact
CREATE-like text shown to the policy."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IRREGULAR = {"person": "people", "child": "children", "man": "men", "woman": "women", "staff": "staff",
              "faculty": "faculty", "information": "information", "equipment": "equipment", "data": "data",
              "series": "series", "species": "species", "mouse": "mice", "foot": "feet", "tooth": "teeth"}
_IRREGULAR_SINGULAR = {v: k for k, v in _IRREGULAR.items()}


def pluralize(word: str) -> str:
    """English plural of the last word of a phrase ("home town" -> "home towns")."""
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        p = _IRREGULAR[low]
    elif low in _IRREGULAR_SINGULAR or (low.endswith("s") and not low.endswith(("ss", "us", "is"))):
        p = low  # already plural
    elif re.search(r"[^aeiou]y$", low):
        p = low[:-1] + "ies"
    elif re.search(r"(s|x|z|ch|sh)$", low):
        p = low + "es"
    else:
        p = low + "s"
    return f"{head} {p}".strip()


def singularize(word: str) -> str:
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR_SINGULAR:
        s = _IRREGULAR_SINGULAR[low]
    elif low.endswith("ies") and len(low) > 4:
        s = low[:-3] + "y"
    elif re.search(r"(ss|x|z|ch|sh)es$", low):
        s = low[:-2]
    elif low.endswith("s") and not low.endswith(("ss", "us", "is")):
        s = low[:-1]
    else:
        s = low
    return f"{head} {s}".strip()


def word_forms(name: str) -> list[str]:
    """Singular and plural forms of a natural name, longest first."""
    n = " ".join(name.lower().split())
    return sorted({n, pluralize(n), singularize(n)}, key=len, reverse=True)


def quote_ident(name: str) -> str:
    from .sqlexec import SQLITE_KEYWORDS

    if _IDENT_RE.match(name) and name.upper() not in SQLITE_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Column:
    table: str  # original table name
    name: str  # original column name
    natural: str  # natural-language name from tables.json ("home town")
    type: str  # text | number | time | boolean | others
    primary: bool = False
    foreign: bool = False

    @property
    def is_id(self) -> bool:
        n = self.natural.lower()
        return self.primary or self.foreign or n == "id" or n.endswith(" id") or n.endswith(" code")


@dataclass
class Table:
    name: str
    natural: str
    columns: list[Column] = field(default_factory=list)

    def column(self, name: str) -> Column | None:
        low = name.lower()
        return next((c for c in self.columns if c.name.lower() == low), None)


@dataclass
class Schema:
    db_id: str
    tables: list[Table]
    foreign_keys: list[tuple[Column, Column]]

    def table(self, name: str) -> Table | None:
        low = name.lower()
        return next((t for t in self.tables if t.name.lower() == low), None)

    def text(self) -> str:
        """Compact CREATE-like schema: one line per table, with keys."""
        lines = []
        for t in self.tables:
            parts = [f"{quote_ident(c.name)} {c.type}" for c in t.columns]
            pk = [quote_ident(c.name) for c in t.columns if c.primary]
            if pk:
                parts.append(f"PRIMARY KEY ({', '.join(pk)})")
            for a, b in self.foreign_keys:
                if a.table == t.name:
                    parts.append(f"FOREIGN KEY ({quote_ident(a.name)}) REFERENCES {quote_ident(b.table)}({quote_ident(b.name)})")
            lines.append(f"CREATE TABLE {quote_ident(t.name)} ({', '.join(parts)});")
        return "\n".join(lines)


def _table_natural(original: str, natural: str) -> str:
    """tables.json's natural name, except where it is plainly wrong (store_1 swaps `artists`
    and `sqlite_sequence`): then the original name with spaces."""
    if ("sqlite" in natural.lower()) != original.lower().startswith("sqlite"):
        return original.replace("_", " ").lower()
    return natural


def load_schemas(tables_json: str | Path) -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for entry in json.loads(Path(tables_json).read_text(encoding="utf-8")):
        tables = [Table(name=o, natural=_table_natural(o, n))
                  for o, n in zip(entry["table_names_original"], entry["table_names"])]
        cols: list[Column | None] = []
        pks = set(entry["primary_keys"] if isinstance(entry["primary_keys"], list) else [])
        pks = {p for x in pks for p in (x if isinstance(x, list) else [x])}
        fk_cols = {i for pair in entry["foreign_keys"] for i in pair[:1]}
        for i, ((ti, orig), (_, nat), typ) in enumerate(zip(entry["column_names_original"], entry["column_names"],
                                                             entry["column_types"])):
            if ti < 0:
                cols.append(None)
                continue
            c = Column(table=tables[ti].name, name=orig, natural=nat, type=typ, primary=i in pks, foreign=i in fk_cols)
            tables[ti].columns.append(c)
            cols.append(c)
        fks = [(cols[a], cols[b]) for a, b in entry["foreign_keys"] if cols[a] is not None and cols[b] is not None]
        out[entry["db_id"]] = Schema(db_id=entry["db_id"], tables=tables, foreign_keys=fks)  # type: ignore[arg-type]
    return out
