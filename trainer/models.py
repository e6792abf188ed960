"""Loading the base model + tokenizer, the LoRA config, precision, merging."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from simkit.modelserver.cpu import cpu_has_bf16  # noqa: F401  (re-exported: trainer.models.cpu_has_bf16)

log = logging.getLogger("trainer")


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if use_cuda() else torch.float32
    if name == "bf16-mixed":  # float32 weights (and LoRA/optimizer state); the matmuls autocast to bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_autocasts(dtype_name: str) -> bool:
    """Whether training on this CPU runs float32 weights under bfloat16 autocast: `bf16-mixed`, and
    `auto` on a CPU with bfloat16 instructions (the fast default there; `float32` keeps plain fp32)."""
    return not use_cuda() and (dtype_name == "bf16-mixed" or (dtype_name == "auto" and cpu_has_bf16()))


def precision_args(dtype_name: str) -> dict[str, Any]:
    """TrainingArguments precision flags matching the weights dtype: bf16 autocast on GPU, and on a
    CPU for `bf16-mixed` or for `auto` where the CPU has bfloat16 instructions (`cpu_autocasts`)."""
    import torch

    dt = torch_dtype(dtype_name)
    on_gpu = use_cuda()
    mixed_cpu = cpu_autocasts(dtype_name)
    return {"bf16": (on_gpu and dt == torch.bfloat16) or dtype_name == "bf16-mixed" or mixed_cpu,
            "fp16": on_gpu and dt == torch.float16, **({"use_cpu": True} if mixed_cpu else {})}


def checkpointing_args(args_cls, enabled: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing flag under its current name (transformers 5 renamed it)."""
    fields = getattr(args_cls, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def frozen_weights_bf16(model) -> int:
    """Store the frozen linear weights (the base under LoRA) in bfloat16, once, for CPU autocast.

    Why: autocast re-casts a weight that does not require grad at every use (its cast cache keeps
    only trainable leaves), so each step copied ~0.4 GB of fp32 weights per forward: `aten::copy_`
    was 16% of a LoRA step's CPU time (bench/RESULTS.md). The values are the ones autocast computed
    with (the same rounding), so the step is unchanged. Embeddings (and a head tied to them) stay
    fp32: autocast leaves them alone and the residual stream starts from them. Call it after the
    trainer wrapped the model in LoRA, so the adapter is created and initialised in fp32.
    Returns how many weights were cast."""
    import torch

    keep = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        keep.add(id(out.weight))
    n = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and id(module.weight) not in keep
                and module.weight.dtype == torch.float32):
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            n += 1
    return n


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


# Vocabulary columns per projection tile of the completion-only head (TRL's fused head uses the same)
_VOCAB_TILE = 32768


def completion_only_logits(trainer) -> bool:
    """Make `trainer`'s fused LM head score only positions with a label (completion tokens).

    Why: TRL 1.16 (DPO and SFT) computes per-token log-probs with a fused, tiled LM head, but it
    compacts to the labelled positions only on CUDA/XPU (Triton); on a CPU it projects every
    position through the 49k-token vocabulary and zeroes the prompt's afterwards. AmbigSQL prompts
    are ~3/4 of each sequence, so most of that work is thrown away. This installs, on the model the
    trainer patched, a forward that gathers the labelled positions first and runs TRL's own kernel
    (`trl.kernels.ChunkedLogProbFunction`) on them: same values (zero where the label is -100),
    same `FusedCausalLMOutput`. Devices where TRL already compacts, softcapped / scaled logits and
    MoE router losses keep TRL's forward. Returns whether it was installed.
    """
    import functools

    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    if any(getattr(text, k, None) not in (None, 1.0) for k in
           ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")):
        return False
    trl_forward = base.forward
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    wanted = tuple(o for o in outputs if o == "log_probs" or o in _requested_outputs(trainer))

    @functools.wraps(trl_forward)
    def forward(*args: Any, fused_lm_head: bool = False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs: Any):
        device = base.get_output_embeddings().weight.device
        if (not fused_lm_head or device.type in ("cuda", "xpu") or kwargs.get("output_router_logits")
                or getattr(text, "output_router_logits", False)):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = base.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = base.get_output_embeddings()
        mask = labels != -100
        per_token = ChunkedLogProbFunction.apply(hidden[mask], head.weight, head.bias, labels[mask], 1.0,
                                                 _VOCAB_TILE, None, 1.0, wanted)
        # masked_scatter keeps an all-prompt micro-batch connected to the graph (a differentiable zero)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    base.forward = forward
    return True


def _requested_outputs(trainer) -> tuple[str, ...]:
    """The per-token extras TRL's trainer reads for its metrics (DPO: entropy, mean logits, top-1;
    SFT: entropy, top-1; WPO weighting: log sum sq probs)."""
    from trl import DPOTrainer

    if isinstance(trainer, DPOTrainer):
        return ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if trainer.use_weighting else ())
    return ("entropy", "is_top1")
