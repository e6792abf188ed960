"""`trainer run`: queue-fed DPO with one long-lived TRL `DPOTrainer` (one optimizer state).

    queue ──lease──► QueueSource (tokenise on the fly) ──► DPOTrainer.train()  (PEFT LoRA;
                                                              │                reference = adapter off, or a frozen copy of --init-adapter)
          on_step_end: ledger, metrics, decide save/publish   │
          on_save: commit marker → ack → Publisher ───────────┘──► policy servers + queue version

`QueueDPOTrainer` changes three things only, through documented Trainer extension points: the
train dataloader (the queue), `training_step` (records the ids of the micro-batch it trains),
and `log` (adds queue metrics). The loss, reference model, precision and the optimizer /
scheduler / checkpoint machinery are TRL's and transformers' own.

Several processes (`accelerate launch --multi_gpu --num_processes N -m trainer.cli run ...` or
`torchrun --nproc_per_node N -m trainer.cli run ...`) train data-parallel: rank 0 alone owns the
queue, ledger, checkpoints' commit and publishing (see `distributed.py`). One `trainer run` per
run directory (`lock.py`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from simkit.queue import open_queue

from .config import RunConfig, save_snapshot
from .data import META, PairCollator, QueueSource
from .distributed import Dist, close
from .ledger import Ledger, latest_committed, rotate
from .lock import RunDirLocked, RunLock
from .metrics import MetricsCallback, MetricsWriter
from .models import (checkpointing_args, completion_only_logits, cpu_autocasts, frozen_weights_bf16, load_model,
                     load_tokenizer, lora_config, precision_args)
from .publish import PublishError, Publisher, PublishRejected

log = logging.getLogger("trainer")


def _placeholder_dataset():
    """DPOTrainer.__init__ wants a dataset to inspect; the real data comes from the queue."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": "hello"}],
                               "chosen": [{"role": "assistant", "content": "yes"}],
                               "rejected": [{"role": "assistant", "content": "no"}]}])


class QueueDPOTrainer(DPOTrainer):
    """DPOTrainer fed by a `QueueSource`; knows which pairs each optimizer step used."""

    def __init__(self, *args: Any, source: QueueSource, on_micro_batch: Callable[[list], None],
                 step_extras: Callable[[], dict] = dict, completion_only: bool = True, bf16_base: bool = False,
                 **kwargs: Any):
        self._source, self._on_micro_batch, self._step_extras = source, on_micro_batch, step_extras
        super().__init__(*args, train_dataset=_placeholder_dataset(), **kwargs)
        if completion_only:
            completion_only_logits(self)
        if bf16_base:
            frozen_weights_bf16(self.model)
        if self.accelerator.num_processes != source.dist.world:
            raise RuntimeError(f"accelerate runs {self.accelerator.num_processes} processes but the queue source "
                               f"was set up for {source.dist.world}")

    def get_train_dataloader(self) -> DataLoader:
        # A plain DataLoader (no accelerate prefetch): a batch is trained as soon as it is leased,
        # not when the next one has arrived. Tensors are moved to the device by _prepare_inputs.
        return DataLoader(self._source, batch_size=self._train_batch_size, num_workers=0,
                          collate_fn=PairCollator(self.data_collator))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._on_micro_batch(inputs.pop(META))
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._step_extras())
        super().log(logs, start_time)


class _RunCallback(TrainerCallback):
    def __init__(self, run: "DPORun"):
        self.run = run

    def on_train_begin(self, args, state, control, **kw):
        self.run.t_last = time.perf_counter()

    # Decisions are rank 0's, broadcast (identity with one process): all ranks save and stop together.
    def on_step_end(self, args, state, control, **kw):
        run, step = self.run, state.global_step
        if run.dist.is_main:
            run.after_step(step)
        stop, stopping = run.dist.bcast((run.stop.is_set(), run.stopping))
        final = step >= state.max_steps or stopping
        if step % run.cfg.commit_every == 0 or step % run.cfg.publish_every == 0 or final:
            control.should_save = True
        if stop:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kw):
        # the source ended between steps (stop signal, idle timeout): commit what is trained
        run = self.run
        uncommitted, stopping = run.dist.bcast((run.dist.is_main and run.ledger.uncommitted > 0, run.stopping))
        if uncommitted:
            control.should_save = True
        if stopping:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kw):
        run = self.run
        run.dist.barrier()  # every rank's part of the checkpoint (its RNG state) is on disk
        final = state.global_step >= state.max_steps or run.dist.bcast(run.stopping)
        if run.dist.is_main:
            run.commit(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, final)


