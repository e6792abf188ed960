"""`simkit serve --workers 2` vs one worker, episodes/s against the fake server, same run.

    .venv/bin/python bench/bench_serve_workers.py                 # toy env, 40 epochs per run
    .venv/bin/python bench/bench_serve_workers.py --epochs 10 --workers 2 --json out.json

Both runs use the same fake server process (latency --latency-ms, no faults) for all three
roles, the toy env (200 tasks) and --concurrency per worker. Throughput is Phase 2 episodes over
the Phase 2 wall time (the longest worker's `elapsed_s`), so Phase 1 and process start-up are
left out. On a 2-core box the fake server shares the cores with the workers: the ratio printed
is what this box gives, the fake server's CPU included.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simkit.loadtools.fakeserver import FakeConfig, start_fake_server  # noqa: E402
from simkit.serving.workers import last_row  # noqa: E402


def _server_cpu_s(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
        return float(json.loads(r.read())["cpu_s"])


def run_serve(url: str, workers: int, epochs: int, concurrency: int, tmp: Path) -> dict:
    name = f"w{workers}"
    cmd = [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(tmp / f"{name}.db"),
           "--run-dir", str(tmp / name), "--policy", url, "--simulator", url, "--classifier", url,
           "--max-epochs", str(epochs), "--concurrency", str(concurrency), "--workers", str(workers),
           "--max-pending", "1000000"]
    s0 = _server_cpu_s(url)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # serve and its (joined) workers, start-up included
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    server_cpu = _server_cpu_s(url) - s0
    dirs = [tmp / name / f"worker-{g}" for g in range(workers)] if workers > 1 else [tmp / name]
    rows = [last_row(d / "metrics.jsonl") for d in dirs]
    episodes = sum(r["episodes"] for r in rows)
    wall = max(r["elapsed_s"] for r in rows)
    return {"workers": workers, "episodes": episodes, "wall_s": wall, "episodes_per_s": episodes / wall,
            "serve_cpu_s": cpu, "episodes_per_cpu_s": episodes / cpu, "server_cpu_s": server_cpu,
            "server_cpu_ms_per_episode": 1000 * server_cpu / episodes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40, help="passes over the 200 toy tasks per run (default 40)")
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-process run (default 2)")
    p.add_argument("--concurrency", type=int, default=64, help="episodes in flight per worker (default 64)")
    p.add_argument("--latency-ms", type=float, default=1.0, help="fake server latency (default 1 ms)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    with start_fake_server(FakeConfig(latency_ms=a.latency_ms)) as srv, tempfile.TemporaryDirectory() as d:
        url = f"http://127.0.0.1:{srv.port}/v1"
        one = run_serve(url, 1, a.epochs, a.concurrency, Path(d))
        many = run_serve(url, a.workers, a.epochs, a.concurrency, Path(d))
    ratio = many["episodes_per_s"] / one["episodes_per_s"]
    for r in (one, many):
        print(f"workers {r['workers']}: {r['episodes']} episodes in {r['wall_s']:.2f}s = {r['episodes_per_s']:.0f} ep/s; "
              f"serve CPU {r['serve_cpu_s']:.2f}s = {r['episodes_per_cpu_s']:.0f} ep per CPU-s; fake server "
              f"{r['server_cpu_ms_per_episode']:.2f} ms CPU per episode")
    print(f"# {os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    print(f"ratio {a.workers} workers / 1 worker: {ratio:.2f}x episodes/s "
          f"(CPU efficiency ratio {many['episodes_per_cpu_s'] / one['episodes_per_cpu_s']:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps({"one": one, "many": many, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
