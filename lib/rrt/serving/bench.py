"""Serving benchmark: CDB with exits vs vanilla static / continuous batching and recursive without exits.

    python -m rrt.serving.bench --model smollm2-135m --num-blocks 2 --out /tmp/bench/b2

Every system serves the same requests (equal-length prompts, all arriving at step 0, per-request
output lengths drawn once around `new_tokens`, generated exactly: EOS ignored) through the same engine code, so ratios to `vanilla_static` measure scheduling, not
implementation (see `baselines`). Oracle exit trajectories (§3.8) are recorded from the recursive
model on its own no-exit outputs; oracle exits never change the emitted tokens. Each system runs
once as warm-up, then `repeats` times; wall-clock medians (device synchronised by the engine's
`.tolist()` reads each step). The paper's simulator (`simulate`) is run on the same trajectories
with block times measured on this device, giving real / simulated.
Memory: weight bytes (unique tensors) and KV bytes per token (every depth); peak memory is CUDA's
max allocated on GPU, and on CPU weights + the engine's KV pool (process RSS cannot be split by system).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import rrt
from rrt.exits import OracleExit, record_oracle_trajectories
from rrt.recursive import num_loops
from rrt.relax import lora_modules
from rrt.rundir import write_config, write_versions
from rrt.serving.baselines import StaticBatchEngine, hf_static_generate, profile
from rrt.serving.engine import Engine, Request
from rrt.serving.simulate import kv_bytes_per_token, measure_block_times, simulate, weight_bytes

TEXT = ("Recursive transformers share one block of layers and loop it; continuous depth-wise "
        "batching lets tokens at different loops share a single call of that block. ")

# The paper's models by scale name, built with random weights from their published shapes
# (rrt.models.SHAPES): timing needs shapes, not values.
PAPER_CONFIGS = {"paper-gemma-2b": "google/gemma-2b",
                 "paper-tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-50K-105b",
                 "paper-pythia-1b": "EleutherAI/pythia-1b"}
RATIO_TO = "vanilla_static"


def run_benchmark(model, tokenizer=None, *, num_blocks: int = 2, lora_rank: int = 0, num_requests: int = 8,
                  prompt_len: int = 16, new_tokens: int = 24, length_spread: float = 0.5,
                  token_budget: int = 64, max_active: int = 4, repeats: int = 1, recursive=None,
                  hf_generate: bool = True, lora_ablation: bool = True, seed: int = 0,
                  trajectories: list[list[int]] | None = None) -> pd.DataFrame:
    """Return one row per system: tokens/s, ms/token, latency p50/p95, batch fill, exits, memory, ratios.

    `recursive`: an already converted (e.g. uptrained, `rrt.load`) model; else `model` is converted
    (Stepwise, `num_blocks`, `lora_rank`). Output lengths are drawn once, uniform in
    new_tokens·[1 − length_spread, 1 + length_spread], and shared by every system (with equal lengths
    and no arrival process, static and continuous batching would schedule identically).
    `max_active` is every system's live-request limit (KV slots); `token_budget` the engine's rows
    per step. With `lora_rank > 0` and `lora_ablation`, the oracle-exit system is also run with LoRA
    off (rank 0, same trajectories). Systems are timed round-robin (one warm-up each, then `repeats`
    rounds; median) so load drift on a shared machine hits all alike. Profile columns: see
    `baselines.StepProfile`. `trajectories` (exit loop per generated token, per request) replaces
    the recorded oracle ones, e.g. to replay another model's exits; the ones used are in
    `df.attrs["trajectories"]`.
    """
    rec = recursive if recursive is not None else rrt.convert(
        model, rrt.RecursiveSpec(num_blocks=num_blocks, lora_rank=lora_rank))
    prompts = make_prompts(tokenizer, model.config.vocab_size, num_requests, prompt_len, seed=seed)
    lengths = output_lengths(num_requests, new_tokens, length_spread, seed=seed)
    requests = lambda: [Request(list(p), n) for p, n in zip(prompts, lengths)]  # noqa: E731
    seq = prompt_len + max(lengths)  # KV pool rows per slot (the default, max_position_embeddings, is GBs)
    engine = lambda cls, m, policy=None: cls(m, token_budget=token_budget, max_active=max_active,  # noqa: E731
                                             exit_policy=policy, max_seq_len=seq)
    if trajectories is None:
        trajectories = oracle_trajectories(engine(Engine, rec), rec, requests())
    elif [len(t) for t in trajectories] != lengths:
        raise ValueError(f"trajectories must have one exit loop per generated token: lengths {lengths}")
    oracle = OracleExit({i: t for i, t in enumerate(full_trajectories(rec, prompts, trajectories))})
    systems = [("vanilla_static", model, lambda: engine(StaticBatchEngine, model)),
               ("vanilla_continuous", model, lambda: engine(Engine, model)),
               ("recursive_no_exit", rec, lambda: engine(Engine, rec)),
               ("recursive_oracle_exit", rec, lambda: engine(Engine, rec, oracle))]
    if lora_ablation and lora_modules(rec):
        bare = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_loops(rec), lora_rank=0))
        systems.append(("recursive_oracle_exit_no_lora", bare, lambda: engine(Engine, bare, oracle)))
    runners = [(name, m, lambda make=make: _time_engine(make, requests)) for name, m, make in systems]
    if hf_generate:
        runners.insert(1, ("vanilla_hf_generate_static", model,
                           lambda: _time_hf(model, requests, max_active, seq)))
    runs = {name: [] for name, _, _ in runners}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for name, m, run in runners:
            _reset_peak(m)
            result = run()
            if round_:
                runs[name].append(result)
    rows = []
    for name, m, _ in runners:
        result = sorted(runs[name], key=lambda r: r["seconds"])[len(runs[name]) // 2]
        rows.append({"system": name, **_common(m, result)})
    df = pd.DataFrame(rows)
    base = df.set_index("system").loc[RATIO_TO]
    df["tokens_per_s_ratio"] = df["tokens_per_s"] / base["tokens_per_s"]
    df["ms_per_token_ratio"] = df["ms_per_token"] / base["ms_per_token"]
    df["latency_p50_ratio"] = df["latency_p50_s"] / base["latency_p50_s"]
    df["latency_p95_ratio"] = df["latency_p95_s"] / base["latency_p95_s"]
    df.attrs["trajectories"] = trajectories
    return df


def run_simulation(model, recursive, trajectories, *, max_active: int, prompt_len: int, new_tokens: int,
                   memory_cap_bytes: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (simulated systems, block-time table) for the benchmark's workload on this device (App. N).

    Block times are swept over powers of two up to max_active × B (propagation rows can reach it).
    The simulated table has one row per system for `propagate` False (paper) and True (our engine).
    """
    b = num_loops(recursive)
    sizes = [2 ** i for i in range(0, (max_active * b).bit_length() + 1)]
    times = {name: measure_block_times(m, batch_sizes=sizes, prefix_len=prompt_len, decode_len=new_tokens,
                                       memory_cap_bytes=memory_cap_bytes)
             for name, m in [("vanilla", model), ("recursive", recursive)]}
    sims = [simulate(trajectories, vanilla_times=times["vanilla"], recursive_times=times["recursive"],
                     num_blocks=b, max_active=max_active, propagate=p).assign(propagate=p)
            for p in (False, True)]
    blocks = pd.concat([t.assign(model=name) for name, t in times.items()], ignore_index=True)
    return pd.concat(sims, ignore_index=True), blocks


