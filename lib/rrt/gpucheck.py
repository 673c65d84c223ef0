"""`make gpu-check`: on one GPU, offline, in minutes, whether a paper-scale run fits and how fast it trains and serves.

(a) Training: a Gemma-2B-shaped recursive model (B=2, random bf16 weights built from `recipes.PAPER_MODELS`' shape,
nothing downloaded) trains `TRAIN_STEPS` optimiser steps of 04_early_exit's recipe at SCALE=paper-gemma-2b (its
aggressive + self-distillation row, co-trained from conversion) with a KD teacher (the same random model), at the
plan's per-GPU micro-batch, gradient checkpointing, loss chunking and teacher dtype, on random tokens. Reported: peak
memory (`torch.cuda.max_memory_allocated`) against `rrt.runs.memory.estimate_memory`, tokens/s, and MFU (FLOPs of
`rrt.runs.cost.train_flops` over the device's dense bf16 peak, `PEAK_BF16_FLOPS`).
(b) Serving: `rrt.serving.bench.run_benchmark` on the SmolLM2-135M and Gemma-2B shapes (dummy weights), per B × r.

`dry_run=True` runs the same code on the CPU with tiny models and a tiny batch (under a minute): what the tests run.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from rrt.devices import resolve_device
from rrt.notebook import load_params
from rrt.recursive import convert
from rrt.rundir import new_run_dir, write_config, write_csv, write_versions
from rrt.runs.cost import train_flops
from rrt.runs.memory import estimate_memory
from rrt.serving.bench import Workload, dummy_model, run_benchmark, serving_dtype
from rrt.spec import RecursiveSpec
from rrt.study import OUTPUTS
from rrt.train.loop import train

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name (vendor datasheets, without sparsity):
# H200 is H100's compute with more and faster memory.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TRAIN_STEPS = 3  # the first is warm-up (kernel selection, allocator growth): tokens/s and MFU are read off the others


@dataclasses.dataclass(frozen=True)
class CheckSize:
    """What one check runs: the trained shape, the served shapes and the serving workload."""
    train_model: str | None          # None: the plan's own model (paper-gemma-2b); else a tiny name (dry run)
    seq_len: int | None              # None: the plan's (App. G: 2048)
    batch_size: int | None           # None: the plan's per-GPU micro-batch
    serve_models: tuple[str, ...]    # bench.dummy_model names
    num_blocks: tuple[int, ...]
    lora_ranks: tuple[int, ...]
    workload: Workload
    max_active: int
    token_budget: int
    repeats: int


GPU = CheckSize(None, None, None, ("smollm2-135m", "paper-gemma-2b"), (2, 3), (0, 64),
                Workload(num_requests=8, prefix_len=32, decode_len=32), max_active=8, token_budget=64, repeats=2)
# the dry run serves one shape and one (B, r): r > 0 runs the LoRA-removed system too, so every code path is taken
DRY_RUN = CheckSize("tiny-gemma", 16, 2, ("tiny-gemma",), (2,), (4,),
                    Workload(num_requests=2, prefix_len=4, decode_len=3), max_active=2, token_budget=8, repeats=1)


@dataclasses.dataclass
class GpuCheckResult:
    out: Path                        # the directory written
    train: pd.DataFrame              # one row: peak memory, its estimate, tokens/s, MFU
    systems: pd.DataFrame            # bench.csv: run_benchmark's rows per served shape × B × r
    step_costs: pd.DataFrame


def run_gpu_check(*, out: str | Path | None = None, dry_run: bool = False) -> GpuCheckResult:
    """Run the check; write train.csv, bench.csv, step_costs.csv, config.json, versions.json into `out` (default
    outputs/gpu-check/<device>-<time>).

    Without CUDA (and not `dry_run`) it stops before any compute with a RuntimeError saying what to check."""
    device = torch.device("cpu") if dry_run else resolve_device("cuda")
    size = DRY_RUN if dry_run else GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu dry run"
    out = Path(out) if out else new_run_dir(OUTPUTS / "gpu-check", f"{_slug(name)}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    write_versions(out)
    write_config(out, {"device": name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                       **_device_facts(device), "dry_run": dry_run, "train_steps": TRAIN_STEPS,
                       **{k: v if not isinstance(v, Workload) else dataclasses.asdict(v)
                          for k, v in dataclasses.asdict(size).items()}})
    trained = pd.DataFrame([train_check(size, device=device, device_name=name, out=out / "train-run")])
    write_csv(out / "train.csv", trained)  # written before serving starts: a serving failure keeps it
    systems, costs = serve_check(size, device=device, out=out)
    return GpuCheckResult(out, trained, systems, costs)


def check_config(size: CheckSize, out: Path):
    """The TrainConfig of the training check: 04's aggressive + self-distillation row at paper-gemma-2b, with its
    execution choices (micro-batch, checkpointing, loss chunks, teacher dtype), from conversion, with KD."""
    study = load_params("04_early_exit", "paper-gemma-2b")
    run = next(r for r in study.runs() if r.config.objective == "early_exit" and r.config.self_distill
               and r.config.exit_scheme == "aggressive" and r.config.trainable == "all")
    changes = dict(out=str(out), init_from=None, kd="fkl", teacher=None, steps=TRAIN_STEPS, warmup_steps=0,
                   grad_accum=1, num_processes=1, data_offset=0, save_every=TRAIN_STEPS, eval_every=0)
    for key in ("train_model", "seq_len", "batch_size"):
        if getattr(size, key) is not None:
            changes["model" if key == "train_model" else key] = getattr(size, key)
    return dataclasses.replace(run.config, **changes)


def train_check(size: CheckSize, *, device: torch.device, device_name: str, out: Path) -> dict:
    """Train TRAIN_STEPS steps (see the module docstring); return one row: memory, estimate, tokens/s, MFU."""
    config = check_config(size, out)
    # initialised on the device (seconds, not minutes on the CPU), then held on the CPU as a sweep job
    # (`python -m rrt.runs`) holds the original: accelerate moves the student, build_teacher the teacher
    original = dummy_model(config.model, device=device, dtype=torch.bfloat16).to("cpu")
    _release(device)
    seqs = torch.randint(original.config.vocab_size, (TRAIN_STEPS * config.batch_size, config.seq_len),
                         generator=torch.Generator().manual_seed(0))
    stamps = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if cuda else 0
    # the callback runs after each optimiser step (before the final checkpoint): the clock waits for the GPU
    error = ""
    try:
        train(config, train_seqs=seqs, original=original, progress=lambda record: stamps.append(_clock(device)))
    except torch.OutOfMemoryError as err:  # the answer to "does the plan fit": reported beside the estimate
        error = f"out of memory after {len(stamps)} steps: {str(err).splitlines()[0]}"
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    del original
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # gigabytes of random weights
    _release(device)
    estimate = estimate_memory(config, device_kind=device.type)
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = train_flops(config)[0] / config.steps
    timed = max(len(stamps) - 1, 0)
    seconds = stamps[-1] - stamps[0] if timed else float("nan")
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), float("nan"))
    return {"device": device_name, "model": config.model, "num_blocks": config.num_blocks,
            "objective": config.objective, "kd": config.kd, "self_distill": config.self_distill,
            "batch_size": config.batch_size, "seq_len": config.seq_len,
            "gradient_checkpointing": config.gradient_checkpointing, "loss_chunk_tokens": config.loss_chunk_tokens,
            "teacher_dtype": config.teacher_dtype, "precision": config.precision, "steps": config.steps,
            "error": error, "timed_steps": timed, "peak_memory_bytes": peak, "resident_before_bytes": resident,
            "estimate_total_bytes": estimate.total, "peak_over_estimate": peak / estimate.total,
            **{f"estimate_{k}_bytes": v for k, v in estimate.to_dict().items()},
            "tokens_per_s": tokens_per_step * timed / seconds, "flops_per_step": flops_per_step,
            "peak_bf16_flops": peak_flops, "mfu": flops_per_step * timed / seconds / peak_flops}


def serve_check(size: CheckSize, *, device: torch.device, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The serving benchmark per served shape × B × r (dummy weights); return (systems, step costs), rewritten to
    out/bench.csv and out/step_costs.csv after each configuration (a run stopped at its time limit keeps them)."""
    dtype = serving_dtype(device)
    systems, costs = [], []
    for shape in size.serve_models:
        model = dummy_model(shape, device=device, dtype=dtype)
        for b in size.num_blocks:
            for r in size.lora_ranks:
                rec = convert(model, RecursiveSpec(num_blocks=b, lora_rank=r))
                result = run_benchmark(model, None, rec, workload=size.workload, max_active=size.max_active,
                                       token_budget=size.token_budget, repeats=size.repeats, own_oracle=False)
                tags = {"shape": shape, "num_blocks": b, "lora_rank": r, "device": result.settings["device"],
                        "dtype": result.settings["dtype"], "mean_loops": result.mean_loops}
                systems.append(result.systems.assign(**tags))
                costs.append(result.step_costs.assign(**tags))
                write_csv(out / "bench.csv", pd.concat(systems, ignore_index=True))
                write_csv(out / "step_costs.csv", pd.concat(costs, ignore_index=True))
                del rec, result
                _release(device)
        del model
        _release(device)
    return pd.concat(systems, ignore_index=True), pd.concat(costs, ignore_index=True)


def _device_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    p = torch.cuda.get_device_properties(device)
    return {"total_memory_bytes": p.total_memory, "compute_capability": f"{p.major}.{p.minor}"}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
