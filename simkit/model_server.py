"""`simkit model-server`: an OpenAI-compatible server over transformers, with vLLM's runtime
LoRA endpoints. The offline default and CI's stand-in for vLLM: requests and responses keep
vLLM's shapes so everything that talks to it talks to vLLM unchanged.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions,
POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}, POST /v1/unload_lora_adapter
{lora_name}. A request's `model` selects the base model or a loaded adapter.

Concurrency: requests queue up; one generation thread takes everything waiting, groups it by
(model, sampling) and runs each group as one left-padded batch (continuous arrival, batched
decode). Adapter loads run on the same thread, so a load never races a generation.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("simkit.model_server")


class APIError(Exception):
    """An error answered in vLLM's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    future: asyncio.Future = field(repr=False)

    @property
    def key(self) -> tuple:
        return (self.model, self.temperature if self.temperature > 0 else 0.0, self.top_p, self.seed)


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ModelRunner:
    """Owns the model, the tokenizer and the LoRA adapters. Call only from its own thread."""

    def __init__(self, path: str, served_name: str, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.path, self.served_name = path, served_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": (torch.bfloat16 if self.device == "cuda" else torch.float32),
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 4096))
        self.adapters: dict[str, str] = {}  # name -> path
        self.created = int(time.time())

    # ------------------------------------------------------------------ prompts
    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str, inplace: bool) -> None:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise APIError(400, f"No adapter found for {path}: missing adapter_config.json")
        if name in self.adapters and not inplace:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load "
                                "the adapter in place, set 'load_inplace' to True.")
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False).eval()
        else:
            if name in self.adapters:
                self._delete(name)
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        self.adapters[name] = path

    def _delete(self, name: str) -> None:
        others = [n for n in self.adapters if n != name]
        if others:
            self.model.set_adapter(others[0])
        self.model.delete_adapter(name)

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        if len(self.adapters) == 1:
            self.model = self.model.unload()  # back to the plain base model
        else:
            self._delete(name)
        del self.adapters[name]

    # ------------------------------------------------------------------ generation
    def generate(self, batch: list[GenRequest]) -> list[GenResult]:
        torch = self.torch
        first = batch[0]
        tok = self.tokenizer
        width = max(len(r.prompt_ids) for r in batch)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch], device=self.device)
        max_new = max(r.max_tokens for r in batch)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.inference_mode():
            if first.model == self.served_name and self.adapters:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            else:
                if self.adapters:
                    self.model.set_adapter(first.model)
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        results = []
        for i, r in enumerate(batch):
            gen = out[i, width:].tolist()
            finish = "length"
            if tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id)]
                finish = "stop"
            if len(gen) >= r.max_tokens:
                gen, finish = gen[: r.max_tokens], ("length" if finish == "length" or len(gen) > r.max_tokens else finish)
            text = tok.decode(gen, skip_special_tokens=True)
            for s in r.stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append(GenResult(text, len(r.prompt_ids), len(gen), finish))
        return results


