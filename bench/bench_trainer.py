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

* `--compute`: SFT and DPO step time, achieved GFLOP/s (useful FLOPs, bench/bench_floor.py's count)
  vs the measured bf16 matmul rate, and peak RSS — old settings (float32, TRL's head on every
  position) vs the new defaults (bf16 autocast where the CPU has it, completion-only head), each
  in its own process, in the same run, on the real SmolLM2 checkpoint with AmbigSQL prompts:

    .venv/bin/python bench/bench_trainer.py --compute --model runs/models/smollm2 --threads 2
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
    from simkit.loadtools.testing import start_model_server
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


SETTINGS = {"old": {"dtype": "float32", "completion_only_logits": False},
            "new": {"dtype": "auto", "completion_only_logits": True}}


def ambigsql_items(n: int) -> list[dict]:
    """n AmbigSQL train tasks as TRL rows: prompt (system + task, ~400 tokens), chosen = the
    reference reply, rejected = the other action's (a question, or the gold SQL without asking)."""
    import simkit
    from simkit.types import CLARIFY

    env = simkit.make("ambigsql")
    rows = []
    for t in env.tasks("train")[:n]:
        prompt = [{"role": "system", "content": env.system_prompt}, *[m.model_dump() for m in t.prompt]]
        wrong = str(t.goal) if t.gold_action == CLARIFY else "Which column do you mean: could you clarify?"
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": t.reference}],
                     "rejected": [{"role": "assistant", "content": wrong}]})
    return rows


