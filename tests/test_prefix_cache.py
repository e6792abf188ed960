"""Prefix caching, chunked prefill and failure isolation of the embedded server's batcher, in-process
on a tiny Llama whose weights are scaled up so greedy replies are varied (not one repeated token)."""
from __future__ import annotations

import threading

import pytest
import torch

from simkit.modelserver.batcher import ContinuousBatcher, GenRequest, GenResult
from simkit.modelserver.kvcache import PrefixCache, RowKV

SYSTEM = "You are a careful assistant who answers questions about tables. " * 3


@pytest.fixture(scope="module")
def lively_model(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lively") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runner(lively_model, one_torch_thread):
    from simkit.modelserver.server import ModelRunner

    return ModelRunner(str(lively_model), "base")


class _Waiter:
    def __init__(self) -> None:
        self.event, self.result = threading.Event(), None

    def __call__(self, res: GenResult | BaseException) -> None:
        self.result = res
        self.event.set()

    def get(self, timeout: float = 60) -> GenResult | BaseException:
        assert self.event.wait(timeout), "request never answered"
        return self.result


def _request(runner, question: str, max_tokens: int = 12, model: str = "base", **kw) -> tuple[GenRequest, _Waiter]:
    ids = runner.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    w = _Waiter()
    return GenRequest(ids, model, max_tokens, kw.pop("temperature", 0.0), 1.0, kw.pop("seed", None), [], w,
                      ignore_eos=kw.pop("ignore_eos", True), **kw), w


def _generate(runner, req: GenRequest) -> list[int]:
    x = torch.tensor([req.prompt_ids])
    with torch.inference_mode(), runner.using(req.model):
        out = runner.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=req.max_tokens,
                                    do_sample=False, min_new_tokens=req.max_tokens)
    return out[0, x.shape[1]:].tolist()


@pytest.fixture(params=[0, 512], ids=["per-row-kv", "slot-pool"])
def batcher(runner, request):
    """Both KV layouts: each row its own KV (a CPU's default) and one slot pool decoded batched (a GPU's)."""
    b = ContinuousBatcher(runner, max_batch=8, max_num_batched_tokens=24, prefix_cache_bytes=8 * 2**20,
                          kv_pool_tokens=request.param)
    yield b
    b.close()


def _kv(tokens: int, fill: float) -> RowKV:
    kv = RowKV(2, 1, 4, torch.float32, "cpu", tokens)
    kv.k.fill_(fill)
    kv.v.fill_(-fill)
    return kv


def test_prefix_cache_hit_miss_and_chain():
    cache = PrefixCache(max_bytes=2**20, block_size=4)
    prompt = list(range(10))
    hashes = cache.block_hashes(prompt, ("base",))
    assert len(hashes) == 2 and cache.match(hashes, len(prompt)) == []  # cold: a miss
    kv = _kv(10, 1.0)
    for i, h in enumerate(hashes):
        cache.put(h, kv, i)
    got = cache.match(hashes, len(prompt))
    assert len(got) == 2 and cache.hits == 8 and cache.queries == 20
    other = cache.block_hashes([99] + prompt[1:], ("base",))  # first block differs: the chain breaks at once
    assert other[1] != hashes[1] and cache.match(other, 10) == []
    assert len(cache.match(hashes, 8)) == 1  # at most len-1 tokens hit: the last one is computed for its logits
    row = _kv(10, 0.0)
    cache.load(got, row)
    assert float(row.k[:, :, :8].min()) == 1.0 and float(row.v[:, :, :8].max()) == -1.0


def test_prefix_cache_evicts_least_recently_used():
    one_block = 2 * 2 * 1 * 4 * 4 * 4  # k and v: [2 layers, 1 head, 4 tokens, 4 dims] fp32
    cache = PrefixCache(max_bytes=2 * one_block, block_size=4)
    a, b, c = ([t] * 5 for t in (1, 2, 3))
    ha, hb, hc = (cache.block_hashes(p, ()) for p in (a, b, c))
    cache.put(ha[0], _kv(5, 1.0), 0)
    cache.put(hb[0], _kv(5, 2.0), 0)
    assert cache.match(ha, 5)  # touch a: b is now the least recently used
    cache.put(hc[0], _kv(5, 3.0), 0)
    assert len(cache) == 2 and cache.match(hb, 5) == [] and cache.match(ha, 5) and cache.match(hc, 5)
    assert PrefixCache(max_bytes=0).match(ha, 5) == []  # 0 bytes: caching off


def test_extra_keys_separate_models():
    cache = PrefixCache(max_bytes=2**20, block_size=4)
    prompt = list(range(9))
    assert cache.block_hashes(prompt, ("a", "/p", "lora1")) != cache.block_hashes(prompt, ("a", "/p", "lora2"))


def test_greedy_parity_with_generate_under_chunking_and_prefix_hits(runner, batcher):
    """Prompts of different lengths, prefilled in 24-token chunks beside decoding rows, the later
    ones reusing the shared system prompt's blocks: token for token what model.generate gives."""
    questions = ["How tall is the oak?", "List the singers older than 30 ordered by age, with their songs.", "hi",
                 "What is the total revenue per year? " * 4]
    first = [_request(runner, q) for q in questions]
    for req, _ in first:
        batcher.submit(req)
    results = [w.get() for _, w in first]
    again = [_request(runner, q) for q in questions]
    for req, _ in again:
        batcher.submit(req)
    results += [w.get() for _, w in again]
    for (req, _), res in zip(first + again, results):
        assert isinstance(res, GenResult), res
        assert res.text == runner.tokenizer.decode(_generate(runner, req), skip_special_tokens=True)
    assert all(res.cached_tokens >= 16 for res in results[len(questions):])  # the second round hits
    assert batcher.prefix_cache.hits > 0 and batcher.stats["prefills"] > len(results)  # chunked
    assert (batcher.stats.get("pooled_decode_steps", 0) > 0) == (batcher.kv_pool is not None)


