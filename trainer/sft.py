"""`trainer sft`: the SFT baseline on reference conversations (TRL `SFTTrainer` + the same LoRA,
base model, precision and metrics code path as `trainer run`), so SFT-vs-ACT comparisons differ
only in the objective.

Rows are conversational prompt/completion pairs, one per assistant turn, so the loss covers
assistant tokens only:
  env task → system prompt + task prompt ⟶ reference
             (+ for CLARIFY tasks with a user reply, with --followup:
              system + prompt + reference + user reply ⟶ the goal as the final answer)
  JSONL    → {"messages": [...]}: one row per assistant message (everything before it is the
             prompt); rows that already have prompt/completion are used as they are.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from simkit.types import goal_text  # noqa: F401  (re-exported: trainer.sft.goal_text)

from .config import SFTRunConfig, save_snapshot
from .metrics import MetricsCallback, MetricsWriter
from .models import (checkpointing_args, completion_only_logits, cpu_autocasts, frozen_weights_bf16, load_model,
                     load_tokenizer, lora_config, merge_adapter, precision_args, use_cuda)

log = logging.getLogger("trainer")


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def env_sample(env_name: str, split: str, n_conversations: int | None = None, seed: int = 0):
    """(env, the conversation sample): the same helper and draw as `simkit serve` / `pairs build`."""
    from simkit.env import make
    from simkit.sampling import sample_conversations

    env = make(env_name)
    return env, sample_conversations(env.tasks(split), n_conversations, seed, env=env.name, split=split)


def env_rows(env_name: str, split: str, followup: bool = True, n_conversations: int | None = None,
             seed: int = 0) -> list[dict]:
    """One row per assistant turn of the sampled conversations' reference turns (the CLARIFY
    follow-up: the gold continuation's final answer after the user's reply)."""
    return task_rows(*env_sample(env_name, split, n_conversations, seed), followup=followup)


def task_rows(env, sample, followup: bool = True) -> list[dict]:
    from simkit.types import CLARIFY

    rows, seen = [], set()

    def add(row: dict) -> None:  # a PACIFIC follow-up is also the dialogue's next turn: train it once
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)

    for t in sample.tasks:
        prompt = [_msg("system", env.system_prompt), *[m.model_dump() for m in t.prompt]]
        add({"prompt": prompt, "completion": [_msg("assistant", t.reference)]})
        if followup and t.gold_action == CLARIFY and t.user_reply and goal_text(t.goal):
            add({"prompt": prompt + [_msg("assistant", t.reference), _msg("user", t.user_reply)],
                 "completion": [_msg("assistant", goal_text(t.goal))]})
    return rows


def conversation_rows(messages: list[dict]) -> list[dict]:
    return [{"prompt": messages[:i], "completion": [m]} for i, m in enumerate(messages)
            if m.get("role") == "assistant" and i > 0]


def jsonl_rows(path: str | Path, n_conversations: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of a JSONL of conversations (one per line); with n, a seeded sample of n lines."""
    from simkit.sampling import TooFewConversations, sample_items

    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    try:
        lines = sample_items(lines, n_conversations, seed)
    except TooFewConversations as e:
        raise TooFewConversations(f"{path}: {e}") from None
    rows = []
    for lineno, line in lines:
        obj = json.loads(line)
        if "messages" in obj:
            rows.extend(conversation_rows([_msg(m["role"], m["content"]) for m in obj["messages"]]))
        elif "prompt" in obj and "completion" in obj:
            rows.append({"prompt": obj["prompt"], "completion": obj["completion"]})
        else:
            raise ValueError(f"{path}:{lineno}: expected 'messages' or 'prompt' + 'completion'")
    return rows


def build_rows(cfg: SFTRunConfig, record_dir: Path | None = None) -> list[dict]:
    """The SFT rows of the config; with `record_dir`, the conversation sample is written there."""
    seed = cfg.seed if cfg.sample_seed is None else cfg.sample_seed
    if cfg.data:
        rows = jsonl_rows(cfg.data, cfg.n_conversations, seed)
    else:
        env, sample = env_sample(cfg.env, cfg.split, cfg.n_conversations, seed)
        if record_dir is not None:
            sample.write(record_dir)
        rows = task_rows(env, sample, cfg.followup)
    if not rows:
        raise ValueError("no training rows: the data has no assistant turns")
    return rows


def sft_config(cfg: SFTRunConfig, output_dir: Path):
    """TRL SFTConfig of `cfg` (benches build the same one)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, optim=cfg.optim,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length,
        seed=cfg.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=use_cuda(),
        **precision_args(cfg.dtype), **checkpointing_args(SFTConfig, cfg.gradient_checkpointing))


def run_sft(cfg: SFTRunConfig) -> Path:
    """Train and save the adapter to RUN_DIR/adapter (and RUN_DIR/merged with --merge); with
    --full-finetune, no LoRA: every weight trains and the model goes to RUN_DIR/model."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from .dpo import quiet_libraries

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_libraries()
    run_dir = cfg.run_dir.resolve()
    save_snapshot(cfg, run_dir, "sft_config.yaml")
    rows = build_rows(cfg, record_dir=run_dir)
    log.info("SFT on %d rows", len(rows))
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
    try:
        args = sft_config(cfg, run_dir / "checkpoints")
        tok = load_tokenizer(cfg.model)
        trainer = SFTTrainer(model=load_model(cfg.model, cfg.dtype), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=None if cfg.full_finetune else lora_config(cfg),
                             callbacks=[MetricsCallback(writer)])
        trainer.remove_callback(PrinterCallback)
        if cfg.completion_only_logits:
            completion_only_logits(trainer)
        if cpu_autocasts(cfg.dtype):
            frozen_weights_bf16(trainer.model)
        writer.event("start", kind="sft", rows=len(rows), source=cfg.data or f"{cfg.env}:{cfg.split}")
        trainer.train()
        kind = "model" if cfg.full_finetune else "adapter"
        out = run_dir / kind
        trainer.save_model(str(out))
        tok.save_pretrained(out)
        writer.event("saved", step=trainer.state.global_step, **{kind: str(out)})
        if cfg.merge:
            merged = merge_adapter(cfg.model, out, run_dir / "merged", cfg.dtype)
            writer.event("merged", path=str(merged))
        log.info("SFT %s written to %s", kind, out)
        return out
    finally:
        writer.close()
