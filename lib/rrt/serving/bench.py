"""Serving benchmark (§3.8, Fig. 8, App. N): measured throughput of every system, and its own bound.

    python -m rrt bench --checkpoint outputs/runs/<early-exit run>/checkpoints/step-… --out DIR

Workload (App. N): held-out corpus documents cut into a prompt and the text that follows it
(`workload.corpus_samples`), all queued at once (offline throughput), plus an open-loop Poisson
run for latency. Exit trajectories are recorded teacher-forced on that text and replayed by
position (`workload.replay_trajectories`), so timing is separated from what the model happens to
generate (as the CDB anchor does); a second oracle system uses the model's own greedy output.

Systems, all serving the same requests, every system of a model at that model's batch (`max_active`, or
the largest within `memory_cap_bytes`):
- `hf_generate_static`: HF `generate` in static batches (finished rows ride along as padding);
- `vanilla_static`, `vanilla_continuous`: the engine on the unconverted model, admitting a new
  batch only when the last one finished / as soon as a slot frees (Orca/vLLM sequence-wise);
- `recursive_no_exit`: continuous depth-wise batching (CDB) without exits;
- `cdb_oracle` (replayed text trajectories) per KV policy, `cdb_oracle_own` (trajectories of the
  model's own greedy output), `cdb_oracle_no_lora` (the same model with its LoRA removed, same
  trajectories) and any confidence policies given (their own exits).

The bound of a system: the engine's own scheduler replayed without compute (`DryRunEngine`, same
exits, same steps) with each step costed by this engine's block, KV-fill and LM-head calls
measured at that row count (`measure_step_costs`); real / bound is the engine's efficiency. The
paper's simulator (`simulate`, decode-only, one row per live request) on the same trajectories
with the same measured costs is reported beside it.

Δ_Seq is given twice. `delta_seq` (ours) counts the whole run, prompts included. `delta_seq_decode` is the
paper's (its simulator counts decode steps only): each system's output tokens after the first over its
seconds minus its prefill seconds, where the prefill seconds are the same engine serving the same prompts for
one token (timed in every round, beside the full run). Each has its row bound, `delta_seq_rows` and
`delta_seq_decode_rows`. `delta_seq_rows` is the compute a system
saves: its tokens per layer row (one row through one layer call of the block; copy_hidden's
KV-only fill rows not counted) over continuous batching's, which is what Δ_Seq would be if a
layer call cost the same per row. Every prompt token runs every loop, so it stays under B / E:
about B·(P + D) / (B·P + E·D) for P prompt and D output tokens under a copy policy, and about 1
under `propagate` (exited tokens run their remaining loops wherever a later token reads them).
`delta_seq_decode_rows` is the same ratio over decode rows only: a prompt token runs all
L layers in every system (B loops of L / B), so the decode layer rows are the layer rows less L per prompt
token.
Each system runs once as warm-up, then `repeats` rounds, round-robin so load drift hits all
alike; the median seconds (the mean of the middle two for an even count) with min and max.

`memory_cap_bytes` (App. N: 16 GB): each model serves at the largest batch whose weights, the engine's packed
copies and the KV of that many requests of the longest sequence fit, at most `max_active`
(`batch_within_cap`; the paper: "batch up to OOM", Tables 16 and 18), the same for every system of that model.

On CUDA every timed phase is bracketed by `torch.cuda.synchronize` (kernels
run asynchronously: an unsynchronised clock times the launches), and each system's peak memory is its own:
the previous system's engine is freed (its KV pool and packed weights) and the peak statistics reset just
before each of its rounds; `peak_memory_bytes` is its weights plus the most its round allocated above what
was resident (the other systems' models), the largest over its rounds. On the CPU it is the arithmetic
of weights, packed copies and KV pool.
"""
from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from rrt.data import load_packed
from rrt.devices import cpu_description, native_bf16
from rrt.exits import POLICY_CLASSES, OracleExit, calibrate_threshold, record_oracle_trajectories
from rrt.models import load_model, model_config
from rrt.recipes import PAPER_MODELS
from rrt.relax import lora_modules, truncate_lora
from rrt.serving.baselines import StaticBatchEngine, hf_static_generate
from rrt.serving.bounds import (DryRunEngine, bound_seconds, hf_bound, measure_step_costs, median_costs, paper_sim,
                                positions)
