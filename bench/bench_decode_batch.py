"""The embedded server's decode loop in-process, without HTTP (issue: compute floor): how the running
batch's size (`--max-batch`) changes the wall time of the same greedy work, in one run.

    python bench/bench_decode_batch.py --batches 32 64 --repeats 3

40 AmbigSQL-like prompts (a Spider schema from tables.json and a question), 64 greedy tokens each,
through `ContinuousBatcher` on SmolLM2 (fp32, prefix cache off), the batch sizes alternated. A decode
step reads every weight once however many rows it carries, so a bigger batch should cost less per
token until attention (which grows with the rows) dominates. Prints each median, the ratio to the
first size, and whether the replies are identical across sizes (they must be: greedy).
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

    def run(max_batch: int) -> tuple[float, list[str]]:
        b = ContinuousBatcher(runner, max_batch=max_batch, max_num_batched_tokens=2048, prefix_cache_bytes=0)
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

    run(a.batches[0])  # warm-up
    walls: dict[int, list[float]] = {m: [] for m in a.batches}
    replies: dict[int, list[str]] = {}
    for _ in range(a.repeats):
        for m in a.batches:
            w, replies[m] = run(m)
            walls[m].append(w)
    base = statistics.median(walls[a.batches[0]])
    for m in a.batches:
        med = statistics.median(walls[m])
        same = sum(x == y for x, y in zip(replies[m], replies[a.batches[0]]))
        print(f"max-batch {m:4d}: {med:6.2f} s median of {[round(w, 2) for w in walls[m]]}  "
              f"time / max-batch {a.batches[0]}: {med / base:.2f}  replies identical {same}/{len(prompts)}")
    os._exit(0)  # the batchers' daemon threads: no interpreter teardown under them


if __name__ == "__main__":
    raise SystemExit(main())
