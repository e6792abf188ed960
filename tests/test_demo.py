"""`simkit demo` end to end (smaller sizes than the default so CI stays quick)."""
import json
import subprocess
import sys


def test_demo_runs_every_step_and_writes_tables_and_plots(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "simkit.cli", "demo", "--out", str(out), "--sft-tasks", "32",
                          "--sft-steps", "4", "--act-tasks", "24", "--act-steps", "4", "--publish-every", "2",
                          "--eval-tasks", "12", "--max-tokens", "16", "--max-length", "512"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| SFT |" in res.stdout and "| ACT |" in res.stdout and "demo finished" in res.stdout
    for f in ("results.md", "sft_vs_act.png", "eval-sft/confusion.png", "eval-act/confusion.png",
              "act/plots/loss.png", "sft/adapter/adapter_config.json"):
        assert (out / f).stat().st_size > 0, f
    sft, act = (json.loads((out / d / "metrics.json").read_text()) for d in ("eval-sft", "eval-act"))
    assert sft["n"] == act["n"] == 12 and sft["model"] == "sft" and act["model"] == "act-v2"
