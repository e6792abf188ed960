"""`simkit demo --policy-server vllm`: the demo's supported CPU path on real vLLM (the `vllm` tier;
skipped without vLLM's venv, failed instead with SIMKIT_REQUIRE_VLLM=1). Tiny sizes: the wiring, not
learning — the same pipeline as tests/test_demo.py, with vLLM serving the base model and every
adapter the demo loads (SFT, then each ACT version)."""
import json
import os
import subprocess
import sys

import pytest

from simkit.loadtools.testing import vllm_venv

pytestmark = pytest.mark.vllm


def test_demo_on_real_vllm(tmp_path):
    if not (vllm_venv() / "bin" / "python").exists():
        msg = f"real vLLM is not installed at {vllm_venv()}: run scripts/install_vllm_cpu.sh"
        if os.environ.get("SIMKIT_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "simkit.cli", "demo", "--model", "tiny", "--policy-server", "vllm",
                          "--out", str(out), "--n", "8", "--sft-epochs", "1", "--act-steps", "2", "--publish-every",
                          "1", "--eval-tasks", "4", "--icl-shots", "1", "--max-tokens", "16", "--max-length", "512",
                          "--train-dtype", "float32", "--rollout-concurrency", "8"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "starting real vLLM" in res.stdout and (out / "logs" / "vllm.log").stat().st_size > 0
    assert not (out / "logs" / "model_server.log").exists()  # the embedded server never started
    for row in ("| zero-shot |", "| SFT (n=8) |", "| ACT (n=8) |"):
        assert row in res.stdout, row
    runs = {d: json.loads((out / d / "metrics.json").read_text()) for d in ("eval-sft", "eval-act")}
    assert runs["eval-sft"]["model"] == "sft" and runs["eval-act"]["model"].startswith("act-")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [p for p in ps if "vllm.entrypoints" in p and str(out) in p], "the demo left its vLLM running"