from rrt.serving.engine import KV_POLICIES, Engine
from rrt.serving.simulate import kv_bytes_per_token, weight_bytes
from rrt.serving.workload import (Sample, corpus_samples, latency_metrics, mean_loops, poisson_arrivals,
                                  replay_trajectories, requests_from)
from rrt.spec import check_choice, num_loops

# column: (baseline system, the throughput it divides); delta_seq_bound is what Δ_Seq would be if every
# system reached its bound, delta_seq_rows what it would be if a layer call cost the same per row
# (tokens per layer row: the compute a system saves, whatever its calls cost)
BASELINES = {"ratio_vs_hf_generate": ("hf_generate_static", "tokens_per_s"),
             "delta_v": ("vanilla_static", "tokens_per_s"),
             "delta_seq": ("vanilla_continuous", "tokens_per_s"),
             "delta_seq_bound": ("vanilla_continuous", "bound_tokens_per_s"),
             "delta_seq_rows": ("vanilla_continuous", "tokens_per_layer_row"),
             "delta_seq_decode": ("vanilla_continuous", "decode_tokens_per_s"),
             "delta_seq_decode_rows": ("vanilla_continuous", "decode_tokens_per_layer_row")}


@dataclass(frozen=True)
class Workload:
    """App. N's offline queue: held-out documents, prompt from the text, output length from the text."""
    corpus: str = "wikitext2"
    split: str = "test"
    source: str = "embedded"
    num_requests: int = 16
    prefix_len: int = 32
    decode_len: int = 96
    seed: int = 0

    def samples(self, tokenizer, vocab_size: int) -> list[Sample]:
        """The workload's samples; without a tokenizer (dummy-weight paper shapes) random ids of the same lengths."""
        if tokenizer is not None:
            return corpus_samples(tokenizer, self.corpus, self.split, source=self.source, seed=self.seed,
                                  num_requests=self.num_requests, prefix_len=self.prefix_len,
                                  decode_len=self.decode_len)
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(vocab_size, (self.num_requests, self.prefix_len + self.decode_len), generator=gen)
        return [Sample(row[:self.prefix_len].tolist(), row[self.prefix_len:].tolist(), "random") for row in ids]


@dataclass
class BenchResult:
    """What `run_benchmark` measured: one row per system, the step costs, the paper simulation, latency."""
    systems: pd.DataFrame            # one row per system (see `_row`)
    step_costs: pd.DataFrame         # per model and row count: block, KV-fill and LM-head seconds (Table 16)
    paper_sim: pd.DataFrame          # the paper's simulator on the same trajectories and costs
    latency: pd.DataFrame            # Poisson-arrival run: TTFT, TPOT, latency per system (empty if no rate)
    trajectories: list[list[int]]    # replayed exit loop per generated token, per request
    settings: dict = field(default_factory=dict)

    @property
    def mean_loops(self) -> float:
        return mean_loops(self.trajectories)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"bench": self.systems, "step_costs": self.step_costs, "paper_sim": self.paper_sim,
                "latency": self.latency}


@dataclass(frozen=True)
class _System:
    name: str
    model: object
    make: object                     # () -> Engine, or None for HF generate
    max_active: int                  # its model's batch (`batch_within_cap`)
    exit_policy: str = "none"
    kv_policy: str = "-"             # what exited tokens leave in deeper depths: "-" where nothing exits


