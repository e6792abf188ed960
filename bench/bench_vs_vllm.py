"""The embedded model server vs a running real vLLM on the same eval, same run.

    python bench/bench_vs_vllm.py --vllm-url http://127.0.0.1:8100/v1 --limit 48 --seed 0

Runs `simkit eval` (AmbigSQL test tasks, greedy, 128 new tokens: eval's defaults) twice: against
the given vLLM URL and against `simkit model-server` started here on the same checkpoint (model
load not timed). Prints the wall time of each, the ratio embedded/vLLM, and for how many tasks the
first policy reply is identical. `--embedded-args` passes extra server flags (e.g.
`--prefix-cache-mb 0` for an ablation). Both sides share the machine's cores: run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_eval(url: str, out: Path, args: argparse.Namespace, model: str | None) -> float:
    """Wall seconds of one `simkit eval` against `url`."""
    cmd = [sys.executable, "-m", "simkit.cli", "eval", "--env", args.env, "--limit", str(args.limit),
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
    ap.add_argument("--vllm-url", default="http://127.0.0.1:8100/v1", help="running vLLM's /v1 URL")
    ap.add_argument("--vllm-model", default="smollm2", help="model name vLLM serves (default smollm2)")
    ap.add_argument("--model", default="runs/models/smollm2", help="checkpoint the embedded server loads")
    ap.add_argument("--env", default="ambigsql")
    ap.add_argument("--limit", type=int, default=48, help="tasks (default 48)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64, help="episodes in flight (eval's default 64)")
    ap.add_argument("--embedded-args", default="", help="extra `simkit model-server` flags, one string")
    ap.add_argument("--out", default="bench/results_vs_vllm.json", help="JSON results file")
    args = ap.parse_args()

    from simkit.testing import free_port, start_model_server

    tmp = Path(tempfile.mkdtemp(prefix="vs_vllm_"))
    extra = shlex.split(args.embedded_args)
    vllm_s = run_eval(args.vllm_url, tmp / "vllm", args, args.vllm_model)
    with start_model_server(args.model, port=free_port(), log_path=tmp / "server.log", extra_args=extra) as srv:
        emb_s = run_eval(srv.url, tmp / "embedded", args, None)
        emb_metrics = metrics_of(srv.url)
    a, b = first_replies(tmp / "vllm"), first_replies(tmp / "embedded")
    same = sum(1 for k in a if k in b and a[k] == b[k])
    res = {"env": args.env, "limit": args.limit, "seed": args.seed, "cpus": os.cpu_count(),
           "embedded_args": extra, "vllm_s": round(vllm_s, 1), "embedded_s": round(emb_s, 1),
           "ratio_embedded_over_vllm": round(emb_s / vllm_s, 3), "tasks": len(a),
           "identical_first_replies": same, "differing_tasks": sorted(k for k in a if a[k] != b.get(k)),
           "embedded_metrics": emb_metrics, "workdir": str(tmp)}
    print(f"vLLM ({args.vllm_url})   : {vllm_s:.1f}s")
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
