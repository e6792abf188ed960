"""The parts `simkit serve` wires together, one job each:

- `cursor.TaskCursor`: which (epoch, position) runs next, the resume watermark and its state
  file, and in-process retries of transient failures (the watermark always advances);
- `sink.PairSink`: one append to the queue (journalled; plus optional trajectories) and the
  resume check that re-appends what the queue lost;
- `follower.VersionFollower`: follows the trainer's published version and switches the policy;
  the policy stamps each turn with the version that wrote it;
- `status.StatusReporter`: the live status line and `metrics.jsonl`.
"""
from simkit.serving.cursor import Slot, TaskCursor
from simkit.serving.follower import VersionFollower
from simkit.serving.sink import PairSink
from simkit.serving.status import StatusReporter

__all__ = ["PairSink", "Slot", "StatusReporter", "TaskCursor", "VersionFollower"]