def real_vs_simulated(bench: pd.DataFrame, sim: pd.DataFrame) -> pd.DataFrame:
    """Return measured and simulated ratios to vanilla static side by side, and real / simulated."""
    real = bench.set_index("system")["tokens_per_s_ratio"]
    out = sim.pivot(index="system", columns="propagate", values="sim_ratio")
    out.columns = [f"sim_ratio_propagate_{c}" for c in out.columns]
    out.insert(0, "real_ratio", real.reindex(out.index))
    out["real_over_sim_paper"] = out["real_ratio"] / out["sim_ratio_propagate_False"]
    out["real_over_sim_propagate"] = out["real_ratio"] / out["sim_ratio_propagate_True"]
    return out.reset_index()


# ---------------------------------------------------------------------- workload


def make_prompts(tokenizer, vocab_size: int, num_requests: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """Equal-length prompts (no padding anywhere): windows of TEXT, or random ids without a tokenizer."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(vocab_size, (num_requests, prompt_len), generator=gen).tolist()
    ids = tokenizer(TEXT * (2 + num_requests * 7 // 20 + prompt_len // 20)).input_ids
    if len(ids) < (num_requests - 1) * 7 + prompt_len:
        raise ValueError(f"TEXT too short for {num_requests} prompts of {prompt_len} tokens")
    return [ids[i * 7:i * 7 + prompt_len] for i in range(num_requests)]


def output_lengths(num_requests: int, new_tokens: int, spread: float, seed: int = 0) -> list[int]:
    """Per-request output lengths, uniform integers in new_tokens·[1 − spread, 1 + spread], at least 1."""
    if not 0 <= spread < 1:
        raise ValueError(f"length_spread must be in [0, 1), got {spread!r}")
    lo, hi = max(1, round(new_tokens * (1 - spread))), max(1, round(new_tokens * (1 + spread)))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (num_requests,), generator=gen).tolist()


def oracle_trajectories(engine: Engine, rec, requests: list[Request]) -> list[list[int]]:
    """Return per request the oracle exit loop of each generated token, on the model's own no-exit output."""
    outputs = engine.run(requests)
    full = record_oracle_trajectories(rec, [r.prompt + outputs[i] for i, r in enumerate(requests)])
    return [full[i][len(r.prompt) - 1:len(r.prompt) - 1 + r.max_new_tokens].tolist()
            for i, r in enumerate(requests)]


def full_trajectories(rec, prompts, trajectories):
    """Pad generated-token trajectories to positions (prompt positions never decide an exit)."""
    last = num_loops(rec) - 1
    return [[last] * (len(p) - 1) + t for p, t in zip(prompts, trajectories)]


# ---------------------------------------------------------------------- timing


def _time_engine(make, requests) -> dict:
    """Serve the requests once on a fresh engine; return seconds, latencies, stats and profile."""
    e = make()
    prof = profile(e)
    start = time.perf_counter()
    e.run(requests())
    seconds = time.perf_counter() - start
    s = e.summary()
    a, b = prof.fixed_and_per_row_cost()
    exits = s["exits_per_loop"]
    kv_pool = 0 if e.kv.keys is None else 2 * e.kv.keys.numel() * e.kv.keys.element_size()
    return {"seconds": seconds, "tokens": s["tokens"], "latency": list(e.latency().values()), "kv_pool": kv_pool,
            "steps": s["steps"], "mean_batch_fill": s["mean_batch_fill"],
            "mean_rows_per_step": s["items"] / max(s["steps"], 1),
            "propagation_rows": s["propagation_items"],
            "exits_per_loop": " ".join(map(str, exits)),
            "mean_loops_per_token": sum((b_ + 1) * n for b_, n in enumerate(exits)) / max(sum(exits), 1),
            "schedule_s": prof.schedule_s, "mask_s": prof.mask_s, "block_s": prof.block_s,
            "attn_s": prof.attn_s, "route_s": prof.route_s,
            "attn_score_waste": prof.attn_rows_keys / max(prof.attn_ideal, 1),
            "block_fixed_ms_per_call": 1e3 * a, "block_ms_per_row": 1e3 * b}


def _time_hf(model, requests, batch_size, seq) -> dict:
    start = time.perf_counter()
    latency = hf_static_generate(model, requests(), batch_size=batch_size)
    seconds = time.perf_counter() - start
    tokens = sum(r.max_new_tokens for r in requests())
    return {"seconds": seconds, "tokens": tokens, "latency": list(latency.values()),
            "kv_pool": batch_size * seq * kv_bytes_per_token(model)}


def _common(model, result) -> dict:
    """Derived metrics for one system's median run; memory: see the module docstring."""
    lat = torch.tensor(result.pop("latency"), dtype=torch.float64)
    kv_pool = result.pop("kv_pool")
    seconds, tokens = result["seconds"], result["tokens"]
    peak = (torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda"
            else weight_bytes(model) + kv_pool)
    return {**result, "tokens_per_s": tokens / seconds, "ms_per_token": 1e3 * seconds / tokens,
            "latency_p50_s": lat.quantile(0.5).item(), "latency_p95_s": lat.quantile(0.95).item(),
            "weight_bytes": weight_bytes(model), "kv_bytes_per_token": kv_bytes_per_token(model),
            "peak_memory_bytes": peak}


def _reset_peak(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)


# ---------------------------------------------------------------------- models and CLI


def load_bench_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer or None): a `PAPER_CONFIGS` shape with random weights, or `rrt.load_model`."""
    if name not in PAPER_CONFIGS:
        return rrt.load_model(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    from rrt.models import model_config
    config = model_config(PAPER_CONFIGS[name])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), None


def main(argv=None) -> pd.DataFrame:
    """Run benchmark + simulator; write bench.csv, simulate.csv, block_times.csv, report.md, config.json."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tok = load_bench_model(args.model, device=args.device, dtype=dtype)
    if args.checkpoint:
        rec = rrt.load(args.checkpoint, dtype=dtype, device=args.device)
        if num_loops(rec) != args.num_blocks or args.lora_rank:
            raise ValueError(f"--checkpoint has num_blocks={num_loops(rec)} and its own LoRA: pass "
                             f"--num-blocks {num_loops(rec)} and no --lora-rank")
    else:
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=args.num_blocks, lora_rank=args.lora_rank))
    knobs = dict(num_blocks=args.num_blocks, lora_rank=args.lora_rank, num_requests=args.num_requests,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, length_spread=args.length_spread,
                 seed=args.seed, token_budget=args.token_budget, max_active=args.max_active,
                 repeats=args.repeats)
    bench = run_benchmark(model, tok, recursive=rec, hf_generate=not args.no_hf_generate, **knobs)
    out = Path(args.out)
    write_config(out, {**vars(args), "device_name": _device_name(model)})
    write_versions(out)
    bench.to_csv(out / "bench.csv", index=False)
    tables = [f"`{' '.join(argv if argv is not None else sys.argv[1:])}` on {_device_name(model)}",
              bench_table(bench)]
    if not args.no_simulate:
        sim, blocks = run_simulation(model, rec, bench.attrs["trajectories"], max_active=args.max_active,
                                     prompt_len=args.prompt_len, new_tokens=args.new_tokens)
        sim.to_csv(out / "simulate.csv", index=False)
        blocks.to_csv(out / "block_times.csv", index=False)
        tables += [real_vs_simulated(bench, sim).to_markdown(index=False, floatfmt=".3g"),
                   blocks.to_markdown(index=False, floatfmt=".4g")]
    report = "\n\n".join(tables) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    return bench


