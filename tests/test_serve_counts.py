"""Serve's bookkeeping (issue 23): the journal recovery keeps pairs whose text holds line
separators other than "\\n", a host's status counts queue-wide counters once, not once per
worker, and the sink's back-pressure (serve's one wait on the queue depth)."""
import asyncio
from types import SimpleNamespace

import pytest

from simkit.queue import AsyncPairQueue, open_queue
from simkit.serving import PairSink
from simkit.serving.status import QUEUE_KEYS, SUM_KEYS, aggregate
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
    rows = [{"time": 10.0 + i, "episodes": 5, "failures": 1, "dropped_stale": 40 + i, "queue_depth": 7 + i,
             "queue_outages": 1, "queue_outage_s": 0.5, "version": 3} for i in range(3)]
    row = aggregate(rows)
    assert row["dropped_stale"] == 42 and row["queue_depth"] == 9  # the newest row's
    assert row["episodes"] == 15 and row["failures"] == 3 and row["queue_outages"] == 3
    assert row["queue_outage_s"] == 1.5 and not set(QUEUE_KEYS) & set(SUM_KEYS)


def test_a_worker_row_and_a_host_row_come_from_one_function():
    """A worker's own counters and the pool's sum go through `aggregate`: the same ratios and
    rates (per second of each worker's own elapsed time, summed)."""
    own = {"time": 5.0, "elapsed_s": 4.0, "episodes": 8, "pairs": 6, "right_action": 6, "terminated": 4,
           "successes": 1, "version": 2, "queue_depth": 3}
    row = aggregate([own])
    assert (row["episodes_per_s"], row["pairs_per_s"], row["action_accuracy"], row["success_rate"]) == (2, 1.5, 0.75, 0.25)
    host = aggregate([row, {**row, "elapsed_s": 8.0, "version": 1}])
    assert host["episodes"] == 16 and host["episodes_per_s"] == 3 and host["action_accuracy"] == 0.75
    assert (host["version"], host["version_min"], host["queue_depth"], host["elapsed_s"]) == (2, 1, 3, 8.0)


async def test_sink_back_pressure_waits_until_the_trainer_drains_or_serve_stops(tmp_path):
    async with AsyncPairQueue(open_queue(tmp_path / "q.db")) as aq:
        sink = PairSink(aq)
        await sink.write([SimpleNamespace(pair=p) for p in toy_pairs(3)])
        assert sink.depth == 3 and await sink.wait_below(4, 0.01) == 3  # below the bound: no wait
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sink.wait_below(3, 0.01), 0.1)

        async def drain():
            await asyncio.sleep(0.05)
            await aq.ack(await aq.lease(2))

        d = asyncio.create_task(drain())
        assert await asyncio.wait_for(sink.wait_below(3, 0.01), 5) == 1
        await d
        stop = asyncio.Event()
        stop.set()
        assert await asyncio.wait_for(sink.wait_below(1, 0.01, stop), 5) == 1  # a signal ends the wait
