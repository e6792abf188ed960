"""The `pacific` environment: clarify-or-answer over financial reports, scored like ACT.

H (trajectory and turn score) is ACT's PACIFIC metric: DROP F1 with TAT-QA's number
normalisation (`tatqa_metric.pacific_f1`), tolerance epsilon = 0.9 (the authors' threshold).
The turn-level score compares the first response with the reference response r_i (for a CLARIFY
turn: the clarifying question). ``scale_aware=True`` additionally credits a bare number written in
another scale ("12,600,000" for "12.6 million"); off by default to match the authors.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from simkit.env import Env, EnvConfig, register
from simkit.types import Task

from .loader import load_tasks
from .tatqa_metric import pacific_f1


class PacificConfig(EnvConfig):
    tune_fraction: float = Field(0.5, gt=0, lt=1, description="share of dialogues in the tuning pool")
    scale_aware: bool = Field(False, description="TAT-QA scale-aware F1 (the authors' metric ignores scale)")


@register("pacific")
class PacificEnv(Env):
    success_threshold = 0.9
    metric_name = "F1"
    Config = PacificConfig

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.scale_aware = self.config.scale_aware

    def load_splits(self) -> dict[str, list[Task]]:
        return load_tasks(self.data_dir, self.config.tune_fraction)  # `tune`, `eval`

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        return pacific_f1(prediction, str(target), scale_aware=self.scale_aware)
