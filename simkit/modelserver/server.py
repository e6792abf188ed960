"""`simkit model-server`: an OpenAI-compatible server over transformers, with vLLM's runtime
LoRA endpoints. The offline default and CI's stand-in for vLLM: requests and responses keep
vLLM's shapes so everything that talks to it talks to vLLM unchanged.

Endpoints: GET /health, GET /version, GET /metrics (running, waiting, shed, cancelled),
GET /v1/models, POST /v1/chat/completions, POST /v1/load_lora_adapter {lora_name, lora_path,
load_inplace}, POST /v1/unload_lora_adapter {lora_name}. A request's `model` selects the base
model or an adapter. Requests are validated by pydantic models mirroring vLLM's protocol
(`simkit.modelserver.protocol`), with vLLM's status codes, error types and messages; `stream: true` answers
SSE. Adapters are validated as vLLM does (`simkit.modelserver.adapter_check`); unset sampling parameters come
from the model's generation_config.json (vLLM's `--generation-config auto`). Differences from vLLM,
each with its reason: docs/VLLM_DIFFERENCES.md (checked live by `pytest -m vllm`).

Concurrency: continuous batching on one model thread (`simkit.modelserver.batcher`) with chunked prefill
(`--max-num-batched-tokens`) and automatic prefix caching (`--prefix-cache-mb`), both as vLLM's; a
bounded waiting list that sheds overload with 503 + Retry-After; a request whose client goes away
is cancelled.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from simkit.config import add_config_args, config_or_exit
from simkit.modelserver import adapter_check
from simkit.modelserver import protocol as proto
if TYPE_CHECKING:  # batcher/kvcache import torch: loaded when a server starts, not by every `simkit` command
    from simkit.modelserver.batcher import ContinuousBatcher, GenRequest, GenResult

log = logging.getLogger("simkit.modelserver.server")
SERVER_VERSION = "simkit-model-server 0.1.0"  # GET /version; vLLM answers {"version": "<vllm version>"}
# vLLM's `--generation-config auto`: these keys of generation_config.json are the default sampling
# parameters (vllm/config/model.py get_diff_sampling_param; max_new_tokens becomes max_tokens)
GENERATION_DEFAULT_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


class APIError(Exception):
    """An error answered in vLLM's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status)


