"""The engine's KV cache: one preallocated pool [slots, depths, max_seq_len, kv_heads, head_dim].

A request holds one slot for its lifetime; (slot, depth, position) addresses one key/value row, so
tokens at different loops (depths) and requests share one pool. `written` marks every slot filled,
so debug mode can assert that attention never reads a (request, depth, position) before it is
written and that no row is written twice (each token runs each depth exactly once: state
propagation runs an exited token's remaining loops instead of skipping them, App. A).

`LayerCache` adapts the pool to one call of a Hugging Face decoder layer over a ragged batch of
rows: the layer's attention calls `update(k, v, layer_idx)` exactly as with HF's own caches, and
gets back the keys/values of every (request, depth) group the batch touches, concatenated; the
additive mask built beforehand lets each row see only its own group's positions <= its own
(and within its sliding window). So the layer's own projections, rotary, q/k norms, softcap and
attention kernel run unchanged: HF's Cache classes key by layer_idx and batch row and cannot
express one call whose rows sit at different depths of different requests.
"""
from __future__ import annotations

import torch


class ScheduleError(AssertionError):
    """Debug mode: the engine broke a KV invariant (an engine bug, never blamed on one request)."""


class KVPool:
    """Preallocated keys and values for `num_slots` requests × `num_depths` depths × `max_seq_len`."""

    def __init__(self, *, num_slots: int, num_depths: int, max_seq_len: int, debug: bool = False):
        self.num_slots, self.num_depths, self.max_seq_len = num_slots, num_depths, max_seq_len
        self.debug = debug
        self.keys: torch.Tensor | None = None    # [slots, depths, max_seq_len, kv_heads, head_dim]
        self.values: torch.Tensor | None = None  # allocated at the first write, when shapes are known
        self.written = torch.zeros(num_slots, num_depths, max_seq_len, dtype=torch.bool)
        self.free = list(range(num_slots))

    def allocate(self) -> int:
        """Return a free slot (its written marks cleared)."""
        if not self.free:
            raise RuntimeError("KV pool is full: no free request slot")
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        """Give a finished (or failed) request's slot back, its written marks cleared."""
        if not 0 <= slot < self.num_slots or slot in self.free:
            raise ValueError(f"slot {slot!r} is not allocated; allocated: "
                             f"{sorted(set(range(self.num_slots)) - set(self.free))}")
        self.written[slot] = False
        self.free.append(slot)

    def unwrite(self, *, slot: torch.Tensor, depth: torch.Tensor, position: torch.Tensor) -> None:
        """Clear the written marks of rows (slot, depth, position) [n] a failed layer call may have set."""
        self.written[slot.to(self.written.device), depth.to(self.written.device),
                     position.to(self.written.device)] = False

    def layer_cache(self, *, slot: torch.Tensor, depth: torch.Tensor, position: torch.Tensor,
                    window: torch.Tensor, dtype: torch.dtype) -> "LayerCache":
        """Return the cache view for one layer call over rows tagged (slot, depth, position) [rows]."""
        return LayerCache(self, slot, depth, position, window, dtype)

    def _ensure(self, kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        if self.keys is None:
            shape = (self.num_slots, self.num_depths, self.max_seq_len, kv_heads, head_dim)
            self.keys = like.new_zeros(shape)
            self.values = like.new_zeros(shape)
            self.written = self.written.to(like.device)


class LayerCache:
    """A duck-typed HF cache for one decoder-layer call over a ragged batch (see module docstring)."""

    def __init__(self, pool: KVPool, slot, depth, position, window, dtype):
        self.pool, self.slot, self.depth, self.position = pool, slot, depth, position
        # Groups: the distinct (slot, depth) pairs in the batch; group g reads positions [0, length_g).
        group_id = slot * pool.num_depths + depth
        groups, row_group = torch.unique(group_id, return_inverse=True)      # [G], [rows]
        length = torch.zeros(len(groups), dtype=torch.long, device=slot.device)
        length.scatter_reduce_(0, row_group, position + 1, reduce="amax")
        key_group = torch.repeat_interleave(torch.arange(len(groups), device=slot.device), length)  # [S]
        start = torch.cumsum(length, 0) - length
        self.key_pos = torch.arange(len(key_group), device=slot.device) - start[key_group]   # [S]
        self.key_slot = groups[key_group] // pool.num_depths
        self.key_depth = groups[key_group] % pool.num_depths
        # [rows, S]: own group, causal, and inside the sliding window where the row's depth has one
        q_pos, k_pos = position[:, None], self.key_pos[None, :]
        self.allowed = ((row_group[:, None] == key_group[None, :]) & (k_pos <= q_pos)
                        & ((window[:, None] == 0) | (k_pos > q_pos - window[:, None])))
        mask = torch.zeros(self.allowed.shape, dtype=dtype, device=slot.device)
        self.mask = mask.masked_fill(~self.allowed, torch.finfo(dtype).min)[None, None]  # [1, 1, rows, S]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx=None, *args, **kwargs):
        """Write the rows' new keys/values [1, kv_heads, rows, head_dim]; return their groups' [1, kv_heads, S, head_dim]."""
        pool = self.pool
        k_rows = key_states[0].transpose(0, 1)  # [rows, kv_heads, head_dim]
        v_rows = value_states[0].transpose(0, 1)
        pool._ensure(k_rows.shape[1], k_rows.shape[2], k_rows)
        at = (self.slot, self.depth, self.position)
        if pool.debug and pool.written[at].any():
            raise ScheduleError("KV slot written twice (a (request, depth, position) ran twice)")
        pool.keys[at] = k_rows
        pool.values[at] = v_rows
        pool.written[at] = True
        key_at = (self.key_slot, self.key_depth, self.key_pos)
        if pool.debug and (self.allowed & ~pool.written[key_at][None, :]).any():
            raise ScheduleError("KV slot read before written (scheduler broke a dependency)")
        keys = pool.keys[key_at].transpose(0, 1)[None]  # [1, kv_heads, S, head_dim]
        values = pool.values[key_at].transpose(0, 1)[None]
        return keys, values
