"""Continuous batching for the embedded model server: one model thread, one running batch.

Why: with static batching a batch runs until its longest reply ends, so short replies, cancelled
requests and new arrivals all wait on it; on a CPU this is what turned client timeouts into a retry
storm. Here the model thread runs one decode step at a time over a running batch:
- new requests join between steps (prefilled together, their KV cache left-padded and merged);
- a row leaves as soon as it ends (EOS, `max_tokens`, a stop string) or its client goes away
  (`GenRequest.cancelled`): its cache rows are dropped, so a cancelled request stops costing time;
- rows of one batch share a model (base or one LoRA adapter, which PEFT switches globally); the
  oldest waiting request picks the next model, so no adapter starves.
Control work (adapter loads) runs on the same thread between steps, so it never races a forward.
Each row samples with its own temperature / top-p / seed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("simkit.batcher")


@dataclass
class GenRequest:
    prompt_ids: list[int]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    done: Callable[["GenResult | BaseException"], None] = field(repr=False)  # called once, on the model thread
    ignore_eos: bool = False  # vLLM's extra sampling parameter: generate max_tokens whatever comes
    top_k: int = 0  # 0 or -1: off (vLLM)
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # vLLM/HF: on every token of the prompt and the output
    cancelled: bool = False  # set by the server when the client goes away
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or EOS id that ended it (vLLM's field)


class _Row:
    __slots__ = ("req", "gen", "generator", "length")

    def __init__(self, req: GenRequest, generator: Any):
        self.req, self.gen, self.generator = req, [], generator
        self.length = len(req.prompt_ids)  # real tokens in the cache: the next position id


class ContinuousBatcher:
    """Owns the model thread. `submit` is thread-safe; results come back through `req.done`."""

    def __init__(self, runner: Any, max_batch: int = 32, max_prefill_tokens: int = 8192):
        self.runner = runner
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: list[GenRequest] = []
        self._control: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._stop = False
        self.rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None
        self._model: str | None = None
        self.stats = {"batches": 0, "steps": 0, "prefills": 0, "completion_tokens": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from other threads
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            self._waiting.append(req)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the model thread between decode steps (adapter loads and the like)."""
        fut: Future = Future()
        with self._cv:
            self._control.put((fn, fut))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    # ------------------------------------------------------------------ model thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self.rows or self._waiting or not self._control.empty()):
                    self._cv.wait()
                if self._stop:
                    return
            while not self._control.empty():
                fn, fut = self._control.get()
                if not fut.set_running_or_notify_cancel():  # the caller gave up (e.g. its HTTP request timed
                    continue  # out): skip the call; a cancelled future must not be resolved (that would kill this thread)
                try:
                    result = fn()
                except BaseException as e:  # reported to the caller
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
            try:
                self._admit()
                if self.rows:
                    self._decode()
            except Exception as e:  # a failed forward fails its rows, never the server
                log.exception("generation failed")
                for row in self.rows:
                    row.req.done(RuntimeError(f"generation failed: {e}"))
                self.rows, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        """Move waiting requests of the running batch's model into it, up to max_batch."""
        with self._cv:
            live = [r for r in self._waiting if not r.cancelled]
            self.stats["cancelled"] += len(self._waiting) - len(live)
            self._waiting = live
            if not live:
                return
            model = self._model if self.rows else live[0].model
            if self.rows and live[0].model != model:
                return  # let this batch drain: the oldest waiting request wants another model
            room, budget, take = self.max_batch - len(self.rows), self.max_prefill_tokens, []
            for r in live:
                if len(take) >= room:
                    break
                if r.model == model and (not take or budget >= len(r.prompt_ids)):
                    take.append(r)
                    budget -= len(r.prompt_ids)
            if not take:
                return
            ids = {id(r) for r in take}
            self._waiting = [r for r in live if id(r) not in ids]
        if not self.rows:
            self._model = model
            self.stats["batches"] += 1
        self._prefill(take)

    def _forward(self, cache: Any, **kw: Any) -> Any:
        r = self.runner
        with r.torch.inference_mode(), r.using(self._model):
            return r.model(**kw, **{r.cache_kwarg: cache}, **r.last_logits_only, use_cache=True).logits[:, -1, :]

    def _prefill(self, reqs: list[GenRequest]) -> None:
        torch, runner = self.runner.torch, self.runner
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in reqs)
        pad = runner.pad_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(cache, input_ids=ids.to(runner.device), attention_mask=mask.to(runner.device),
                               position_ids=pos.to(runner.device))
        self.stats["prefills"] += 1
        new_rows = []
        for r in reqs:
            gen = None
            if r.seed is not None and r.temperature > 0:
                gen = torch.Generator(device=runner.device).manual_seed(int(r.seed))
            new_rows.append(_Row(r, gen))
        self._merge(new_rows, cache, mask.to(runner.device))
        self._accept(logits, first=len(self.rows) - len(new_rows))

    def _merge(self, rows: list[_Row], cache: Any, mask: Any) -> None:
        """Append prefilled rows to the running batch: left-pad the shorter cache, concat on batch."""
        torch = self.runner.torch
        if not self.rows:
            self.rows, self._cache, self._mask = rows, cache, mask
            return
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def lpad(x: Any, n: int) -> Any:  # [B, H, T, D] or [B, T]: n zero columns on the left of T
            if n == 0:
                return x
            shape = list(x.shape)
            shape[-2 if x.dim() == 4 else -1] = n
            return torch.cat([x.new_zeros(shape), x], dim=-2 if x.dim() == 4 else -1)

        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([lpad(old.keys, width - t_old), lpad(new.keys, width - t_new)])
            old.values = torch.cat([lpad(old.values, width - t_old), lpad(new.values, width - t_new)])
        self._mask = torch.cat([lpad(self._mask, width - t_old), lpad(mask, width - t_new)])
        self.rows = self.rows + rows

    def _decode(self) -> None:
        torch, runner = self.runner.torch, self.runner
        last = torch.tensor([[row.gen[-1]] for row in self.rows], device=runner.device)
        pos = torch.tensor([[row.length] for row in self.rows], device=runner.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(self._cache, input_ids=last, attention_mask=self._mask, position_ids=pos)
        self.stats["steps"] += 1
        for row in self.rows:
            row.length += 1
        self._accept(logits, first=0)

    def _accept(self, logits: Any, first: int) -> None:
        """Pick each row's next token (rows[first:] own `logits`), then retire finished rows."""
        torch, runner = self.runner.torch, self.runner
        rows = self.rows[first:]
        if any(row.req.repetition_penalty != 1.0 for row in rows):
            logits = logits.clone()  # an inference-mode tensor: edit a copy
        for i, row in enumerate(rows):
            if row.req.repetition_penalty != 1.0:
                logits[i] = _penalise(torch, logits[i], row.req.prompt_ids + row.gen, row.req.repetition_penalty)
        nxt = logits.argmax(-1)
        for i, row in enumerate(rows):
            r = row.req
            if r.temperature > 0:
                nxt[i] = _sample(torch, logits[i], r.temperature, r.top_p, row.generator, r.top_k, r.min_p)
        keep = []
        for i, (row, tok) in enumerate(zip(rows, nxt.tolist())):
            result = None
            if row.req.cancelled:
                self.stats["cancelled"] += 1
                row.req.done(RuntimeError("cancelled"))
                continue
            if tok in runner.eos_ids and not row.req.ignore_eos:
                # vLLM: stop_reason None on EOS; the EOS token counts in completion_tokens
                result = self._result(row, "stop", None)
                result.completion_tokens += 1
            else:
                row.gen.append(tok)
                self.stats["completion_tokens"] += 1
                hit = self._stop_hit(row)
                if hit is not None:
                    result = hit
                elif len(row.gen) >= row.req.max_tokens or row.length + 1 >= runner.max_len:
                    result = self._result(row, "length", None)
            if result is None:
                keep.append(first + i)
            else:
                row.req.done(result)
        keep = list(range(first)) + keep
        if len(keep) < len(self.rows):
            self._retire(keep)

    def _retire(self, keep: list[int]) -> None:
        torch = self.runner.torch
        if not keep:
            self.rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.runner.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self._mask[idx]
        start = int((mask.sum(0) > 0).nonzero()[0])  # leading columns no row uses any more
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]

    def _stop_hit(self, row: _Row) -> GenResult | None:
        if not row.req.stop:
            return None
        text = self.runner.tokenizer.decode(row.gen, skip_special_tokens=True)
        for s in row.req.stop:
            if s and s in text:
                return GenResult(text[: text.index(s)], len(row.req.prompt_ids), len(row.gen), "stop", s)
        return None

    def _result(self, row: _Row, finish: str, stop_reason: Any) -> GenResult:
        text = self.runner.tokenizer.decode(row.gen, skip_special_tokens=True)
        return GenResult(text, len(row.req.prompt_ids), len(row.gen), finish, stop_reason)


def _penalise(torch: Any, logits: Any, seen: list[int], penalty: float) -> Any:
    """HF / vLLM repetition penalty: a seen token's logit is divided by it if positive, else multiplied."""
    logits = logits.clone()
    idx = torch.tensor(sorted(set(seen)), device=logits.device, dtype=torch.long)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _sample(torch: Any, logits: Any, temperature: float, top_p: float, generator: Any, top_k: int = 0,
            min_p: float = 0.0) -> Any:
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[0]

