"""What a serving system could reach: each engine call's cost measured at each row count (`measure_step_costs`,
Table 16), and a system's bound, its scheduler replayed without compute (`DryRunEngine`) with every step
costed at its rows; the paper's simulator on the same costs beside it (`paper_sim`)."""
from __future__ import annotations

import statistics
import time

import pandas as pd
import torch

from rrt.serving import simulate as simulate_module
from rrt.serving.engine import Engine
from rrt.serving.kv import StepLayout
from rrt.serving.simulate import kv_bytes_per_token, simulate, weight_bytes
from rrt.spec import num_loops


@torch.no_grad()
def measure_step_costs(model, *, max_rows: int, context_len: int, max_active: int, seq_len: int,
                       repeats: int = 5, memory_cap_bytes: int | None = None) -> pd.DataFrame:
    """Time this engine's own block, KV-fill and LM-head calls at row counts up to max_rows (Table 16).

    Rows are decode rows, each its own (request, loop) group with `context_len` keys, spread over
    the loops (so every loop's LoRA is in the batch, as in a CDB step). Median of `repeats` calls.
    Columns: rows, block_s (one call of the K shared layers; for a plain model all L layers),
    fill_s (copy_hidden's KV-only call at loops >= 1), head_s, kv_bytes (the KV of max_active
    requests of seq_len tokens), fits (weights, the engine's packed copies of them, and that KV within
    memory_cap_bytes).
    """
    sizes = sorted({n for n in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256] if n <= max_rows}
                   | {max_rows})
    b = num_loops(model)
    engine = Engine(model, max_active=max(sizes), max_seq_len=context_len)
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    engine.kv._ensure(kv_heads, head_dim, torch.empty(0, dtype=model.dtype, device=model.device))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        tags = sorted((i % b, i, context_len - 1) for i in range(n))  # (loop, slot, position)
        layout = StepLayout(engine.kv, [(s, loop, p) for loop, s, p in tags], num_shared=engine.num_shared,
                            depth_window=engine.depth_window, device=model.device)
        h = torch.randn(1, n, cfg.hidden_size, generator=gen).to(model.device, model.dtype)
        block = _median_call(lambda: engine._layers(h, layout, kv_only=False), model.device, repeats)
        fill = float("nan")
        if b > 1:
            deep = sorted((1 + i % (b - 1), i, context_len - 1) for i in range(n))
            fill_layout = StepLayout(engine.kv, [(s, loop, p) for loop, s, p in deep], num_shared=engine.num_shared,
                                     depth_window=engine.depth_window, device=model.device)
            fill = _median_call(lambda: engine._layers(h, fill_layout, kv_only=True), model.device, repeats)
        head = _median_call(lambda: engine._head(h[0], list(range(n)), [b - 1] * n), model.device, repeats)
        rows.append({"rows": n, "block_s": block, "fill_s": fill, "head_s": head})
    df = pd.DataFrame(rows)
    df["kv_bytes"] = max_active * seq_len * kv_bytes_per_token(model)
    held = weight_bytes(model) + engine.packed_bytes
    df["fits"] = True if memory_cap_bytes is None else held + df["kv_bytes"] <= memory_cap_bytes
    return df


def median_costs(rounds: list[pd.DataFrame]) -> pd.DataFrame:
    """Per row count, the median over rounds of each measured cost (`measure_step_costs` tables)."""
    df = pd.concat(rounds, ignore_index=True)
    return df.groupby("rows", as_index=False, sort=True).median(numeric_only=True).astype({"fits": bool})


class DryRunEngine(Engine):
    """The engine's scheduler and routing without compute: records each step's block, fill and head rows.

    Exits come from the policy (oracle or no exit: neither reads logits); tokens are all 0, which
    changes nothing in the schedule (the bench has no stop tokens). static=True admits like
    `StaticBatchEngine`.
    """

    def __init__(self, *args, static: bool = False, **kwargs):
        super().__init__(*args, pack_weights=False, **kwargs)  # no compute: no packed weights
        self.static = static
        self.trace: list[tuple[str, int]] = []

    def _admit(self, elapsed: float = float("inf")) -> None:
        if not (self.static and self.active):
            super()._admit(elapsed)

    def _layers(self, h, layout, *, kv_only):
        self.trace.append(("fill" if kv_only else "block", len(layout.loop_list)))
        return h

    def _head(self, outputs, rows, loops):
        self.trace.append(("head", len(rows)))
        return outputs.new_zeros(len(rows), 1)


def bound_seconds(trace: list[tuple[str, int]], costs: pd.DataFrame) -> float:
    """Σ over a dry run's calls of the measured cost at that row count (linear between measured counts)."""
    column = {"block": "block_s", "fill": "fill_s", "head": "head_s"}
    return sum(interpolate(costs, column[kind], n) for kind, n in trace)


def interpolate(costs: pd.DataFrame, column: str, n: int) -> float:
    """Cost at n rows: linear between measured row counts, extrapolated from the last two beyond them."""
    return simulate_module.interpolate(costs["rows"].tolist(), costs[column].tolist(), n)


def positions(exit_loops: dict, requests) -> dict:
    """Per-request exit loops of generated tokens → per-position trajectories (prompt positions: last loop)."""
    return {r.request_id: [0] * (len(r.prompt) - 1) + list(exit_loops[r.request_id]) for r in requests}


def hf_bound(samples, max_active, costs) -> float:
    """HF static batches: one prefill of the batch's prompts, then its longest output's decode steps."""
    total = 0.0
    for i in range(0, len(samples), max_active):
        batch = samples[i:i + max_active]
        m, steps = len(batch), max(len(s.continuation) for s in batch)
        total += interpolate(costs, "block_s", m * len(batch[0].prompt)) + interpolate(costs, "head_s", m)
        total += (steps - 1) * (interpolate(costs, "block_s", m) + interpolate(costs, "head_s", m))
    return total


def paper_sim(trajectories, vanilla, recursive, b, max_active) -> pd.DataFrame:
    """The paper's simulator (decode only) with T(n) = this engine's block (+ head) cost at n rows."""
    def table(costs, loops):
        return pd.DataFrame({"batch_size": costs["rows"],
                             "block_s_per_token": costs["block_s"] * loops + costs["head_s"]})
    return simulate(trajectories, vanilla_times=table(vanilla, 1), recursive_times=table(recursive, b),
                    num_blocks=b, max_active=max_active)


def _median_call(fn, device, repeats) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = _now(device)
        fn()
        times.append(_now(device) - start)
    return statistics.median(times)


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
