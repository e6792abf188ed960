"""Trainer benchmark, in one run on the same machine:

* steps/s — queue-fed DPO (`trainer run`'s DPORun: lease → tokenise on the fly → DPOTrainer step →
  ledger, metrics JSONL + TensorBoard) vs. a plain TRL `DPOTrainer` over a pre-tokenised
  `datasets.Dataset` of the same pairs, same model, LoRA and DPOConfig. Runs are interleaved
  (plain, queue, queue, plain, ...) and the first `--warmup` steps of each are not timed; step
  time = wall time between consecutive optimizer-step ends (so data loading counts). Target ≥ 0.95.
* hot-reload latency — Publisher on the embedded model server (a real subprocess): copy adapter
  to a new version dir → POST /v1/load_lora_adapter → verify in /v1/models → publish on the queue,
  then "served": the first chat completion with the new adapter name answers 200.

    .venv/bin/python bench/bench_trainer.py                       # table
    .venv/bin/python bench/bench_trainer.py --json                # one JSON object
    .venv/bin/python bench/bench_trainer.py --steps 40 --reps 3 --batch-size 8 --model DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.95


def plain_steps_per_s(model_dir: str, pairs, cfg, out: Path, warmup: int) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from trainer.dpo import DPORun
    from trainer.models import load_model, load_tokenizer, lora_config

    class Clock(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())

    args = DPORun(cfg).dpo_config()
    args.output_dir = str(out)
    clock = Clock()
    trainer = DPOTrainer(model=load_model(model_dir, cfg.dtype), args=args, processing_class=load_tokenizer(model_dir),
                         train_dataset=Dataset.from_list([p.to_trl() for p in pairs]), peft_config=lora_config(cfg),
                         callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    t = clock.t[warmup - 1:]
    return (len(t) - 1) / (t[-1] - t[0])


def queue_steps_per_s(pairs, cfg, warmup: int) -> float:
    from simkit.queue import open_queue
    from trainer.dpo import DPORun
    from trainer.metrics import read_metrics

    with open_queue(cfg.queue) as q:
        q.append(pairs)
    assert DPORun(cfg).main() == 0
    steps = [r for r in read_metrics(cfg.out) if r["event"] == "step"][warmup:]
    return len(steps) / sum(r["step_time_s"] for r in steps)


def hot_reload(model_dir: str, adapter_src: Path, work: Path, n: int) -> dict:
    import httpx

    from simkit.queue import open_queue
    from simkit.testing import start_model_server
    from trainer.publish import Publisher

    q = open_queue(work / "reload.db")
    save, load, served = [], [], []
    with start_model_server(model_dir, log_path=work / "server.log") as srv:
        pub = Publisher(q, [srv.url], work / "reload_adapters", adapter_name="bench")
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
        for _ in range(n):
            t0 = time.perf_counter()
            res = pub.publish(adapter_src)
            while httpx.post(srv.url + "/chat/completions", json={**chat, "model": res.adapter},
                             timeout=60).status_code != 200:
                time.sleep(0.001)
            served.append(time.perf_counter() - t0)
            save.append(res.save_s)
            load.append(res.load_s)
        pub.close()
    q.close()
    med = statistics.median
    return {"reloads": n, "save_s": med(save), "load_verify_publish_s": med(load), "save_to_served_s": med(served),
            "save_to_served_max_s": max(served)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base model dir (default: a fresh `simkit model init-tiny`)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps of each run (default 3)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--reps", type=int, default=4,
                   help="plain/queue run pairs, alternating which runs first; the ratio is of the medians (default 4)")
    p.add_argument("--reloads", type=int, default=5, help="hot reloads to time (default 5)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU, spinning OpenMP threads make step times "
                        "swing several-fold between runs; 1 thread keeps the comparison fair)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--keep", action="store_true", help="keep the work directory (runs, queues, adapters)")
    a = p.parse_args(argv)
    import torch

    if a.threads and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)

    logging.basicConfig(level=logging.WARNING)
    from trainer.config import RunConfig
    from trainer.dpo import quiet_libraries
    from trainer.synthetic import toy_pairs

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    if a.model:
        model_dir = a.model
    else:
        from simkit.tiny_model import init_tiny

        model_dir = str(init_tiny(work / "tiny"))
    pairs = toy_pairs(a.steps * a.batch_size)
    plain, queued, last_run = [], [], None
    for rep in range(a.reps):
        cfg = RunConfig(queue=str(work / f"q{rep}.db"), model=model_dir, out=str(work / f"run{rep}"),
                        max_steps=a.steps, batch_size=a.batch_size, publish_every=a.steps, max_length=a.max_length,
                        log_level="warning")
        if rep % 2 == 0:  # alternate which goes first, so drift in machine load hits both alike
            plain.append(plain_steps_per_s(model_dir, pairs, cfg, work / f"plain{rep}", a.warmup))
            queued.append(queue_steps_per_s(pairs, cfg, a.warmup))
        else:
            queued.append(queue_steps_per_s(pairs, cfg, a.warmup))
            plain.append(plain_steps_per_s(model_dir, pairs, cfg, work / f"plain{rep}", a.warmup))

        last_run = Path(cfg.out)
    ratio = statistics.median(queued) / statistics.median(plain)
    adapter = sorted((last_run / "checkpoints").glob("checkpoint-*"))[-1]
    reload = hot_reload(model_dir, adapter, work, a.reloads)
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    result = {"steps": a.steps, "batch_size": a.batch_size, "reps": a.reps, "threads": torch.get_num_threads(),
              "plain_steps_per_s": [round(x, 3) for x in plain], "queue_steps_per_s": [round(x, 3) for x in queued],
              "ratio": round(ratio, 3), "target": TARGET, "ok": ratio >= TARGET,
              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in reload.items()}}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"DPO steps/s  plain DPOTrainer: {', '.join(f'{x:.2f}' for x in plain)}   "
              f"queue-fed: {', '.join(f'{x:.2f}' for x in queued)}")
        print(f"ratio queue/plain (median): {ratio:.3f}  (target >= {TARGET})  {'OK' if result['ok'] else 'BELOW'}")
        print(f"hot reload (embedded server, {reload['reloads']}x, median): save {reload['save_s'] * 1e3:.1f} ms, "
              f"load+verify+publish {reload['load_verify_publish_s'] * 1e3:.1f} ms, "
              f"save->served {reload['save_to_served_s'] * 1e3:.1f} ms (max {reload['save_to_served_max_s'] * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
