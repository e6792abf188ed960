"""The two-process ACT loop, end to end with three real processes on a tiny model:
embedded model server ◄─ simkit serve ─► queue ─► trainer run ─► LoRA versions ─► server."""
import json
import sqlite3
import subprocess
import sys
import time

import aiohttp

from simkit.queue import open_queue
from simkit.loadtools.testing import start_process


async def test_serve_and_trainer_close_the_loop(model_server, tiny_model, tmp_path):
    queue, serve_dir, act_dir = tmp_path / "q.sqlite", tmp_path / "serve", tmp_path / "act"
    serve_cmd = [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(queue),
                 "--run-dir", str(serve_dir), "--policy", model_server.url, "--max-tokens", "8",
                 "--concurrency", "8", "--poll-s", "0.2", "--max-pending", "1000", "--save-trajectories"]
    trainer_cmd = [sys.executable, "-m", "trainer.cli", "run", "--model", str(tiny_model), "--queue", str(queue),
                   "--out", str(act_dir), "--policy-url", model_server.url, "--max-steps", "6",
                   "--publish-every", "2", "--batch-size", "2", "--max-length", "256", "--adapter-name", "act",
                   "--no-tensorboard", "--lr", "1e-3", "--max-staleness", "100"]
    with start_process(serve_cmd, None, tmp_path / "serve.log") as serve:
        res = subprocess.run(trainer_cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        q = open_queue(str(queue))
        versions = q.versions()
        rid = (act_dir / "run_id").read_text().strip()  # names carry the run id: unique across runs
        assert [v.version for v in versions] == [1, 2, 3]
        assert [v.adapter for v in versions] == [f"act-{rid}-v1", f"act-{rid}-v2", f"act-{rid}-v3"]
        assert len({v.path for v in versions}) == 3  # a new directory per version
        # serve follows: wait until its rollouts come from the newest adapter
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            text = (serve_dir / "metrics.jsonl").read_text() if (serve_dir / "metrics.jsonl").exists() else ""
            lines = text.split("\n")[:-1]  # complete lines only: serve may be mid-append
            if lines and json.loads(lines[-1])["version"] == 3 and json.loads(lines[-1])["adapter"] == f"act-{rid}-v3":
                break
            time.sleep(0.3)
        else:
            raise AssertionError("serve never switched to version 3")
        time.sleep(1.5)  # let a few v3 rollouts land

    async with aiohttp.ClientSession() as s:
        async with s.get(model_server.url + "/models") as r:
            listed = {m["id"] for m in (await r.json())["data"]}
        assert f"act-{rid}-v3" in listed
        async with s.post(model_server.url + "/chat/completions",
                          json={"model": f"act-{rid}-v3", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert (await r.json())["model"] == f"act-{rid}-v3"

    with sqlite3.connect(queue) as db:  # pairs record the version that produced them
        by_version = dict(db.execute("SELECT policy_version, count(*) FROM pairs GROUP BY policy_version"))
    assert by_version.get(0, 0) > 0 and any(v >= 1 for v in by_version)
    complete = (serve_dir / "trajectories.jsonl").read_text().split("\n")[:-1]  # serve may be mid-append
    served = {t["turns"][0]["model"]: t["policy_version"] for t in map(json.loads, complete) if t["turns"]}
    assert served.get(str(tiny_model)) == 0  # vLLM's served name: the --model argument verbatim
    assert any(name.startswith(f"act-{rid}-v") and v >= 1 for name, v in served.items())
    for name, v in served.items():
        if name.startswith("act-"):
            assert name == f"act-{rid}-v{v}"  # the adapter that served a rollout matches its stamped version
    metrics = [json.loads(line) for line in (act_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
