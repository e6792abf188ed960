"""The `abgcoqa` environment: clarify-or-answer about a story, scored by embedding similarity.

H = cosine similarity (clipped to [0, 1]) of sentence embeddings (all-MiniLM-L6-v2, packaged
offline) between the final answer and the goal; the turn score compares the first response with
the reference response. The paper reports these similarities but names no tolerance; ours,
``success_threshold = 0.5``, was set on the data (tests/test_abgcoqa_similarity.py keeps it honest).
On the 130 ambiguous examples, a gold answer against another annotator's answer to the *same*
reading (447 pairs, the stand-in for "a correct answer") passes 0.5 in 76% of pairs, against the
answer to a *different* reading of the question (135 pairs, "a wrong guess") in 18%, against a
random other answer in 2%; 0.5 maximises the gap (Youden's J) among 0.4/0.5/0.6/0.7.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from simkit.env import Env, EnvConfig, register
from simkit.types import Task

from .loader import load_tasks
from .similarity import Embedder, get_embedder


class AbgCoqaConfig(EnvConfig):
    tune_fraction: float = Field(0.5, gt=0, lt=1, description="share of stories in the tuning pool")
    embedder: Any = Field(None, description="an Embedder object (default: all-MiniLM-L6-v2, loaded on first use)")
    embedder_path: str | None = Field(None, description="embedding model folder (default $SIMKIT_EMBEDDER_PATH)")


@register("abgcoqa")
class AbgCoqaEnv(Env):
    success_threshold = 0.5
    metric_name = "sim"
    Config = AbgCoqaConfig

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        c = self.config
        self._embedder: Embedder | None = c.embedder
        self._embedder_path = c.embedder_path

    @property
    def embedder(self) -> Embedder:
        """Created on first use, so listing splits never loads the model."""
        if self._embedder is None:
            self._embedder = get_embedder(self._embedder_path)
        return self._embedder

    def load_splits(self) -> dict[str, list[Task]]:
        return load_tasks(self.data_dir, self.config.tune_fraction)  # `tune`, `eval`

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        return await self.embedder.similarity(prediction, str(target))
