"""LoRA adapter validation as vLLM does it, so the stand-in refuses what vLLM would refuse.

Why: a stand-in that accepts any adapter lets a run train for hours on a config that the real
server rejects at the first publish. The rules and messages follow vLLM:

- vllm/lora/peft_helper.py `PEFTHelper.from_dict` (required fields r, lora_alpha,
  target_modules) and `validate_legal` (modules_to_save, DoRA, rank > --max-lora-rank, bias);
- vllm/lora/lora_model.py `from_local_checkpoint` (LoRA weights on modules the model lacks);
- vllm/config/lora.py `MaxLoRARanks` (the values `--max-lora-rank` may take; default 16);
- vllm/exceptions.py `LoRAAdapterNotFoundError` (a path without an adapter: 404).

vllm/entrypoints/openai/models/serving.py `load_lora_adapter` answers a missing adapter 404
NotFoundError and every other load failure 500 InternalServerError with the message.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
DEFAULT_MAX_LORA_RANK = 16
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")


class AdapterNotFound(Exception):
    """No adapter at the path (vLLM: LoRAAdapterNotFoundError, HTTP 404)."""

    def __init__(self, name: str, path: str):
        super().__init__(f"Loading lora {name} failed: No adapter found for {path}")


class AdapterRejected(Exception):
    """vLLM cannot serve this adapter (ValueError in vLLM, HTTP 500 from load_lora_adapter)."""


def read_config(name: str, path: str) -> dict:
    """adapter_config.json of `path`; AdapterNotFound when there is none."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise AdapterNotFound(name, path)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterRejected(f"{cfg_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterRejected(f"{cfg_path}: not a JSON object")
    return cfg


def config_problems(cfg: dict, max_lora_rank: int) -> list[str]:
    """What vLLM's PEFTHelper rejects in an adapter config, in its order and words."""
    missing = {f for f in REQUIRED_FIELDS if f not in cfg}
    if missing:
        return [f"Missing required configuration fields: {missing}"]
    errors = []
    if cfg.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if cfg.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    ranks = [cfg["r"], *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        errors.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    return errors


def weight_modules(path: str, cfg: dict) -> list[str]:
    """Module names the adapter's weights sit on (safetensors keys; else target_modules)."""
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors import safe_open

        try:
            with safe_open(st, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # a truncated or foreign file: vLLM fails the load the same way (500)
            raise AdapterRejected(f"Loading lora from {path} failed: {e}") from e
        names = []
        for k in keys:
            k = k.removeprefix("base_model.model.")
            for tail in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
                if k.endswith(tail):
                    names.append(k[: -len(tail)])
                    break
            else:
                names.append(k.rsplit(".", 1)[0])
        return list(dict.fromkeys(names))
    targets = cfg.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def unexpected_modules(path: str, cfg: dict, expected: Iterable[str]) -> str | None:
    """vLLM's message when the adapter has weights on modules the model cannot take LoRA on."""
    expected = sorted(set(expected))
    bad = [m for m in weight_modules(path, cfg) if m.rsplit(".", 1)[-1] not in expected]
    if not bad:
        return None
    return (f"While loading {path}, expected target modules in {expected} but received {bad}. "
            "Please verify that the loaded LoRA module is correct")


def validate(name: str, path: str, max_lora_rank: int, expected_modules: Iterable[str]) -> dict:
    """Raise AdapterNotFound / AdapterRejected as vLLM would; return the adapter config."""
    cfg = read_config(name, path)
    errors = config_problems(cfg, max_lora_rank)
    if errors:
        raise AdapterRejected(" ".join(errors))
    msg = unexpected_modules(path, cfg, expected_modules)
    if msg:
        raise AdapterRejected(msg)
    return cfg