def test_slot_pool_reuses_freed_slots_and_refuses_long_rows():
    from simkit.modelserver.kvcache import SlotPool

    pool = SlotPool(2, 1, 4, torch.float32, "cpu", slots=2, tokens=16)
    a, b = pool.acquire(16), pool.acquire(3)
    assert a.slot != b.slot and pool.acquire(1) is None and pool.used == 2  # full
    assert pool.acquire(17) is None  # longer than a slot: the caller gives the row its own KV
    a.k[:, :, 0] = 7.0
    assert pool.k[:, a.slot, :, 0].eq(7.0).all()  # a row's KV is a view of its slot
    del a
    c = pool.acquire(16)
    assert c is not None and pool.used == 2
    with pytest.raises(ValueError):
        c.reserve(17, 0, 99)


def test_pooled_batcher_recycles_slots_and_falls_back_for_long_rows(runner):
    """Two slots, six requests (one too long for a slot): every reply is still model.generate's."""
    b = ContinuousBatcher(runner, max_batch=2, max_num_batched_tokens=64, prefix_cache_bytes=0, kv_pool_tokens=128)
    try:
        reqs = [_request(runner, q, max_tokens=8) for q in ["a?", "bb?", "How tall?", "Count them.", "Which one?"]]
        reqs.append(_request(runner, "Describe every table. " * 10, max_tokens=8))
        assert len(reqs[-1][0].prompt_ids) + 8 > 128 and all(len(r.prompt_ids) + 8 <= 128 for r, _ in reqs[:-1])
        for req, _ in reqs:
            b.submit(req)
        for req, w in reqs:
            res = w.get()
            assert isinstance(res, GenResult), res
            assert res.text == runner.tokenizer.decode(_generate(runner, req), skip_special_tokens=True)
        assert b.stats.get("pooled_decode_steps", 0) > 0 and b.kv_pool.used == 0
    finally:
        b.close()


def test_chunked_prefill_keeps_running_rows_decoding(runner, batcher):
    long_req, long_w = _request(runner, "Describe every table. " * 40, max_tokens=1)
    running, run_w = _request(runner, "Count.", max_tokens=80)
    seen: dict[str, int] = {}

    def long_done(res):  # on the model thread: how far the running row got while the long prompt prefilled
        seen["tokens"] = next(len(r.gen) for r in batcher.rows if r.req is running)
        long_w(res)

    long_req.done = long_done
    batcher.submit(running)
    batcher.submit(long_req)
    assert isinstance(long_w.get(), GenResult) and isinstance(run_w.get(), GenResult)
    chunks = (len(long_req.prompt_ids) - 24) // 24
    assert len(long_req.prompt_ids) > 200 and seen["tokens"] >= chunks  # one token per step of the prefill


def test_new_adapter_version_never_reuses_old_blocks(runner, lively_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(lively_model),
                              LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        peft.save_pretrained(tmp_path / f"v{seed}")
        paths.append(str(tmp_path / f"v{seed}"))
    b = ContinuousBatcher(runner, max_batch=4, max_num_batched_tokens=64, prefix_cache_bytes=8 * 2**20)
    try:
        def serve(model):
            req, w = _request(runner, "Which singer is the oldest?", model=model)
            b.submit(req)
            res = w.get()
            assert isinstance(res, GenResult), res
            return res, req

        b.call(lambda: runner.load_adapter("pol", paths[0], False)).result(30)
        serve("pol")
        hit, _ = serve("pol")
        assert hit.cached_tokens > 0  # same version: reused
        for path in (paths[1], paths[1]):  # a new version, then an in-place reload of that same path
            b.call(lambda p=path: runner.load_adapter("pol", p, True)).result(30)
            fresh, req = serve("pol")
            assert fresh.cached_tokens == 0
            assert fresh.text == runner.tokenizer.decode(_generate(runner, req), skip_special_tokens=True)
        base, _ = serve("base")
        assert base.cached_tokens == 0  # the base model never reads an adapter's blocks
    finally:
        b.call(lambda: runner.unload_adapter("pol")).result(30)
        b.close()


@pytest.mark.parametrize("seed", [2**64, "abc", 1.5])
def test_a_bad_seed_fails_its_request_only(runner, batcher, seed):
    good = [_request(runner, f"Question {i}?", max_tokens=6, temperature=1.0, seed=i) for i in range(3)]
    bad, bad_w = _request(runner, "Question bad?", max_tokens=6, temperature=1.0, seed=seed)
    batcher.submit(good[0][0])
    batcher.submit(bad)
    for req, _ in good[1:]:
        batcher.submit(req)
    assert isinstance(bad_w.get(), RuntimeError)
    assert all(isinstance(w.get(), GenResult) for _, w in good)
    assert batcher.stats["failed"] == 1 and batcher.running == 0 and batcher.waiting == 0
