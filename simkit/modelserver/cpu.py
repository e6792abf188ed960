"""What this CPU computes fast: shared by the trainer (bf16 autocast) and the demo (bf16 rollouts)."""
from __future__ import annotations


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). There `bf16-mixed` LoRA
    steps on SmolLM2 ran 1.5x faster than float32, and the embedded server sampled ACT's rollouts
    1.5x faster in bfloat16 (bench/RESULTS.md); elsewhere bfloat16 is emulated and gains nothing."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