def _tokens(tok, prompt: list[dict], completion: list[dict]) -> tuple[int, int]:
    """(tokens of prompt + completion, completion tokens) under the chat template."""
    full = len(tok(tok.apply_chat_template(prompt + completion, tokenize=False)).input_ids)
    head = len(tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)).input_ids)
    return full, full - head


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_summary(prof, top: int = 12) -> dict:
    """Where a profiled step's CPU time went: self time of the matmul kernels (the work the floor
    counts) against everything else, and the top ops by self time."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"self_cpu_s": total / 1e6, "matmul_share": mm / total,
            "top": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "share": round(e.self_cpu_time_total / total, 3),
                     "calls": e.count} for e in ranked]}


def compute_child(kind: str, setting: str, model_dir: str, batch: int, steps: int, max_length: int,
                  profile: bool = False) -> dict:
    """One config in this process: step times, useful GFLOP per step, peak RSS; with `profile`, the
    last step runs under torch.profiler and its summary comes back too."""
    import resource

    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from bench.bench_floor import Shape
    from trainer.config import RunConfig, SFTRunConfig
    from trainer.dpo import DPORun
    from trainer.models import completion_only_logits, load_model, load_tokenizer, lora_config

    class Clock(TrainerCallback):
        def __init__(self):
            self.t = [time.perf_counter()]
            self.prof = None

        def on_step_begin(self, args, state, *a, **k):
            if profile and state.global_step == steps - 1:
                import torch.profiler

                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, *a, **k):
            if self.prof is not None and len(self.t) == steps:
                self.prof.__exit__(None, None, None)
            self.t.append(time.perf_counter())

    items = ambigsql_items(batch * steps)
    tok, shape, over = load_tokenizer(model_dir), Shape.from_model(model_dir), SETTINGS[setting]
    work = Path(tempfile.mkdtemp(prefix=f"bench_compute_{kind}_"))
    clock = Clock()
    if kind == "dpo":
        from trl import DPOTrainer

        cfg = RunConfig(queue=str(work / "q.db"), model=model_dir, out=str(work), max_steps=steps, batch_size=batch,
                        max_length=max_length, log_level="warning", **over)
        args = DPORun(cfg).dpo_config()
        args.output_dir = str(work)
        trainer = DPOTrainer(model=load_model(model_dir, cfg.dtype), args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(items), peft_config=lora_config(cfg), callbacks=[clock])
        flops = [3 * sum(shape.forward(*_tokens(tok, r["prompt"], r[side])) for side in ("chosen", "rejected"))
                 for r in items]
    else:
        from trl import SFTTrainer

        from trainer.sft import sft_config

        cfg = SFTRunConfig(model=model_dir, out=str(work), data="unused.jsonl", max_steps=steps, batch_size=batch,
                           max_length=max_length, log_level="warning", **over)
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in items]
        trainer = SFTTrainer(model=load_model(model_dir, cfg.dtype), args=sft_config(cfg, work),
                             train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=lora_config(cfg), callbacks=[clock])
        flops = [2 * shape.forward(*_tokens(tok, r["prompt"], r["completion"])) for r in rows]
    trainer.remove_callback(PrinterCallback)
    if cfg.completion_only_logits:
        completion_only_logits(trainer)
    trainer.train()
    step_s = [b - a for a, b in zip(clock.t[1:], clock.t[2:])]  # the first step (warm-up) is not timed
    if clock.prof is not None:  # the profiled step is slower: keep it out of the timing
        step_s = step_s[:-1] or step_s
    return {"kind": kind, "setting": setting, "dtype": cfg.dtype, "step_s": step_s,
            "profile": profile_summary(clock.prof) if clock.prof is not None else None,
            "gflop_per_step": batch * statistics.mean(flops) / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def compute_bench(a) -> dict:
    """Old vs new settings for SFT and DPO, each in a fresh process, alternating; plus matmul rates."""
    import subprocess

    from bench.bench_floor import Shape, big_gemm_rate, matmul_rates

    model_dir = a.model or "runs/models/smollm2"
    rates = matmul_rates(Shape.from_model(model_dir), 800, a.threads, 0.5)
    bf16 = big_gemm_rate(rates["bfloat16"])
    runs = []
    for kind, batch, steps in (("sft", a.compute_sft_batch, a.compute_steps), ("dpo", a.compute_dpo_batch, a.compute_steps)):
        for setting in ("old", "new"):
            spec = json.dumps([kind, setting, model_dir, batch, steps, a.max_length, a.threads,
                               a.compute_profile and setting == "new"])
            res = subprocess.run([sys.executable, __file__, "--_child", spec], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{kind}/{setting} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["median_step_s"] = statistics.median(r["step_s"])
            r["gflops"] = r["gflop_per_step"] / r["median_step_s"]
            r["of_bf16_rate"] = r["gflops"] / bf16
            runs.append(r)
            print(f"  {kind} {setting}: {r['median_step_s']:.1f} s/step, {r['gflops']:.1f} GFLOP/s, "
                  f"peak RSS {r['peak_rss_gb']:.1f} GB", file=sys.stderr, flush=True)  # partial results survive a kill
    return {"bf16_rate": bf16, "fp32_rate": big_gemm_rate(rates["float32"]), "runs": runs}


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
    p.add_argument("--compute", action="store_true", help="SFT / DPO step time and GFLOP/s, old vs new settings, "
                                                           "on --model (default runs/models/smollm2)")
    p.add_argument("--compute-steps", type=int, default=2, help="steps per config, the first untimed (default 2)")
    p.add_argument("--compute-sft-batch", type=int, default=4, help="SFT rows per step (default 4)")
    p.add_argument("--compute-dpo-batch", type=int, default=2, help="DPO pairs per step (default 2)")
    p.add_argument("--compute-profile", action="store_true",
                   help="profile the last step of each new-settings run (torch.profiler): the share of CPU time in "
                        "matmul kernels and the top ops (one more step each)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    if a._child:
        kind, setting, model_dir, batch, steps, max_length, threads, profile = json.loads(a._child)
        torch.set_num_threads(threads)
        logging.basicConfig(level=logging.WARNING)
        from trainer.dpo import quiet_libraries

        quiet_libraries()
        print(json.dumps(compute_child(kind, setting, model_dir, batch, steps, max_length, profile)))
        return 0
    if a.threads and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
    if a.compute:
        res = compute_bench(a)
        if a.json:
            print(json.dumps(res))
            return 0
        print(f"matmul big-GEMM rate ({a.threads} threads): bf16 {res['bf16_rate']:.0f} GFLOP/s, "
              f"fp32 {res['fp32_rate']:.0f} GFLOP/s")
        by = {(r["kind"], r["setting"]): r for r in res["runs"]}
        for (kind, setting), r in by.items():
            print(f"{kind} {setting:3s} ({r['dtype']:>7s}, {'completion-only' if setting == 'new' else 'every-position'}"
                  f" head): {r['median_step_s']:6.1f} s/step  {r['gflops']:6.1f} GFLOP/s = "
                  f"{100 * r['of_bf16_rate']:4.0f}% of bf16 matmul  peak RSS {r['peak_rss_gb']:.1f} GB")
        for r in res["runs"]:
            if r.get("profile"):
                pr = r["profile"]
                print(f"{r['kind']} new, profiled step: {pr['self_cpu_s']:.1f} s CPU, {100 * pr['matmul_share']:.0f}% in "
                      "matmul kernels; top ops by self time:")
                for t in pr["top"]:
                    print(f"    {t['op']:<60s} {t['self_s']:7.2f} s  {100 * t['share']:4.1f}%  {t['calls']} calls")
        for kind in ("sft", "dpo"):
            o, n = by[(kind, "old")], by[(kind, "new")]
            print(f"{kind}: new/old speed-up {o['median_step_s'] / n['median_step_s']:.2f}x, "
                  f"peak RSS {n['peak_rss_gb'] / o['peak_rss_gb']:.2f}x")
        return 0

    logging.basicConfig(level=logging.WARNING)
    from trainer.config import RunConfig
    from trainer.dpo import quiet_libraries
    from trainer.synthetic import toy_pairs

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    if a.model:
        model_dir = a.model
    else:
        from simkit.modelserver.tiny import init_tiny

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
