"""Per-step metrics to RUN_DIR/metrics.jsonl and TensorBoard (RUN_DIR/tb).

Every line has `event` ("step", "commit", "publish", "resume", "summary", ...) and `time`;
step lines also have `step` and whatever the trainer logged (loss, rewards/*, logps/*, ...), and
the step's pair mix: `pairs/action` and `pairs/content` (pairs whose sides take different actions
/ the same one) with `rewards/margins_action` or `rewards/margins_content` when the step trained
only that kind. TRL logs one margin per step (the batch mean, from `DPOTrainer.get_batch_loss_metrics`),
so per-kind margins of mixed steps are estimated later (`simkit.act.pairstats.margins_by_kind`); exact
per-pair margins would need a hook in trainer/dpo.py (see `kind_logs`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("trainer")
_SHOWN = (("loss", "loss", ".4f"), ("rewards/margins", "margin", ".4f"), ("rewards/accuracies", "acc", ".2f"),
          ("mean_token_accuracy", "tok_acc", ".2f"), ("pairs_per_s", "pairs/s", ".1f"),
          ("policy_version", "v", "d"), ("staleness_mean", "stale", ".2f"), ("queue_depth", "depth", "d"))


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(str(self.run_dir / "tb"), flush_secs=10)

    def _tb_write(self, step: int, metrics: dict[str, Any]) -> None:
        """One TensorBoard event per step holding every scalar (far cheaper than one per scalar)."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k if "/" in k else f"train/{k}", simple_value=float(v))
                  for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def event(self, event: str, **fields: Any) -> None:
        row = {"event": event, "time": round(time.time(), 3), **fields}
        self._f.write(json.dumps(row, default=str) + "\n")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.event("step", step=step, **metrics)
        if self._tb is not None:
            self._tb_write(step, metrics)

    def flush(self) -> None:
        self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        self._f.close()
        if self._tb is not None:
            self._tb.close()


class MetricsCallback(TrainerCallback):
    """Trainer logs → MetricsWriter. Training-step logs (with `loss`) become step rows; the final
    train() summary (train_runtime, ...) becomes a summary row."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            logs.update(kind_logs(kwargs.get("train_dataloader"), logs))
            self.writer.step(state.global_step, logs)
            shown = " ".join(f"{name} {int(logs[k]) if fmt == 'd' else format(logs[k], fmt)}"
                             for k, name, fmt in _SHOWN if isinstance(logs.get(k), (int, float)))
            log.info("step %d/%d %s", state.global_step, state.max_steps, shown)
        elif logs:
            self.writer.event("summary", step=state.global_step, **logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.writer.flush()


def kind_logs(dataloader: Any, logs: dict[str, Any]) -> dict[str, Any]:
    """The step's pair mix from the collator's tally (trainer/data.py `PairCollator.drain_kinds`),
    and the batch margin filed under its kind when the step trained one kind only."""
    collate = getattr(dataloader, "collate_fn", None)
    if not hasattr(collate, "drain_kinds"):
        return {}
    kinds = collate.drain_kinds()
    a, c = kinds.get("action", 0), kinds.get("content", 0)
    out: dict[str, Any] = {"pairs/action": a, "pairs/content": c}
    if kinds.get("unknown"):
        out["pairs/unknown_kind"] = kinds["unknown"]
    margin = logs.get("rewards/margins")
    if isinstance(margin, (int, float)) and a + c and not kinds.get("unknown"):
        if c == 0:
            out["rewards/margins_action"] = margin
        elif a == 0:
            out["rewards/margins_content"] = margin
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a trainer run directory?")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows
