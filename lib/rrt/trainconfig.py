"""`TrainConfig`: one frozen dataclass for uptraining and early-exit training (§3.6–3.7, App. G, Tables 13).

Where the starting model comes from decides the regime:
- conversion of `model` with the recursion fields (co-training: early-exit losses from the start);
- `init_from`, a directory written by `rrt.save` of an uptrained model (post-training, Table 13);
- `baseline`: "full" trains the original L-layer model with the same recipe, "reduced" a random
  model of L/B layers and the same widths from scratch (the paper's two reference lines, Fig. 4).
Every bad value fails in `__post_init__`, before any model is loaded. This module is the schema
only: rrt.train.build builds the models a config describes, rrt.cli its command-line flags.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from rrt.losses import KD_KINDS, LOOP_SCHEMES, loop_weights
from rrt.spec import RecursiveSpec, check_choice, check_int, expand_home

OBJECTIVES = ("uptrain", "early_exit")
BASELINES = ("full", "reduced")
TRAINABLE = ("all", "base", "lora", "head_lora")
PRECISIONS = ("auto", "fp32", "bf16")
TEACHER_DTYPES = ("float32", "bfloat16")
SHARDINGS = ("none", "fsdp")
# Fields that change how a run executes, not what it computes (up to float rounding): not in `hash`.
EXECUTION_FIELDS = ("loss_chunk_tokens", "sharding")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; written to the run directory as config.json."""
    out: str                              # run directory: config.json, metrics.jsonl, checkpoints/
    model: str = "smollm2-135m"           # rrt.load_model source: conversion source and KD teacher
    init_from: str | None = None          # post-training: an rrt.save dir; None: convert `model`
    baseline: str | None = None           # None | "full" (L layers) | "reduced" (L/B layers, random)
    data: str = ""                        # a label for the data (corpus/split/length); checked on resume
    # recursion (RecursiveSpec fields; §2.2–2.3)
    num_blocks: int = 2                   # B: loops over the shared block; divides the layer count L
    init: str = "stepwise"                # looped-layer init: stepwise|average|lower|random|stepwise_start
    norm_init: str | None = None          # shared norms: average|choice|zero; None: as the init does (App. I)
    lora_rank: int = 0                    # per-depth LoRA rank (§2.3); 0: the plain recursive model
    module_ranks: tuple[int, int, int, int] | None = None  # per-module ranks q, kv, o, mlp (Table 8); None:
                                          # lora_rank for all; when set, lora_rank must equal their max
    lora_init: str = "svd"                # LoRA init: svd (truncated SVD of the residual, eq. 4-5) | zero
    untie_norms: bool = False             # per-depth norm weights (full rank then reproduces the original)
    # objective
    objective: str = "uptrain"            # uptrain (CE + KD, §3.6) | early_exit (every loop, §3.7)
    kd: str | None = None                 # KD divergence: fkl|rkl|jsd|tvd; None = CE only
    teacher: str | None = None            # KD teacher: None = `model` as loaded; else an rrt.save dir or a
                                          # load_model source (App. L: the full-size model uptrained alike)
    kd_weight: float = 1.0                # weight of the KD term beside CE
    temperature: float = 1.0              # KD temperature T (the divergence is scaled by T²)
    teacher_dtype: str = "float32"        # float32 | bfloat16 (halves the teacher's memory on GPU)
    exit_scheme: str = "aggressive"       # weighted | aggressive (App. M)
    exit_coefficient: float | None = 0.1  # aggressive: weight of every intermediate loop (Table 13: 0.1)
    self_distill: bool = False            # intermediate loops also distil the detached final loop
    self_distill_kind: str = "fkl"        # self-distillation divergence: fkl|rkl|jsd|tvd
    # what trains
    trainable: str = "all"                # all | base (no LoRA) | lora | head_lora (Table 13)
    head_lora_rank: int = 0               # a LoRA on the LM head for intermediate exits (Table 13's frozen-model option)
    # optimisation (AdamW + cosine with linear warmup)
    lr: float = 2e-4                      # AdamW peak learning rate (App. G)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0             # AdamW weight decay
    warmup_steps: int = 0                 # linear warmup steps, then cosine decay to 0
    steps: int = 100                      # optimiser steps
    batch_size: int = 8                   # sequences per micro-batch per process
    grad_accum: int = 1                   # micro-batches per optimiser step
    num_processes: int = 1                # processes the batch arithmetic assumes (train() checks it):
                                          # tokens per step = batch_size × grad_accum × num_processes × seq_len
    data_offset: int = 0                  # training samples to skip first: post-training on "new" tokens
                                          # starts past the uptraining's (Table 13, "Data: New")
    clip: float = 1.0                     # max global grad norm; 0 disables
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)
    # execution only (never the run's identity: left out of `hash`, so a run keeps its key and directory)
    loss_chunk_tokens: int = 0            # losses over this many tokens' logits at a time, recomputed in backward
                                          # (0: the whole micro-batch's logits at once)
    sharding: str = "none"                # none (DDP: every rank holds all optimizer state) | fsdp (FSDP2
                                          # fully_shard: parameters, gradients and optimizer state split over ranks)
    precision: str = "auto"               # auto: bf16 autocast on GPU and on CPUs with bf16 matmuls, else fp32
    # bookkeeping
    seq_len: int | None = None            # tokens per training sequence (if set, the data must have it)
    eval_every: int = 0                   # per-loop perplexity every N steps (also at start and end)
    eval_batch_size: int = 8              # sequences per batch of the per-loop perplexity
    save_every: int = 50                  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2             # checkpoints kept (the newest)
    seed: int = 0                         # data order, random init, LoRA A matrices

    def __post_init__(self):
        expand_home(self, ("out", "model", "init_from", "teacher"))  # before `hash`: "~/x" and "/home/u/x" are one run
        check_choice("objective", self.objective, OBJECTIVES)
        if self.baseline is not None:
            check_choice("baseline", self.baseline, BASELINES)
        if self.kd is not None:
            check_choice("kd", self.kd, KD_KINDS)
        check_choice("self_distill_kind", self.self_distill_kind, KD_KINDS)
        check_choice("exit_scheme", self.exit_scheme, LOOP_SCHEMES)
        check_choice("trainable", self.trainable, TRAINABLE)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        check_choice("sharding", self.sharding, SHARDINGS)
        # RecursiveSpec validates num_blocks, init, norm_init, lora_rank, module_ranks, lora_init, head_lora_rank
        object.__setattr__(self, "module_ranks", self.spec().module_ranks)  # a list becomes a tuple
        loop_weights(2, self.exit_scheme, self.exit_coefficient)  # coefficient in [0, 1]; None for weighted
        if self.teacher is not None and self.kd is None:
            raise ValueError(f"teacher={self.teacher!r} is set but kd is None: set kd (fkl|rkl|jsd|tvd) or drop teacher")
        if self.objective == "uptrain" and self.self_distill:
            raise ValueError("self_distill=True needs objective='early_exit' (it distils intermediate loops)")
        for name in ("kd_weight", "weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0; got {self.temperature}, {self.lr}")
        for name in ("steps", "batch_size", "grad_accum", "num_processes", "save_every", "keep_checkpoints",
                     "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "head_lora_rank", "seed", "data_offset", "loss_chunk_tokens"):
            check_int(name, getattr(self, name), 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        self._check_regime()

    def _check_regime(self):
        if self.baseline is not None:
            # init_from with "full": the full-size model uptrained further (App. M's 75B = 60B + 15B new tokens)
            if (self.init_from is not None and self.baseline != "full") or self.lora_rank != 0:
                raise ValueError(f"baseline={self.baseline!r} trains a plain model: lora_rank 0, and init_from None "
                                 f"unless 'full' continues one; got {self.init_from!r}, {self.lora_rank!r}")
            if self.baseline == "full" and self.num_blocks != 1:
                raise ValueError(f"baseline='full' is the unshared L-layer model: set num_blocks=1 "
                                 f"(got {self.num_blocks}); 'reduced' uses num_blocks for its L/B layers")
            if self.objective != "uptrain":
                raise ValueError(f"baselines have one exit: objective must be 'uptrain', got {self.objective!r}")
        if self.head_lora_rank and self.objective != "early_exit":  # the last loop never uses it
            raise ValueError(f"head_lora_rank > 0 needs objective='early_exit': the head LoRA acts on "
                             f"intermediate exits only; got objective={self.objective!r}")
        if self.trainable == "head_lora" and self.head_lora_rank == 0:
            raise ValueError("trainable='head_lora' needs head_lora_rank > 0")
        if self.trainable == "lora" and self.lora_rank == 0 and self.head_lora_rank == 0:
            raise ValueError("trainable='lora' needs lora_rank > 0 or head_lora_rank > 0 (nothing would train)")
        if self.head_lora_rank and self.trainable == "base":
            raise ValueError("head_lora_rank > 0 with trainable='base' leaves the head LoRA frozen at zero")

    def hash(self) -> str:
        """Return a 12-hex digest of every field but `out` and the EXECUTION_FIELDS: the identity of a run (same
        hash, same run)."""
        fields = {k: v for k, v in self.to_dict().items() if k != "out" and k not in EXECUTION_FIELDS
                  and not (k == "module_ranks" and v is None)}  # unset: the runs from before the field keep their key
        if self.init == "random" and self.baseline is None:  # issue 28: Random loads no pretrained tensor (Table 5);
            fields["init"] = "random, no pretrained tensor"  # a run of the old Random (pretrained embeddings, norms,
                                                              # head) is another run, never resumed or reused as this
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def spec(self) -> RecursiveSpec:
        """Return the RecursiveSpec these fields describe (seeded with `seed`)."""
        return RecursiveSpec(num_blocks=self.num_blocks, init=self.init, norm_init=self.norm_init,
                             lora_rank=self.lora_rank, module_ranks=self.module_ranks, lora_init=self.lora_init,
                             untie_norms=self.untie_norms, head_lora_rank=self.head_lora_rank, seed=self.seed)

    def to_dict(self) -> dict:
        """Return the config as JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Return the config written by `to_dict`."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