class DPORun:
    """Everything one `trainer run` process owns: queue, model, ledger, publisher, metrics."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None, lock: RunLock | None = None):
        self.cfg = cfg
        self.dist = dist or Dist()
        self._given_lock = lock  # the CLI takes it before the heavy imports, to fail at once
        self.run_dir = cfg.run_dir.resolve()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop = threading.Event()
        self.version = 0
        self.last_published_step = 0
        self.t_last = time.perf_counter()
        self._extras: dict[str, Any] = {}
        self.source: QueueSource | None = None

    @property
    def stopping(self) -> bool:
        """A signal asked to stop, or the queue stayed empty for idle_timeout_s."""
        return self.stop.is_set() or (self.source is not None and self.source.idle)

    # ------------------------------------------------------------------ per step
    def after_step(self, step: int) -> None:
        pairs = self.ledger.on_step_end()
        now = time.perf_counter()
        dt, self.t_last = max(now - self.t_last, 1e-9), now
        stale = [self.version - v for _, v in pairs] or [0]
        self._extras = {"pairs": len(pairs), "pairs_per_s": len(pairs) / dt, "step_time_s": dt,
                        "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
                        "stale_skipped": self.source.stale_skipped if self.source is not None else 0,
                        "policy_version": self.version, "queue_depth": self.queue.depth(),
                        "committed_pairs": self.ledger.committed_total, **self.queue.outage_stats()}

    def step_extras(self) -> dict:
        extras, self._extras = self._extras, {}
        return extras

    def commit(self, ckpt: Path, step: int, final: bool) -> None:
        publish = step % self.cfg.publish_every == 0 or (final and step > self.last_published_step)
        marker = self.ledger.commit(ckpt, step, publish=publish)
        self.writer.event("commit", step=step, pairs=len(marker["pair_ids"]),
                          committed_total=marker["committed_total"], checkpoint=str(ckpt))
        rotate(self.ckpt_dir, self.cfg.keep_checkpoints)
        if publish:
            self.publish(ckpt, step)

    def publish(self, ckpt: Path, step: int) -> None:
        try:
            res = self.publisher.publish(ckpt, meta={"step": step, "run_dir": str(self.run_dir),
                                                    "checkpoint": str(ckpt)})
        except PublishRejected as e:  # the server will never take this adapter: stop, say what to change
            log.error("publishing step %d was rejected: %s", step, e)
            self.writer.event("publish_rejected", step=step, error=str(e))
            raise
        except PublishError as e:  # transient: keep training; the next publish point tries again
            log.error("publishing step %d failed: %s", step, e)
            self.writer.event("publish_failed", step=step, error=str(e))
            return
        self.version, self.last_published_step = res.version, step
        self.writer.event("publish", step=step, version=res.version, adapter=res.adapter, path=res.path,
                          save_s=round(res.save_s, 4), load_s=round(res.load_s, 4), total_s=round(res.total_s, 4),
                          servers=res.servers, merged_path=res.merged_path)

    # ------------------------------------------------------------------ lifecycle
    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.info("%s: finishing the current step, committing, then stopping", signal.Signals(signum).name)
            self.stop.set()

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _resume_state(self) -> tuple[Path | None, int]:
        """Ack what the last committed checkpoint trained, release the rest, republish if due.
        Returns the checkpoint to resume from and its step."""
        found = latest_committed(self.ckpt_dir)
        path, marker = found if found else (None, None)
        released = self.ledger.restore(marker, self.cfg.consumer)
        cur = self.queue.current_version()
        self.version = cur.version if cur else 0
        if cur is not None and cur.meta.get("run_dir") == str(self.run_dir):
            self.last_published_step = int(cur.meta.get("step", 0))
        self.writer.event("resume" if path else "start", checkpoint=str(path) if path else None,
                          step=marker["step"] if marker else 0, committed_total=self.ledger.committed_total,
                          released=released, version=self.version)
        if path is not None:
            log.info("resuming from %s (step %d, %d pairs committed, %d leases released)", path, marker["step"],
                     self.ledger.committed_total, released)
            if marker.get("publish") and self.last_published_step < marker["step"]:
                self.publish(path, marker["step"])  # died between commit and publish
        return path, marker["step"] if marker else 0

    def dpo_config(self) -> DPOConfig:
        c = self.cfg
        return DPOConfig(
            output_dir=str(self.ckpt_dir), per_device_train_batch_size=c.batch_size,
            gradient_accumulation_steps=c.grad_accum, max_steps=c.max_steps, learning_rate=c.lr,
            lr_scheduler_type=c.lr_scheduler, warmup_steps=c.warmup_steps, optim=c.optim,
            weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm, beta=c.beta,
            label_smoothing=c.label_smoothing, max_length=c.max_length, **loss_args(c),
            seed=c.seed, logging_steps=1, save_strategy="no",
            save_total_limit=None, report_to="none", remove_unused_columns=False, ignore_data_skip=True,
            dataloader_num_workers=0, disable_tqdm=True, **{**precision_args(c.dtype), **self.dist.trainer_args()},  # both may set use_cpu
            **checkpointing_args(DPOConfig, c.gradient_checkpointing))

    def _open(self) -> tuple[str | None, int]:
        """Rank 0: lock the run dir, open queue, metrics, ledger and publisher, and resume.
        Returns (checkpoint to resume from or None, its step)."""
        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = self._given_lock or RunLock(self.run_dir).acquire()
        save_snapshot(c, self.run_dir, "config.yaml")
        self.queue = open_queue(c.queue)
        self.writer = MetricsWriter(self.run_dir, tensorboard=c.tensorboard)
        self.ledger = Ledger(self.queue, self.run_dir, c.lease_s)
        self.publisher = Publisher(
            self.queue, c.policy_url, self.run_dir / "adapters", adapter_name=c.adapter_name,
            naming=c.adapter_naming, keep_loaded=c.keep_loaded, retries=c.publish_retries,
            timeout_s=c.publish_timeout_s, api_key=os.environ.get(c.api_key_env) or None,
            merge_base=c.model if c.merge else None, merge_dtype=c.dtype, run_id=run_id(self.run_dir))
        self.publisher.check_servers(*adapter_shape(c))  # before step 1: a LoRA the servers would refuse
        path, step = self._resume_state()
        return (str(path) if path else None), step

    def _close(self) -> None:
        c = self.cfg
        try:
            if self.source is not None:
                self.source.close()  # no feeder may lease after the release below
            if self.queue is not None:
                self.queue.release(c.consumer)  # leased but not committed: back to the queue
        finally:
            for part in (self.writer, self.publisher, self.queue):
                if part is not None:
                    part.close()
            if self.lock is not None:
                self.lock.release()  # last: the run dir is free once everything above is settled

    def main(self) -> int:
        c, d = self.cfg, self.dist
        self.queue = self.writer = self.ledger = self.publisher = self.lock = None
        previous = self._install_signals()
        self.source = None
        try:
            resume, step = d.bcast(self._open() if d.is_main else None)
            if step >= c.max_steps:  # not a single step left: say so instead of an empty Trainer epoch
                if d.is_main:
                    self.writer.event("finished", step=step, max_steps=c.max_steps)
                    print(f"trainer run: {self.run_dir} already finished (step {step} of {c.max_steps}); "
                          "nothing to do (raise --max-steps to train on)", flush=True)
                return 0
            tokenizer = load_tokenizer(c.model)
            world = d.world
            self.source = source = QueueSource(
                self.queue, tokenizer, lease_n=c.batch_size * world, stop=self.stop,
                budget=lambda: (c.max_steps - self.trainer.state.global_step) * c.batch_size * c.grad_accum * world,
                on_lease=self.ledger.on_lease if d.is_main else None,
                on_skip=self.ledger.on_skip if d.is_main else None,
                on_return=self.ledger.on_return if d.is_main else None, consumer=c.consumer,
                lease_s=c.lease_s, poll_s=c.poll_s, max_length=c.max_length, idle_timeout_s=c.idle_timeout_s,
                action_tokens=c.action_tokens, min_version=(lambda: None) if c.max_staleness is None else
                (lambda: max(0, self.version - c.max_staleness)), dist=d)
            callbacks = [_RunCallback(self)] + ([MetricsCallback(self.writer)] if d.is_main else [])
            self.trainer = QueueDPOTrainer(
                model=policy_model(c), args=self.dpo_config(), processing_class=tokenizer,
                peft_config=None if c.init_adapter else lora_config(c), source=source,
                on_micro_batch=self.ledger.on_micro_batch if d.is_main else (lambda pairs: None),
                step_extras=self.step_extras, callbacks=callbacks, completion_only=c.completion_only_logits,
                bf16_base=cpu_autocasts(c.dtype))
            self.trainer.remove_callback(PrinterCallback)  # MetricsCallback logs one concise line per step
            if d.bcast(self.stop.is_set()):
                return 0
            self.trainer.train(resume_from_checkpoint=resume)
            if d.is_main:
                self.writer.event("stop", step=self.trainer.state.global_step, reason="idle" if source.idle else
                                  "signal" if self.stop.is_set() else "max_steps",
                                  committed_total=self.ledger.committed_total,
                                  skipped_total=self.ledger.skipped_total, version=self.version)
            return 0
        finally:
            try:
                self._close()
            finally:
                for sig, h in previous.items():
                    signal.signal(sig, h)


def init_adapter_config(c: RunConfig) -> dict | None:
    """--init-adapter's adapter_config.json (None without one); a clear error when it is missing."""
    if not c.init_adapter:
        return None
    f = Path(c.init_adapter) / "adapter_config.json"
    if not f.is_file():
        raise SystemExit(f"--init-adapter {c.init_adapter}: no adapter_config.json there; give the folder "
                         "`trainer sft` wrote (RUN/adapter)")
    return json.loads(f.read_text())


