"""The engine's KV cache and its ragged attention: one pool [slots, depths, max_seq_len, kv_heads, head_dim].

A request holds one slot for its lifetime; (slot, depth, position) addresses one key/value row, so
tokens at different loops (depths) and requests share one pool. `written` marks every row filled,
so debug mode can assert that attention never reads a (request, depth, position) before it is
written and that no row is written twice.

One engine step runs the K shared layers over a ragged batch of rows, each tagged (slot, loop,
position). `StepLayout` is built once per step from the rows (sorted by loop, slot, position, so
each (request, loop) *group* is a contiguous run of rows at consecutive positions) and serves all K
layer calls: layer j of a row at loop b reads and writes depth b·K + j.

`ragged_attention` is registered with transformers' `AttentionInterface` as "rrt_ragged" and set on
the shared layers' configs for the duration of a step, so each HF decoder layer runs unchanged
(its own projections, rotary, q/k norms, scaling) and only the attention product is ours. Why not
the layer's own sdpa/eager call: it takes one [batch, seq] tensor, and a step's rows are one
"sequence" whose keys live in different (request, depth) groups; masking the concatenation of
every group's keys computes rows × Σ keys scores (4–6× the needed ones at cpu scale). Instead:
- one-row groups (decode tokens, the common case) are bucketed by key length so each bucket's
  padding is under 1.5×, and each bucket is one batched SDPA call over [groups, kv_heads, keys];
- multi-row groups (prefill chunks) get one causal SDPA call each, unless their rows' key lengths
  are within the same 1.5× (propagation catch-up runs): those rows join the buckets.
Transformers' own paged attention (`paged|eager`, continuous batching) keys its cache by layer and
sequence; it cannot express rows of one call sitting at different depths of a looped model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_RATIO = 1.5   # a decode bucket holds groups whose key length is >= its longest / PAD_RATIO


class ScheduleError(AssertionError):
    """Debug mode: the engine broke a KV invariant (an engine bug, never blamed on one request)."""


class KVPool:
    """Preallocated keys and values for `max_active` requests × `num_depths` depths × `max_seq_len`."""

    def __init__(self, *, max_active: int, num_depths: int, max_seq_len: int, debug: bool = False):
        self.max_active, self.num_depths, self.max_seq_len = max_active, num_depths, max_seq_len
        self.debug = debug
        self.keys: torch.Tensor | None = None    # [slots, depths, max_seq_len, kv_heads, head_dim]
        self.values: torch.Tensor | None = None  # allocated at the first write, when shapes are known
        self.written = torch.zeros(max_active, num_depths, max_seq_len, dtype=torch.bool)
        self.free = list(range(max_active))

    def allocate(self) -> int:
        """Return a free slot (its written marks cleared)."""
        if not self.free:
            raise RuntimeError("KV pool is full: no free request slot")
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        """Give a finished (or failed) request's slot back, its written marks cleared."""
        if not 0 <= slot < self.max_active or slot in self.free:
            raise ValueError(f"slot {slot!r} is not allocated; allocated: "
                             f"{sorted(set(range(self.max_active)) - set(self.free))}")
        self.written[slot] = False
        self.free.append(slot)

    def unwrite(self, *, slot: torch.Tensor, depth: torch.Tensor, position: torch.Tensor) -> None:
        """Clear the written marks of rows (slot, depth, position) [n] a failed layer call may have set."""
        self.written[slot.to(self.written.device), depth.to(self.written.device),
                     position.to(self.written.device)] = False

    def write(self, slot, depth, position, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows' keys/values [n, kv_heads, head_dim] at (slot, depth, position) [n]."""
        self._ensure(keys.shape[1], keys.shape[2], keys)
        at = (slot, depth, position)
        if self.debug and self.written[slot, depth, position].any():
            raise ScheduleError("KV slot written twice (a (request, depth, position) ran twice)")
        self.keys[at] = keys
        self.values[at] = values
        self.written[slot, depth, position] = True

    def copy_depths(self, copies: list[tuple[int, int, int, int]]) -> None:
        """Copy keys/values of (slot, position) from a source depth into a target depth, for every
        (slot, position, source, target) given, in one gather and one scatter (copy_kv policy)."""
        if self.keys is None or not copies:
            return
        slot, position, src, dst = torch.tensor(copies, device=self.keys.device).unbind(1)
        if self.debug and self.written[slot.to(self.written.device), dst.to(self.written.device),
                                       position.to(self.written.device)].any():
            raise ScheduleError("KV slot written twice (copy into a depth that already ran)")
        self.keys[slot, dst, position] = self.keys[slot, src, position]
        self.values[slot, dst, position] = self.values[slot, src, position]
        self.written[slot.to(self.written.device), dst.to(self.written.device), position.to(self.written.device)] = True

    def gather(self, slot: torch.Tensor, depth: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of each (slot, depth) [n]: two [n, kv_heads, length, head_dim].

        One index_select over (slot, depth) of the pool sliced to `length` positions: each group's
        rows are one contiguous range, and nothing past `length` is copied.
        """
        flat = slot * self.num_depths + depth
        shape = (self.max_active * self.num_depths, self.max_seq_len, *self.keys.shape[3:])
        keys = self.keys.view(shape)[:, :length].index_select(0, flat).transpose(1, 2)
        values = self.values.view(shape)[:, :length].index_select(0, flat).transpose(1, 2)
        return keys, values

    def _ensure(self, kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        if self.keys is None:
            shape = (self.max_active, self.num_depths, self.max_seq_len, kv_heads, head_dim)
            self.keys = like.new_zeros(shape)
            self.values = like.new_zeros(shape)
            self.written = self.written.to(like.device)


@dataclass
class _Bucket:
    """One-row groups of similar key length: one batched SDPA call."""
    rows: torch.Tensor       # [n] row index in the step
    slot: torch.Tensor       # [n]
    loop: torch.Tensor       # [n]
    query_pos: torch.Tensor  # [n] = key length − 1
    length: int              # keys read (the longest group's)
    valid: torch.Tensor      # [n, length] key position < the group's own length


@dataclass
class _Chunk:
    """A multi-row group (prefill chunk): rows [lo, hi) at positions [start, start + hi − lo)."""
    lo: int
    hi: int
    slot: int
    loop: int
    start: int


class StepLayout:
    """Everything the K layer calls of one step share: row tags, loop segments, attention groups.

    `rows` are (slot, loop, position) triples sorted by (loop, slot, position). Built once per step;
    `cache(j)` gives layer j's cache view.
    """

    def __init__(self, pool: KVPool, rows: list[tuple[int, int, int]], *, num_shared: int,
                 depth_window: list[int], device):
        self.pool, self.num_shared, self.device = pool, num_shared, device
        self.depth_window = depth_window
        self.has_window = any(depth_window)
        self.depth_window_t = torch.tensor(depth_window, device=device) if self.has_window else None
        slots, loops, positions = zip(*rows)
        self.slot = torch.tensor(slots, device=device)
        self.loop = torch.tensor(loops, device=device)
        self.position = torch.tensor(positions, device=device)
        self.loop_list = list(loops)
        # loop segments (rows are sorted by loop): the per-row LoRA runs one matmul pair per segment
        self.segments, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or loops[i] != loops[start]:
                self.segments.append((loops[start], start, i))
                start = i
        # groups: runs of equal (slot, loop)
        groups, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][:2] != rows[start][:2]:
                groups.append((start, i))
                start = i
        # A group whose rows' key lengths (start+1 … start+m) lie within PAD_RATIO of each other is split
        # into one-row groups (its causal mask is then each row's own length): propagation catch-up runs
        # join the decode buckets. Longer ones (prefill from the start) stay causal chunks.
        split = [(lo, hi) for lo, hi in groups if hi - lo == 1 or positions[hi - 1] + 1 <= PAD_RATIO * (positions[lo] + 1)]
        singles = sorted(((positions[r] + 1, r) for lo, hi in split for r in range(lo, hi)), reverse=True)
        whole = set(split)
        self.chunks = [_Chunk(lo, hi, slots[lo], loops[lo], positions[lo]) for lo, hi in groups if (lo, hi) not in whole]
        self.buckets, i = [], 0
        while i < len(singles):
            length = singles[i][0]
            j = i
            while j < len(singles) and singles[j][0] * PAD_RATIO >= length:
                j += 1
            rows_ = [r for _, r in singles[i:j]]
            idx = torch.tensor(rows_, device=device)
            key_len = torch.tensor([n for n, _ in singles[i:j]], device=device)
            valid = torch.arange(length, device=device)[None, :] < key_len[:, None]
            self.buckets.append(_Bucket(idx, self.slot[idx], self.loop[idx], key_len - 1, length, valid))
            i = j
        # attention work: scores computed vs needed (a ragged kernel's), per layer call
        self.scores_computed = (sum(len(b.rows) * b.length for b in self.buckets)
                                + sum((c.hi - c.lo) * (c.start + c.hi - c.lo) for c in self.chunks))
        self.scores_needed = (sum(n for n, _ in singles)
                              + sum(sum(c.start + k + 1 for k in range(c.hi - c.lo)) for c in self.chunks))

    def cache(self, j: int) -> "LayerCache":
        return LayerCache(self, j)


class LayerCache:
    """A duck-typed HF cache for shared layer j's call over one step's rows (see module docstring)."""

    def __init__(self, layout: StepLayout, j: int):
        self.layout, self.j = layout, j
        self.depth = layout.loop * layout.num_shared + j  # [rows]
        self.kv_only = False   # copy_hidden fills: write keys/values, attend nothing
        self.profile = None    # the engine's StepProfile, if profiling (attn_s)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx=None, *args, **kwargs):
        """Write the rows' new keys/values [1, kv_heads, rows, head_dim]; return them (attention reads the pool)."""
        lay = self.layout
        lay.pool.write(lay.slot, self.depth, lay.position, key_states[0].transpose(0, 1),
                       value_states[0].transpose(0, 1))
        return key_states, value_states

    def window(self, loops: torch.Tensor | int) -> torch.Tensor | int:
        """The sliding window (0: none) of the depth this layer has at the given loop(s)."""
        lay = self.layout
        if isinstance(loops, int):
            return lay.depth_window[loops * lay.num_shared + self.j]
        return lay.depth_window_t[loops * lay.num_shared + self.j]


def ragged_attention(module, query, key, value, attention_mask, *, rrt_cache: LayerCache | None = None,
                     scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                     **kwargs):
    """The attention product for one shared-layer call over a step's rows (registered as "rrt_ragged").

    query [1, heads, rows, head_dim]; keys/values are read from the pool through `rrt_cache` (the
    layer's own `key`/`value` arguments are only the rows' new ones, already written). Returns
    ([1, rows, heads, head_dim], None) as HF attention functions do.
    """
    if rrt_cache is None:
        raise RuntimeError("rrt_ragged attention is only valid inside an rrt serving Engine step")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention {name} is not supported by the ragged engine")
    if rrt_cache.kv_only:
        return query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3]), None
    start = time.perf_counter() if rrt_cache.profile is not None else None
    lay, pool = rrt_cache.layout, rrt_cache.layout.pool
    q = query[0]                                  # [heads, rows, head_dim]
    heads, rows, head_dim = q.shape
    kv_heads = pool.keys.shape[3]
    group = heads // kv_heads
    out = q.new_empty(rows, heads, head_dim)
    for b in lay.buckets:
        n = len(b.rows)
        depth = b.loop * lay.num_shared + rrt_cache.j
        keys, values = pool.gather(b.slot, depth, b.length)         # [n, kv_heads, length, head_dim]
        mask = b.valid
        if lay.has_window:
            window = rrt_cache.window(b.loop)                       # [n]
            k_pos = torch.arange(b.length, device=mask.device)[None, :]
            mask = mask & ((window[:, None] == 0) | (k_pos > b.query_pos[:, None] - window[:, None]))
        if pool.debug:
            _check_written(pool, b.slot, depth, mask)
        # GQA packed into the query-length axis: head h reads kv head h // group
        qb = q[:, b.rows].transpose(0, 1).reshape(n, kv_heads, group, head_dim)
        o = _attend(qb, keys, values, mask[:, None, None, :], scaling, softcap)
        out[b.rows] = o.reshape(n, heads, head_dim)
    for c in lay.chunks:
        length = c.start + c.hi - c.lo
        depth = c.loop * lay.num_shared + rrt_cache.j
        keys = pool.keys[c.slot, depth, :length].transpose(0, 1)[None]  # [1, kv_heads, length, head_dim]
        values = pool.values[c.slot, depth, :length].transpose(0, 1)[None]
        q_pos = torch.arange(c.start, length, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        mask = k_pos <= q_pos
        window = rrt_cache.window(c.loop)
        if window:
            mask = mask & (k_pos > q_pos - window)
        if pool.debug:
            _check_written(pool, torch.tensor([c.slot]), torch.tensor([depth]), mask.any(0)[None])
        if group > 1:
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        o = _attend(q[None, :, c.lo:c.hi], keys, values, mask[None, None], scaling, softcap)
        out[c.lo:c.hi] = o[0].transpose(0, 1)
    if start is not None:
        rrt_cache.profile.attn_s += time.perf_counter() - start
    return out[None], None


def _attend(q, k, v, mask, scaling, softcap):
    """softmax(q kᵀ · scaling, masked) v; SDPA unless a logit softcap needs the explicit product (Gemma 2)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.float().softmax(-1).to(q.dtype) @ v


def _check_written(pool: KVPool, slot, depth, mask) -> None:
    written = pool.written[slot.to(pool.written.device), depth.to(pool.written.device)]  # [n, max_seq]
    if (mask & ~written[:, :mask.shape[1]].to(mask.device)).any():
        raise ScheduleError("KV slot read before written (scheduler broke a dependency)")


def rotary_tables(rotary, h, position, layer_types=None) -> dict:
    """Return {layer type: (cos, sin) [1, rows, head_dim]} for the rows' positions; one table (key None) unless
    the rotary embedding takes a layer type (Gemma 3 has one per type), then one per type in `layer_types`."""
    if layer_types is None:
        return {None: rotary(h, position[None])}
    return {t: rotary(h, position[None], t) for t in layer_types}


def per_row_rotary(tables: dict, depth, depth_type) -> tuple:
    """Return (cos, sin) for rows at depths `depth` [rows]: each row the table of its depth's layer type."""
    if None in tables:
        return tables[None]
    types = [depth_type[d] for d in depth.tolist()]
    cos, sin = tables[types[0]]
    for t in set(types) - {types[0]}:
        rows = torch.tensor([x == t for x in types], device=depth.device)[None, :, None]
        cos = torch.where(rows, tables[t][0], cos)
        sin = torch.where(rows, tables[t][1], sin)
    return cos, sin
