"""Loading the base model + tokenizer, the LoRA config, precision, merging."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer")


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). There `bf16-mixed` LoRA
    steps on SmolLM2 ran 1.5x faster than float32 (bench/RESULTS.md); elsewhere autocast emulates
    bfloat16 and gains nothing."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if use_cuda() else torch.float32
    if name == "bf16-mixed":  # float32 weights (and LoRA/optimizer state); the matmuls autocast to bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def precision_args(dtype_name: str) -> dict[str, Any]:
    """TrainingArguments precision flags matching the weights dtype: bf16 autocast on GPU, and on
    any device for `bf16-mixed`."""
    import torch

    dt = torch_dtype(dtype_name)
    on_gpu = use_cuda()
    mixed_cpu = dtype_name == "bf16-mixed" and not on_gpu
    return {"bf16": (on_gpu and dt == torch.bfloat16) or dtype_name == "bf16-mixed",
            "fp16": on_gpu and dt == torch.float16, **({"use_cpu": True} if mixed_cpu else {})}


def checkpointing_args(args_cls, enabled: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing flag under its current name (transformers 5 renamed it)."""
    fields = getattr(args_cls, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{model}: the tokenizer has no chat template; conversational pairs need one")
    return tok


def load_model(model: str, dtype_name: str = "auto"):
    """`from_pretrained(path or hub id)` — the base model the LoRA adapter trains on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(dtype_name))


def lora_config(cfg) -> Any:
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets[0] if targets == ["all-linear"] else list(targets))


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path, dtype_name: str = "auto") -> Path:
    """Base + adapter → merged full weights in `out_dir` (loadable by any server with a restart)."""
    from peft import PeftModel

    out = Path(out_dir)
    model = PeftModel.from_pretrained(load_model(base_model, dtype_name), str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    load_tokenizer(base_model).save_pretrained(out)
    log.info("merged weights written to %s", out)
    return out
