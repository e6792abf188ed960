"""Continuous batching for the embedded model server: one model thread, one running batch.

Why: with static batching a batch runs until its longest reply ends, so short replies, cancelled
requests and new arrivals all wait on it; on a CPU this is what turned client timeouts into a retry
storm. Here the model thread runs one step at a time, scheduled as vLLM's V1 scheduler does:
- a step packs one token of every decoding row, then prompt chunks of rows still prefilling and of
  newly admitted requests, up to `max_num_batched_tokens` tokens, into one forward without padding
  (`simkit.modelserver.kvcache`): a long prompt is prefilled over several steps while the other rows keep
  decoding between its chunks;
- a new request first reuses the KV of its longest cached prompt prefix (`PrefixCache`, keyed also
  by the adapter's name, path and load generation) and prefills only the rest;
- a row leaves as soon as it ends (EOS, `max_tokens`, a stop string) or its client goes away
  (`GenRequest.cancelled`), freeing its KV;
- rows of one batch share a model (base or one LoRA adapter, which PEFT switches globally); the
  oldest waiting request picks the next model, so no adapter starves.
Every request is answered exactly once: a failure while admitting or sampling one request fails
that request; a failed forward fails the rows in it; the others go on.
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

from simkit.modelserver.kvcache import STEP_KWARG, PrefixCache, RowKV, Segment, SlotPool, Step

log = logging.getLogger("simkit.modelserver.batcher")
FIRST_DECODE_ROOM = 256  # KV slots reserved beyond the prompt at admission (grown by doubling after)


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
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (vLLM's usage.prompt_tokens_details)


class _Row:
    __slots__ = ("req", "gen", "generator", "kv", "computed", "hashes", "cached_blocks", "hit")

    def __init__(self, req: GenRequest, generator: Any, hashes: list[bytes]):
        self.req, self.gen, self.generator, self.hashes = req, [], generator, hashes
        self.kv: RowKV | None = None  # allocated when the row starts (after its prefix-cache lookup)
        self.cached_blocks = 0  # prompt blocks already in the prefix cache
        self.hit = 0  # prompt tokens reused from the prefix cache
        self.computed = 0  # tokens whose KV is in `kv`: the next position id

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.req.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.req.prompt_ids) + len(self.gen)

    def token(self, i: int) -> int:
        p = self.req.prompt_ids
        return p[i] if i < len(p) else self.gen[i - len(p)]


class ContinuousBatcher:
    """Owns the model thread. `submit` is thread-safe; results come back through `req.done`."""

    def __init__(self, runner: Any, max_batch: int = 64, max_num_batched_tokens: int = 2048,
                 prefix_cache_bytes: int = 512 * 2**20, block_size: int = 16, kv_pool_tokens: int = 0):
        self.runner = runner
        self.max_batch = max_batch
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, block_size)
        # kv_pool_tokens > 0: rows of up to that many tokens get a slot of one preallocated pool and
        # decode batched (a GPU's default; longer rows keep their own KV and the per-row path)
        self.kv_pool = (SlotPool(*runner.kv_shape, runner.dtype, runner.device, max_batch,
                                 min(kv_pool_tokens, runner.max_len)) if kv_pool_tokens > 0 else None)
        self._waiting: list[GenRequest] = []
        self._control: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._stop = False
        self.rows: list[_Row] = []
        self._model: str | None = None
        self.stats = {"batches": 0, "steps": 0, "pooled_decode_steps": 0, "prefills": 0, "prefill_tokens": 0,
                      "completion_tokens": 0, "cancelled": 0, "failed": 0}
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
                self._step()
            except Exception as e:  # last resort: answer every running row, keep serving the waiting ones
                log.exception("generation failed")
                rows, self.rows = self.rows, []
                for row in rows:
                    self._fail(row.req, e)

    def _finish(self, req: GenRequest, result: "GenResult | BaseException") -> None:
        try:
            req.done(result)
        except Exception:  # a broken callback must not take the model thread (or other rows) with it
            log.exception("request callback failed")

    def _fail(self, req: GenRequest, e: BaseException) -> None:
        self.stats["failed"] += 1
        self._finish(req, RuntimeError(f"generation failed: {type(e).__name__}: {e}"))

    def _step(self) -> None:
        """Schedule one step (decode tokens, then prompt chunks, then new requests), run it, sample."""
        for row in [r for r in self.rows if r.req.cancelled]:
            self.stats["cancelled"] += 1
            self._finish(row.req, RuntimeError("cancelled"))
        self.rows = [r for r in self.rows if not r.req.cancelled]
        budget = self.max_num_batched_tokens
        sched: list[tuple[_Row, int]] = []
        for row in self.rows:
            if budget > 0 and row.kv is not None and not row.prefilling:  # decoding rows first, one token each
                sched.append((row, 1))
                budget -= 1
        pending = {h for r in self.rows if r.kv is not None for h in r.hashes[r.cached_blocks:]}
        for row in [r for r in self.rows if r.prefilling] + self._admit():
            if budget <= 0:
                break
            if row.kv is None:  # not started: look up its prefix now, or wait for blocks being computed
                if self._defer(row, pending):
                    continue
                self._start(row)
                pending.update(row.hashes[row.cached_blocks:])
            n = min(budget, len(row.req.prompt_ids) - row.computed)
            sched.append((row, n))
            budget -= n
        if not sched:
            return
        try:
            logits, sample = self._run(sched)
        except Exception as e:  # the rows of this forward fail; rows not in it and waiting requests go on
            log.exception("forward failed")
            failed = {id(row) for row, _ in sched}
            for row, _ in sched:
                self._fail(row.req, e)
            self.rows = [r for r in self.rows if id(r) not in failed]
            return
        self._accept(sample, logits)

    def _admit(self) -> list[_Row]:
        """Move waiting requests of the running batch's model into it, up to max_batch."""
        with self._cv:
            live = [r for r in self._waiting if not r.cancelled]
            self.stats["cancelled"] += len(self._waiting) - len(live)
            self._waiting = live
            if not live or len(self.rows) >= self.max_batch:
                return []
            model = self._model if self.rows else live[0].model
            if self.rows and live[0].model != model:
                return []  # let this batch drain: the oldest waiting request wants another model
            take = [r for r in live if r.model == model][: self.max_batch - len(self.rows)]
            ids = {id(r) for r in take}
            self._waiting = [r for r in live if id(r) not in ids]
        if not self.rows:
            self._model = model
            self.stats["batches"] += 1
        new = []
        for req in take:
            try:
                new.append(self._new_row(req))
            except Exception as e:  # e.g. a seed torch cannot take: this request fails, the others go on
                log.warning("request rejected at admission: %s", e)
                self._fail(req, e)
        self.rows.extend(new)
        return new

    def _new_row(self, req: GenRequest) -> _Row:
        generator = None
        if req.seed is not None and req.temperature > 0:
            if isinstance(req.seed, bool) or not isinstance(req.seed, int):
                raise TypeError(f"seed must be an integer, got {req.seed!r}")
            generator = self.runner.torch.Generator(device=self.runner.device).manual_seed(req.seed)
        cache = self.prefix_cache
        hashes = cache.block_hashes(req.prompt_ids, self.runner.cache_key(req.model)) if cache.enabled else []
        return _Row(req, generator, hashes)

    def _defer(self, row: _Row, pending: set[bytes]) -> bool:
        """Wait a step when the next block this prompt misses is being computed by a running row:
        a burst sharing a system prompt then computes it once and hits, instead of all missing."""
        usable = self.prefix_cache.usable(row.hashes, len(row.req.prompt_ids))
        k = self.prefix_cache.peek(row.hashes, len(row.req.prompt_ids))
        return k < len(usable) and usable[k] in pending

    def _start(self, row: _Row) -> None:
        """Reuse the longest cached prefix and allocate the row's KV."""
        runner, cache, req = self.runner, self.prefix_cache, row.req
        blocks = cache.match(row.hashes, len(req.prompt_ids))
        cap = min(len(req.prompt_ids) + min(req.max_tokens, FIRST_DECODE_ROOM), runner.max_len)
        pooled = self.kv_pool.acquire(len(req.prompt_ids) + req.max_tokens) if self.kv_pool else None
        row.kv = pooled or RowKV(*runner.kv_shape, runner.dtype, runner.device, cap)
        cache.load(blocks, row.kv)
        row.cached_blocks = len(blocks)
        row.hit = row.computed = len(blocks) * cache.block_size

    def _run(self, sched: list[tuple[_Row, int]]) -> tuple[Any, list[_Row]]:
        """One packed forward; returns the logits of the rows that need a next token, and those rows."""
        torch, runner = self.runner.torch, self.runner
        ids: list[int] = []
        pos: list[int] = []
        segments, keep, sample = [], [], []
        for row, n in sched:
            row.kv.reserve(row.computed + n, row.computed, runner.max_len)
            segments.append(Segment(row.kv, len(ids), n, row.computed))
            ids.extend(row.token(i) for i in range(row.computed, row.computed + n))
            pos.extend(range(row.computed, row.computed + n))
            if row.computed + n == row.length:  # every known token is in: the row needs its next one
                keep.append(len(ids) - 1)
                sample.append(row)
        dev = runner.device
        step = Step(segments) if self.kv_pool else segments
        with torch.inference_mode(), runner.using(self._model):
            out = runner.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([pos], device=dev),
                               use_cache=False, logits_to_keep=torch.tensor(keep or [len(ids) - 1], device=dev),
                               **{STEP_KWARG: step})
        self.stats["steps"] += 1
        self.stats["pooled_decode_steps"] += getattr(step, "decode", None) is not None
        for row, n in sched:
            prefilling = row.computed < len(row.req.prompt_ids)
            row.computed += n
            if prefilling:
                self.stats["prefills"] += 1
                self.stats["prefill_tokens"] += n
                self._cache_blocks(row)
        return out.logits[0], sample

    def _cache_blocks(self, row: _Row) -> None:
        """Offer the row's newly completed prompt blocks to the prefix cache."""
        full = min(row.computed, len(row.req.prompt_ids)) // self.prefix_cache.block_size
        for i in range(row.cached_blocks, min(full, len(row.hashes))):
            self.prefix_cache.put(row.hashes[i], row.kv, i)
        row.cached_blocks = max(row.cached_blocks, full)

    def _accept(self, rows: list[_Row], logits: Any) -> None:
        """Pick each row's next token from its logits row, then retire finished rows."""
        if not rows:
            return
        greedy = logits.argmax(-1).tolist()
        ended = set()
        for i, row in enumerate(rows):
            try:
                result = self._next(row, logits[i], greedy[i])
            except Exception as e:  # a sampling failure fails this row only
                log.exception("sampling failed")
                self._fail(row.req, e)
                ended.add(id(row))
                continue
            if result is not None:
                self._finish(row.req, result)
                ended.add(id(row))
        if ended:
            self.rows = [r for r in self.rows if id(r) not in ended]

    def _next(self, row: _Row, logits: Any, greedy: int) -> GenResult | None:
        torch, runner, r = self.runner.torch, self.runner, row.req
        tok = greedy
        if r.repetition_penalty != 1.0 or r.temperature > 0:
            if r.repetition_penalty != 1.0:
                logits = _penalise(torch, logits, r.prompt_ids + row.gen, r.repetition_penalty)
                tok = int(logits.argmax(-1))
            if r.temperature > 0:
                tok = int(_sample(torch, logits, r.temperature, r.top_p, row.generator, r.top_k, r.min_p))
        if tok in runner.eos_ids and not r.ignore_eos:
            # vLLM: stop_reason None on EOS; the EOS token counts in completion_tokens
            result = self._result(row, "stop", None)
            result.completion_tokens += 1
            return result
        row.gen.append(tok)
        self.stats["completion_tokens"] += 1
        hit = self._stop_hit(row)
        if hit is not None:
            return hit
        if len(row.gen) >= r.max_tokens or row.length + 1 > runner.max_len:
            return self._result(row, "length", None)
        return None

    def _stop_hit(self, row: _Row) -> GenResult | None:
        if not row.req.stop:
            return None
        text = self.runner.tokenizer.decode(row.gen, skip_special_tokens=True)
        for s in row.req.stop:
            if s and s in text:
                return GenResult(text[: text.index(s)], len(row.req.prompt_ids), len(row.gen), "stop", s, row.hit)
        return None

    def _result(self, row: _Row, finish: str, stop_reason: Any) -> GenResult:
        text = self.runner.tokenizer.decode(row.gen, skip_special_tokens=True)
        return GenResult(text, len(row.req.prompt_ids), len(row.gen), finish, stop_reason, row.hit)


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

