"""The systems the CDB engine is compared with (issue "Continuous depth-wise batching", point 4).

All of them serve the same `Request`s (prompts, arrival steps, exact output lengths):

- vanilla, continuous sequence-wise batching (Orca/vLLM iteration-level scheduling): the plain
  `Engine` on an unconverted model — one loop, a request joins as soon as a KV slot frees.
- vanilla, static batching: `StaticBatchEngine`, the same engine admitting a new batch only when
  the whole previous batch has finished (finished rows leave the batch: idle slots, no padding
  compute, so on a compute-bound device it flatters static batching). We take this, not HF `generate`, as the static baseline
  every ratio divides by: both then pay the same per-step Python, mask and kernel costs, so a
  ratio measures the *scheduling policy*, not our engine's overhead against HF's fused path. HF
  `generate` in fixed batches (`hf_static_generate`) is timed too, as a row that shows that overhead.
- recursive without exits: `Engine(rec)` with `NoExit` (CDB still pipelines tokens across loops).

`profile(engine)` wraps one engine's phases with wall-clock timers (see `StepProfile`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rrt.serving.engine import Engine, Request


class StaticBatchEngine(Engine):
    """The engine with static batching: admit up to `max_active` arrived requests only when none is live."""

    def _admit(self) -> None:
        if not self.active:
            super()._admit()


def hf_static_generate(model, requests: list[Request], *, batch_size: int) -> dict:
    """Greedy HF `generate` in fixed batches of equal-length prompts; return {request_id: seconds to finish}.

    EOS is ignored; a batch decodes its longest output, shorter requests ride along as padding rows
    (static batching's cost) and count only their own max_new_tokens.
    """
    start, latency = time.perf_counter(), {}
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        if len({len(r.prompt) for r in batch}) > 1:
            raise ValueError("hf_static_generate needs equal prompt lengths within a batch (no padding)")
        ids = torch.tensor([r.prompt for r in batch], device=model.device)
        new = max(r.max_new_tokens for r in batch)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                       eos_token_id=None, max_new_tokens=new, min_new_tokens=new)
        for r in batch:
            latency[r.request_id] = time.perf_counter() - start
    return latency


@dataclass
class StepProfile:
    """Wall-clock per engine phase, plus the attention work the ragged mask implies.

    schedule_s: admission + `_schedule` (Python). mask_s: building each layer call's ragged mask
    and key gather indices (`KVPool.layer_cache`). block_s: the K shared layers, mask_s excluded
    (projections, LoRA, attention, KV scatter/gather); attn_s: the part of block_s inside the
    layers' attention modules (q/k/v/o projections, rotary, KV scatter/gather, SDPA). route_s: LM head on deciding rows, exit
    policy, bookkeeping. attn_rows_keys: Σ over layer calls of rows × S (the [rows, S] score
    matrix SDPA computes); attn_ideal: Σ of allowed (row, key) pairs — what a ragged kernel
    (FlashDecoding/paged attention) would compute. step_rows / step_block_s: per step, for a fit.
    """
    schedule_s: float = 0.0
    mask_s: float = 0.0
    block_s: float = 0.0
    route_s: float = 0.0
    attn_s: float = 0.0
    attn_rows_keys: int = 0
    attn_ideal: int = 0
    step_rows: list = field(default_factory=list)
    step_block_s: list = field(default_factory=list)

    def fixed_and_per_row_cost(self) -> tuple[float, float]:
        """Least-squares fit block_s ≈ a + b·rows over steps: (a per call, b per row), in seconds."""
        if len(set(self.step_rows)) < 2:
            return float("nan"), float("nan")
        x = torch.tensor(self.step_rows, dtype=torch.float64)
        y = torch.tensor(self.step_block_s, dtype=torch.float64)
        design = torch.stack([torch.ones_like(x), x], 1)
        a, b = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
        return a, b


def profile(engine: Engine) -> StepProfile:
    """Wrap `engine`'s phases (instance attributes only; the class is untouched); return the live profile."""
    prof = StepProfile()
    schedule, run_block, route, layer_cache = engine._schedule, engine._run_block, engine._route, engine.kv.layer_cache
    admit = engine._admit

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(prof, name, getattr(prof, name) + time.perf_counter() - start)
        return wrapper

    def cache_wrapper(**kwargs):
        start = time.perf_counter()
        cache = layer_cache(**kwargs)
        prof.mask_s += time.perf_counter() - start
        prof.attn_rows_keys += cache.allowed.numel()
        prof.attn_ideal += int(cache.allowed.sum())
        return cache

    attention = [getattr(layer, "self_attn", None) or layer.attention  # GPT-NeoX: .attention
                 for layer in engine.layers[:engine.num_shared]]
    attn_start = [0.0]

    def attn_pre(*_):
        attn_start[0] = time.perf_counter()

    def attn_post(*_):
        prof.attn_s += time.perf_counter() - attn_start[0]

    def block_wrapper(items):
        hooks = [h for m in attention for h in (m.register_forward_pre_hook(attn_pre),
                                                 m.register_forward_hook(attn_post))]
        mask_before, start = prof.mask_s, time.perf_counter()
        try:
            out = run_block(items)
        finally:
            for h in hooks:
                h.remove()
        seconds = time.perf_counter() - start - (prof.mask_s - mask_before)
        prof.block_s += seconds
        prof.step_rows.append(len(items))
        prof.step_block_s.append(seconds)
        return out

    engine._admit = timed(admit, "schedule_s")
    engine._schedule = timed(schedule, "schedule_s")
    engine._route = timed(route, "route_s")
    engine._run_block = block_wrapper
    engine.kv.layer_cache = cache_wrapper
    return prof