def run_benchmark(model, tokenizer, recursive, *, workload: Workload = Workload(), max_active: int = 8,
                  token_budget: int = 64, repeats: int = 3, kv_policies=("propagate", "copy_kv"),
                  exit_policies: dict | None = None, hf_generate: bool = True, lora_ablation: bool = True,
                  own_oracle: bool = True, arrival_rate: float | None = None, memory_cap_bytes: int | None = None,
                  progress: bool = False) -> BenchResult:
    """Measure every system on the workload (see the module docstring); `recursive` is the served model.

    exit_policies: {name: policy} of extra (e.g. calibrated confidence) exit policies, each run under
    every KV policy. arrival_rate (requests/s): also serve the queue with Poisson arrivals through
    vanilla continuous batching and CDB + oracle (the first KV policy) and report latency.
    memory_cap_bytes: each model's batch is the largest within it, at most max_active (`batch_within_cap`); the
    step-cost sweep marks the row counts whose KV would exceed it.
    """
    for policy in kv_policies:  # before any compute (the engines are built after the trajectories)
        check_choice("kv_policy", policy, KV_POLICIES)
    samples = workload.samples(tokenizer, model.config.vocab_size)
    seq = max(len(s.prompt) + len(s.continuation) for s in samples)
    batch = {id(m): batch_within_cap(m, memory_cap_bytes, seq_len=seq, upper=max_active) for m in (model, recursive)}
    trajectories = replay_trajectories(recursive, samples)
    b = num_loops(recursive)
    text_oracle = OracleExit({i: [b - 1] * (len(s.prompt) - 1) + t for i, (s, t) in enumerate(zip(samples, trajectories))})
    requests = lambda: requests_from(samples)  # noqa: E731
    prefill = lambda: requests_from([Sample(x.prompt, x.continuation[:1], x.source) for x in samples])  # noqa: E731

    def system(name, cls, m, policy=None, kv="propagate", exit_policy="none"):
        def make():
            return cls(m, token_budget=token_budget, max_active=batch[id(m)], exit_policy=policy, max_seq_len=seq,
                       kv_policy=kv, profile=True)
        return _System(name, m, make, batch[id(m)], exit_policy, kv if exit_policy != "none" else "-")

    systems = [system("vanilla_static", StaticBatchEngine, model), system("vanilla_continuous", Engine, model),
               system("recursive_no_exit", Engine, recursive)]
    if hf_generate:
        systems.insert(0, _System("hf_generate_static", model, None, batch[id(model)]))
    for kv in kv_policies:
        systems.append(system("cdb_oracle", Engine, recursive, text_oracle, kv, "oracle"))
    if own_oracle:
        own = _own_oracle(recursive, samples, seq)
        for kv in kv_policies:
            systems.append(system("cdb_oracle_own", Engine, recursive, own, kv, "oracle (own output)"))
    if lora_ablation and lora_modules(recursive):
        bare = copy.deepcopy(recursive)
        truncate_lora(bare, 0)
        batch[id(bare)] = batch[id(recursive)]
        for kv in kv_policies:
            systems.append(system("cdb_oracle_no_lora", Engine, bare, text_oracle, kv, "oracle"))
    for name, policy in (exit_policies or {}).items():
        for kv in kv_policies:
            systems.append(system(f"cdb_{name}", Engine, recursive, policy, kv, name))

    models = {id(s.model): s.model for s in systems}
    measured: dict[int, list[pd.DataFrame]] = {k: [] for k in models}
    runs: dict[int, list[dict]] = {i: [] for i in range(len(systems))}
    rounds = range(repeats + 1)  # round 0 is the warm-up
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="benchmark rounds", leave=False)
    for round_ in rounds:
        if round_:  # step costs measured in every timed round: drift of the machine hits both sides of real / bound
            for k, m in models.items():
                measured[k].append(measure_step_costs(m, max_rows=token_budget, context_len=workload.prefix_len
                                                      + workload.decode_len // 2, max_active=batch[k], seq_len=seq,
                                                      memory_cap_bytes=memory_cap_bytes))
        for i, s in enumerate(systems):
            result = {}
            for part, reqs in (("prefill", prefill), ("", requests)):  # the prompts alone (one token each), then all
                resident = _release_and_reset(s.model)
                timed = _time_hf(s.model, reqs, s.max_active) if s.make is None else _time_engine(s.make, reqs)
                if part:
                    result["prefill_seconds"] = timed["seconds"]
                else:
                    result.update(timed, peak=_peak(s.model, resident))
            if round_:
                runs[i].append(result)
    costs = {k: median_costs(v) for k, v in measured.items()}
    rows = []
    for i, s in enumerate(systems):
        run = _median_run(runs[i])
        if s.make is None:
            bound = hf_bound(samples, s.max_active, costs[id(s.model)])
        else:
            recorded = None if s.exit_policy in ("none", "oracle", "oracle (own output)") else run["exit_loops"]
            bound = _dry_bound(s, requests, costs[id(s.model)], recorded)
        rows.append(_row(s, run, runs[i], bound, prompt_tokens=sum(len(x.prompt) for x in samples),
                         num_requests=len(samples)))
    systems_df = pd.DataFrame(rows)
    for column, (base, rate) in BASELINES.items():
        if base in set(systems_df["system"]):
            ref = systems_df.loc[systems_df["system"] == base, rate].iloc[0]
            systems_df[column] = systems_df[rate] / ref
    step_costs = pd.concat([costs[k].assign(model=_model_name(m)) for k, m in models.items()], ignore_index=True)
    paper = paper_sim(trajectories, costs[id(model)], costs[id(recursive)], b, batch[id(recursive)])
    latency = pd.DataFrame()
    if arrival_rate:
        latency = _poisson(systems, samples, arrival_rate, workload.seed)
    settings = {"workload": asdict(workload), "max_active": max_active, "token_budget": token_budget,
                "batch": {_model_name(m): batch[id(m)] for m in (model, recursive)},
                "repeats": repeats, "kv_policies": list(kv_policies), "arrival_rate": arrival_rate,
                "memory_cap_bytes": memory_cap_bytes, "mean_loops": mean_loops(trajectories),
                "num_blocks": b, "device": _device_name(model), "dtype": str(model.dtype).removeprefix("torch.")}
    return BenchResult(systems_df, step_costs, paper, latency, trajectories, settings)


