"""Reading env data files so that a bad row is named, not a stack trace from deep inside.

Why: a corrupt record (bad JSON, a missing field, a wrong type) used to surface as a KeyError or
TypeError in a prompt builder, with no hint of which file or row. Here every record keeps the line
it starts on, and `each` turns any failure on a record into a `DataError` naming file, line and
record index (the data sets are fixed benchmarks, so a bad row is an error, never a silent skip).

The helpers every env loader needs live here too, so each env does not repeat them: where the
data root is (`data_root`), a data file under it with a useful error when it is missing
(`data_file`), and a cached records reader (`cached_records`).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_DECODER = json.JSONDecoder()


class DataError(ValueError):
    """A data file that cannot be used, with the place: `path:line: record N: what`."""


def _ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _value(path: Path, text: str, i: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None


def _expect(path: Path, text: str, i: int, ch: str) -> int:
    i = _ws(text, i)
    if i >= len(text) or text[i] != ch:
        raise DataError(f"{path}:{_line(text, i)}: expected {ch!r}, found "
                        f"{text[i:i + 20]!r}" if i < len(text) else f"{path}: ends early (expected {ch!r})")
    return i + 1


def _array(path: Path, text: str, i: int) -> tuple[list[tuple[int, Any]], int]:
    """The elements of the array at text[i] == '[' with the line each starts on."""
    i = _expect(path, text, i, "[")
    out: list[tuple[int, Any]] = []
    i = _ws(text, i)
    if i < len(text) and text[i] == "]":
        return out, i + 1
    while True:
        i = _ws(text, i)
        line = _line(text, i)
        value, i = _value(path, text, i)
        out.append((line, value))
        i = _ws(text, i)
        if i < len(text) and text[i] == "]":
            return out, i + 1
        i = _expect(path, text, i, ",")


def read_records(path: str | Path, key: str | None = None) -> list[tuple[int, Any]]:
    """(line, record) for each record of a JSON file: a top-level array, or the array under the
    top-level `key` of an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if key is None:
        records, _ = _array(path, text, _ws(text, 0))
        return records
    i = _expect(path, text, 0, "{")
    while True:
        i = _ws(text, i)
        name, i = _value(path, text, i)
        i = _expect(path, text, i, ":")
        i = _ws(text, i)
        if name == key:
            if text[i:i + 1] != "[":
                raise DataError(f"{path}:{_line(text, i)}: {key!r} is not a list")
            return _array(path, text, i)[0]
        _, i = _value(path, text, i)
        i = _ws(text, i)
        if text[i:i + 1] == "}":
            raise DataError(f"{path}: no {key!r} list in the file")
        i = _expect(path, text, i, ",")


def each(path: str | Path, records: list[tuple[int, Any]], fn: Callable[[dict], T]) -> list[T]:
    """fn(record) for every record; any failure → DataError naming the file, line and record."""
    out = []
    for n, (line, rec) in enumerate(records):
        where = f"{path}:{line}: record {n}"
        try:
            if not isinstance(rec, dict):
                raise DataError(f"expected a JSON object, found {type(rec).__name__}")
            out.append(fn(rec))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except KeyError as e:
            raise DataError(f"{where}: missing field {e}") from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # pydantic's errors are ValueErrors
            msg = str(e).splitlines()
            raise DataError(f"{where}: wrong type or value: {' '.join(m.strip() for m in msg[:3])}") from None
    return out


# --------------------------------------------------------------------------- env data helpers
def data_root() -> Path:
    """Where task data lives: $SIMKIT_DATA_DIR, else ../shared/data next to the checkout."""
    env = os.environ.get("SIMKIT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_file(data_dir: str | Path, relpath: str | Path, what: str = "data") -> Path:
    """`data_dir/relpath`, resolved; missing -> FileNotFoundError that says what to set, since
    the usual cause is a data root pointing at the wrong folder."""
    path = Path(data_dir) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}: set SIMKIT_DATA_DIR (or data_dir=) to the folder "
                                f"holding {Path(relpath).as_posix()}")
    return path.resolve()


@functools.lru_cache(maxsize=8)
def _cached(path: str, key: str | None, mtime_ns: int, size: int) -> tuple[tuple[int, Any], ...]:
    return tuple(read_records(path, key))


def cached_records(path: str | Path, key: str | None = None) -> tuple[tuple[int, Any], ...]:
    """`read_records`, parsed once per file version: several envs (and several configs of one
    env) read the same large file. A file rewritten in place is read again (the key holds its
    modification time and size)."""
    st = Path(path).stat()
    return _cached(str(Path(path).resolve()), key, st.st_mtime_ns, st.st_size)
