"""Task partition over hosts x workers: which tasks a serve process takes, and its budget share.

Its own module so that the config (which checks `--shard`), the wiring and the worker pool all
use it without importing each other."""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/S' -> (I, S) with 0 <= I < S."""
    try:
        i, s = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/S (e.g. 0/2), not {text!r}") from None
    if not 0 <= i < s:
        raise ValueError(f"shard {text!r}: need 0 <= I < S")
    return i, s


def shard_of(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items at indices index, index+count, ... (a partition over index = 0..count-1)."""
    return list(items[index::count])


def split_budget(total: int | None, index: int, count: int) -> int | None:
    """An even share of a global episode budget (the first total % count shares get one more)."""
    if total is None:
        return None
    return total // count + (index < total % count)
