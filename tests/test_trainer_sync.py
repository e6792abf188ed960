"""The paper's sync schedule: publish every step and train each step only on pairs made by the
policy version in force — even pairs leased ahead of a publish are dropped, never trained.
In-process `trainer run --sync` on the tiny model, fed by a producer thread that keeps the queue
stocked with pairs stamped with the current queue version (as `simkit serve --sync` does)."""
import json
import threading
import time

import pytest

from simkit.queue import open_queue
from trainer.config import RunConfig
from trainer.dpo import DPORun
from trainer.metrics import read_metrics
from trainer.synthetic import toy_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sync_schedule_never_trains_on_a_pair_older_than_the_current_version(tiny_model, tmp_path):
    qpath = tmp_path / "q.db"
    made: dict[str, int] = {}  # pair id -> policy version that "made" it
    stop = threading.Event()

    def producer():
        q = open_queue(qpath)
        offset = 0
        try:
            while not stop.is_set():
                cur = q.current_version()
                v = cur.version if cur else 0
                if q.depth() < 6:
                    pairs = toy_pairs(2, version=v, offset=offset % 300, size=302)
                    offset += 2
                    made.update({p.id: p.policy_version for p in pairs})
                    q.append(pairs)
                time.sleep(0.01)
        finally:
            q.close()

    open_queue(qpath).close()
    t = threading.Thread(target=producer, daemon=True)
    t.start()
    cfg = RunConfig(queue=str(qpath), model=str(tiny_model), out=str(tmp_path / "run"), sync=True, max_steps=4,
                    batch_size=2, max_length=256, lr=1e-3, poll_s=0.05, idle_timeout_s=120, log_level="warning",
                    tensorboard=False, keep_checkpoints=1)
    assert (cfg.publish_every, cfg.max_staleness, cfg.commit_every) == (1, 0, 1)
    try:
        assert DPORun(cfg).main() == 0
    finally:
        stop.set()
        t.join(30)

    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["pairs"] == 2 for r in steps)
    assert all(r["staleness_max"] == 0 for r in steps)  # every step: only current-version pairs
    assert [r["policy_version"] for r in steps] == [0, 1, 2, 3]
    assert [p["version"] for p in rows if p["event"] == "publish"] == [1, 2, 3, 4]  # a version per step
    audit = [json.loads(line) for line in (tmp_path / "run" / "trained_pairs.jsonl").read_text().splitlines()]
    for row in audit:  # the version in force while training step k is k - 1
        assert {made[i] for i in row["pair_ids"]} == {row["step"] - 1}, row
    # the batch leased ahead of each publish was stale by the time it was due, and was dropped, not trained
    assert steps[-1]["stale_skipped"] >= 1


def test_sync_rejects_a_conflicting_async_setting():
    with pytest.raises(ValueError, match="sync"):
        RunConfig(queue="q", model="m", out="o", sync=True, publish_every=5)
    with pytest.raises(ValueError, match="sync"):
        RunConfig(queue="q", model="m", out="o", sync=True, max_staleness=2)
    c = RunConfig(queue="q", model="m", out="o")
    assert (c.sync, c.publish_every, c.max_staleness) == (False, 10, None)  # async stays the default


def test_serve_sync_preset():
    from simkit.serving.serve import ServeConfig

    s = ServeConfig(env="toy", queue="q", sync=True, concurrency=8)
    assert s.max_pending == 8
    a = ServeConfig(env="toy", queue="q", limit=5)
    assert (a.max_pending, a.n_conversations) == (4096, 5)
    with pytest.raises(ValueError, match="max_staleness"):  # one staleness setting: the trainer's
        ServeConfig(env="toy", queue="q", max_staleness=1)