def bench_table(bench: pd.DataFrame) -> str:
    """Return the markdown ratio table (the headline columns)."""
    cols = ["system", "tokens_per_s", "tokens_per_s_ratio", "ms_per_token", "latency_p50_s",
            "latency_p95_s", "mean_batch_fill", "mean_rows_per_step", "exits_per_loop", "weight_bytes", "kv_bytes_per_token",
            "peak_memory_bytes", "schedule_s", "mask_s", "block_s", "attn_s", "route_s", "attn_score_waste",
            "block_fixed_ms_per_call", "block_ms_per_row"]
    return bench[[c for c in cols if c in bench]].to_markdown(index=False, floatfmt=".3g")


def _device_name(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"cpu, {torch.get_num_threads()} threads"


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help=f"rrt.load_model source or one of {', '.join(PAPER_CONFIGS)} (random weights)")
    p.add_argument("--checkpoint", default=None, help="an rrt.save directory: the recursive model to serve")
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=0, help="per-loop LoRA rank of the conversion")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--length-spread", type=float, default=0.5,
                   help="output lengths uniform in new_tokens·[1-spread, 1+spread]")
    p.add_argument("--seed", type=int, default=0, help="prompts (without a tokenizer) and output lengths")
    p.add_argument("--max-active", type=int, default=4, help="live requests (KV slots) for every system")
    p.add_argument("--token-budget", type=int, default=64, help="engine rows per step")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up; median reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-hf-generate", action="store_true", help="skip the HF generate reference row")
    p.add_argument("--no-simulate", action="store_true", help="skip the paper-method simulator")
    p.add_argument("--out", default="outputs/serving_bench")
    return p


if __name__ == "__main__":
    main()
