"""Model-server throughput vs a plain batched `model.generate`, same prompts, same run.

    python bench/bench_model_server.py --model runs/models/smollm2 --batch 32 --max-tokens 64

Baseline: the prompts (AmbigSQL test tasks, as the policy sees them) as one left-padded batch
through `model.generate` (greedy) in this process. Candidate: the same prompts sent at once to
`simkit model-server --max-batch B` (a subprocess on loopback) with temperature 0. Both count
generated tokens up to EOS; the ratio is candidate tokens/s over baseline tokens/s (target ≥ 0.8).
Don't run it beside other CPU work: both sides share the same cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(env_name: str, n: int) -> list[list[dict]]:
    import simkit

    env = simkit.make(env_name)
    tasks = env.tasks(list(env.splits())[-1])[:n]
    return [[{"role": m.role, "content": m.content} for m in env.episode(t).messages] for t in tasks]


def baseline(model_dir: str, chats: list[list[dict]], max_tokens: int) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                  return_dict=True)
    with torch.inference_mode():
        model.generate(**{k: v[:2] for k, v in enc.items()}, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        wall = time.perf_counter() - t0
    tokens = 0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        tokens += row.index(eos) if eos in row else len(row)
    return tokens, wall


async def served(url: str, chats: list[list[dict]], max_tokens: int) -> tuple[int, float]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
        async def one(chat):
            async with s.post(url + "/chat/completions", json={"messages": chat, "max_tokens": max_tokens,
                                                               "temperature": 0}) as r:
                r.raise_for_status()
                return (await r.json())["usage"]["completion_tokens"]

        await one(chats[0][:1] + [{"role": "user", "content": "hi"}])  # warm-up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(c) for c in chats))
        return sum(counts), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/models/smollm2", help="checkpoint folder (default runs/models/smollm2)")
    ap.add_argument("--env", default="ambigsql", help="where the prompts come from (default ambigsql)")
    ap.add_argument("--batch", type=int, default=32, help="prompts = server --max-batch (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--out", default="bench/results_model_server.json", help="JSON results file")
    args = ap.parse_args()

    from simkit.loadtools.testing import free_port, start_model_server

    chats = prompts(args.env, args.batch)
    with start_model_server(args.model, port=free_port(), extra_args=["--max-batch", str(args.batch)]) as srv:
        base_tokens, base_wall = baseline(args.model, chats, args.max_tokens)
        srv_tokens, srv_wall = asyncio.run(served(srv.url, chats, args.max_tokens))
    base_tps, srv_tps = base_tokens / base_wall, srv_tokens / srv_wall
    res = {"model": args.model, "env": args.env, "batch": args.batch, "max_tokens": args.max_tokens,
           "threads": os.cpu_count(), "baseline": {"tokens": base_tokens, "wall_s": round(base_wall, 2),
                                                   "tokens_per_s": round(base_tps, 1)},
           "server": {"tokens": srv_tokens, "wall_s": round(srv_wall, 2), "tokens_per_s": round(srv_tps, 1)},
           "ratio": round(srv_tps / base_tps, 3)}
    print(f"plain model.generate : {base_tokens} tokens in {base_wall:.1f}s = {base_tps:.1f} tok/s")
    print(f"simkit model-server  : {srv_tokens} tokens in {srv_wall:.1f}s = {srv_tps:.1f} tok/s")
    print(f"ratio server/generate: {res['ratio']:.2f}x (target >= 0.8x)")
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