# ---------------------------------------------------------------------- step costs and the bound


def batch_within_cap(model, cap_bytes: int | None, *, seq_len: int, upper: int) -> int:
    """The largest batch (live requests) of `model` whose weights, the engine's packed copies of them and the KV
    of that many `seq_len`-token requests fit `cap_bytes`, at most `upper`; `upper` without a cap. Raises, naming
    the sizes, when not even one request fits."""
    if not cap_bytes:
        return upper
    held = weight_bytes(model) + Engine(model, max_active=1, max_seq_len=seq_len).packed_bytes
    per_request = seq_len * kv_bytes_per_token(model)
    fits = (cap_bytes - held) // per_request
    if fits < 1:
        raise ValueError(f"memory cap {cap_bytes / 2**30:.2f} GiB holds no request of {_model_name(model)}: "
                         f"weights and packed copies take {held / 2**30:.2f} GiB, one request's KV "
                         f"{per_request / 2**20:.1f} MiB ({seq_len} tokens)")
    return int(min(upper, fits))


def _median_run(runs: list[dict]) -> dict:
    """The round at the median seconds: with an even count, the mean of the middle two rounds' seconds (and
    prefill seconds) on the faster one's record."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    mid = ordered[(len(ordered) - 1) // 2]
    if len(ordered) % 2:
        return mid
    pair = ordered[len(ordered) // 2 - 1:len(ordered) // 2 + 1]
    return {**mid, "seconds": sum(r["seconds"] for r in pair) / 2,
            "prefill_seconds": sum(r["prefill_seconds"] for r in pair) / 2}


def _dry_bound(s: _System, requests, costs, recorded) -> float:
    engine = s.make()  # read for its settings only; freed on return
    dry = DryRunEngine(engine.model, token_budget=engine.token_budget, max_active=engine.max_active,
                       max_seq_len=engine.max_seq_len, kv_policy=engine.kv_policy,
                       static=isinstance(engine, StaticBatchEngine),
                       exit_policy=OracleExit(positions(recorded, requests())) if recorded else engine.exit_policy)
    dry.run(requests())
    return bound_seconds(dry.trace, costs)


# ---------------------------------------------------------------------- timing


def _time_engine(make, requests) -> dict:
    """Serve the requests once on a fresh engine; return seconds, latencies, its stats and profile, and the sizes
    `_row` reads (not the engine: its KV pool and packed weights must not outlive the round)."""
    e = make()
    reqs = requests()
    start = _clock(e.model.device)
    e.run(reqs)
    seconds = _clock(e.model.device) - start
    kv_pool = 0 if e.kv.keys is None else 2 * e.kv.keys.numel() * e.kv.keys.element_size()
    return {"seconds": seconds, "stats": e.stats, "profile": e.profile, "exit_loops": dict(e.exit_loops),
            "latency": list(e.latency().values()), "kv_pool": kv_pool, "num_shared": e.num_shared,
            "packed": e.packed_bytes}


def _time_hf(model, requests, max_active) -> dict:
    reqs = requests()
    start = _clock(model.device)
    latency = hf_static_generate(model, reqs, max_active=max_active)
    return {"seconds": _clock(model.device) - start, "tokens": sum(r.max_new_tokens for r in reqs),
            "latency": list(latency.values()), "seq": max(len(r.prompt) + r.max_new_tokens for r in reqs)}


def _clock(device) -> float:
    """perf_counter() once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _row(s: _System, run: dict, runs: list[dict], bound: float, *, prompt_tokens: int, num_requests: int) -> dict:
    """One system's row: throughput (median, min, max over repeats), decode-only throughput, bound, profile, exits,
    memory."""
    lat = torch.tensor(run["latency"], dtype=torch.float64)
    engine = "stats" in run
    tokens = run["stats"]["tokens"] if engine else run["tokens"]
    seconds = [r["seconds"] for r in runs]
    decode_s = run["seconds"] - run["prefill_seconds"]
    row = {"system": s.name, "model": _model_name(s.model), "exit_policy": s.exit_policy, "kv_policy": s.kv_policy,
           "max_active": s.max_active, "tokens": tokens, "seconds": run["seconds"], "repeats": len(seconds),
           "prefill_seconds": run["prefill_seconds"],
           "decode_tokens_per_s": (tokens - num_requests) / decode_s if decode_s > 0 else float("nan"),
           "tokens_per_s": tokens / run["seconds"], "tokens_per_s_min": tokens / max(seconds),
           "tokens_per_s_max": tokens / min(seconds), "ms_per_token": 1e3 * run["seconds"] / tokens,
           "bound_s": bound, "bound_tokens_per_s": tokens / bound, "real_over_bound": bound / run["seconds"],
           "latency_p50_s": lat.quantile(0.5).item(), "latency_p99_s": lat.quantile(0.99).item()}
    if engine:
        s_ = run["stats"]
        p = run["profile"]
        exits = s_["exits_per_loop"]
        kv_pool = run["kv_pool"]
        layer_rows = s_["items"] * run["num_shared"]  # rows × layer calls of the block
        packed = run["packed"]
        row.update({"steps": s_["steps"], "mean_rows_per_step": s_["items"] / max(s_["steps"], 1),
                    "exits_per_loop": " ".join(map(str, exits)),
                    "mean_loops_per_token": sum((b + 1) * n for b, n in enumerate(exits)) / max(sum(exits), 1),
                    "propagation_rows": s_["propagation_items"], "filled_rows": s_["filled_rows"],
                    "layer_rows": layer_rows, "tokens_per_layer_row": tokens / max(layer_rows, 1),
                    # a prompt token runs every layer once in every system (B loops of L / B layers)
                    "decode_tokens_per_layer_row": (tokens - num_requests) / max(
                        layer_rows - prompt_tokens * run["num_shared"] * num_loops(s.model), 1),
                    "schedule_s": p.schedule_s, "block_s": p.block_s, "attn_s": p.attn_s, "route_s": p.route_s,
                    "head_s": p.head_s, "score_waste": p.score_waste})
    else:
        kv_pool, packed = s.max_active * run["seq"] * kv_bytes_per_token(s.model), 0
    peak = (max(r["peak"] for r in runs) if s.model.device.type == "cuda"
            else weight_bytes(s.model) + packed + kv_pool)
    row.update({"weight_bytes": weight_bytes(s.model), "packed_bytes": packed,
                "kv_bytes_per_token": kv_bytes_per_token(s.model), "peak_memory_bytes": peak})
    return row


