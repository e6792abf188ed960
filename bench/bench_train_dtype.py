"""LoRA training step on CPU: float32 vs bfloat16 autocast (`--dtype bf16-mixed`), same run.

One forward + backward of a LoRA'd model on a batch of random tokens, alternating the two
precisions so that both see the same machine state; prints seconds per step and the ratio.
Where the CPU lacks bfloat16 instructions (no avx512_bf16 / amx_bf16) expect no gain.

    python bench/bench_train_dtype.py --model runs/models/smollm2 [--batch 4 --tokens 700 --rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. runs/models/smollm2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=700, help="sequence length (AmbigSQL pairs: ~400-1000)")
    ap.add_argument("--rounds", type=int, default=2, help="timed steps per precision (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.models import cpu_has_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)  # warm-up
    for _ in range(args.rounds):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"cpu bf16 instructions: {cpu_has_bf16()}; threads {torch.get_num_threads()}; "
          f"batch {args.batch} x {args.tokens} tokens")
    print(f"float32     {fp32:6.2f} s/step  {[round(t, 2) for t in times[False]]}")
    print(f"bf16-mixed  {bf16:6.2f} s/step  {[round(t, 2) for t in times[True]]}")
    print(f"speed-up bf16-mixed / float32: {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
