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
from pathlib import Path
from typing import Any

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


class AdapterLoadError(RuntimeError):
    """A LoRA adapter could not be loaded into a policy server."""


class AdapterRefused(AdapterLoadError):
    """The server answered 4xx: retrying the same request cannot help."""


class AdapterRejected(AdapterRefused):
    """The server will not serve this adapter (4xx, or vLLM's 500 with its validation message):
    training on cannot help either, so `trainer run` stops with what to change."""


# vLLM's load_lora_adapter messages (vllm/lora/peft_helper.py, lora_model.py, exceptions.py) → the fix
_FIXES = (
    ("max_lora_rank", "lower --lora-r, or restart the server with a larger --max-lora-rank"),
    ("DoRA", "train without DoRA (use_dora)"),
    ("modules_to_save", "train without modules_to_save"),
    ("bias", "train with bias='none'"),
    ("expected target modules", "change --lora-target-modules to modules the server's model has"),
    ("No adapter found", "the server cannot read the adapter directory: it must see the trainer's --out path "
                         "(same machine or a shared filesystem)"),
)


def rejection_hint(message: str) -> str:
    for needle, fix in _FIXES:
        if needle in message:
            return fix
    return "fix the adapter or the server's LoRA settings, then resume the run"


def is_rejection(status: int | None) -> bool:
    """4xx but 408/409/425/429 (timing, not content), or 500: vLLM answers an adapter it cannot
    load with 500 InternalServerError (vllm/entrypoints/openai/models/serving.py)."""
    return status is not None and (status == 500 or (400 <= status < 500 and status not in (408, 409, 425, 429)))


async def listed_adapters(transport: Any, url: str, timeout_s: float) -> dict[str, dict]:
    """The server's /models entries by id (the base model and every adapter)."""
    body = await transport.get_json(url, "/models", timeout_s)
    if not isinstance(body, dict):
        raise AdapterLoadError(f"{url}/models answered {str(body)[:200]!r}, not a model list")
    return {m["id"]: m for m in body.get("data", [])}


async def load_adapter(transport: Any, url: str, name: str, path: str | Path, timeout_s: float = 120.0) -> None:
    """vLLM's runtime LoRA load: POST /load_lora_adapter (in place when `name` is already listed), then
    check /models lists `name` at `path`. A refusal (see `is_rejection`) is `AdapterRejected` with the
    fix; other failures are `AdapterLoadError` or the transport's error (the caller may retry them)."""
    from simkit.roles.transport import TransportError

    inplace = name in await listed_adapters(transport, url, timeout_s)
    try:
        await transport.post_json(url, "/load_lora_adapter",
                                  {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}, timeout_s)
    except TransportError as e:
        if is_rejection(e.status):  # the adapter itself: the same request fails again
            raise AdapterRejected(f"{url} rejected adapter {name} from {path}: {e}. To fix: "
                                  f"{rejection_hint(str(e))}") from e
        raise
    entry = (await listed_adapters(transport, url, timeout_s)).get(name)
    if entry is None or (entry.get("root") not in (None, str(path))):
        raise AdapterLoadError(f"{url} does not list {name} at {path} after loading it (got {entry})")


def load_adapter_once(url: str, name: str, path: str | Path, timeout_s: float = 120.0) -> None:
    """`load_adapter` from synchronous code, over a fresh transport (the demo's one-off loads)."""
    import asyncio

    from simkit.roles.transport import make_transport

    async def go() -> None:
        transport = make_transport("fast", None)
        try:
            await load_adapter(transport, url, name, path, timeout_s)
        finally:
            await transport.aclose()

    asyncio.run(go())
