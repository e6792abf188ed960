"""The parts `simkit serve` wires together, one job each:

- `cursor.TaskCursor`: which (epoch, position) runs next, the resume watermark and its state
  file, and in-process retries of transient failures (the watermark always advances);
- `sink.PairSink`: one append to the queue (journalled; plus optional trajectories), the
  back-pressure wait on its depth, and the resume check that re-appends what the queue lost;
- `follower.VersionFollower`: the one holder of the policy version: follows the trainer's
  published version and switches the policy, which asks it to stamp each turn;
- `status.StatusReporter`: the live status line and `metrics.jsonl`, from rows that
  `status.aggregate` makes (a worker's own, or a host's sum);
- `shard`, `config`, `serve` (the wiring), `workers` (`--workers`) and `cli` (the command).
"""
from simkit.serving.cursor import Slot, TaskCursor
from simkit.serving.follower import VersionFollower
from simkit.serving.sink import PairSink
from simkit.serving.status import StatusReporter

__all__ = ["PairSink", "Slot", "StatusReporter", "TaskCursor", "VersionFollower"]
