"""Configs for `trainer run` and `trainer sft`: pydantic models, loadable from YAML, overridable
by CLI flags (one config type per command; docs/DESIGN.md, "Conventions").

Precedence: field defaults < `--config FILE.yaml` < flags given on the command line.
The CLI flags are generated from the fields by `simkit.config` (`--publish-every` ↔
`publish_every`), so `--help` always lists every option with its description and default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from simkit.config import add_config_args, config_from_args, load_yaml, save_snapshot

Dtype = Literal["auto", "float32", "bfloat16", "float16", "bf16-mixed"]


class CommonConfig(BaseModel):
    """Model, LoRA and optimiser settings shared by `trainer run` and `trainer sft`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: a local directory or a hub id (anything from_pretrained loads)")
    out: str = Field(description="run directory: config snapshot, checkpoints, adapters, metrics, plots")
    batch_size: int = Field(4, ge=1, description="pairs (DPO) or examples (SFT) per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate. LoRA default from recipes/lora_sweep.sh (bench/"
                                              "RESULTS.md); the authors' 2e-5 is a full fine-tuning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    optim: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, rmsprop, ...)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 disables)")
    max_length: int = Field(1024, ge=8, description="max tokens of prompt + response (authors: 1024)")
    lora_r: int = Field(16, ge=1, description="LoRA rank (a vLLM server needs --max-lora-rank >= this)")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (default 0: DPO runs with dropout off "
                                "anyway, TRL's disable_dropout, and on a CPU SFT's dropout masks took 22%% of a step: "
                                "bench/bench_trainer.py --compute-profile)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"], description="LoRA target modules ('all-linear' = every linear but lm_head)")
    dtype: Dtype = Field("auto", description="weights dtype; auto = bfloat16 on GPU, float32 weights on CPU with "
                                           "bfloat16 autocast where the CPU has AVX512-BF16/AMX (plain float32 "
                                           "elsewhere); bf16-mixed = float32 weights with bfloat16 autocast on any "
                                           "device; float32 = no autocast (the old CPU default)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (large models on GPU). Off "
                                                            "here although TRL's configs default it on: recomputing "
                                                            "is one more policy forward, ~+1/3 of a DPO step")
    completion_only_logits: bool = Field(True, description="project only completion (labelled) positions through "
                                                           "the LM head; off: TRL's CPU path, every position "
                                                           "(same loss, ~3x the head's work on AmbigSQL prompts)")
    seed: int = Field(0, description="random seed (LoRA init, dropout)")
    tensorboard: bool = Field(True, description="also write metrics to RUN_DIR/tb for TensorBoard")
    merge: bool = Field(False, description="also save merged full weights (base + adapter) for restart-based reloads")
    log_level: str = Field("info", description="python logging level")

    @property
    def run_dir(self) -> Path:
        return Path(self.out)


class RunConfig(CommonConfig):
    """`trainer run`: queue-fed DPO that publishes LoRA versions into the policy servers."""

    queue: str = Field(description="pair queue (the one `simkit serve` appends to): a SQLite path, sqlite:///path "
                                   "or redis://host:6379/0?stream=act")
    policy_url: list[str] = Field(
        default_factory=list, description="OpenAI-style base URL(s) of the policy server(s) to load each version into "
                                          "(e.g. http://127.0.0.1:8000/v1); none = publish on the queue only")
    max_steps: int = Field(1000, ge=1, description="total optimizer steps of the run (resumes count from the checkpoint)")
    queue_outage_s: float | None = Field(
        None, ge=0, json_schema_extra={"metavar": "S"},
        description="ride through a queue outage this long before stopping with exit code 75 (default: "
                    "$SIMKIT_QUEUE_OUTAGE_S, else 180)")
    sync: bool = Field(False, description="the paper's schedule: publish (and checkpoint) every step and train each "
                                          "step only on pairs made by the latest version (max_staleness 0; stale "
                                          "pairs are dropped, even ones leased before the publish); pair it with "
                                          "`simkit serve --sync`. Off: asynchronous, the publish_every / "
                                          "max_staleness below")
    publish_every: int = Field(10, ge=1, description="publish a new policy version every N optimizer steps")
    save_every: int | None = Field(None, ge=1, description="checkpoint + ack the trained pairs every N steps "
                                                           "(default: publish_every)")
    init_adapter: str | None = Field(None, description="start from this LoRA adapter (e.g. `trainer sft`'s RUN/adapter) "
                                                       "instead of a fresh one: it is trained further and a frozen "
                                                       "copy is DPO's reference, so each version is one adapter on "
                                                       "the same base (the usual SFT-then-preference pipeline)")
    beta: float = Field(0.05, gt=0, description="DPO beta (authors: 0.05)")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"],
                                 description="TRL DPO loss type(s): sigmoid, hinge, ipo, exo_pair, nca_pair, robust, "
                                             "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                                             "sft, sigmoid_norm")
    loss_weights: list[float] | None = Field(None, description="weights when combining several loss types")
    rpo_alpha: float | None = Field(None, ge=0, description="IRPO / RPO: add rpo_alpha x the NLL of the chosen "
                                                          "response to the DPO loss (TRL's rpo_alpha; on TRL "
                                                          "versions without it, loss_type + ['sft'] weighted "
                                                          "rpo_alpha). Default: off")
    label_smoothing: float = Field(0.0, ge=0, description="label smoothing (robust / exo_pair losses)")
    action_tokens: int | None = Field(None, ge=1, description="score an action pair (ask vs answer) on only the first "
                                                             "K tokens of each side, where the action is decided, "
                                                             "instead of the whole continuation, whose later tokens "
                                                             "(the user's reply, the SQL) can win the margin while the "
                                                             "opening moves the other way (bench/RESULTS.md). Content "
                                                             "pairs keep their whole completions. Default: off")
    consumer: str = Field("trainer", description="consumer name on the queue (leases are owned by it)")
    lease_s: float = Field(3600.0, gt=0, description="lease length; held leases are renewed until their pairs are acked")
    poll_s: float = Field(0.5, gt=0, description="wait between lease attempts while the queue is empty")
    idle_timeout_s: float | None = Field(None, gt=0, description="stop cleanly after this long without new pairs "
                                                                 "(default: wait forever)")
    max_staleness: int | None = Field(None, ge=0, description="the one staleness limit (serve has none): pairs more than "
                                                             "this many versions behind the current one are dropped "
                                                             "(counted) when leasing, and skipped when a leased pair is "
                                                             "about to be trained (default: keep all, for offline DPO "
                                                             "and IRPO rounds; async ACT: 2; --sync: 0)")
    adapter_name: str = Field("policy", description="adapter name on the servers (versioned naming adds -vN)")
    adapter_naming: Literal["versioned", "inplace"] = Field(
        "versioned", description="versioned: a new name per version (policy-v3); inplace: reuse one name with "
                                 "load_inplace (the path is still new per version)")
    keep_loaded: int = Field(0, ge=0, description="unload versions older than the newest K from the servers "
                                                  "(0 = never unload)")
    keep_checkpoints: int = Field(2, ge=1, description="committed checkpoints to keep on disk")
    publish_retries: int = Field(5, ge=1, description="attempts per server to load + verify an adapter")
    publish_timeout_s: float = Field(60.0, gt=0, description="HTTP timeout of one load / list call")
    api_key_env: str = Field("SIMKIT_SERVER_API_KEY", description="environment variable holding the servers' bearer "
                                                                  "token (unset = none)")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights needs one weight per loss_type")
        if self.rpo_alpha is not None and "sft" in self.loss_type:
            raise ValueError("rpo_alpha adds the 'sft' (NLL) term itself: drop 'sft' from loss_type")
        if self.sync:
            given = self.model_fields_set
            if "publish_every" in given and self.publish_every != 1:
                raise ValueError("sync publishes every step: drop publish_every or sync")
            if "max_staleness" in given and self.max_staleness not in (None, 0):
                raise ValueError("sync trains only on current-version pairs (max_staleness 0): drop one of them")
            if "save_every" in given and self.save_every not in (None, 1):
                raise ValueError("sync commits every step: drop save_every or sync")
            self.publish_every, self.max_staleness, self.save_every = 1, 0, None
        return self

    @property
    def commit_every(self) -> int:
        return self.save_every or self.publish_every


