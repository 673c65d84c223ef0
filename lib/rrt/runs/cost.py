"""The cost model of a plan: training FLOPs and H100 hours per run from shapes alone (no weights), and the
plan as a table (`plan_table`, what `make plan` prints and every notebook writes as plan.csv)."""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from rrt.models import model_config
from rrt.recursive import convert, count_parameters
from rrt.runs.memory import GB, estimate_memory
from rrt.runs.store import PRETRAINED, Run
from rrt.spec import RecursiveSpec
from rrt.trainconfig import TrainConfig

# Cost rule printed with every plan: training 6·N·T FLOPs (N = parameters a token passes through:
# every depth's layers, its LoRAs and the LM head), + 2·N_teacher·T for an online KD teacher,
# + 6·V·d·T per extra early-exit head; H100 at 989 TFLOP/s dense bf16 and this utilisation.
H100_FLOPS = 989e12
MFU = 0.4
COST_RULE = (f"FLOPs = 6·N·T (+2·N_teacher·T with KD, +6·V·d·T per intermediate exit); "
             f"H100 hours = FLOPs / ({H100_FLOPS / 1e12:.0f} TFLOP/s × {MFU:.0%} MFU) / 3600")


def plan_table(runs: list[Run], owners: dict[str, str] | None = None) -> pd.DataFrame:
    """Return the plan as a table: what each run trains, on what, for how long, what it costs (COST_RULE), and its
    memory per GPU by component with the execution choices that size it (rrt.runs.memory), and its checkpoint's
    size on disk (weights + optimizer state, all shards). owners: {run key: the notebook that counts its hours}
    (rrt.suite; column `owner`, "" where not given). A pretrained run costs nothing: it is never trained."""
    by_name = {r.name: r for r in runs}
    rows = []
    for r in runs:
        c = r.config
        flops, active = (0.0, train_flops(c)[1]) if r.role == PRETRAINED else train_flops(c)
        memory = estimate_memory(c)
        starts = (f"{by_name[r.needs[0]].name} ({by_name[r.needs[0]].dir.name})" if c.init_from and r.needs
                  else c.init_from or ("random init" if c.baseline == "reduced" else
                                       f"the original {c.model}, not trained" if r.role == PRETRAINED else
                                       f"convert {c.model}"))
        teacher = "-" if c.kd is None else (
            f"full-size ({Path(c.teacher).parents[1].name})" if c.teacher and "full-size" in r.needs
            else c.teacher or f"pretrained {c.model}")
        rows.append({
            "run": r.name, "role": r.role, "init": "-" if c.baseline else c.init, "num_blocks": c.num_blocks,
            "lora_rank": c.lora_rank, "lora_init": c.lora_init if c.lora_rank else "-", "objective": c.objective,
            "exit_scheme": c.exit_scheme if c.objective == "early_exit" else "-",
            "exit_coefficient": c.exit_coefficient if c.objective == "early_exit" else "-",
            "self_distill": c.self_distill, "trainable": c.trainable, "kd": c.kd or "-", "teacher": teacher,
            "starts_from": starts, "data": c.data, "data_offset": c.data_offset, "tokens": r.tokens,
            "steps": c.steps, "warmup_steps": c.warmup_steps, "tokens_per_step": r.tokens_per_step,
            "batch_size": c.batch_size, "grad_accum": c.grad_accum, "gpus": c.num_processes,
            "active_params": active, "flops": flops, "h100_hours": flops / (H100_FLOPS * MFU) / 3600,
            "checkpointing": c.gradient_checkpointing, "loss_chunk_tokens": c.loss_chunk_tokens,
            "teacher_dtype": c.teacher_dtype if c.kd else "-", "sharding": c.sharding,
            "memory_gb": memory.gb,
            "model_state_gb": (memory.parameters + memory.working_copy + memory.gradients + memory.optimizer) / GB,
            "teacher_gb": memory.teacher / GB, "activations_gb": memory.activations / GB,
            "logits_gb": memory.logits / GB, "checkpoint_gb": memory.checkpoint / GB,
            "trained": r.trained(), "run_dir": r.dir.name, "config_hash": r.key,
            "owner": (owners or {}).get(r.key, "")})
    return pd.DataFrame(rows)


def totals_text(table: pd.DataFrame, notebook: str) -> str:
    """The plan's totals over the runs `notebook` owns (column `owner`; "" counts here), and what it lists but
    another notebook owns and counts: a suite's hours add up with each run once."""
    mine = table.owner.isin(["", notebook])
    own, todo, other = table[mine], table[mine & ~table.trained], table[~mine]
    text = (f"{len(table)} runs, {len(own)} owned here ({len(todo)} to train): {format_tokens(own.tokens.sum())} "
            f"tokens, {own.flops.sum():.2e} FLOPs, {own.h100_hours.sum():,.0f} H100 hours "
            f"({todo.h100_hours.sum():,.0f} still to spend)")
    if len(other):
        names = "; ".join(f"{nb}: {', '.join(t.run)}" for nb, t in other.groupby("owner"))
        text += (f"; {len(other)} runs another notebook owns and counts ({other.h100_hours.sum():,.0f} H100 hours, "
                 f"not counted here: {names})")
    return text


def train_flops(config: TrainConfig) -> tuple[float, int]:
    """Return (training FLOPs, parameters per token) of one run by COST_RULE, from shapes alone."""
    model = config.model
    shape = _shape(model, config.num_blocks if config.baseline == "reduced" else 1, config.lora_rank,
                   config.num_blocks if config.baseline is None else 1, config.module_ranks)
    full = _shape(model, 1, 0, 1)
    head = shape["head"]
    active = shape["layers"] + shape["lora"] + head
    tokens = config.steps * config.batch_size * config.grad_accum * config.num_processes * (config.seq_len or 0)
    flops = 6 * active * tokens
    if config.kd:
        flops += 2 * (full["layers"] + head) * tokens
    if config.objective == "early_exit":
        flops += 6 * head * (config.num_blocks - 1) * tokens
    return float(flops), int(active)


@functools.lru_cache(maxsize=64)
def _shape(model: str, reduce_by: int, lora_rank: int, num_blocks: int,
           module_ranks: tuple[int, int, int, int] | None = None) -> dict:
    """Parameters a token passes through: every depth's layers (L/reduce_by of them), its LoRAs, the LM head."""
    cfg = copy.deepcopy(model_config(model))
    cfg.num_hidden_layers //= reduce_by
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    counts = count_parameters(m)
    lora = 0
    if lora_rank:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamped ranks
            rec = convert(m, RecursiveSpec(num_blocks=num_blocks, lora_rank=lora_rank, lora_init="zero",
                                           module_ranks=module_ranks))
        lora = count_parameters(rec)["lora"]
    return {"layers": counts["non_embedding"], "lora": lora, "head": cfg.vocab_size * cfg.hidden_size}


def format_tokens(n) -> str:
    """A token count the way a plan prints it: 15.00B, 2.10M, 512."""
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
