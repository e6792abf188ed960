"""Serve's bookkeeping (issue 23): the journal recovery keeps pairs whose text holds line
separators other than "\\n", and a host's status counts queue-wide counters once, not once per
worker."""
from types import SimpleNamespace

from simkit.queue import AsyncPairQueue, open_queue
from simkit.serving import PairSink
from simkit.serving.workers import aggregate
from simkit.types import PreferencePair
from trainer.synthetic import toy_pairs


async def test_journal_recovery_keeps_pairs_with_unicode_line_separators(tmp_path):
    """JSON leaves U+0085 / U+2028 / U+2029 raw inside strings; `splitlines()` cut such a journal
    line in two and the recovery silently skipped the pair."""
    odd = ["next\u0085line", "line\u2028separator", "para\u2029graph", "carriage\rreturn", "crlf\r\nend"]
    pairs = [PreferencePair.model_validate({**p.model_dump(), "id": "", "chosen": [{"role": "assistant", "content": t}]})
             for p, t in zip(toy_pairs(5), odd)]  # the id follows the new content
    journal = tmp_path / "queued.jsonl"
    async with AsyncPairQueue(open_queue(tmp_path / "a.db")) as aq:
        await PairSink(aq, journal=journal).write([SimpleNamespace(pair=p) for p in pairs])
    raw = journal.read_bytes().decode()
    assert "\u0085" in raw and "\u2028" in raw  # written unescaped: the case that broke
    async with AsyncPairQueue(open_queue(tmp_path / "b.db")) as fresh:  # a queue that lost everything
        sink = PairSink(fresh, journal=journal)
        assert await sink.recover() == 5
        got = {p.id: p for p in (await fresh.lease(100)).pairs}
    assert set(got) == {p.id for p in pairs}
    assert sorted(got[p.id].chosen[0].content for p in pairs) == sorted(odd)


def test_queue_wide_counters_are_reported_once_per_host():
    """dropped_stale is the queue's counter: every worker reads the same number. Summed over 3
    workers it was tripled; per-worker counters (episodes, failures, outages) stay summed."""
    from simkit.serving.workers import QUEUE_KEYS, SUM_KEYS

    rows = [{"time": 10.0 + i, "episodes": 5, "failures": 1, "dropped_stale": 40 + i, "queue_depth": 7 + i,
             "queue_outages": 1, "queue_outage_s": 0.5, "version": 3} for i in range(3)]
    row = aggregate(rows)
    assert row["dropped_stale"] == 42 and row["queue_depth"] == 9  # the newest row's
    assert row["episodes"] == 15 and row["failures"] == 3 and row["queue_outages"] == 3
    assert row["queue_outage_s"] == 1.5 and not set(QUEUE_KEYS) & set(SUM_KEYS)