class SFTRunConfig(CommonConfig):
    """`trainer sft`: the SFT baseline on reference conversations (TRL SFTTrainer + LoRA)."""

    data: str | None = Field(None, description="JSONL of conversations ({'messages': [...]}) or prompt/completion rows")
    env: str | None = Field(None, description="environment name (simkit.make(NAME)); its reference conversations")
    split: str = Field("train", description="environment split")
    n_conversations: int | None = Field(
        None, ge=1, description="train on N conversations (dialogues, not turns; paper: n=50 / n=250): a seeded random "
                                "sample stratified by gold action (the CLARIFY share matches the split), the same as "
                                "`simkit serve` / `pairs build` draw for the same seed; ids written to "
                                "RUN_DIR/conversations.json. An error if N exceeds the split's conversations. "
                                "JSONL data: N lines (one conversation each), a seeded sample. Default: all")
    limit: int | None = Field(None, ge=1, json_schema_extra={"cli": False},
                              description="old name of n_conversations in YAML files (same meaning); no flag")
    sample_seed: int | None = Field(None, description="seed of the conversation sample (default: seed); give the "
                                                      "ACT run's `simkit serve --seed` to train SFT on the same "
                                                      "conversations")
    followup: bool = Field(True, description="for CLARIFY tasks also train the final answer after the user's reply")
    epochs: float = Field(8.0, gt=0, description="training epochs (authors' SFT baseline: 8)")
    max_steps: int = Field(-1, description="stop after N optimizer steps (overrides epochs when > 0)")
    full_finetune: bool = Field(False, description="train every weight instead of a LoRA (the authors' SFT; the "
                                                   "capacity check of the when-to-ask issue): full weights go to "
                                                   "RUN_DIR/model, a base for `simkit model-server --model` or "
                                                   "`trainer run --model`. Give a full fine-tuning --lr (authors: 2e-5)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate. LoRA default from recipes/lora_sweep.sh (bench/"
                                              "RESULTS.md); at the authors' 2e-5 a rank-16 LoRA barely moves")

    @model_validator(mode="after")
    def _check(self) -> "SFTRunConfig":
        if bool(self.data) == bool(self.env):
            raise ValueError("give exactly one of data (a JSONL file) or env (an environment name)")
        if self.limit is not None:
            if self.n_conversations not in (None, self.limit):
                raise ValueError("limit is the old name of n_conversations: give one")
            self.n_conversations = self.limit
        if self.full_finetune and self.merge:
            raise ValueError("full_finetune already writes full weights (RUN_DIR/model): drop merge")
        return self


class PlotConfig(BaseModel):
    """`trainer plot`: learning-curve PNGs of a run directory."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., json_schema_extra={"positional": True, "metavar": "RUN_DIR"},
                         description="a run directory holding metrics.jsonl")
    out: str | None = Field(None, description="output directory (default: RUN_DIR/plots)")
    smooth: int = Field(1, ge=1, description="moving-average window in steps (1: raw)")


# YAML + CLI: the generator lives in simkit's core (one config system for every command)
__all__ = ["CommonConfig", "PlotConfig", "RunConfig", "SFTRunConfig", "add_config_args", "config_from_args", "load_yaml",
           "save_snapshot"]
