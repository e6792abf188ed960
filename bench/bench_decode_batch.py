"""The embedded server's decode loop in-process, without HTTP (issue: compute floor): how the running
batch's size (`--max-batch`) and the KV layout (per-row, or a slot pool: `--kv-pool-tokens`) change
the wall time of the same greedy work, in one run.

    python bench/bench_decode_batch.py --batches 32 64 --repeats 3
    python bench/bench_decode_batch.py --batches 32 --kv-pool-tokens 0 2048      # per-row vs pool

40 AmbigSQL-like prompts (a Spider schema from tables.json and a question), 64 greedy tokens each,
through `ContinuousBatcher` on SmolLM2 (fp32, prefix cache off), the batch sizes alternated. A decode
step reads every weight once however many rows it carries, so a bigger batch should cost less per
token until attention (which grows with the rows) dominates. Prints each median, the ratio to the
first setting, and whether the replies are identical across settings (they must be: greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/models/smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64], help="max-batch values; the first is the baseline")
    ap.add_argument("--kv-pool-tokens", type=int, nargs="+", default=[0],
                    help="KV layouts: 0 = per-row KV, N = a slot pool of N tokens a row (the GPU default)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from simkit.modelserver.batcher import ContinuousBatcher, GenRequest
    from simkit.modelserver.server import ModelRunner

    torch.set_num_threads(a.threads)
    runner = ModelRunner(a.model, "base", "float32", "cpu")
    data = os.environ.get("SIMKIT_DATA_DIR", "../shared/data")
    tables = json.load(open(os.path.join(data, "spider", "tables.json"), encoding="utf-8"))
    prompts = []
    for db in tables[:a.prompts]:
        schema = "\n".join(f"{t}: " + ", ".join(c for ti, c in db["column_names_original"] if ti == k)
                           for k, t in enumerate(db["table_names_original"]))
        prompts.append(runner.encode_chat([{"role": "system", "content": "You translate questions to SQL. Schema:\n" + schema},
                                           {"role": "user", "content": f"How many rows are in {db['db_id']}?"}]))

    def run(setting: tuple[int, int]) -> tuple[float, list[str]]:
        b = ContinuousBatcher(runner, max_batch=setting[0], max_num_batched_tokens=2048, prefix_cache_bytes=0,
                              kv_pool_tokens=setting[1])
        done = [threading.Event() for _ in prompts]
        texts: list[str] = [""] * len(prompts)

        def finish(i: int):
            def cb(res) -> None:
                texts[i] = res.text
                done[i].set()
            return cb

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            b.submit(GenRequest(p, "base", 64, 0.0, 1.0, None, [], finish(i), ignore_eos=True))
        for e in done:
            e.wait(900)
        wall = time.perf_counter() - t0
        b.close()
        return wall, texts

    settings = [(m, t) for m in a.batches for t in a.kv_pool_tokens]
    run(settings[0])  # warm-up
    walls: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    replies: dict[tuple[int, int], list[str]] = {}
    for _ in range(a.repeats):
        for s in settings:
            w, replies[s] = run(s)
            walls[s].append(w)
    base = statistics.median(walls[settings[0]])
    for s in settings:
        med = statistics.median(walls[s])
        same = sum(x == y for x, y in zip(replies[s], replies[settings[0]]))
        print(f"max-batch {s[0]:4d}, kv pool {s[1] or 'off':>5}: {med:6.2f} s median of {[round(w, 2) for w in walls[s]]}"
              f"  time / first: {med / base:.2f}  replies identical {same}/{len(prompts)}")
    os._exit(0)  # the batchers' daemon threads: no interpreter teardown under them


if __name__ == "__main__":
    raise SystemExit(main())
