"""`trainer` command line: run (queue-fed DPO), sft (the SFT baseline), plot (learning curves).

Heavy imports (torch, transformers, trl) happen inside the commands so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from .config import PlotConfig, RunConfig, SFTRunConfig, add_config_args, config_from_args

RUN_EPILOG = """\
example (CPU, tiny model, embedded server):
  simkit model init-tiny --out runs/tiny
  simkit model-server --model runs/tiny --port 8000 &
  trainer run --queue runs/queue.db --model runs/tiny --policy-url http://127.0.0.1:8000/v1 \\
      --out runs/act --publish-every 10 --max-steps 200 --batch-size 4

Before step 1 the trainer checks --lora-r / --lora-target-modules against each server's limits.
Each publish: the adapter is copied to RUN_DIR/adapters/RUN_ID/vNNNNNN and loaded as
NAME-RUN_ID-vN (RUN_ID in RUN_DIR/run_id, kept on resume: names and paths never repeat across
runs), into every --policy-url (POST /v1/load_lora_adapter, load_inplace when the name is
already loaded), verified in GET /v1/models, and only then announced on the queue. A server that
rejects the adapter (4xx, or vLLM's 500) stops the run with what to change; 502/503/timeouts retry.
Pairs are acked once a checkpoint containing their step is committed; a killed trainer
restarts from its last committed checkpoint (just run the same command again).
SIGINT / SIGTERM: finish the current step, commit, publish, release unused leases, exit 0.
Queue outages (a Redis restart, a locked SQLite file): every queue call is retried for
--queue-outage-s (default 180; logged once, counted); a commit is acked whole or redone. Past the
window the run stops with exit code 75: start the queue again and rerun the same command.
On start, the queue's current version is loaded again into any --policy-url that lost it.
Schedules: asynchronous by default (publish every --publish-every steps, pairs up to --max-staleness
versions old: the one staleness limit, applied when leasing; serve has none). --sync is the paper's: publish every step and train each step only on pairs made by
the latest version (stale ones are dropped, also if leased before the publish); run `simkit serve
--sync` with it. IRPO baseline: --rpo-alpha A (DPO + A x NLL of the chosen) on `simkit serve --mode irpo`.
Outputs: RUN_DIR/{config.yaml, run_id, metrics.jsonl, tb/, checkpoints/, adapters/, trained_pairs.jsonl}.
One trainer per RUN_DIR: a second one exits at once naming the first (pid, host, start; RUN_DIR/trainer.lock).
Data parallel (DDP; rank 0 leases, acks, commits and publishes, every rank trains its share):
  accelerate launch --multi_gpu --num_processes 8 -m trainer.cli run ...     # GPUs
  torchrun --nproc_per_node 2 -m trainer.cli run ...                         # CPU (gloo) or GPUs
--batch-size is per process: each step trains batch_size x grad_accum x processes pairs.
"""

SFT_EPILOG = """\
examples:
  trainer sft --env toy --model runs/tiny --out runs/sft --epochs 2
  trainer sft --env pacific --split tune --n-conversations 50 --model HuggingFaceH4/zephyr-7b-beta --out runs/sft50
  trainer sft --data conversations.jsonl --model runs/tiny --out runs/sft --merge
  trainer sft --env ambigsql --n-conversations 100 --model runs/models/smollm2 --out runs/sft-full \
      --full-finetune --lr 2e-5
The adapter lands in RUN_DIR/adapter (serve it with load_lora_adapter), merged weights in RUN_DIR/merged;
with --full-finetune the whole model lands in RUN_DIR/model (serve it with `simkit model-server --model`).
--n-conversations N counts dialogues, not turns: a seeded sample stratified by gold action, drawn by the
same helper as `simkit serve --n-conversations N --seed S` (same N and seed: same conversations); the
ids go to RUN_DIR/conversations.json. N larger than the split's conversations is an error.
"""


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 100)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer",
        description="simkit trainer: queue-fed DPO (ACT Phase 2) with a PEFT LoRA adapter, hot-published into "
                    "the policy servers; the SFT baseline; learning-curve plots.",
        epilog="Run `trainer COMMAND --help` for each command's options. Options can also come from "
               "--config FILE.yaml (flags override it).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="train DPO on pairs from the queue; publish LoRA versions to the policy servers",
                       description=_wrap("Queue-fed DPO with TRL's DPOTrainer and a LoRA adapter (the reference model "
                                         "is the base with the adapter off; with --init-adapter, a frozen copy of that "
                                         "adapter). One trainer, one optimizer state for the "
                                         "whole run."),
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(r, RunConfig)
    r.set_defaults(func=_run, parser=r)

    s = sub.add_parser("sft", help="the SFT baseline on reference conversations (env split or JSONL)",
                       description=_wrap("Supervised fine-tuning (TRL SFTTrainer, LoRA) on an environment's reference "
                                         "conversations or a JSONL of conversations; the same base model, LoRA and "
                                         "metrics as `trainer run`, for SFT-vs-ACT comparisons."),
                       epilog=SFT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(s, SFTRunConfig)
    s.set_defaults(func=_sft, parser=s)

    pl = sub.add_parser("plot", help="write learning-curve PNGs of a run directory",
                        description="Read RUN_DIR/metrics.jsonl (from `trainer run` or `trainer sft`) and write "
                                    "loss, chosen and rejected rewards, reward margins (split by pair kind — action "
                                    "contrast vs content only — when the run logged its pair mix), reward accuracy, "
                                    "log-probs, throughput, staleness and learning rate curves as PNGs (default: "
                                    "RUN_DIR/plots). `simkit pairs stats PAIRS --train-run RUN_DIR` prints the margins "
                                    "by kind.")
    add_config_args(pl, PlotConfig, config_flag=False)
    pl.set_defaults(func=_plot, parser=pl)
    return p


def queue_down(e: BaseException) -> BaseException | None:
    """The QueueUnavailable behind `e` (the feeder thread wraps its errors), if any."""
    from simkit.queue.outage import QueueUnavailable

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, QueueUnavailable):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _run(args: argparse.Namespace) -> int:
    import os

    from simkit.queue.outage import OUTAGE_ENV, QueueUnavailable

    from .lock import RunDirLocked, RunLock

    if getattr(args, "queue_outage_s", None) is not None:  # open_queue reads it (here and in DDP ranks)
        os.environ[OUTAGE_ENV] = str(args.queue_outage_s)
    cfg = config_from_args(RunConfig, args, args.parser)
    lock = None
    if os.environ.get("RANK", "0") == "0":  # rank 0 (or the only process) owns the run dir: fail before torch loads
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(cfg.run_dir).acquire()
        except RunDirLocked as e:
            args.parser.exit(2, f"trainer run: error: {e}\n")
    from .dpo import run
    from .publish import PublishRejected

    try:
        return run(cfg, lock)
    except PublishRejected as e:  # the server refuses this run's adapters: stop, naming the fix
        args.parser.exit(2, f"trainer run: stopped: {e}\n")
    except Exception as e:  # the queue outage outlasted the window: what to do, not a traceback
        down = queue_down(e)
        if down is None:
            raise
        args.parser.exit(QueueUnavailable.exit_code, f"trainer run: stopped: {down}\n")


def _sft(args: argparse.Namespace) -> int:
    from simkit.sampling import TooFewConversations

    from .sft import run_sft

    try:
        run_sft(config_from_args(SFTRunConfig, args, args.parser))
    except TooFewConversations as e:
        args.parser.exit(2, f"trainer sft: error: {e}\n")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from simkit.config import config_or_exit

    from .plot import plot_run

    cfg = config_or_exit(PlotConfig, args, "plot")
    for path in plot_run(cfg.run_dir, cfg.out, cfg.smooth):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from simkit.config import dispatch

    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
