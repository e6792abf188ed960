"""`simkit demo`: the whole ACT pipeline, offline on CPU, in a few minutes.

    tiny model ─► model-server (base) ─► trainer sft (LoRA "sft", hot-loaded) ─► eval (SFT)
        ─► simkit serve ‖ trainer run  (ACT from the same base; versions hot-loaded) ─► eval (ACT)
        ─► both tables side by side + plots

As in the paper, SFT and ACT are each trained from the same base model on the same task pool.

Every step is the real command as a subprocess, so the demo is also a smoke test of the CLI.
With `--model DIR` it starts from a real checkpoint; with `--policy URL` it uses a running
OpenAI-compatible server (e.g. vLLM with --enable-lora) instead of starting the embedded one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    t0 = time.monotonic()
    with open(log, "ab") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise SystemExit(f"demo step failed ({' '.join(cmd[:4])} …, exit {res.returncode}); log {log}:\n{tail}")
    print(f"    done in {time.monotonic() - t0:.0f}s (log: {log})", flush=True)


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="offline end-to-end demo: tiny model → SFT → eval → ACT loop → eval",
        description="Run the whole ACT pipeline on AmbigSQL, offline on CPU: create a tiny model (or use --model), "
                    "SFT baseline, evaluate, a short ACT loop (`simkit serve` + `trainer run` as two processes with "
                    "hot-reloaded LoRA versions), evaluate again, print both tables side by side and write plots.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; removed first)")
    p.add_argument("--model", help="base model directory (default: a fresh tiny random Llama)")
    p.add_argument("--policy", help="use this running OpenAI-compatible server (serving --model with LoRA "
                                    "enabled) instead of starting the embedded model server")
    p.add_argument("--env", default="ambigsql", help="environment (default ambigsql)")
    p.add_argument("--sft-tasks", type=int, default=256, help="training conversations for SFT (default 256)")
    p.add_argument("--sft-steps", type=int, default=100, help="SFT optimizer steps (default 100)")
    p.add_argument("--act-tasks", type=int, default=128, help="training conversations for ACT (default 128)")
    p.add_argument("--act-steps", type=int, default=24, help="DPO optimizer steps (default 24)")
    p.add_argument("--publish-every", type=int, default=8, help="publish a policy version every N steps (default 8)")
    p.add_argument("--eval-tasks", type=int, default=96, help="evaluation tasks (default 96)")
    p.add_argument("--max-tokens", type=int, default=48, help="policy completion tokens (default 48)")
    p.add_argument("--max-length", type=int, default=1024, help="training max tokens (default 1024)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate for SFT and DPO (default 5e-3: tiny model)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    from .eval import compare
    from .testing import free_port, start_model_server, start_process

    py = sys.executable
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir()
    t_start = time.monotonic()

    base = Path(args.model).resolve() if args.model else out / "tiny-llama"
    if not args.model:
        _step("1/6 tiny model (random Llama + offline tokenizer)")
        corpus = out / "tokenizer_corpus.txt"
        write_corpus(args.env, corpus, args.sft_tasks * 4)
        _run([py, "-m", "simkit.cli", "model", "init-tiny", "--out", str(base), "--corpus", str(corpus),
              "--vocab-size", "4096", "--hidden-size", "128"], logs / "init.log", 300)

    _step(f"2/6 SFT baseline on {args.sft_tasks} {args.env} reference conversations")
    train_common = ["--lr", str(args.lr), "--max-length", str(args.max_length), "--batch-size", "4",
                    "--no-tensorboard", "--lora-r", "16", "--lora-alpha", "32"]
    _run([py, "-m", "trainer.cli", "sft", "--model", str(base), "--env", args.env, "--split", "train",
          "--limit", str(args.sft_tasks), "--max-steps", str(args.sft_steps), "--out", str(out / "sft"),
          *train_common], logs / "sft.log", 1200)
    sft_adapter = out / "sft" / "adapter"

    def pipeline(policy_url: str) -> None:
        evals = []
        load_adapter(policy_url, "sft", sft_adapter)

        def evaluate(label: str, model: str | None) -> Path:
            d = out / f"eval-{label.lower()}"
            cmd = [py, "-m", "simkit.cli", "eval", "--env", args.env, "--split", "test", "--limit",
                   str(args.eval_tasks), "--policy", policy_url, "--temperature", "0", "--max-tokens",
                   str(args.max_tokens), "--out", str(d), "--label", label, "--concurrency", "32"]
            _run(cmd + (["--policy-model", model] if model else []), logs / f"eval-{label.lower()}.log", 1200)
            evals.append(d)
            return d

        _step(f"3/6 evaluate SFT on {args.eval_tasks} held-out tasks")
        evaluate("SFT", "sft")

        _step(f"4/6 ACT loop: simkit serve ‖ trainer run ({args.act_steps} DPO steps, "
              f"a version every {args.publish_every})")
        queue = out / "queue.sqlite"
        serve_cmd = [py, "-m", "simkit.cli", "serve", "--env", args.env, "--split", "train", "--limit",
                     str(args.act_tasks), "--queue", str(queue), "--run-dir", str(out / "serve"), "--policy",
                     policy_url, "--max-tokens", str(args.max_tokens), "--concurrency", "32", "--poll-s", "0.5",
                     "--max-pending", "256"]
        with start_process(serve_cmd, None, logs / "serve.log"):
            _run([py, "-m", "trainer.cli", "run", "--model", str(base), "--queue", str(queue), "--out",
                  str(out / "act"), "--policy-url", policy_url, "--max-steps", str(args.act_steps),
                  "--publish-every", str(args.publish_every), "--adapter-name", "act", *train_common],
                 logs / "trainer.log", 1800)
        from .queue import open_queue

        q = open_queue(str(queue))
        v = q.current_version()
        q.close()
        if v is None:
            raise SystemExit(f"the trainer published no version; see {logs / 'trainer.log'}")
        serve_metrics = (out / "serve" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(serve_metrics[-1]) if serve_metrics else {}
        print(f"    trainer published v{v.version} ({v.adapter}); serve ran {last.get('episodes')} episodes, "
              f"{last.get('pairs')} pairs, last on v{last.get('version')}")

        _step(f"5/6 evaluate ACT ({v.adapter})")
        evaluate("ACT", v.adapter)

        _step("6/6 results")
        _run([py, "-m", "trainer.cli", "plot", str(out / "act")], logs / "plot.log", 300)
        table = compare(evals)
        (out / "results.md").write_text(table + "\n")
        plot_side_by_side(evals, out / "sft_vs_act.png")
        print(table)
        print(f"\nplots: {out / 'sft_vs_act.png'}, {evals[0] / 'confusion.png'}, {evals[1] / 'confusion.png'}, "
              f"{out / 'act' / 'plots'}/*.png")

    if args.policy:
        pipeline(args.policy)
    else:
        with start_model_server(base, port=free_port(), log_path=logs / "model_server.log") as srv:
            pipeline(srv.url)
    print(f"\ndemo finished in {time.monotonic() - t_start:.0f}s; everything is in {out}")
    return 0


def load_adapter(policy_url: str, name: str, path: Path) -> None:
    """vLLM's runtime LoRA load (the embedded server speaks the same API)."""
    import urllib.request

    req = urllib.request.Request(policy_url.rstrip("/") + "/load_lora_adapter", method="POST",
                                 data=json.dumps({"lora_name": name, "lora_path": str(path),
                                                  "load_inplace": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if r.status != 200:
            raise SystemExit(f"could not load adapter {name} into {policy_url}: HTTP {r.status}")


def write_corpus(env_name: str, path: Path, n: int) -> None:
    """Task text (prompts and references of the training split) for the tiny tokenizer."""
    from .env import make

    env = make(env_name)
    with open(path, "w", encoding="utf-8") as f:
        for t in env.tasks(next(iter(env.splits())))[:n]:
            for m in [*t.prompt]:
                f.write(m.content + "\n")
            f.write(t.reference + "\n" + str(t.goal) + "\n")


def plot_side_by_side(run_dirs: list[Path], path: Path) -> None:
    """Grouped bars: each metric for each run (x100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import COLUMNS

    runs = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    keys = [(k, label) for k, label in COLUMNS]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [100 * (r.get(k) or 0) for k, _ in keys], width, label=r.get("label"))
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))], [lbl for _, lbl in keys], fontsize=8)
    ax.set_ylabel("score (x100)")
    ax.set_title(f"{runs[0].get('env')}: " + " vs ".join(str(r.get("label")) for r in runs), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
