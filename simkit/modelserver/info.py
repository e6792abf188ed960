"""What a policy server is and what it accepts: its /version and its LoRA limits.

Why: behaviour that matters to the trainer differs between vLLM releases and the stand-in, and an
adapter the server will refuse should stop a run before step 1, not after hours of training.

- GET {root}/version: vLLM answers {"version": "0.x.y"} (vllm/entrypoints/openai/api_server.py);
  the stand-in answers its own string ("simkit-model-server ..."), which parses as no vLLM version.
- LoRA limits: the stand-in lists `max_lora_rank` and `lora_target_modules` on its base model
  card; vLLM's card has neither, so a client falls back to vLLM's rules (the rank must be at most
  the largest value `--max-lora-rank` can take, 512; vllm/config/lora.py MaxLoRARanks).
"""
from __future__ import annotations

import re

from simkit.modelserver.adapter_check import MAX_LORA_RANKS

# before vLLM 0.33 a LoRARequest loaded with load_inplace=True kept the flag, so the engine
# re-read that adapter from disk on every step that used it
STICKY_INPLACE_FIXED = (0, 33)


def root_url(base_url: str) -> str:
    """The server root of an OpenAI base URL (http://h:p/v1 → http://h:p): /version lives there."""
    u = base_url.rstrip("/")
    return u[: -len("/v1")] if u.endswith("/v1") else u


def vllm_version(body: object) -> tuple[int, int] | None:
    """(major, minor) of a vLLM /version answer; None for anything else (the stand-in, a proxy)."""
    v = body.get("version") if isinstance(body, dict) else None
    m = re.match(r"^v?(\d+)\.(\d+)", v) if isinstance(v, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_warnings(version: tuple[int, int] | None, inplace_reloads: bool) -> list[str]:
    """Behaviour of this server version that the publisher's way of loading runs into."""
    out = []
    if version is not None and version < STICKY_INPLACE_FIXED and inplace_reloads:
        out.append(f"vLLM {version[0]}.{version[1]} < 0.33: an adapter loaded with load_inplace stays flagged "
                   "and is re-read from disk on every step that uses it (slow serving); use "
                   "--adapter-naming versioned (the default) or upgrade vLLM")
    return out


def lora_problems(card: dict, rank: int, target_modules: list[str]) -> list[str]:
    """What in the trainer's LoRA config the server (its base model card) will refuse."""
    out = []
    max_rank = card.get("max_lora_rank")
    if isinstance(max_rank, int):
        if rank > max_rank:
            allowed = [r for r in MAX_LORA_RANKS if r >= rank]
            fix = f"restart it with --max-lora-rank {allowed[0]}" if allowed else "no server can take it"
            out.append(f"LoRA rank {rank} is greater than the server's max_lora_rank {max_rank}: lower --lora-r "
                       f"to {max_rank} or less, or {fix}")
    elif rank > MAX_LORA_RANKS[-1]:
        out.append(f"LoRA rank {rank} is greater than {MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
                   "allows: lower --lora-r")
    supported = card.get("lora_target_modules")
    if isinstance(supported, list) and target_modules not in (["all-linear"], ["all"]):
        bad = [m for m in target_modules if m.rsplit(".", 1)[-1] not in supported]
        if bad:
            out.append(f"target modules {bad} cannot take LoRA on this server (it supports {supported}): "
                       "change --lora-target-modules")
    return out


def rank_hint(card: dict, rank: int) -> str | None:
    """A server that does not report its limit: the flag vLLM needs for this rank."""
    if isinstance(card.get("max_lora_rank"), int):
        return None
    allowed = [r for r in MAX_LORA_RANKS if r >= rank]
    return (f"the server does not report its max LoRA rank; a vLLM server needs --max-lora-rank >= "
            f"{allowed[0]} for rank {rank} (vLLM's default is 16)") if allowed else None
