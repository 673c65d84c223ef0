"""The paper's hypothetical-throughput simulator (§3.8, App. N, Tables 16–17), kept small and explicit.

Block times T(n) — one decode step of n sequences through *all* L depths (the paper times the
Transformer blocks on dummy inputs, embedding and LM head excluded) — come from the caller:
`bench.measure_step_costs` times this engine's own block call at each row count.

`simulate`: replay a queue of requests with oracle exit trajectories, all arrived at t=0
(the paper's queue, no arrival process), at most `max_active` requests live. Only decode steps are
counted (prefill is excluded, as in the paper's per-token times). Rules:

- vanilla static: batches of `max_active` requests in queue order; each batch runs as many steps
  as its longest output, every step costs T_vanilla(batch rows) (finished rows stay as padding).
- vanilla continuous (sequence-wise): each step, every live request emits one token; the step
  costs T_vanilla(live); a finished request's slot is refilled from the queue at the next step.
- recursive, CDB: one step = one call of the shared block (K layers) and costs
  T_recursive(rows) / B. Each live request has one row: its current token at loop b. If b is the
  token's exit loop (B−1 without exits), the token is emitted and the request's next token is at
  loop 0 next step; otherwise it moves to loop b+1. With `propagate=True` (our engine's state
  propagation, App. A; the paper leaves it out), an exited token also keeps one extra row per step
  for its remaining loops b+1…B−1, so rows = live requests + propagating tokens.

T(n) between measured batch sizes is interpolated linearly (extrapolated from the last two beyond).
Throughput = emitted tokens / Σ step costs.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from rrt.families import decoder_layers


def simulate(trajectories: Sequence[Sequence[int]], *, vanilla_times: pd.DataFrame,
             recursive_times: pd.DataFrame, num_blocks: int, max_active: int,
             propagate: bool = False) -> pd.DataFrame:
    """Return one row per system (simulated seconds, tokens/s, ratio to vanilla static; App. N).

    `trajectories`: per request, the exit loop (0-based) of each generated token; its length is the
    request's output length. `*_times`: tables (batch_size, block_s_per_token), e.g.
    `bounds.paper_sim`'s from `bounds.measure_step_costs`.
    """
    if max_active < 1 or num_blocks < 1:
        raise ValueError(f"max_active and num_blocks must be >= 1, got {max_active}, {num_blocks}")
    lengths = [len(t) for t in trajectories]
    t_vanilla = lambda n: _interpolate(vanilla_times, n)  # noqa: E731
    t_loop = lambda n: _interpolate(recursive_times, n) / num_blocks  # noqa: E731
    no_exit = [[num_blocks - 1] * n for n in lengths]
    rows = [("vanilla_static", *_static(lengths, max_active, t_vanilla)),
            ("vanilla_continuous", *_continuous(lengths, max_active, t_vanilla)),
            ("recursive_no_exit", *_cdb(no_exit, max_active, t_loop, num_blocks, propagate)),
            ("recursive_oracle_exit", *_cdb(trajectories, max_active, t_loop, num_blocks, propagate))]
    df = pd.DataFrame(rows, columns=["system", "sim_seconds", "sim_steps", "sim_mean_rows"])
    df["sim_tokens_per_s"] = sum(lengths) / df["sim_seconds"]
    df["sim_ratio"] = df["sim_tokens_per_s"] / df["sim_tokens_per_s"].iloc[0]
    return df


def weight_bytes(model) -> int:
    """Bytes of the model's unique parameters (tied tensors once; LoRA included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token needs over every depth: L × 2 (K, V) × kv_heads × head_dim × dtype bytes."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return len(decoder_layers(model)) * 2 * kv_heads * head_dim * model.dtype.itemsize


# ---------------------------------------------------------------------- simulation rules


def _static(lengths, max_active, step_cost):
    seconds, steps, rows = 0.0, 0, 0
    for i in range(0, len(lengths), max_active):
        batch = lengths[i:i + max_active]
        seconds += max(batch) * step_cost(len(batch))
        steps += max(batch)
        rows += max(batch) * len(batch)
    return seconds, steps, rows / max(steps, 1)


def _continuous(lengths, max_active, step_cost):
    queue, live = list(lengths), []
    seconds, steps, rows = 0.0, 0, 0
    while queue or live:
        while queue and len(live) < max_active:
            live.append(queue.pop(0))
        seconds += step_cost(len(live))
        steps, rows = steps + 1, rows + len(live)
        live = [left - 1 for left in live if left > 1]
    return seconds, steps, rows / max(steps, 1)


def _cdb(trajectories, max_active, loop_cost, num_blocks, propagate):
    """Simulate CDB; a live request is [exit loops left to emit, current loop, propagating loops]."""
    queue, live = [list(t) for t in trajectories], []
    seconds, steps, rows_total = 0.0, 0, 0
    while queue or live:
        while queue and len(live) < max_active:
            live.append([queue.pop(0), 0, []])
        rows = len(live) + sum(len(r[2]) for r in live)
        seconds += loop_cost(rows)
        steps, rows_total = steps + 1, rows_total + rows
        for r in live:
            exits, loop, propagating = r
            r[2] = [b + 1 for b in propagating if b + 1 < num_blocks]  # each ran loop b this step
            if loop >= exits[0]:
                if propagate and loop + 1 < num_blocks:
                    r[2].append(loop + 1)
                exits.pop(0)
                r[1] = 0
            else:
                r[1] = loop + 1
        live = [r for r in live if r[0]]  # as in the engine: the last token's propagation is dropped
    return seconds, steps, rows_total / max(steps, 1)


def _interpolate(times: pd.DataFrame, n: int) -> float:
    return interpolate(times["batch_size"].tolist(), times["block_s_per_token"].tolist(), n)


def interpolate(x: Sequence[float], y: Sequence[float], n: float) -> float:
    """y at n: linear between the measured points x (ascending), extrapolated from the last two beyond them."""
    if len(x) == 1:
        return y[0] * n / x[0]
    i = max(1, min(len(x) - 1, next((j for j, v in enumerate(x) if v >= n), len(x) - 1)))
    return y[i - 1] + (y[i] - y[i - 1]) * (n - x[i - 1]) / (x[i] - x[i - 1])
