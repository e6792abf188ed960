"""Where a decode step's attention time goes (issue: compute floor): per-row sdpa calls, as the
embedded server makes them (`simkit.modelserver.kvcache.varlen_attention`), against one batched,
masked sdpa over a slot pool, and against the bytes of K/V each must read.

    python bench/bench_decode_attention.py --rows 32 --threads 2

SmolLM2-135M's shapes (30 layers, 3 KV heads x 3 query heads each, head dim 64); each row's length
is drawn from 300..1000 tokens (AmbigSQL prompts plus a reply). If the per-row calls cost mostly
Python and dispatch overhead, the batched call wins; if both sit near the K/V read rate, the cost
is memory traffic, and only a smaller KV dtype or fewer bytes read would cut it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="decoding rows (the embedded server's max batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    layers, kvh, group, hd, max_len = 30, 3, 3, 64, 1024
    lens = torch.randint(300, 1000, (a.rows,))
    pool_k = torch.randn(a.rows, kvh, max_len, hd, dtype=dtype)
    pool_v = torch.randn(a.rows, kvh, max_len, hd, dtype=dtype)
    q = torch.randn(a.rows, kvh, group, hd, dtype=dtype)
    lmax = int(lens.max())
    mask = (torch.arange(lmax)[None, :] < lens[:, None])[:, None, None, :]

    def per_row() -> torch.Tensor:
        return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], pool_k[i:i + 1, :, :int(lens[i])],
                                                         pool_v[i:i + 1, :, :int(lens[i])]) for i in range(a.rows)])

    def batched() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, pool_k[:, :, :lmax], pool_v[:, :, :lmax], attn_mask=mask)

    diff = (per_row().float() - batched().float()).abs().max().item()
    times: dict[str, list[float]] = {"per_row": [], "batched": []}
    for _ in range(a.repeats):  # alternated
        for name, fn in (("per_row", per_row), ("batched", batched)):
            fn()
            t = time.perf_counter()
            for _ in range(layers):
                fn()
            times[name].append(time.perf_counter() - t)
    kv_bytes = layers * 2 * int(lens.sum()) * kvh * hd * pool_k.element_size()
    pr, ba = statistics.median(times["per_row"]), statistics.median(times["batched"])
    print(f"{a.rows} rows, {a.threads} threads, {a.dtype}; max |per-row - batched| = {diff:.2e}")
    print(f"per-row sdpa ({layers * a.rows} calls): {1e3 * pr:.1f} ms/step, K/V read {kv_bytes / pr / 1e9:.1f} GB/s")
    print(f"batched sdpa ({layers} calls):     {1e3 * ba:.1f} ms/step  -> batched / per-row time {ba / pr:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
