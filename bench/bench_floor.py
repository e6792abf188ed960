"""Compute floor of each `simkit demo` stage on this machine: measured matmul rate x FLOPs to do.

1. Times torch.mm at SmolLM2-135M's shapes (hidden 576, intermediate 1536, kv 192, vocab 49152;
   rows = tokens in flight) in float32 and bfloat16, with the torch threads given.
2. Counts the FLOPs each stage must do (2 x params per token through 30 layers, causal attention,
   the LM head only where it is needed: every completion token in training, the last position per
   generated token in rollouts):
     SFT row      fwd + bwd of a LoRA'd model (frozen base: the backward is one more pass for the
                  activation gradients) = 2 x forward(T tokens, C scored)
     DPO pair     chosen + rejected, each policy fwd + bwd + reference fwd = 2 x 3 x forward
     rollouts     prefill (P prompt tokens) + decode (D tokens, growing context), per generation
     eval         the same as a rollout
3. Prints per stage: measured time (if given), floor = FLOPs / bf16 big-GEMM rate, and the ratio.

Counts come from flags (defaults: the demo's defaults on AmbigSQL-like ~400-token prompts) or
from a finished demo's run directory (`--run RUN`: stage wall times from RUN/stages/*.json, rows,
pairs and episodes from its logs).

    .venv/bin/python bench/bench_floor.py                        # rates + floors, demo defaults
    .venv/bin/python bench/bench_floor.py --run runs/demo        # + measured stage times and ratios
    .venv/bin/python bench/bench_floor.py --time sft=900 --time act=2400 --sft-rows 260
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Shape:
    hidden: int = 576
    inter: int = 1536
    kv: int = 192  # 3 KV heads x 64
    vocab: int = 49152
    layers: int = 30

    @classmethod
    def from_model(cls, model: str | None) -> "Shape":
        if not model or not (Path(model) / "config.json").is_file():
            return cls()
        c = json.loads((Path(model) / "config.json").read_text())
        head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], head * c.get("num_key_value_heads", c["num_attention_heads"]),
                   c["vocab_size"], c["num_hidden_layers"])

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return h * h * 2 + h * self.kv * 2 + 3 * h * self.inter

    def forward(self, tokens: int, scored: int, context: int | None = None) -> float:
        """FLOPs of one sequence's forward: `tokens` new positions (attending to `context` earlier
        ones plus themselves, causally), `scored` of them through the LM head."""
        ctx = context or 0
        linear = 2 * self.layer_params * self.layers * tokens
        # QK^T and AV: 2 matmuls x 2 FLOPs x hidden, per (query, key) pair under the causal mask
        pairs = tokens * ctx + tokens * (tokens + 1) / 2
        attention = 4 * self.hidden * pairs * self.layers
        return linear + attention + 2 * self.hidden * self.vocab * scored

    def generate(self, prompt: int, decode: int) -> float:
        """Prefill + decode of one generation (KV cache; the head on the last position only)."""
        total = self.forward(prompt, 1)
        for i in range(decode - 1):
            total += self.forward(1, 1, prompt + 1 + i)
        return total


def matmul_rates(shape: Shape, rows: int, threads: int, seconds: float) -> dict[str, dict[str, float]]:
    """GFLOP/s of torch.mm at the model's shapes, float32 and bfloat16."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    h, i, v = shape.hidden, shape.inter, shape.vocab
    cases = {"qkvo  (T x h) @ (h x h)": (rows, h, h), "up    (T x h) @ (h x i)": (rows, h, i),
             "down  (T x i) @ (i x h)": (rows, i, h), "head  (T x h) @ (h x V/4)": (min(rows, 512), h, v // 4),
             "decode (8 x h) @ (h x i)": (8, h, i)}
    out: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        out[name] = {}
        for label, (m, k, n) in cases.items():
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            torch.mm(a, b)
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(times) < 3:
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
            out[name][label] = 2 * m * k * n / statistics.median(times) / 1e9
    return out


def big_gemm_rate(rates: dict[str, float]) -> float:
    """The prefill / training rate: the median of the large-T shapes (not decode)."""
    return statistics.median(r for k, r in rates.items() if not k.startswith("decode"))


def from_run(run: Path) -> tuple[dict[str, float], dict[str, int]]:
    """(stage -> wall s, counts) from a finished demo's run directory."""
    times: dict[str, float] = {}
    for f in sorted((run / "stages").glob("*.json")):
        d = json.loads(f.read_text())
        times[d["stage"]] = float(d["wall_s"])
    counts: dict[str, int] = {}

    def events(path: Path) -> list[dict]:
        try:
            return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        except OSError:
            return []

    sft = events(run / "sft" / "metrics.jsonl")
    start = next((e for e in sft if e.get("event") == "start"), None)
    steps = sum(e.get("event") == "step" for e in sft)
    if start and steps:
        settings = json.loads((run / "settings.json").read_text()) if (run / "settings.json").is_file() else {}
        counts["sft_rows"] = steps * int(settings.get("batch_size", 4))
    act = [e for e in events(run / "act" / "metrics.jsonl") if e.get("event") == "commit"]
    if act:
        counts["dpo_pairs"] = int(act[-1]["committed_total"])
    serve = events(run / "serve" / "metrics.jsonl")
    if serve and serve[-1].get("episodes"):
        counts["rollouts"] = int(serve[-1]["episodes"])
    ev = [sum(1 for _ in open(p)) for p in run.glob("eval-*/episodes.jsonl")]
    if ev:
        counts["eval_episodes"] = max(ev)
    return times, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/models/smollm2", help="checkpoint dir for the shapes (config.json)")
    p.add_argument("--run", help="a finished `simkit demo` run directory: measured times and counts")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    p.add_argument("--rows", type=int, default=800, help="matmul rows (tokens in flight) when timing (default 800)")
    p.add_argument("--seconds", type=float, default=1.0, help="time per matmul shape and dtype (default 1)")
    p.add_argument("--prompt", type=int, default=400, help="prompt tokens (AmbigSQL ~370-400)")
    p.add_argument("--completion", type=int, default=48, help="completion tokens of a training row / pair side")
    p.add_argument("--decode", type=int, default=128, help="tokens generated per rollout / eval episode")
    p.add_argument("--sft-rows", type=int, default=3 * 130, help="SFT rows x epochs (demo: ~130 rows x 3 epochs)")
    p.add_argument("--dpo-pairs", type=int, default=120, help="DPO pairs trained (demo: 30 steps x 4)")
    p.add_argument("--rollouts", type=int, default=240,
                   help="policy generations of ACT rollouts, Phase 1 + Phase 2 (default 240: 2 per pair)")
    p.add_argument("--phase2-share", type=float, default=0.5,
                   help="share of rollouts that are Phase 2 (multi-turn: prompt + first reply + user turn)")
    p.add_argument("--eval-episodes", type=int, default=4 * 48, help="generations of the 4 evals (demo: 4 x 48)")
    p.add_argument("--time", action="append", default=[], metavar="STAGE=S",
                   help="measured wall time of a stage (sft, act, eval); overrides --run")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    shape = Shape.from_model(a.model)
    times, counts = from_run(Path(a.run)) if a.run else ({}, {})
    for k, v in counts.items():
        setattr(a, k, v)
    if times:
        times = {"sft": times.get("sft"), "act": times.get("act"),
                 "eval": sum(t for k, t in times.items() if k.startswith("eval-"))}
    for t in a.time:
        k, v = t.split("=", 1)
        times[k] = float(v)

    rates = matmul_rates(shape, a.rows, a.threads, a.seconds)
    bf16, fp32 = big_gemm_rate(rates["bfloat16"]), big_gemm_rate(rates["float32"])
    T = a.prompt + a.completion
    per = {
        "sft row": 2 * shape.forward(T, a.completion),
        "sft row, head on every position (old CPU path)": 2 * shape.forward(T, T),
        "dpo pair (policy fwd+bwd + reference fwd, x2 sides)": 2 * 3 * shape.forward(T, a.completion),
        "phase 1 rollout (prefill + decode)": shape.generate(a.prompt, a.decode),
        "phase 2 rollout (prefill + decode)": shape.generate(a.prompt + a.decode + 40, a.decode),
        "eval episode": shape.generate(a.prompt, a.decode),
    }
    phase2 = round(a.rollouts * a.phase2_share)
    stages = {
        "sft": per["sft row"] * a.sft_rows,
        "act": per["dpo pair (policy fwd+bwd + reference fwd, x2 sides)"] * a.dpo_pairs
        + per["phase 1 rollout (prefill + decode)"] * (a.rollouts - phase2)
        + per["phase 2 rollout (prefill + decode)"] * phase2,
        "eval": per["eval episode"] * a.eval_episodes,
    }
    result = {"threads": a.threads, "shape": shape.__dict__, "gflops": rates, "bf16_rate": bf16, "fp32_rate": fp32,
              "per_item_gflop": {k: v / 1e9 for k, v in per.items()},
              "stages": {k: {"gflop": f / 1e9, "floor_s": f / (bf16 * 1e9), "measured_s": times.get(k),
                             "ratio": (times[k] / (f / (bf16 * 1e9))) if times.get(k) else None}
                         for k, f in stages.items()}}
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"matmul GFLOP/s, {a.threads} threads, T={a.rows}:")
    for label in rates["float32"]:
        print(f"  {label:28s} fp32 {rates['float32'][label]:7.1f}   bf16 {rates['bfloat16'][label]:7.1f}")
    print(f"  big-GEMM rate (floor)        fp32 {fp32:7.1f}   bf16 {bf16:7.1f}")
    print(f"\nper item (prompt {a.prompt}, completion {a.completion}, decode {a.decode}):")
    for k, f in per.items():
        print(f"  {k:55s} {f / 1e9:8.1f} GFLOP  floor {f / (bf16 * 1e9):7.2f} s")
    print(f"\nstages (sft rows {a.sft_rows}, dpo pairs {a.dpo_pairs}, rollouts {a.rollouts}, "
          f"eval episodes {a.eval_episodes}):")
    for k, s in result["stages"].items():
        meas = f"{s['measured_s']:8.0f} s  ratio {s['ratio']:6.1f}x" if s["measured_s"] else "  (no measured time)"
        print(f"  {k:5s} {s['gflop']:9.0f} GFLOP  floor {s['floor_s']:8.1f} s  measured {meas}")
    print("decode runs at the small-M rate (weights re-read per token): "
          f"bf16 {rates['bfloat16']['decode (8 x h) @ (h x i)']:.0f} GFLOP/s, so rollouts' real floor is higher")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
