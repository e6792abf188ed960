"""`ServeConfig`: every setting of `simkit serve`, one default each (YAML, flags generated from it)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from simkit.act.pairs import Phase1Options
from simkit.engine import DEFAULT_CONCURRENCY
from simkit.roles.build import RolesConfig
from simkit.sampling import conversations_help
from simkit.serving.shard import parse_shard

ASYNC_MAX_PENDING = 4096


class ServeConfig(Phase1Options):
    """Everything `simkit serve` needs; loadable from YAML (`--config`), overridden by flags
    (generated from these fields by `simkit.config`).

    Schedules: the default is asynchronous (rollouts keep flowing while the trainer trains).
    `sync=True` is the paper's quasi-online schedule: bounded pending (`max_pending` defaults to
    `concurrency`), the version re-read before every episode; run `trainer run --sync` (publish
    every step, train only current-version pairs). Staleness is one setting, the trainer's
    `--max-staleness`, enforced when it leases: serve appends every pair it makes."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(description="environment name (see `simkit envs`)")
    queue: str = Field(description="the queue shared with `trainer run`: a SQLite path (sqlite:///path) or "
                                   "redis://host:6379/0?stream=act")
    split: str | None = Field(None, description="task split (default: the env's first split)")
    run_dir: str = Field("runs/serve", description="run directory: config, state, metrics.jsonl, dpref.jsonl")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    n_conversations: int | None = Field(
        None, ge=1, json_schema_extra={"flags": ["--n-conversations", "--n"], "metavar": "N"},
        description=conversations_help())
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="episodes in flight")
    max_pending: int | None = Field(
        None, ge=1, description="back-pressure: pause while the queue holds this many unacked pairs (default "
                                f"{ASYNC_MAX_PENDING}; with --sync: --concurrency; set it to the trainer's batch_size "
                                "x grad_accum to waste least)")
    sync: bool = Field(False, description="the paper's schedule: every trainer step trains only on pairs of the "
                                          "latest policy version (bounded pending, version re-read before each "
                                          "episode); pair it with `trainer run --sync`, which trains only "
                                          "current-version pairs. Off: asynchronous (rollouts never wait; the "
                                          "trainer's --max-staleness bounds what it trains)")
    ablation: Literal["none", "random-actions", "no-sampling", "no-simulation"] = Field(
        "none", description="ACT ablations: random-actions (a random label replaces the gold action and, where it "
                            "differs, the forced response for it wins over the reference); no-sampling (Phase 1 "
                            "pairs only: offline DPO); no-simulation (Phase 2 judges by the action only)")
    mode: Literal["act", "irpo"] = Field(
        "act", description="act, or the IRPO baseline: pairs from K samples of the current policy, best success vs "
                           "worst failure by the env's heuristic (train with `trainer run --rpo-alpha`)")
    irpo_samples: int = Field(4, ge=1, description="IRPO: samples per task (at least 2 are drawn)")
    pseudo_label: bool = Field(False, description="Phase 1 gold actions from the LLM classifier (--classifier URL) "
                                                  "labelling each reference, instead of the data's labels (ACT's "
                                                  "pseudo-labelled setting)")
    clarify_rounds: int | None = Field(None, ge=0, description="simulated clarification rounds per episode before it "
                                                               "must end (default: the env's, 1 as the authors)")
    max_episodes: int | None = Field(None, ge=0, description="stop after this many Phase 2 episodes, counted across "
                                                             "restarts (default: never)")
    max_epochs: int | None = Field(None, ge=0, description="stop after this many passes over D_pref (default: never)")
    poll_s: float = Field(1.0, gt=0, description="how often to check for a new policy version")
    flush_s: float = Field(0.25, gt=0, description="how often finished pairs are appended to the queue")
    seed: int = Field(0, description="seed of the conversation sample (the same as `trainer sft --seed`), task "
                                     "order and random-actions labels")
    save_trajectories: bool = Field(False, description="also write every trajectory to RUN_DIR/trajectories.jsonl")
    retries: int = Field(2, ge=0, description="in-process retries of an episode whose role call gave up (then it "
                                              "is a counted failure and the resume watermark moves past it)")
    retry_backoff_s: float = Field(0.5, ge=0, description="wait before the first such retry (doubles per retry)")
    workers: int = Field(1, ge=1, description="serve processes on this host, each with its own event loop, task "
                                              "slice and RUN_DIR/worker-G state (the parent aggregates status and "
                                              "restarts a worker that dies)")
    shard: str = Field("0/1", json_schema_extra={"metavar": "I/S"}, description="this host's shard I of S: hosts x workers partition the "
                                                        "tasks (worker g = I*workers+i takes task g mod S*workers); "
                                                        "every host needs the same --workers, --seed and --n")
    replace_rule: Literal["paper", "authors"] = Field(
        "paper", description="Phase 2 replacement: paper (Algorithm 2: a wrong action always loses; a right one by "
                             "its simulated outcome) or authors (act_trainer.py: by the outcome alone)")
    content_pairs: Literal["keep", "base", "drop"] = Field(
        "keep", description="a Phase 2 pair whose sides take the same action (only the content differs, e.g. the "
                            "gold SQL vs the sample's wrong SQL): keep (the paper), base (train its D_pref action "
                            "pair instead) or drop; an ablation of the pair mix")
    rollout_temperature: float | None = Field(
        None, ge=0, description="policy sampling temperature sent with every request; default: none is sent, so "
                                "the checkpoint's generation_config.json applies (the server's defaults, as vLLM "
                                "--generation-config auto), as the authors sample; serve does not use --temperature")
    cut_first_newline: bool = Field(False, description="cut each sampled policy reply at its first newline (the "
                                                       "authors' simulator.py post-processing)")
    queue_outage_s: float = Field(
        180.0, ge=0, description="ride through a queue outage (a Redis restart, a locked SQLite file) this long: "
                                 "calls are retried, the outage logged and counted (queue_outages, queue_outage_s); "
                                 "past it serve stops with exit code 75 and resumes when run again")
    roles: RolesConfig = Field(default_factory=RolesConfig, description="the three roles and their clients")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "limit" in data:
            data = dict(data)
            limit = data.pop("limit")
            if data.get("n_conversations") is None:
                data["n_conversations"] = limit
        return data

    @model_validator(mode="after")
    def _schedule(self) -> "ServeConfig":
        if self.sync:
            if self.max_pending is None:
                self.max_pending = self.concurrency
        else:
            self.max_pending = ASYNC_MAX_PENDING if self.max_pending is None else self.max_pending
        parse_shard(self.shard)
        if self.mode == "irpo" and self.ablation != "none":
            raise ValueError("--mode irpo is a baseline of its own: no --ablation with it")
        return self

