"""`simkit demo` end to end on the tiny model (smaller sizes than the default so CI stays quick)."""
import json
import subprocess
import sys


def test_demo_runs_every_step_and_writes_tables_and_plots(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "simkit.cli", "demo", "--model", "tiny", "--out", str(out),
                          "--n", "16", "--sft-epochs", "1", "--act-steps", "4", "--publish-every", "2",
                          "--eval-tasks", "8", "--icl-shots", "1", "--max-tokens", "16", "--max-length", "512",
                          "--train-dtype", "float32", "--rollout-concurrency", "16", "--rollout-dtype", "bfloat16"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for row in ("| zero-shot |", "| ICL (1 shots) |", "| SFT (n=16) |", "| ACT (n=16) |"):
        assert row in res.stdout, row
    assert "demo finished" in res.stdout
    times = [line for line in res.stdout.splitlines() if line.startswith("stage wall times: ")]
    assert len(times) == 1 and all(f"{s} " in times[0]
                                   for s in ("model", "eval-zero-shot", "sft", "phase1", "act", "total"))
    assert all((out / "stages" / f"{s}.json").is_file()
               for s in ("model", "eval-icl", "sft", "eval-sft", "phase1", "act"))
    # Phase 1 ran as its own stage with every core; serve's ACT run took its pairs as they were
    assert (out / "serve" / "dpref.jsonl").read_bytes() == (out / "phase1" / "dpref.jsonl").read_bytes()
    # the embedded server: all cores for the evals; ACT's data in --rollout-dtype (Phase 1 with all cores,
    # the rollouts with half); all cores again for the last eval
    assert (out / "logs" / "model_server.log").read_text().count("simkit model-server: serving") == 4
    for f in ("results.md", "results.png", "eval-sft/confusion.png", "eval-act/confusion.png",
              "act/plots/loss.png", "sft/adapter/adapter_config.json", "sft/conversations.json", "demo.json"):
        assert (out / f).stat().st_size > 0, f
    runs = {d: json.loads((out / d / "metrics.json").read_text())
            for d in ("eval-zero-shot", "eval-icl", "eval-sft", "eval-act")}
    assert all(r["n"] == 8 for r in runs.values())
    from simkit.queue import open_queue

    with open_queue(out / "queue.sqlite") as q:
        last = q.current_version()
    rid = (out / "act" / "run_id").read_text().strip()  # adapter names carry the trainer's run id
    assert last is not None and last.adapter == f"act-{rid}-v{last.version}"
    assert runs["eval-sft"]["model"] == "sft" and runs["eval-act"]["model"] == last.adapter  # ACT row = newest version
    assert runs["eval-icl"]["icl_shots"] == 1 and runs["eval-sft"]["n_train"] == 16
    # SFT and ACT trained on the same recorded sample of 16 conversations
    sample = json.loads((out / "sft" / "conversations.json").read_text())
    assert sample["n_conversations"] == 16
    served = json.loads((out / "serve" / "conversations.json").read_text())
    assert served["conversation_ids"] == sample["conversation_ids"]


def test_train_dtype_auto_follows_the_cpus_bfloat16_flags(tmp_path):
    """The demo passes `--dtype auto` (it imports nothing from trainer): the trainer autocasts to bf16
    exactly where the CPU multiplies bfloat16 natively."""
    from simkit.demo import DemoConfig
    from trainer.models import cpu_autocasts, cpu_has_bf16, use_cuda

    with_bf16, without, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    other.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_bf16(str(with_bf16)) and cpu_has_bf16(str(other))
    assert not cpu_has_bf16(str(without)) and not cpu_has_bf16(str(tmp_path / "missing"))
    assert DemoConfig().train_dtype == "auto"
    assert cpu_autocasts("auto") == (cpu_has_bf16() and not use_cuda()) and not cpu_autocasts("float32")


def test_act_processes_share_the_cores_through_their_environment(tmp_path, monkeypatch):
    """During ACT the policy server and the trainer compute at once: the server gets half the cores,
    the trainer all of them with passive OpenMP threads (two spinning 2-thread pools on 2 cores made a
    DPO step 153 s instead of 27 s), and the server samples in bfloat16 where the CPU multiplies it
    natively."""
    from simkit import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo._cores_each() == 1
    assert demo._trainer_env() == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    assert demo._cores_each() == 8
    import simkit.modelserver.cpu as cpu

    for flags, want in ((True, "bfloat16"), (False, None)):
        monkeypatch.setattr(cpu, "cpu_has_bf16", lambda flags=flags: flags)
        assert demo._rollout_dtype("auto") == want
    assert demo._rollout_dtype("float32") == "float32"
    log = tmp_path / "child.log"
    demo._run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['PATH'] != '')"],
              log, 60, env={"OMP_NUM_THREADS": "3"})
    assert log.read_text().split() == ["3", "True"]  # the stage's variable, and the rest of the environment kept


def test_training_commands_split_each_step_into_micro_batches(tmp_path):
    """The demo trains one SFT row / DPO pair per forward by default (no padding between rows of
    212-1,668 tokens), the same 4 per optimizer step through gradient accumulation."""
    from simkit.demo import DemoConfig, DemoRun

    def flags(cmd):
        i = cmd.index("--batch-size")
        return cmd[i:i + 4]

    run = DemoRun(DemoConfig(out=tmp_path / "a"))
    assert flags(run._sft_cmd()) == ["--batch-size", "1", "--grad-accum", "4"]
    assert flags(run._trainer_cmd("http://127.0.0.1:1/v1")) == ["--batch-size", "1", "--grad-accum", "4"]
    run = DemoRun(DemoConfig(out=tmp_path / "b", sft_micro_batch=2, dpo_micro_batch=8))
    assert flags(run._sft_cmd()) == ["--batch-size", "2", "--grad-accum", "2"]
    assert flags(run._trainer_cmd("http://127.0.0.1:1/v1")) == ["--batch-size", "4", "--grad-accum", "1"]