class ModelRunner:
    """Owns the model, the tokenizer and the LoRA adapters. Call only from the model thread."""

    def __init__(self, path: str, served_name: str, dtype: str = "auto", device: str | None = None,
                 max_lora_rank: int = adapter_check.DEFAULT_MAX_LORA_RANK, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.path, self.served_name = path, served_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": (torch.bfloat16 if self.device == "cuda" else torch.float32),
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        from simkit.modelserver.kvcache import ATTN_IMPL

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # varlen attention over per-request KV (simkit.modelserver.kvcache); plain sdpa for anything else
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=ATTN_IMPL
                                                          ).to(self.device).eval()
        self.dtype = torch_dtype
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.kv_shape = (cfg.num_hidden_layers, kv_heads, head_dim)  # RowKV's [layers, kv_heads, ·, head_dim]
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id} - {None}
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids)))
        # vLLM's --max-model-len: the model's own limit unless told (a longer one is refused, as vLLM does)
        model_max = int(getattr(self.model.config, "max_position_embeddings", 4096))
        if max_model_len is not None and max_model_len > model_max:
            raise ValueError(f"--max-model-len {max_model_len} is greater than the model's max_position_embeddings "
                             f"{model_max}")
        self.max_len = int(max_model_len or model_max)
        self.adapters: dict[str, str] = {}  # name -> path
        self._peft_ids: dict[str, str] = {}  # name -> PEFT's adapter name (a fresh one per load)
        # unloaded adapters that accepted requests still use: name -> PEFT name, deleted once idle
        # (vLLM: a request keeps its LoRARequest, and the worker loads it again if it was evicted)
        self._draining: dict[str, str] = {}
        self._loads = 0
        self.max_lora_rank = max_lora_rank
        # LoRA-capable modules (vLLM's expected_lora_modules): the model's Linear layers but lm_head
        self.lora_modules = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()
                                    if isinstance(m, torch.nn.Linear)} - {"lm_head"})
        self.generation_defaults = generation_defaults(path)
        self.created = int(time.time())

    # ------------------------------------------------------------------ prompts
    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def cache_key(self, model: str) -> tuple:
        """The prefix cache's extra key for `model`: an adapter's name, path and load generation, so
        a new version (or an in-place reload of the same path) never reuses an old version's KV."""
        peft_id = self._peft_ids.get(model) or self._draining.get(model)
        if model == self.served_name or peft_id is None:
            return (self.served_name,)
        return (model, self.adapters.get(model, "<unloaded>"), peft_id)

    def using(self, model: str | None):
        """Context in which a forward runs as `model` (the base model or one adapter)."""
        if not (self._peft_ids or self._draining):
            return contextlib.nullcontext()
        if model == self.served_name:
            return self.model.disable_adapter()
        self.model.set_adapter(self._peft_ids.get(model) or self._draining[model])
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str, inplace: bool) -> None:
        """Validate as vLLM does, then load under a fresh PEFT name: a failed in-place reload
        leaves the old weights serving (vLLM swaps only a successfully loaded LoRAModel)."""
        from peft import PeftModel

        if name in self.adapters and not inplace:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load "
                                "the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        try:
            adapter_check.validate(name, path, self.max_lora_rank, self.lora_modules)
        except adapter_check.AdapterNotFound as e:
            raise APIError(404, str(e), "NotFoundError")
        except adapter_check.AdapterRejected as e:
            raise APIError(500, str(e), "InternalServerError")
        self._loads += 1
        peft_id = f"lora{self._loads}"
        try:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=peft_id,
                                                       is_trainable=False).eval()
            else:
                self.model.load_adapter(path, adapter_name=peft_id, is_trainable=False)
        except Exception as e:  # unreadable weights, shape mismatch: what vLLM answers 500 for
            self._drop_partial(peft_id)
            raise APIError(500, f"Loading lora {name} failed: {type(e).__name__}: {e}", "InternalServerError")
        old = self._peft_ids.get(name)
        self.adapters[name], self._peft_ids[name] = path, peft_id
        if old is not None:
            self._delete(old)

    def _drop_partial(self, peft_id: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and peft_id in self.model.peft_config:
            if not (self._peft_ids or self._draining):
                self.model = self.model.unload()
            else:
                self._delete(peft_id)

    def _delete(self, peft_id: str) -> None:
        others = [p for p in [*self._peft_ids.values(), *self._draining.values()] if p != peft_id]
        if others:
            self.model.set_adapter(others[0])
        self.model.delete_adapter(peft_id)

    def unload_adapter(self, name: str, in_use: bool = False) -> None:
        """Unlist `name` at once (new requests for it get 404); if accepted requests still use it
        (`in_use`), its weights stay until `reap` finds it idle, so those requests finish with it."""
        if name not in self.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        peft_id = self._peft_ids.pop(name)
        del self.adapters[name]
        if in_use:
            old = self._draining.pop(name, None)
            self._draining[name] = peft_id
            if old is not None:
                self._remove(old)
        else:
            self._remove(peft_id)

    def _remove(self, peft_id: str) -> None:
        if not self._peft_ids and not self._draining:
            self.model = self.model.unload()  # back to the plain base model
        else:
            self._delete(peft_id)

    def reap(self, in_use: set[str]) -> None:
        """Delete unloaded adapters that no running or waiting request uses any more."""
        for name in [n for n in self._draining if n not in in_use or n in self._peft_ids]:
            self._remove(self._draining.pop(name))


def generation_defaults(path: str) -> dict[str, Any]:
    """Default sampling parameters from the checkpoint's generation_config.json, as vLLM's
    `--generation-config auto` reads them (only keys the file sets; max_new_tokens → max_tokens)."""
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {k: cfg[k] for k in GENERATION_DEFAULT_KEYS if cfg.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


class ModelServer:
    """HTTP front of one model: admission control, cancellation, vLLM's request/response shapes.

    Overload is shed, not queued: past `max_waiting` requests waiting for a batch slot a request is
    answered 503 with `Retry-After` (the expected wait), so clients back off instead of timing out
    and resending work the server is still doing. A request whose client disconnects (or times
    out) is cancelled: it leaves the waiting list or the running batch at the next decode step."""

    def __init__(self, runner_factory, served_name: str, max_batch: int = 64, default_max_tokens: int = 128,
                 api_key: str | None = None, max_waiting: int = 256, status_every_s: float = 10.0,
                 max_num_batched_tokens: int = 2048, prefix_cache_mb: float = 512, block_size: int = 16,
                 kv_pool: str = "auto", kv_pool_tokens: int = 2048):
        self.served_name = served_name
        self.kv_pool, self.kv_pool_tokens = kv_pool, kv_pool_tokens
        self.max_batch = max_batch
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache_bytes = int(prefix_cache_mb * 2**20)
        self.block_size = block_size
        self.max_waiting = max_waiting
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self.status_every_s = status_every_s
        self._runner_factory = runner_factory
        self.runner: ModelRunner | None = None
        self.batcher: ContinuousBatcher | None = None
        self._status_task: asyncio.Task | None = None
        self.stats = {"requests": 0, "completed": 0, "shed": 0, "cancelled": 0, "failed": 0}
        self._done_times: list[float] = []  # completion times, for the Retry-After estimate
        self._inflight: collections.Counter[str] = collections.Counter()  # model name -> accepted requests

    async def _call(self, fn, *args):
        """Run `fn(*args)` on the model thread, between decode steps."""
        return await asyncio.wrap_future(self.batcher.call(lambda: fn(*args)))

    # ------------------------------------------------------------------ lifecycle
    async def on_startup(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as ex:
            self.runner = await loop.run_in_executor(ex, self._runner_factory)
        from simkit.modelserver.batcher import ContinuousBatcher

        pool_tokens = self.kv_pool_tokens if uses_kv_pool(self.kv_pool, self.runner.device) else 0
        self.batcher = ContinuousBatcher(self.runner, self.max_batch, self.max_num_batched_tokens,
                                         self.prefix_cache_bytes, self.block_size, kv_pool_tokens=pool_tokens)
        if self.status_every_s > 0:
            self._status_task = asyncio.create_task(self._report())
        log.info("model %s ready on %s (max batch %d, max waiting %d)", self.served_name, self.runner.device,
                 self.max_batch, self.max_waiting)

    async def on_cleanup(self, app: web.Application) -> None:
        if self._status_task:
            self._status_task.cancel()
        if self.batcher:
            self.batcher.close()

    def status(self) -> dict[str, Any]:
        b = self.batcher
        pc = b.prefix_cache if b else None
        # prefix_cache_queries / _hits: prompt tokens looked up / found, as vLLM's counters
        return {**self.stats, "running": b.running if b else 0, "waiting": b.waiting if b else 0,
                "completion_tokens": b.stats["completion_tokens"] if b else 0,
                "prefill_tokens": b.stats["prefill_tokens"] if b else 0,
                "prefix_cache_queries": pc.queries if pc else 0, "prefix_cache_hits": pc.hits if pc else 0,
                "prefix_cache_blocks": len(pc) if pc else 0}

    async def _report(self) -> None:
        """A status line while there is work, naming any limit that was hit."""
        last_tokens, last = 0, None
        while True:
            await asyncio.sleep(self.status_every_s)
            st = self.status()
            if st == last:
                continue
            tps = (st["completion_tokens"] - last_tokens) / self.status_every_s
            last_tokens, last = st["completion_tokens"], st
            shed = f", shed {st['shed']} (queue full at {self.max_waiting} waiting: clients told to retry)" \
                if st["shed"] else ""
            hit = st["prefix_cache_hits"] / max(1, st["prefix_cache_queries"])
            log.info("status: running %d/%d, waiting %d, completed %d, cancelled %d, %.1f tok/s, prefix cache "
                     "hit %.0f%%%s", st["running"], self.max_batch, st["waiting"], st["completed"], st["cancelled"],
                     tps, 100 * hit, shed)

    def _retry_after(self) -> int:
        """Seconds until the queue ahead has likely drained: requests ahead (running and waiting)
        over the recent completion rate, 5 s before anything has completed, within [1, 60]."""
        now = time.monotonic()
        recent = [t for t in self._done_times if now - t < 60]
        self._done_times = recent
        rate = len(recent) / max(1.0, now - recent[0]) if recent else 0.0
        ahead = self.batcher.waiting + self.batcher.running
        return int(min(60, max(1, ahead / rate if rate else 5)))

    # ------------------------------------------------------------------ handlers
    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if self.api_key and request.path.startswith("/v1") and \
                request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except APIError as e:
            return e.response()
        except proto.RequestInvalid as e:  # a pydantic validation error: vLLM's 400 "Bad Request" body
            return web.json_response(e.body, status=400)
        except proto.VLLMValidationError as e:  # vLLM answers these 400 BadRequestError, str(e) as message
            return APIError(400, str(e), param=e.parameter).response()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def models(self, request: web.Request) -> web.Response:
        """vllm/entrypoints/openai/models/serving.py show_available_models: the base model with
        max_model_len, adapters with parent = the base and max_model_len None, each with a permission."""
        r = self.runner

        def card(id_: str, root: str, parent: str | None, max_len: int | None) -> dict:
            perm = {"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission", "created": r.created,
                    "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                    "organization": "*", "group": None, "is_blocking": False}
            return {"id": id_, "object": "model", "created": r.created, "owned_by": "vllm", "root": root,
                    "parent": parent, "max_model_len": max_len, "permission": [perm]}

        # max_lora_rank / lora_target_modules: the stand-in's limits, for clients that check before
        # training (vLLM's model card has no such fields; clients fall back to vLLM's rules)
        base = {**card(self.served_name, r.path, None, r.max_len), "max_lora_rank": r.max_lora_rank,
                "lora_target_modules": r.lora_modules}
        data = [base] + [card(n, p, self.served_name, None) for n, p in r.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    async def version(self, request: web.Request) -> web.Response:
        """vLLM's GET /version ({"version": ...}); clients tell the stand-in from vLLM by it."""
        return web.json_response({"version": SERVER_VERSION})

    async def _json(self, request: web.Request) -> Any:
        """The body as FastAPI reads it for vLLM: declared application/json (vllm/entrypoints/utils.py
        validate_json_request), valid JSON; both failures are 400 "Bad Request" validation errors."""
        if request.content_type != "application/json":
            raise proto.RequestInvalid({"error": {
                "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                "type": "Bad Request", "param": None, "code": 400}})
        raw = await request.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:  # FastAPI: a json_invalid error at ("body", position)
            raise proto.RequestInvalid(proto.validation_error_body([{
                "type": "json_invalid", "loc": (e.pos,), "msg": "JSON decode error", "input": {},
                "ctx": {"error": e.msg}}]))
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8: {e}")

    def sampling(self, body: dict) -> dict[str, Any]:
        """The request's sampling parameters; unset ones from generation_config.json, then vLLM's defaults
        (`max_tokens` None when neither the request nor a default sets it: the room left in the context)."""
        d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
             "max_tokens": self.default_max_tokens or None, **self.runner.generation_defaults}
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if body.get(k) is not None:
                d[k] = body[k]
        mt = body.get("max_completion_tokens")
        mt = body.get("max_tokens") if mt is None else mt
        if mt is not None:
            d["max_tokens"] = mt
        try:
            out = {k: float(d[k]) for k in ("temperature", "top_p", "min_p", "repetition_penalty")}
            out["top_k"] = int(d["top_k"])
            out["max_tokens"] = None if d["max_tokens"] is None else int(d["max_tokens"])
        except (TypeError, ValueError) as e:
            raise APIError(400, f"invalid sampling parameter: {e}")
        if out["max_tokens"] is not None and out["max_tokens"] < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {out['max_tokens']}. (parameter=max_tokens, "
                                f"value={out['max_tokens']})", param="max_tokens")
        return out

    @staticmethod
    def seed(body: dict) -> int | None:
        """vLLM's protocol: an int within torch.long's range (else 400, never a request left unanswered)."""
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
            raise APIError(400, f"seed must be an integer in [-2**63, 2**63), got {seed!r}", param="seed")
        return seed

    def _max_tokens(self, req: proto.ChatCompletionRequest, prompt_len: int, default: int | None) -> int:
        """vLLM's length rules: a requested max_tokens above max_model_len is a 400
        (vllm/renderers/params.py TokenizeParams), so is a prompt longer than the context (_token_len_check);
        otherwise the reply is capped by the room left: min(max_model_len - prompt, the request or the
        default) (vllm/entrypoints/serve/utils/api_utils.py get_max_tokens)."""
        L = self.runner.max_len
        asked, param = req.requested_max_tokens()
        if asked is not None and asked > L:
            raise proto.VLLMValidationError(f"{param}={asked} cannot be greater than max_model_len={L}. Please "
                                            "request fewer output tokens.", parameter=param, value=asked)
        if prompt_len > L:
            raise proto.VLLMValidationError(
                f"This model's maximum context length is {L} tokens. However, your prompt contains {prompt_len} "
                "input tokens, which exceeds this limit even without any output tokens. Please reduce the length "
                "of the input prompt.", parameter="input_tokens", value=prompt_len)
        fallback = asked if asked is not None else default
        return min(v for v in (L - prompt_len, fallback) if v is not None)

    def _encode(self, req: proto.ChatCompletionRequest) -> list[int]:
        messages = []
        for m in req.messages:
            d = {k: v for k, v in m.model_dump(exclude_unset=True).items() if k != "content"}
            text = m.text()
            d["content"] = text if text is not None else ""  # an assistant's null content renders as ""
            messages.append(d)
        r = self.runner
        try:
            if req.tools:  # tool_choice "none": the tools are only rendered into the prompt, as vLLM does
                out = r.tokenizer.apply_chat_template(messages, tools=req.tools, add_generation_prompt=True,
                                                      tokenize=True, **(req.chat_template_kwargs or {}))
                prompt_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
            elif req.chat_template_kwargs:
                out = r.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      **req.chat_template_kwargs)
                prompt_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
            else:
                prompt_ids = r.encode_chat(messages)
        except Exception as e:  # vLLM's serving_chat answers a template failure 400 with f"{e} {e.__cause__}"
            raise APIError(400, f"{e} {e.__cause__}")
        if not prompt_ids:  # vllm/v1/engine/input_processor.py _validate_prompt_len
            raise APIError(400, "The decoder prompt cannot be empty")
        return prompt_ids

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, validated as vLLM validates it (simkit.modelserver.protocol), in vLLM's
        order (`_check_chat`); then shed when the waiting list is full, else generate and answer."""
        body = await self._json(request)
        if isinstance(body, dict):  # kept stricter than vLLM (a bool seed is a client bug; param "seed"):
            self.seed(body)         # tests/test_model_server.py holds this; docs/VLLM_DIFFERENCES.md
        req = proto.parse(proto.ChatCompletionRequest, body)
        model, prompt_ids, sp, max_tokens = self._check_chat(req)
        n = req.n or 1
        self.stats["requests"] += 1
        if self.batcher.waiting + n > self.max_waiting:
            return self._overloaded()
        reqs, futs = self._gen_requests(req, model, prompt_ids, sp, max_tokens)
        results = await self._generate(model, reqs, futs)
        self.stats["completed"] += 1
        self._done_times.append(time.monotonic())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": results[0].prompt_tokens,
                 "total_tokens": results[0].prompt_tokens + sum(x.completion_tokens for x in results),
                 "completion_tokens": sum(x.completion_tokens for x in results)}
        if req.stream:
            return await self._stream(request, rid, created, model, results, usage,
                                      bool(req.stream_options and req.stream_options.include_usage))
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": x.text, "tool_calls": []},
                         "logprobs": None, "finish_reason": x.finish_reason, "stop_reason": x.stop_reason}
                        for i, x in enumerate(results)],
            "usage": usage,
        })

    def _check_chat(self, req: proto.ChatCompletionRequest) -> tuple[str, list[int], dict[str, Any], int]:
        """The checks after the request model, in vLLM's order: the model name (404), the chat template,
        the length rules, then the sampling parameters (vllm/sampling_params.py _verify_args).
        Returns (model, prompt_ids, sampling parameters, max_tokens)."""
        model = req.model or self.served_name
        if model != self.served_name and model not in self.runner.adapters:
            raise APIError(404, f"The model `{model}` does not exist. Valid aliases: {self.served_name}.",
                           "NotFoundError", "model")
        if req.tools and req.tool_choice == "auto":  # vLLM without --enable-auto-tool-choice (no tool parser here)
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                                'be set')
        prompt_ids = self._encode(req)
        sp = self.sampling(req.model_dump())
        max_tokens = self._max_tokens(req, len(prompt_ids), sp["max_tokens"])
        proto.verify_sampling(req.n, sp["temperature"], sp["top_p"], sp["top_k"], sp["min_p"],
                              sp["repetition_penalty"], req.presence_penalty or 0.0, req.frequency_penalty or 0.0,
                              max_tokens, req.min_tokens, req.stop_list())
        if (unsupported := req.unsupported_features()) is not None:  # valid for vLLM, not doable here
            raise unsupported
        return model, prompt_ids, sp, max_tokens

    def _overloaded(self) -> web.Response:
        """503 + Retry-After: the waiting list is full, so the request is shed rather than queued."""
        self.stats["shed"] += 1
        wait = self._retry_after()
        body = {"error": {"message": f"server overloaded: {self.batcher.waiting} requests waiting (limit "
                                     f"--max-waiting {self.max_waiting}); retry after {wait}s",
                          "type": "ServiceUnavailableError", "param": None, "code": 503}}
        return web.json_response(body, status=503, headers={"Retry-After": str(wait)})

    def _gen_requests(self, req: proto.ChatCompletionRequest, model: str, prompt_ids: list[int],
                      sp: dict[str, Any], max_tokens: int) -> tuple[list[GenRequest], list[asyncio.Future]]:
        """One GenRequest per sample, each with a future that the model thread resolves. n > 1: n
        independent samples (seed + i each, so seeded samples still differ)."""
        from simkit.modelserver.batcher import GenRequest  # already loaded by on_startup
        loop = asyncio.get_running_loop()
        stop = req.stop_list()
        futs, reqs = [], []
        for i in range(req.n or 1):
            fut = loop.create_future()

            def done(res, fut=fut):  # on the model thread
                loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(res) if isinstance(
                    res, BaseException) else fut.set_result(res)))

            seed = None if req.seed is None else (req.seed + i + 2**63) % 2**64 - 2**63
            reqs.append(GenRequest(prompt_ids, model, max_tokens, sp["temperature"], sp["top_p"], seed, stop, done,
                                   ignore_eos=req.ignore_eos, top_k=sp["top_k"], min_p=sp["min_p"],
                                   repetition_penalty=sp["repetition_penalty"]))
            futs.append(fut)
        return reqs, futs

    async def _generate(self, model: str, reqs: list[GenRequest], futs: list[asyncio.Future]) -> list[GenResult]:
        """Submits the requests and awaits their results, counted in flight for `model` meanwhile (an
        adapter is unloaded only once idle). A client gone away or a model failure cancels them all."""
        n = len(reqs)
        self._inflight[model] += n
        try:
            for g in reqs:
                self.batcher.submit(g)
            try:
                results: list[GenResult] = list(await asyncio.gather(*futs))
            except asyncio.CancelledError:  # the client went away: stop generating for it
                for g in reqs:
                    g.cancelled = True
                self.stats["cancelled"] += 1
                raise
            except RuntimeError as e:
                for g in reqs:
                    g.cancelled = True
                self.stats["failed"] += 1
                raise APIError(500, str(e), "InternalServerError")
        finally:
            self._inflight[model] -= n
            if self._inflight[model] <= 0:
                del self._inflight[model]
                if model in self.runner._draining:  # an unloaded adapter's last request is done: free its weights
                    asyncio.ensure_future(self._call(self.runner.reap, set(self._inflight)))
        return results

    @staticmethod
    async def _stream(request: web.Request, rid: str, created: int, model: str, results: list[GenResult],
                      usage: dict, include_usage: bool) -> web.StreamResponse:
        """`stream: true` as vLLM's SSE (serving_chat.py chat_completion_stream_generator): per choice a
        role chunk, the content, a chunk with finish_reason/stop_reason; a usage chunk with empty choices
        when stream_options.include_usage; then `data: [DONE]`. The reply is generated first, so the
        content comes as one delta rather than token by token."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(choices: list, **extra: Any) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra}
            await resp.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        for i, x in enumerate(results):
            await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])
            if x.text:
                await send([{"index": i, "delta": {"content": x.text}, "logprobs": None, "finish_reason": None}])
            await send([{"index": i, "delta": {}, "logprobs": None, "finish_reason": x.finish_reason,
                         "stop_reason": x.stop_reason}])
        if include_usage:
            await send([], usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def load_lora(self, request: web.Request) -> web.Response:
        """vllm/entrypoints/openai/models/serving.py load_lora_adapter + _check_load_lora_adapter_request."""
        body = proto.parse(proto.LoadLoRAAdapterRequest, await self._json(request))
        name, path = body.lora_name, body.lora_path
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == self.served_name:
            raise APIError(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
        await self._call(self.runner.load_adapter, name, path, body.load_inplace)
        log.info("loaded LoRA adapter %s from %s", name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        """Unlisted at once; requests already accepted for it still finish with it (as in vLLM, where a
        request carries its LoRARequest), then its weights are freed."""
        body = proto.parse(proto.UnloadLoRAAdapterRequest, await self._json(request))
        name = body.lora_name
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        await self._call(lambda: self.runner.unload_adapter(name, in_use=self._inflight.get(name, 0) > 0))
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=64 * 2**20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


def build_server(model: str, served_name: str | None = None, dtype: str = "auto", device: str | None = None,
                 max_lora_rank: int = adapter_check.DEFAULT_MAX_LORA_RANK, max_model_len: int | None = None,
                 **kw: Any) -> ModelServer:
    name = served_name or model  # vLLM: the served model name defaults to --model, verbatim
    return ModelServer(lambda: ModelRunner(model, name, dtype, device, max_lora_rank, max_model_len), name, **kw)


def _env_api_key() -> str | None:
    """--api-key's default, read when the config is built (so a YAML or flag still overrides it)."""
    return os.environ.get("SIMKIT_SERVER_API_KEY")


class ModelServerConfig(BaseModel):
    """`simkit model-server`'s settings; flags generated from these fields (vLLM's names where vLLM has one)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(json_schema_extra={"metavar": "DIR"},
                       description="checkpoint directory (anything from_pretrained loads)")
    served_model_name: str | None = Field(None, json_schema_extra={"metavar": "NAME"},
                                          description="model id to report (default: the --model argument verbatim, "
                                                      "as vLLM)")
    max_lora_rank: Literal[adapter_check.MAX_LORA_RANKS] = Field(  # type: ignore[valid-type]
        adapter_check.DEFAULT_MAX_LORA_RANK,
        description="largest LoRA rank an adapter may have; vLLM's allowed values and default (16)")
    max_model_len: int | None = Field(None, json_schema_extra={"metavar": "N"},
                                      description="context length (prompt + reply), vLLM's flag (default: the "
                                                  "model's max_position_embeddings)")
    host: str = Field("127.0.0.1", description="bind address (default 127.0.0.1)")
    port: int = Field(8000, description="port (default 8000)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bf16 on GPU, fp32 on CPU). On a CPU with avx512_bf16, bfloat16 is "
                            "~1.5x faster but greedy replies drift from fp32 model.generate (5/8 identical on AmbigSQL "
                            "prompts), so it is opt-in (default auto)")
    threads: int | None = Field(None, json_schema_extra={"metavar": "N"},
                                description="torch intra-op threads (default: torch's choice); on a CPU shared with "
                                            "other jobs fewer threads than cores avoids OpenMP spin-waiting on busy "
                                            "cores")
    device: str | None = Field(None, description="torch device (default: cuda if available, else cpu)")
    max_batch: int = Field(64, json_schema_extra={"metavar": "N"},
                           description="most requests decoded together in the running batch: as many as a client "
                                       "sends at once (simkit's default concurrency is 64), since a decode step "
                                       "reads every weight once however many rows it carries; each row holds its "
                                       "own KV (SmolLM2 fp32: ~46 MB per 1,000 tokens) (default 64)")
    max_waiting: int = Field(256, json_schema_extra={"metavar": "N"},
                             description="requests allowed to wait for a batch slot; past it the server answers 503 "
                                         "with Retry-After instead of letting clients time out (default 256)")
    max_num_batched_tokens: int = Field(
        2048, json_schema_extra={"metavar": "N"},
        description="tokens per model step (vLLM's flag): every decoding row's next token, then chunks of prompts "
                    "being prefilled, so long prompts never stall decoding (default 2048)")
    prefix_cache_mb: float = Field(
        512, json_schema_extra={"metavar": "MB"},
        description="memory for automatic prefix caching: KV of full prompt blocks, reused by later prompts with "
                    "the same prefix (same model/adapter version), LRU-evicted; 0 turns it off (default 512)")
    block_size: int = Field(16, json_schema_extra={"metavar": "N"},
                            description="tokens per prefix-cache block (default 16, vLLM's)")
    kv_pool: Literal["auto", "on", "off"] = Field(
        "auto", description="preallocate KV slots for --max-batch rows of up to --kv-pool-tokens tokens and decode "
                            "them batched, a few ops per layer instead of three per row: on a GPU the per-row kernel "
                            "launches bound a step. auto: on for a GPU, off for a CPU (where per-row is as fast)")
    kv_pool_tokens: int = Field(2048, ge=1, json_schema_extra={"metavar": "N"},
                                description="tokens per KV slot (prompt + completion; longer rows keep their own "
                                            "KV); the pool takes max_batch x N tokens of KV memory (default 2048)")
    status_every: float = Field(10.0, json_schema_extra={"metavar": "SECONDS"},
                                description="seconds between status lines while busy; 0 turns them off (default 10)")
    default_max_tokens: int = Field(
        128, json_schema_extra={"metavar": "N"},
        description="completion length when a request gives no max_tokens and generation_config.json no "
                    "max_new_tokens (default 128, a CPU-friendly cap); 0 = vLLM's rule: the room left in the "
                    "context (--max-model-len minus the prompt)")
    api_key: str | None = Field(default_factory=_env_api_key, json_schema_extra={"metavar": "KEY"},
                                description="require this bearer token on /v1 (default: $SIMKIT_SERVER_API_KEY, "
                                            "read at startup, else none)")


def uses_kv_pool(setting: str, device: str) -> bool:
    """`--kv-pool`: auto means a GPU (any device but the CPU), where per-row attention is launch-bound."""
    return setting == "on" or (setting == "auto" and device != "cpu")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-server", help="OpenAI-compatible server over transformers, with vLLM's runtime LoRA endpoints",
        description="Serve a local transformers checkpoint with an OpenAI-compatible API (the offline default and "
                    "CI stand-in for vLLM). Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, "
                    "POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}, POST /v1/unload_lora_adapter "
                    "{lora_name}. A request's `model` selects the base model or a loaded adapter.")
    add_config_args(p, ModelServerConfig)
    p.set_defaults(func=_run)


def server_from_config(cfg: ModelServerConfig) -> ModelServer:
    """The server a config describes (the config's names are the flags'; ModelServer's are its own)."""
    return build_server(cfg.model, cfg.served_model_name, cfg.dtype, cfg.device, cfg.max_lora_rank,
                        cfg.max_model_len, max_batch=cfg.max_batch, default_max_tokens=cfg.default_max_tokens,
                        api_key=cfg.api_key, max_waiting=cfg.max_waiting, status_every_s=cfg.status_every,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, prefix_cache_mb=cfg.prefix_cache_mb,
                        block_size=cfg.block_size, kv_pool=cfg.kv_pool, kv_pool_tokens=cfg.kv_pool_tokens)


def _run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(ModelServerConfig, args, "model-server")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    server = server_from_config(cfg)
    print(f"simkit model-server: serving {server.served_name} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its generation
    web.run_app(server.app(), host=cfg.host, port=cfg.port, print=None, access_log=None,
                handler_cancellation=True)
    return 0