def adapter_shape(c: RunConfig) -> tuple[int, list[str]]:
    """(rank, target modules) of the adapters this run publishes: --init-adapter's, else the flags'."""
    cfg = init_adapter_config(c)
    if cfg is not None:
        targets = cfg.get("target_modules") or []
        return int(cfg.get("r", c.lora_r)), [targets] if isinstance(targets, str) else list(targets)
    return c.lora_r, list(c.lora_target_modules)


def run_id(run_dir: Path) -> str:
    """This run's id (RUN_DIR/run_id, made on first start, kept on resume): adapter names and paths
    carry it, so a run redone into the same folder never reuses a name+path a server has cached."""
    f = run_dir / "run_id"
    if f.is_file() and f.read_text().strip():
        return f.read_text().strip()
    rid = uuid.uuid4().hex[:8]
    f.write_text(rid + "\n")
    return rid


def policy_model(c: RunConfig):
    """The base model, or base + `init_adapter` made trainable (TRL then keeps a frozen copy of that
    adapter, named "ref", as the DPO reference)."""
    model = load_model(c.model, c.dtype)
    if init_adapter_config(c) is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, c.init_adapter, is_trainable=True)


def loss_args(c: RunConfig) -> dict:
    """loss_type / loss_weights (and rpo_alpha): IRPO's DPO + alpha x NLL of the chosen response is
    TRL's `rpo_alpha` where DPOConfig has it, else the equivalent `sft` loss term weighted alpha."""
    types_, weights = list(c.loss_type), c.loss_weights
    if c.rpo_alpha is None:
        return {"loss_type": types_, "loss_weights": weights}
    if "rpo_alpha" in getattr(DPOConfig, "__dataclass_fields__", {}):
        return {"loss_type": types_, "loss_weights": weights, "rpo_alpha": c.rpo_alpha}
    return {"loss_type": [*types_, "sft"], "loss_weights": [*(weights or [1.0] * len(types_)), c.rpo_alpha]}


def quiet_libraries() -> None:
    """CLI runs: no dataset progress bars, no deprecation chatter from library internals."""
    import warnings

    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def run(cfg: RunConfig, lock: RunLock | None = None) -> int:
    """`trainer run` in this process (one rank of several under accelerate launch / torchrun)."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_libraries()
    dist = Dist.from_env()
    try:
        return DPORun(cfg, dist, lock if dist.is_main else None).main()
    except RunDirLocked as e:
        print(f"trainer run: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        close(dist)
