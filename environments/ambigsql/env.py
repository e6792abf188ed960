"""`ambigsql`: clarify-or-answer text-to-SQL over Spider databases (ACT's AmbigSQL, rebuilt).

    env = simkit.make("ambigsql")                 # builds the data on first use, then caches it
    env = simkit.make("ambigsql", path="ambigsql.json")   # a file from `simkit data build-ambigsql`

Splits: `train` (Spider-train questions from spiderman_train_queries.csv), `dev` (the train
questions of a fixed, seeded ~12% of the train databases, `build.dev_databases`: database-disjoint
from `train`, for choosing settings without touching test; `dev_fraction=0` turns it off) and
`test` (Spider dev). Each task's prompt is one user message with the database schema and the question.
Gold action CLARIFY: reference = the clarifying question, user_reply = the user's answer;
ANSWER: reference = the gold SQL. goal = the gold SQL of the disambiguated question.

Scores (execution match; `exec_match="official"`, the default, is Spider's test-suite evaluator
exactly, `"strict"` the older stricter rule; see `sqlexec` and `spider_eval`):
* `score` (trajectory level): 1.0 if the SQL in the final answer has the same result as the
  goal SQL on the task's database, else 0.0. Averaged over tasks whose gold action is
  CLARIFY this is ACT's Post-Clarify Execution Match. success_threshold = 1.0.
* `turn_score` (first response only): gold ANSWER -> execution match of the first
  response; gold CLARIFY -> 1.0 when the first response asks (contains no SQL and reads as
  a clarifying question by the offline rule classifier), 0.0 when it commits to SQL — even
  SQL that happens to match (a guess is the wrong turn, whatever its luck). Execution match
  cannot compare a question with the gold continuation (question, reply, SQL), so here the
  continuation form and `turn_score_question_only` are the same number; the paper reports
  no turn-level AmbigSQL score.

All SQL from the policy is untrusted and runs in sandboxed worker processes off the event
loop (`sqlexec.SQLRunner`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from simkit import prompts
from simkit.roles.agents import RuleClassifier
from simkit.datafile import DataError, data_file, each
from simkit.env import Env, EnvConfig, register
from simkit.types import ANSWER, CLARIFY, Message, Task

from . import build as builder
from .sqlexec import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, SQLRunner, extract_sql

log = logging.getLogger(__name__)

_DESCRIPTIONS = {
    "information": "which attribute, value or threshold the user means (SELECT / WHERE)",
    "population": "which table or group of records the user means (FROM)",
    "presentation": "how the results should be ordered, grouped or limited (ORDER BY / GROUP BY / LIMIT)",
}


class AmbigSQLConfig(EnvConfig):
    path: Path | None = Field(None, description="dataset file from `simkit data build-ambigsql` (built there if missing)")
    spider_dir: Path | None = Field(None, description="Spider folder (default DATA_DIR/spider)")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, description="time limit of one SQL execution")
    max_rows: int = Field(DEFAULT_MAX_ROWS, ge=1, description="rows kept from one SQL execution")
    sql_workers: int | None = Field(None, ge=1, description="sandbox worker processes (default: CPU count)")
    isolation: Literal["process", "thread"] = Field("process", description="where policy SQL runs")
    dev_fraction: float = Field(builder.DEV_FRACTION, ge=0, lt=1,
                                description="share of the train databases (by db_id) moved to the dev split")
    exec_match: Literal["official", "strict"] = Field(
        "official", description="official: Spider's test-suite evaluator exactly (DISTINCT removed, first statement "
                                "only, order matters iff the gold has 'order by'); strict: DISTINCT and every "
                                "statement count, order only for a top-level ORDER BY")


@register("ambigsql")
class AmbigSQLEnv(Env):
    success_threshold = 1.0
    metric_name = "Exec Match"
    Config = AmbigSQLConfig

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        c = self.config
        self.spider_dir = c.spider_dir or self.data_dir / "spider"
        self.path = c.path
        self.runner = SQLRunner(workers=c.sql_workers, timeout_s=c.timeout_s, max_rows=c.max_rows,
                                isolation=c.isolation)
        self._doc: dict[str, Any] | None = None

    # -------------------------------------------------------------- data
    def dataset_path(self) -> Path:
        """The dataset file: `path=` (built there if missing) or the cached build."""
        if self.path is not None:
            if not self.path.is_file():
                fp = builder.input_fingerprint(self.spider_dir, self.seed)
                builder.save(builder.build(self.spider_dir, self.seed), self.path, fp)
            return self.path
        if self.config.spider_dir is None:
            data_file(self.data_dir, Path("spider") / "tables.json", "Spider data")
        elif not (self.spider_dir / "tables.json").is_file():
            raise FileNotFoundError(f"Spider data not found in {self.spider_dir} (spider_dir= must hold tables.json)")
        return builder.build_cached(self.spider_dir, self.seed)

    @property
    def dataset(self) -> dict[str, Any]:
        if self._doc is None:
            path = self._doc_path = self.dataset_path()
            log.info("ambigsql: loading %s", path)
            self._doc = builder.load(path)
        return self._doc

    def load_splits(self) -> dict[str, list[Task]]:
        """`train`, `dev` (carved from train), `test`; built or read on first use."""
        doc = self.dataset
        out: dict[str, list[Task]] = {s: [] for s in doc["stats"].get("splits", [])}

        def task_of(e: dict[str, Any]) -> Task:
            schema = doc["schemas"].get(e["db_id"])
            if not isinstance(schema, str):
                raise DataError(f"db_id {e['db_id']!r} has no schema in the file")
            if not isinstance(e["split"], str):
                raise DataError(f"split {e['split']!r} is not a name")
            return self._task(e, schema)

        # the built file is one JSON line: a bad example is named by its index
        for task in each(self._doc_path, [(1, e) for e in doc["examples"]], task_of):
            out.setdefault(task.meta["split"], []).append(task)
        return self._carve_dev(out)

    def _carve_dev(self, out: dict[str, list[Task]]) -> dict[str, list[Task]]:
        """Move the train tasks of the dev databases to `dev`; split order train, dev, test, ..."""
        dev_dbs = builder.dev_databases((t.meta["db_id"] for t in out.get("train", [])), self.seed,
                                        self.config.dev_fraction)
        if not dev_dbs:
            return out
        train = out["train"]
        dev = [t.model_copy(update={"meta": {**t.meta, "split": "dev"}}) for t in train if t.meta["db_id"] in dev_dbs]
        carved = {"train": [t for t in train if t.meta["db_id"] not in dev_dbs], "dev": dev}
        return {**carved, **{k: v for k, v in out.items() if k not in carved}}

    def _task(self, e: dict[str, Any], schema_text: str) -> Task:
        content = prompts.render("policy/user_prompt", env=self.name, schema=schema_text, question=e["question"])
        clarify = e["gold_action"] == "CLARIFY"
        grounding: dict[str, Any] = {"intent": e["disambiguated_question"]}
        if clarify:
            grounding["clarification"] = e["clarification"]
            grounding["ambiguity"] = _DESCRIPTIONS.get(e["ambiguity"], e["ambiguity"])
        return Task(
            id=e["id"], env=self.name, prompt=[Message(role="user", content=content)],
            reference=e["clarifying_question"] if clarify else e["gold_sql"],
            gold_action=CLARIFY if clarify else ANSWER, goal=e["gold_sql"],
            user_reply=e["clarification"] if clarify else None, grounding=grounding,
            meta={"db_id": e["db_id"], "ambiguity": e["ambiguity"], "subtype": e["subtype"],
                  "alternatives": e["alternatives"], "question": e["question"],
                  "original_question": e["original_question"], "source": e["source"], "split": e["split"]},
        )

    def stats(self) -> dict[str, Any]:
        """The builder's stats report (counts per split and ambiguity type, skipped questions)."""
        return self.dataset["stats"]

    def db_path(self, db_id: str) -> Path:
        return self.spider_dir / "database" / db_id / f"{db_id}.sqlite"

    # -------------------------------------------------------------- scoring
    async def exec_match(self, text: str, gold_sql: str, db_id: str) -> float:
        """1.0 if the SQL in `text` executes to the same result as `gold_sql`."""
        sql = extract_sql(text)
        if not sql:
            return 0.0
        match = await self.runner.exec_match(self.db_path(db_id), sql, gold_sql, self.config.exec_match)
        return 1.0 if match else 0.0

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        return await self.exec_match(prediction, str(target), task.meta["db_id"])

    async def turn_score(self, text: str, task: Task) -> float:
        if task.gold_action == CLARIFY:
            asks = extract_sql(text) is None and RuleClassifier.classify_sync(text) == CLARIFY
            return 1.0 if asks else 0.0
        return await self.exec_match(text, str(task.goal), task.meta["db_id"])

    async def turn_score_question_only(self, text: str, task: Task) -> float:
        return await self.turn_score(text, task)

    async def aclose(self) -> None:
        self.runner.close()