class ModelServer:
    def __init__(self, runner_factory, served_name: str, max_batch: int = 32, default_max_tokens: int = 128,
                 api_key: str | None = None):
        self.served_name = served_name
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._runner_factory = runner_factory
        self.runner: ModelRunner | None = None
        self._queue: asyncio.Queue[GenRequest] | None = None
        self._loop_task: asyncio.Task | None = None
        self.stats = {"requests": 0, "batches": 0, "completion_tokens": 0}

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ lifecycle
    async def on_startup(self, app: web.Application) -> None:
        self.runner = await self._run(self._runner_factory)
        self._queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._batch_loop())
        log.info("model %s ready on %s", self.served_name, self.runner.device)

    async def on_cleanup(self, app: web.Application) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch * 4 and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [r for r in items if not r.future.done()]  # client went away
            groups: dict[tuple, list[GenRequest]] = {}
            for r in items:
                groups.setdefault(r.key, []).append(r)
            for group in groups.values():
                for i in range(0, len(group), self.max_batch):
                    chunk = group[i: i + self.max_batch]
                    try:
                        results = await self._run(self.runner.generate, chunk)
                    except Exception as e:  # report to each caller, keep serving
                        log.exception("generation failed")
                        for r in chunk:
                            if not r.future.done():
                                r.future.set_exception(APIError(500, f"generation failed: {e}", "InternalServerError"))
                        continue
                    self.stats["batches"] += 1
                    for r, res in zip(chunk, results):
                        self.stats["completion_tokens"] += res.completion_tokens
                        if not r.future.done():
                            r.future.set_result(res)

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

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        r = self.runner
        base = {"id": self.served_name, "object": "model", "created": r.created, "owned_by": "vllm",
                "root": r.path, "parent": None, "max_model_len": r.max_len}
        data = [base] + [{"id": n, "object": "model", "created": r.created, "owned_by": "vllm", "root": p,
                          "parent": self.served_name, "max_model_len": r.max_len} for n, p in r.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    async def _json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = body.get("model") or self.served_name
        r = self.runner
        if model != self.served_name and model not in r.adapters:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported by the embedded server", param="n")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        try:
            prompt_ids = r.encode_chat(messages)
        except Exception as e:
            raise APIError(400, f"could not apply the chat template: {e}", param="messages")
        if len(prompt_ids) + int(max_tokens) > r.max_len:
            raise APIError(400, f"This model's maximum context length is {r.max_len} tokens. However, you "
                                f"requested {len(prompt_ids) + int(max_tokens)} tokens "
                                f"({len(prompt_ids)} in the messages, {max_tokens} in the completion).")
        fut = asyncio.get_running_loop().create_future()
        req = GenRequest(prompt_ids, model, int(max_tokens), float(body.get("temperature", 1.0)),
                         float(body.get("top_p", 1.0)), body.get("seed"), stop, fut)
        self.stats["requests"] += 1
        self._queue.put_nowait(req)
        res: GenResult = await fut
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text, "tool_calls": []},
                         "logprobs": None, "finish_reason": res.finish_reason, "stop_reason": None}],
            "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens + res.completion_tokens,
                      "completion_tokens": res.completion_tokens},
        })

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.served_name:
            raise APIError(400, f"'{name}' is the base model's name")
        await self._run(self.runner.load_adapter, name, path, bool(body.get("load_inplace", False)))
        log.info("loaded LoRA adapter %s from %s", name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name = body.get("lora_name")
        if not name:
            raise APIError(400, "'lora_name' must be provided.")
        await self._run(self.runner.unload_adapter, name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=64 * 2**20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


def build_server(model: str, served_name: str | None = None, dtype: str = "auto", device: str | None = None,
                 **kw: Any) -> ModelServer:
    name = served_name or os.path.basename(os.path.normpath(model))
    return ModelServer(lambda: ModelRunner(model, name, dtype, device), name, **kw)


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-server", help="OpenAI-compatible server over transformers, with vLLM's runtime LoRA endpoints",
        description="Serve a local transformers checkpoint with an OpenAI-compatible API (the offline default and "
                    "CI stand-in for vLLM). Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, "
                    "POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}, POST /v1/unload_lora_adapter "
                    "{lora_name}. A request's `model` selects the base model or a loaded adapter.")
    p.add_argument("--model", required=True, help="checkpoint directory (anything from_pretrained loads)")
    p.add_argument("--served-model-name", help="model id to report (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch", type=int, default=32, help="largest generation batch (default 32)")
    p.add_argument("--default-max-tokens", type=int, default=128,
                   help="completion length when a request gives no max_tokens (default 128)")
    p.add_argument("--api-key", default=os.environ.get("SIMKIT_SERVER_API_KEY"),
                   help="require this bearer token on /v1 (default: $SIMKIT_SERVER_API_KEY, else none)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = build_server(args.model, args.served_model_name, args.dtype, args.device, max_batch=args.max_batch,
                          default_max_tokens=args.default_max_tokens, api_key=args.api_key)
    print(f"simkit model-server: serving {server.served_name} on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
