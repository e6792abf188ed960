"""Self-healing adapters (issue 23): a restarted policy server starts without adapters. Whoever
holds the current version loads it again from the path it was published with: serve's follower
(when a policy call is answered "The model `x` does not exist.") and the trainer at start."""
import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.queue import open_queue
from simkit.loadtools.testing import free_port, start_process, wait_http
from trainer.publish import Publisher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(base_dir, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out_dir)
    return out_dir


def _models(url: str) -> set[str]:
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        return {m["id"] for m in json.load(r)["data"]}


def _post(url: str, path: str, body: dict) -> None:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()


def test_a_starting_trainer_reloads_the_current_version(tiny_model, model_server, tmp_path):
    """The server lost v1 (as after a restart) and the trainer that published it is done: the next
    trainer start (`check_servers`, before step 1) loads v1 again from its recorded path."""
    url = model_server.url
    with open_queue(tmp_path / "q.db") as q:
        pub = Publisher(q, [url], tmp_path / "adapters", adapter_name="heal", run_id="r23")
        res = pub.publish(_adapter(tiny_model, tmp_path / "ckpt"))
        pub.close()
        _post(url, "/unload_lora_adapter", {"lora_name": res.adapter})
        assert res.adapter not in _models(url)
        again = Publisher(q, [url], tmp_path / "adapters", adapter_name="heal", run_id="r24")
        again.check_servers(4, ["q_proj", "v_proj"])
        again.close()
    assert res.adapter in _models(url)


def _rows(path):
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _wait_row(path, pred, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited"
        rows = _rows(path)
        if rows and pred(rows[-1]):
            return rows[-1]
        time.sleep(0.2)
    raise AssertionError(f"timed out; last row {(_rows(path) or [None])[-1]}")


def test_serve_heals_a_restarted_policy_server(tiny_model, tmp_path):
    """The model server is SIGKILLed and restarted mid-run: its episodes fail while it is down,
    then serve's follower loads v1 again and the failures stop (before: every episode failed on
    "The model ... does not exist." until the trainer published again, here: never)."""
    port = free_port()
    ms_url = f"http://127.0.0.1:{port}/v1"
    ms_cmd = [sys.executable, "-m", "simkit.cli", "model-server", "--model", str(tiny_model), "--port", str(port)]
    queue, run_dir = tmp_path / "q.db", tmp_path / "serve"
    one_thread = {"OMP_NUM_THREADS": "1"}  # a small shared CPU: no OpenMP spin contention
    with start_fake_server(FakeConfig(latency_ms=5)) as fake, \
            start_process(ms_cmd, ms_url[:-3] + "/health", tmp_path / "ms.log", env=one_thread) as ms:
        with open_queue(queue) as q:
            pub = Publisher(q, [ms_url], tmp_path / "adapters", adapter_name="heal", run_id="r23")
            adapter = pub.publish(_adapter(tiny_model, tmp_path / "ckpt")).adapter
            pub.close()
        fake_url = f"http://127.0.0.1:{fake.port}/v1"
        serve = subprocess.Popen(
            [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(queue), "--run-dir",
             str(run_dir), "--policy", ms_url, "--simulator", fake_url, "--classifier", fake_url, "--concurrency", "2",
             "--max-tokens", "4", "--timeout", "60", "--poll-s", "0.2", "--pairs-per-conversation", "one"],
            stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT)
        try:
            metrics = run_dir / "metrics.jsonl"
            _wait_row(metrics, lambda r: r["episodes"] >= 8 and r["version"] == 1, 240, serve)
            ms.send_signal(signal.SIGKILL)
            ms.wait()
            with start_process(ms_cmd, ms_url[:-3] + "/health", tmp_path / "ms2.log", env=one_thread):
                assert adapter not in _models(ms_url)  # a fresh server: no adapters
                time.sleep(8)  # bounded: in-flight episodes finish (failing or not) and serve heals
                settled = _rows(metrics)[-1]
                last = _wait_row(metrics, lambda r: r["episodes"] >= settled["episodes"] + 10, 240, serve)
                assert adapter in _models(ms_url)
            assert last["failures"] == settled["failures"], (settled, last)  # no failure once healed
            assert last["adapter_heals"] >= 1 and last["version"] == 1 and last["pairs"] > settled["pairs"]
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                code = serve.wait(180)  # in-flight episodes finish first
            except subprocess.TimeoutExpired:
                serve.kill()
                code = serve.wait()
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    assert "had lost adapter" in log and "Traceback" not in log, log[-3000:]