def _poisson(systems, samples, rate, seed) -> pd.DataFrame:
    """Serve the queue with Poisson arrivals through vanilla continuous batching and the first CDB + oracle."""
    arrivals = poisson_arrivals(len(samples), rate, seed=seed)
    picked = [next(s for s in systems if s.name == name) for name in ("vanilla_continuous", "cdb_oracle")
              if any(s.name == name for s in systems)]
    rows = []
    for s in picked:
        e = s.make()
        e.run(requests_from(samples, arrivals=arrivals))
        n = {rid: len(out) for rid, out in e.results.items()}
        rows.append({"system": s.name, "kv_policy": s.kv_policy, "arrival_rate": rate,
                     **latency_metrics(e.arrived_at, e.first_token_at, e.finished_at, n),
                     "tokens_per_s": e.stats["tokens"] / e.stats["seconds"]})
    return pd.DataFrame(rows)


def _own_oracle(rec, samples, seq) -> OracleExit:
    """Oracle trajectories on the model's own greedy (no-exit) output: its exits emit the same tokens."""
    engine = Engine(rec, max_seq_len=seq, max_active=8)
    reqs = requests_from(samples)
    out = engine.run(reqs)
    full = record_oracle_trajectories(rec, [r.prompt + out[r.request_id] for r in reqs])
    return OracleExit({r.request_id: full[i].tolist() for i, r in enumerate(reqs)})


