"""`simkit serve --workers N [--shard I/S]`: N serve processes, each with its own event loop.

Why processes: one serve process is bound by one core (JSON, HTTP, scoring); N processes scale
with cores while the queue (SQLite with busy-retries, or Redis) takes their appends.

Partition: host shard I of S runs workers with global indices g = I*N + i (i < N) out of
G = S*N, and worker g takes the tasks at indices g, g+G, g+2G, ... of the seeded conversation
sample (the same sample on every host: same --seed, --n-conversations, data). So hosts x workers
partition the tasks globally with no overlap; pair ids are deterministic per (task, epoch), so
even a mistake would be caught by the queue's de-duplication. Every host must run the same
--workers (recorded in RUN_DIR/workers.json; a different layout on an old run dir is refused).

Each worker is an ordinary single-process serve with its own run directory RUN_DIR/worker-g
(state.json watermark, dpref.jsonl, metrics.jsonl), so resume is per worker. The parent only
supervises: it aggregates the workers' latest metrics rows into one status line and
RUN_DIR/metrics.jsonl (`status.aggregate`, which makes each worker's own row too), and restarts
a worker that dies (kill -9, OOM, crash) — it resumes from its own watermark — after a backoff (0.5 s, doubling) up to `max_restarts` times per worker;
beyond that the parent stops the others and exits 1. A worker that exits 0 (its --max-episodes / --max-epochs reached) is done.
A worker that exits 75 waited out a whole queue outage (--queue-outage-s): the queue is down for
every worker alike, so the parent stops them all and exits 75 with what to do (run it again).
SIGINT / SIGTERM are forwarded; the parent exits when every worker has.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simkit.queue.outage import QueueUnavailable
from simkit.serving.shard import parse_shard, split_budget
from simkit.serving.status import StatusReporter, aggregate

QUEUE_DOWN = QueueUnavailable.exit_code  # a worker's exit code after a whole queue outage


def last_row(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a metrics file (a worker may be mid-append)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().split(b"\n")[:-1]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _worker_main(cfg_json: str, parent_pid: int) -> None:
    """Child process entry: one ordinary serve with its slice of the tasks."""
    from simkit.procs import die_with_parent

    # a worker must not outlive its parent (kill -9 of the parent alone would leave it running beside
    # the restarted parent's new worker on the same state file): the kernel sends it SIGTERM (serve's
    # clean stop: flush, save the watermark) when the parent dies
    die_with_parent(parent_pid)

    import asyncio

    from simkit.serving.config import ServeConfig
    from simkit.serving.serve import serve

    cfg = ServeConfig.model_validate_json(cfg_json)
    try:
        asyncio.run(serve(cfg, quiet=True))
    except QueueUnavailable as e:  # waited out the whole window: tell the parent, no traceback
        print(f"simkit serve: {e}", file=sys.stderr, flush=True)
        sys.exit(QUEUE_DOWN)
    except SystemExit as e:
        if e.code not in (None, 0):
            print(e.code if isinstance(e.code, str) else f"exit {e.code}", file=sys.stderr, flush=True)
            sys.exit(1)


@dataclass
class _Worker:
    index: int  # global index g
    cfg_json: str
    run_dir: Path
    proc: mp.Process | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    done: bool = False
    restart_at: float | None = None  # monotonic time of a pending restart (backoff)


class WorkerPool:
    """Start, watch, restart and aggregate the worker processes of one serve host."""

    def __init__(self, cfg: Any, max_restarts: int = 5, poll_s: float = 0.5, backoff_s: float = 0.5):
        self.cfg, self.max_restarts, self.poll_s, self.backoff_s = cfg, max_restarts, poll_s, backoff_s
        self.run_dir = Path(cfg.run_dir)
        self.shard, self.shards = parse_shard(cfg.shard)
        self.total = self.shards * cfg.workers
        self.ctx = mp.get_context("spawn")  # fresh interpreters: no inherited event loop or sockets
        self.stopping = False
        self.workers = [self._worker(self.shard * cfg.workers + i) for i in range(cfg.workers)]
        self.reporter = StatusReporter(self.run_dir / "metrics.jsonl", self.snapshot)
        self.failed: str | None = None
        self.exit_code = 1  # when failed

    def _worker(self, g: int) -> _Worker:
        run_dir = self.run_dir / f"worker-{g}"
        cfg = self.cfg.model_copy(update={
            "workers": 1, "shard": f"{g}/{self.total}", "run_dir": str(run_dir),
            "max_episodes": split_budget(self.cfg.max_episodes, g, self.total)})
        return _Worker(g, cfg.model_dump_json(), run_dir)

    def _check_layout(self) -> None:
        path = self.run_dir / "workers.json"
        layout = {"workers": self.cfg.workers, "shards": self.shards, "seed": self.cfg.seed,
                  "n_conversations": self.cfg.n_conversations}
        if path.exists():
            old = json.loads(path.read_text())
            if old != layout:
                raise SystemExit(f"simkit serve: {self.run_dir} was run with {old}; resuming it needs the same "
                                 f"--workers / --shard / --seed / --n-conversations (got {layout}), or a new --run-dir")
        path.write_text(json.dumps(layout))

    def _start(self, w: _Worker) -> None:
        w.run_dir.mkdir(parents=True, exist_ok=True)
        w.proc = self.ctx.Process(target=_worker_main, args=(w.cfg_json, os.getpid()), name=f"serve-worker-{w.index}",
                                  daemon=False)
        w.proc.start()
        (w.run_dir / "pid").write_text(f"{w.proc.pid}\n")  # for operators (and the kill tests)

    def snapshot(self) -> dict[str, Any]:
        rows = [r for w in self.workers if (r := last_row(w.run_dir / "metrics.jsonl")) is not None]
        out = aggregate(rows)
        out.update(workers=len(self.workers), shard=self.cfg.shard,
                   alive=sum(1 for w in self.workers if w.proc is not None and w.proc.is_alive()),
                   worker_restarts=sum(w.restarts for w in self.workers),
                   worker_exits={str(w.index): w.exits for w in self.workers if w.exits})
        return out

    def _forward(self, signum: int, frame: Any = None) -> None:
        self.stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.is_alive():
                os.kill(w.proc.pid, signal.SIGTERM)

    def _reap(self, w: _Worker) -> None:
        """A worker has exited: done (0, or any exit while stopping), restarted, or the pool fails."""
        assert w.proc is not None
        code = w.proc.exitcode if w.proc.exitcode is not None else -1
        w.proc.close()
        w.proc = None
        if code == 0 or self.stopping:
            w.done = True
            return
        w.exits.append(code)
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if code == QUEUE_DOWN:
            self.failed = (f"worker {w.index} stopped: the queue stayed unreachable for --queue-outage-s "
                           f"({self.cfg.queue_outage_s:.0f}s); start it again, then run the same command (it resumes)")
            self.exit_code = QUEUE_DOWN
            print(f"simkit serve: {self.failed}", file=sys.stderr, flush=True)
            self._forward(signal.SIGTERM)
            w.done = True
            return
        if w.restarts >= self.max_restarts:
            self.failed = f"worker {w.index} died {len(w.exits)} times (last: {reason}); giving up"
            print(f"simkit serve: {self.failed}", file=sys.stderr, flush=True)
            self._forward(signal.SIGTERM)
            w.done = True
            return
        w.restarts += 1
        delay = self.backoff_s * 2 ** (w.restarts - 1)  # a worker failing at start-up must not spin
        w.restart_at = time.monotonic() + delay
        print(f"simkit serve: worker {w.index} {reason}; restarting it in {delay:.1f}s ({w.restarts}/"
              f"{self.max_restarts}), it resumes from {w.run_dir / 'state.json'}", file=sys.stderr, flush=True)

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_layout()
        (self.run_dir / "config.json").write_text(self.cfg.model_dump_json(indent=2))
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for w in self.workers:
                self._start(w)
            while not all(w.done for w in self.workers):
                for w in self.workers:
                    if w.proc is not None and not w.proc.is_alive():
                        self._reap(w)
                    elif w.restart_at is not None and (self.stopping or time.monotonic() >= w.restart_at):
                        w.restart_at = None
                        if self.stopping:
                            w.done = True
                        else:
                            self._start(w)
                self.reporter.tick()
                self.reporter.write_metrics()
                time.sleep(self.poll_s)
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
            for w in self.workers:  # an exception here must not leave orphans
                if w.proc is not None and w.proc.is_alive():
                    w.proc.terminate()
                    w.proc.join(30)
        self.reporter.write_metrics(final=True)
        self.reporter.close()
        return self.exit_code if self.failed else 0
