"""KV memory of the embedded model server: per-request KV rows, vLLM-style automatic prefix
caching, and a varlen attention that lets one forward mix prefill chunks and decode tokens.

Why: padding a batch of 250–900-token prompts to its longest one, recomputing the shared system
prompt of every request, and prefilling 20 prompts in one forward (decoding stalled meanwhile) made
the embedded server ~4x slower than vLLM's CPU build on the same eval. Here:
- each request owns its KV (`RowKV`, no padding); one forward packs every scheduled token of every
  row into a single [1, N] sequence, and `varlen_attention` attends each segment to its own row;
- full blocks of prompt KV are kept in a `PrefixCache` keyed by a hash chain (parent hash, block
  tokens, extra keys = the model/adapter identity) and evicted LRU under a byte budget, so a prompt
  that shares a prefix with an earlier one prefills only the rest (vLLM's automatic prefix caching).
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPL = "simkit_varlen"  # the model's attn_implementation; plain sdpa when no step is passed
STEP_KWARG = "simkit_step"  # the forward kwarg that carries the step's `Segment`s down to attention


class RowKV:
    """One request's keys/values for all layers, [layers, kv_heads, capacity, head_dim] each;
    positions [0, n) hold its first n tokens. Grows by doubling (decode appends one per step), or is
    a fixed slot of a `SlotPool` (`slot` set), whose decode steps run batched."""

    slot: int | None = None
    pool: "SlotPool | None" = None

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: Any, device: Any, capacity: int):
        shape = (layers, kv_heads, capacity, head_dim)
        self._set(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def in_pool(cls, pool: "SlotPool", slot: int) -> "RowKV":
        row = cls.__new__(cls)
        row._set(pool.k[:, slot], pool.v[:, slot])
        row.slot, row.pool = slot, pool
        return row

    def _set(self, k: Any, v: Any) -> None:
        """The KV tensors, and their per-layer views made once (attention indexes a layer per call)."""
        self.k, self.v = k, v
        self.k_layers, self.v_layers = k.unbind(0), v.unbind(0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, n: int, used: int, limit: int) -> None:
        """Room for n tokens (at most `limit`), keeping the first `used`."""
        if n <= self.capacity:
            return
        if self.pool is not None:
            raise ValueError(f"{n} tokens exceed the KV slot's {self.capacity}")
        cap = min(max(n, 2 * self.capacity), max(n, limit))
        grown = []
        for old in (self.k, self.v):
            new = old.new_empty((old.shape[0], old.shape[1], cap, old.shape[3]))
            new[:, :, :used] = old[:, :, :used]
            grown.append(new)
        self._set(*grown)


class SlotPool:
    """KV for `slots` rows of up to `tokens` tokens each, allocated once, so that a step's decoding
    rows write and read their K/V in a few batched ops per layer (`DecodeBatch`) instead of three
    small ops per row per layer. On a GPU those ~6,000 launches a step at 64 rows, not the math,
    bound decoding (0.4 s a step, bench/RESULTS.md); on a CPU the per-row path is as fast (it reads
    no padding), so the server uses the pool on a GPU only by default. A slot is free again once
    its `RowKV` is gone (rows are dropped, never closed, on finish, cancel and failure)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: Any, device: Any, slots: int, tokens: int):
        shape = (layers, slots, kv_heads, tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = tokens
        self._owners: list[Any] = [None] * slots

    def acquire(self, tokens: int) -> RowKV | None:
        """A slot for a row that will hold at most `tokens` tokens, or None (too long, or all taken)."""
        if tokens > self.tokens:
            return None
        for i, owner in enumerate(self._owners):
            if owner is None or owner() is None:
                row = RowKV.in_pool(self, i)
                self._owners[i] = weakref.ref(row)
                return row
        return None

    @property
    def used(self) -> int:
        return sum(1 for o in self._owners if o is not None and o() is not None)


@dataclass
class Segment:
    """`n` consecutive tokens of one row in a packed step: packed offset `start`, positions from `past`."""
    kv: RowKV
    start: int
    n: int
    past: int
    mask: Any = None  # [n, past + n] bool, for a chunk that follows earlier KV (else causal / none)
    batched: bool = False  # attended by the step's `DecodeBatch`, not on its own

    def __post_init__(self) -> None:
        if self.n > 1 and self.past > 0:
            q = torch.arange(self.n, device=self.kv.k.device)[:, None] + self.past
            self.mask = torch.arange(self.past + self.n, device=self.kv.k.device)[None, :] <= q


class DecodeBatch:
    """The decoding rows of one step that live in one `SlotPool`: their slots, positions and packed
    offsets as tensors, built once per step and used by every layer."""

    def __init__(self, segments: list[Segment]):
        self.pool = segments[0].kv.pool
        dev = self.pool.k.device
        self.slots = torch.tensor([s.kv.slot for s in segments], device=dev)
        self.pos = torch.tensor([s.past for s in segments], device=dev)
        self.starts = torch.tensor([s.start for s in segments], device=dev)
        self.length = max(s.past for s in segments) + 1
        self.mask = (torch.arange(self.length, device=dev)[None, :] <= self.pos[:, None])[:, None, None, :]
        for s in segments:
            s.batched = True

    @staticmethod
    def of(segments: list[Segment]) -> "DecodeBatch | None":
        """The batch of a step's pooled decoding rows (None under two: the per-row path is as quick)."""
        rows = [s for s in segments if s.n == 1 and s.kv.pool is not None]
        pools = {id(s.kv.pool) for s in rows}
        return DecodeBatch(rows) if len(rows) >= 2 and len(pools) == 1 else None

    def attend(self, layer: int, query: Any, key: Any, value: Any, out: Any, scaling: float | None) -> None:
        """Write the rows' new K/V into their slots and attend each row's query to its slot, in one
        masked sdpa call for the layer (GQA: a KV head's query heads form the query length)."""
        heads, head_dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
        b = len(self.slots)
        kp, vp = self.pool.k[layer], self.pool.v[layer]  # [slots, kv_heads, tokens, head_dim]
        kp[self.slots, :, self.pos] = key[0][:, self.starts].transpose(0, 1)
        vp[self.slots, :, self.pos] = value[0][:, self.starts].transpose(0, 1)
        k, v = kp[self.slots, :, :self.length], vp[self.slots, :, :self.length]
        q = query[0][:, self.starts].transpose(0, 1).reshape(b, kv_heads, heads // kv_heads, head_dim)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling)
        out[self.starts] = o.reshape(b, heads, head_dim)


class Step(list):
    """A packed step's segments (a list, what `varlen_attention` reads), with its `DecodeBatch`."""

    def __init__(self, segments: list[Segment]):
        super().__init__(segments)
        self.decode = DecodeBatch.of(segments)


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Attention over a packed [1, N] step: write each segment's new K/V into its row, attend its
    queries to that row only. Without a step (e.g. `model.generate` on this model) it is plain sdpa."""
    segments: list[Segment] | None = kwargs.pop(STEP_KWARG, None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = query.new_empty((query.shape[2], heads, head_dim))
    decode = getattr(segments, "decode", None)
    if decode is not None:
        decode.attend(layer, query, key, value, out, scaling)
    key0, value0, query0 = key[0], value[0], query[0]  # a few tensor ops per row per layer: keep them few
    for s in segments:
        if s.batched:
            continue
        end, a, b = s.past + s.n, s.start, s.start + s.n
        k_row, v_row = s.kv.k_layers[layer], s.kv.v_layers[layer]
        k_row[:, s.past:end] = key0[:, a:b]
        v_row[:, s.past:end] = value0[:, a:b]
        k, v = k_row[None, :, :end], v_row[None, :, :end]  # 4-D: sdpa's CPU kernels (3-D falls back to math)
        if s.n == 1:  # decode: the query heads of one KV head form its "query length", no repeat needed
            q = query0[:, a].view(1, kv_heads, group, head_dim)
            out[a] = F.scaled_dot_product_attention(q, k, v, scale=scaling).view(heads, head_dim)
        else:
            o = F.scaled_dot_product_attention(query[:, :, a:b], k, v, attn_mask=s.mask, is_causal=s.mask is None,
                                               scale=scaling, enable_gqa=group > 1)
            out[a:b] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPL, varlen_attention)
# sdpa's masks for calls without a step (padded `generate`); a packed step has no padding and no
# cache, so sdpa_mask skips it (None) and `varlen_attention` builds its own per-segment masks
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


@dataclass
class _Block:
    k: Any  # [layers, kv_heads, block, head_dim]
    v: Any


@dataclass
class PrefixCache:
    """Full-block prompt KV keyed by a hash chain, LRU-evicted under `max_bytes` (0: off).

    vLLM's semantics: block i's hash covers block i-1's hash, its `block_size` tokens and the extra
    keys (here the model/adapter identity: name, path and load generation), so a hit on block i
    implies the whole prefix up to it matches; a lookup stops at the first miss; at most
    len(prompt) - 1 tokens hit (the last one is always computed, for its logits). Blocks are copies,
    so evicting one never touches a running request. `queries`/`hits` count prompt tokens."""
    max_bytes: int
    block_size: int = 16
    queries: int = 0
    hits: int = 0
    _blocks: OrderedDict = field(default_factory=OrderedDict)
    _bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def block_hashes(self, tokens: list[int], extra: tuple) -> list[bytes]:
        """Chained hashes of the full blocks of `tokens`."""
        out, parent, bs = [], b"", self.block_size
        for i in range(len(tokens) // bs):
            h = hashlib.sha256(parent + repr((tokens[i * bs:(i + 1) * bs], extra)).encode()).digest()
            out.append(h)
            parent = h
        return out

    def usable(self, hashes: list[bytes], prompt_len: int) -> list[bytes]:
        """The hashes a prompt may hit: at most prompt_len - 1 tokens."""
        return hashes[:(prompt_len - 1) // self.block_size] if self.enabled else []

    def peek(self, hashes: list[bytes], prompt_len: int) -> int:
        """How many leading blocks would hit, without counting or touching anything."""
        n = 0
        for h in self.usable(hashes, prompt_len):
            if h not in self._blocks:
                break
            n += 1
        return n

    def match(self, hashes: list[bytes], prompt_len: int) -> list[_Block]:
        """The longest cached run of blocks at the start of a prompt; counts the query."""
        self.queries += prompt_len
        found = self.usable(hashes, prompt_len)[:self.peek(hashes, prompt_len)]
        for h in reversed(found):  # the parent ends most recent: LRU evicts a chain from its tail
            self._blocks.move_to_end(h)
        self.hits += len(found) * self.block_size
        return [self._blocks[h] for h in found]

    def put(self, h: bytes, kv: RowKV, index: int) -> None:
        """Keep a copy of block `index` of `kv` under hash `h`, evicting least recently used blocks."""
        if not self.enabled:
            return
        if h in self._blocks:
            self._blocks.move_to_end(h)
            return
        a, b = index * self.block_size, (index + 1) * self.block_size
        blk = _Block(kv.k[:, :, a:b].clone(), kv.v[:, :, a:b].clone())
        size = 2 * blk.k.numel() * blk.k.element_size()
        if size > self.max_bytes:
            return
        self._blocks[h] = blk
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= 2 * old.k.numel() * old.k.element_size()

    def load(self, blocks: list[_Block], kv: RowKV) -> None:
        """Copy matched blocks into the start of a row's KV."""
        bs = self.block_size
        for i, blk in enumerate(blocks):
            kv.k[:, :, i * bs:(i + 1) * bs] = blk.k
            kv.v[:, :, i * bs:(i + 1) * bs] = blk.v