def _release_and_reset(model) -> int:
    """Free what the previous system left (its engine's KV pool and packed weights: collected, and on CUDA handed
    back by the caching allocator), reset the peak statistics; return the bytes still allocated (0 on the CPU)."""
    gc.collect()
    if model.device.type != "cuda":
        return 0
    torch.cuda.synchronize(model.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(model.device)
    return torch.cuda.memory_allocated(model.device)


def _peak(model, resident: int) -> int:
    """On CUDA, the system alone: its weights plus the most its round allocated above what was resident; else 0
    (`_row` uses the CPU's arithmetic)."""
    if model.device.type != "cuda":
        return 0
    return weight_bytes(model) + torch.cuda.max_memory_allocated(model.device) - resident


def config_name(model) -> str:
    """"B=2 r=64": a recursive model's loops and largest per-loop LoRA rank."""
    ranks = {m.lora_A.shape[0] for m in lora_modules(model).values()}
    return f"B={num_loops(model)} r={max(ranks, default=0)}"


def _model_name(model) -> str:
    return "vanilla" if num_loops(model) == 1 else f"recursive {config_name(model)}"


def _device_name(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"cpu ({cpu_description()}), {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------- models and CLI


DTYPES = ("auto", "float32", "bfloat16", "float16")


def serving_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The dtype to serve in: `dtype` by name, or for "auto" bf16 where matmuls run natively in bf16 (a
    GPU, as the paper measured; a CPU with AVX512-BF16/AMX: small-batch matmuls there are bound by
    reading the weights, which depth-wise batching amortises, not by fp32 arithmetic) and fp32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if native_bf16(device) else torch.float32


def load_bench_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer or None): a `paper-*` scale's shape (recipes.PAPER_MODELS) with random weights,
    or `rrt.load_model`'s."""
    if name not in PAPER_MODELS:
        return load_model(name, dtype=dtype, device=device)
    return dummy_model(name, device=device, dtype=dtype), None


def dummy_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return a model of `name`'s shape with random weights, built on `device` (timing and memory only, nothing
    downloaded): a `paper-*` scale or any `rrt.models.model_config` source (an embedded or tiny name)."""
    config = model_config(PAPER_MODELS[name].model if name in PAPER_MODELS else name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


SUMMARY_COLUMNS = ["system", "model", "exit_policy", "kv_policy", "max_active", "tokens_per_s", "tokens_per_s_min",
                   "tokens_per_s_max", "ratio_vs_hf_generate", "delta_v", "delta_seq", "delta_seq_bound",
                   "delta_seq_rows", "delta_seq_decode", "delta_seq_decode_rows", "real_over_bound",
                   "mean_loops_per_token", "steps", "mean_rows_per_step",
                   "score_waste", "latency_p50_s", "latency_p99_s"]


def summary_table(result: BenchResult) -> str:
    """The headline columns as markdown."""
    df = result.systems
    return df[[c for c in SUMMARY_COLUMNS if c in df]].to_markdown(index=False, floatfmt=".3g")


def heldout_text(tokenizer, corpus: str, *, vocab_size: int, source: str = "embedded", seqs: int = 16,
                 seq_len: int = 128, seed: int = 0) -> list[list[int]]:
    """Held-out sequences ("name/split" packed `seqs` × `seq_len`) to calibrate thresholds and score perplexity
    on; random ids without a tokenizer (dummy-weight shapes)."""
    if tokenizer is None:
        return torch.randint(vocab_size, (seqs, seq_len), generator=torch.Generator().manual_seed(seed)).tolist()
    name, _, split = corpus.partition("/")
    packed = load_packed(name, split or "test", tokenizer=tokenizer, seq_len=seq_len, source=source, max_seqs=seqs)
    return [list(map(int, row["input_ids"])) for row in packed]


def calibrated_policies(rec, text, names, *, target_agreement: float) -> tuple[dict, list[dict]]:
    """Return ({name: policy}, calibration rows): each scored policy's threshold calibrated on `text`
    (teacher-forced) so its exits agree with the last loop on `target_agreement` of the tokens."""
    policies, rows = {}, []
    for policy in names:
        cal = calibrate_threshold(rec, text, policy=policy, target_agreement=target_agreement)
        policies[policy] = POLICY_CLASSES[policy](cal.threshold)
        rows.append({"exit_policy": policy, "threshold": cal.threshold, "agreement": cal.agreement,
                     "mean_exit_loop": cal.mean_exit_loop, "target_agreement": target_agreement})
    return policies, rows
