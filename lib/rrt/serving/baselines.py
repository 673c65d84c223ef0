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

Per-phase timing is the engine's own hook (`Engine(profile=True)`, `engine.StepProfile`).
"""
from __future__ import annotations

import time

import torch

from rrt.serving.engine import Engine, Request


class StaticBatchEngine(Engine):
    """The engine with static batching: admit up to `max_active` arrived requests only when none is live."""

    def _admit(self, elapsed: float = float("inf")) -> None:
        if not self.active:
            super()._admit(elapsed)


def hf_static_generate(model, requests: list[Request], *, max_active: int) -> dict:
    """Greedy HF `generate` in fixed batches of equal-length prompts; return {request_id: seconds to finish}.

    EOS is ignored; a batch decodes its longest output, shorter requests ride along as padding rows
    (static batching's cost) and count only their own max_new_tokens.
    """
    start, latency = time.perf_counter(), {}
    for i in range(0, len(requests), max_active):
        batch = requests[i:i + max_active]
        if len({len(r.prompt) for r in batch}) > 1:
            raise ValueError("hf_static_generate needs equal prompt lengths within a batch (no padding)")
        ids = torch.tensor([r.prompt for r in batch], device=model.device)
        new = max(r.max_new_tokens for r in batch)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                       eos_token_id=None, max_new_tokens=new, min_new_tokens=new)
        for r in batch:
            latency[r.request_id] = time.perf_counter() - start
    return latency
