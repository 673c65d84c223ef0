"""`TrainConfig`: one frozen dataclass for uptraining and early-exit training (§3.6–3.7, App. G, Tables 13).

Where the starting model comes from decides the regime:
- conversion of `model` with the recursion fields (co-training: early-exit losses from the start);
- `init_from`, a directory written by `rrt.save` of an uptrained model (post-training, Table 13);
- `baseline`: "full" trains the original L-layer model with the same recipe, "reduced" a random
  model of L/B layers and the same widths from scratch (the paper's two reference lines, Fig. 4).
Every bad value fails in `__post_init__`, before any model is loaded.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rrt.losses import KD_KINDS, LOOP_SCHEMES, loop_weights
from rrt.models import decoder_layers
from rrt.recursive import RecursiveSpec, check_num_blocks, convert

OBJECTIVES = ("uptrain", "early_exit")
BASELINES = ("full", "reduced")
TRAINABLE = ("all", "base", "lora", "head_lora")
PRECISIONS = ("auto", "fp32", "bf16")
TEACHER_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; written to the run directory as config.json."""
    out: str                              # run directory: config.json, metrics.jsonl, checkpoints/
    model: str = "smollm2-135m"           # rrt.load_model source: conversion source and KD teacher
    init_from: str | None = None          # post-training: an rrt.save dir; None: convert `model`
    baseline: str | None = None           # None | "full" (L layers) | "reduced" (L/B layers, random)
    data: str = ""                        # a label for the data (corpus/split/length); checked on resume
    # recursion (RecursiveSpec fields; §2.2–2.3)
    num_blocks: int = 2
    init: str = "stepwise"
    norm_init: str | None = None
    lora_rank: int = 0
    lora_init: str = "svd"
    untie_norms: bool = False
    # objective
    objective: str = "uptrain"            # uptrain (CE + KD, §3.6) | early_exit (every loop, §3.7)
    kd: str | None = None                 # KD from the original model: fkl|rkl|jsd|tvd; None = CE only
    kd_weight: float = 1.0
    temperature: float = 1.0
    teacher_dtype: str = "float32"        # float32 | bfloat16 (halves the teacher's memory on GPU)
    exit_scheme: str = "aggressive"       # weighted | aggressive (App. M)
    exit_coefficient: float | None = 0.1  # aggressive: weight of every intermediate loop (Table 13: 0.1)
    self_distill: bool = False            # intermediate loops also distil the detached final loop
    self_distill_kind: str = "fkl"
    # what trains
    trainable: str = "all"                # all | base (no LoRA) | lora | head_lora (Table 13)
    head_lora_rank: int = 0               # a LoRA on the LM head (Table 13's frozen-model option)
    # optimisation (AdamW + cosine with linear warmup)
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 100
    batch_size: int = 8                   # blocks per micro-batch per process
    grad_accum: int = 1
    clip: float = 1.0                     # max global grad norm; 0 disables
    gradient_checkpointing: bool = False
    precision: str = "auto"               # auto: bf16 autocast on GPU, fp32 on CPU
    # bookkeeping
    seq_len: int | None = None            # if set, the training blocks must have this length
    eval_every: int = 0                   # per-loop perplexity every N steps (also at start and end)
    eval_batch_size: int = 8
    save_every: int = 50                  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        _choice("objective", self.objective, OBJECTIVES)
        if self.baseline is not None:
            _choice("baseline", self.baseline, BASELINES)
        if self.kd is not None:
            _choice("kd", self.kd, KD_KINDS)
        _choice("self_distill_kind", self.self_distill_kind, KD_KINDS)
        _choice("exit_scheme", self.exit_scheme, LOOP_SCHEMES)
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("precision", self.precision, PRECISIONS)
        _choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        self.spec()  # RecursiveSpec validates num_blocks, init, norm_init, lora_rank, lora_init
        loop_weights(2, self.exit_scheme, self.exit_coefficient)  # coefficient in [0, 1]; None for weighted
        if self.objective == "uptrain" and self.self_distill:
            raise ValueError("self_distill=True needs objective='early_exit' (it distils intermediate loops)")
        for name in ("kd_weight", "weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0; got {self.temperature}, {self.lr}")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "head_lora_rank", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0; got {getattr(self, name)!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        self._check_regime()

    def _check_regime(self):
        if self.baseline is not None:
            if self.init_from is not None or self.lora_rank != 0:
                raise ValueError(f"baseline={self.baseline!r} trains a plain model: init_from must be None "
                                 f"and lora_rank 0; got {self.init_from!r}, {self.lora_rank!r}")
            if self.baseline == "full" and self.num_blocks != 1:
                raise ValueError(f"baseline='full' is the unshared L-layer model: set num_blocks=1 "
                                 f"(got {self.num_blocks}); 'reduced' uses num_blocks for its L/B layers")
            if self.objective != "uptrain":
                raise ValueError(f"baselines have one exit: objective must be 'uptrain', got {self.objective!r}")
        if self.trainable == "head_lora" and self.head_lora_rank == 0:
            raise ValueError("trainable='head_lora' needs head_lora_rank > 0")
        if self.trainable == "lora" and self.lora_rank == 0 and self.head_lora_rank == 0:
            raise ValueError("trainable='lora' needs lora_rank > 0 or head_lora_rank > 0 (nothing would train)")
        if self.head_lora_rank and self.trainable == "base":
            raise ValueError("head_lora_rank > 0 with trainable='base' leaves the head LoRA frozen at zero")

    def spec(self) -> RecursiveSpec:
        """Return the RecursiveSpec these fields describe (seeded with `seed`)."""
        return RecursiveSpec(num_blocks=self.num_blocks, init=self.init, norm_init=self.norm_init,
                             lora_rank=self.lora_rank, lora_init=self.lora_init,
                             untie_norms=self.untie_norms, seed=self.seed)

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


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


# ---- the models a config describes ------------------------------------------------------------

def build_student(config: TrainConfig, original: nn.Module) -> nn.Module:
    """Return the model to train (fp32 master weights), its trainable parameters set; `original` untouched."""
    if config.baseline == "reduced":
        model = _reduced_model(original, config.num_blocks)
    elif config.init_from is not None:  # post-training an uptrained model
        from rrt.checkpoint import load
        model = load(config.init_from, dtype=torch.float32)
        saved = {k: v for k, v in (getattr(model.config, "rrt", None) or {}).items() if k != "seed"}
        wanted = {k: v for k, v in config.spec().to_dict().items() if k != "seed"}
        if saved != wanted:
            raise ValueError(f"init_from={config.init_from!r} holds spec {saved}; the config asks for {wanted}")
    else:  # conversion (co-training); baseline "full" is num_blocks=1, identical to the original
        model = convert(original, config.spec()).float()
    if config.head_lora_rank:
        add_head_lora(model, config.head_lora_rank)
    _set_trainable(model, config.trainable)
    return model.train()


def build_teacher(config: TrainConfig, original: nn.Module, device) -> nn.Module | None:
    """Return the KD teacher: `original` itself, frozen, eval mode, on `device` (None without KD)."""
    if config.kd is None:
        return None
    dtype = getattr(torch, config.teacher_dtype)
    # a cast copies (the caller's original stays as it was); same dtype: the very same model, no copy
    teacher = original if next(original.parameters()).dtype == dtype else copy.deepcopy(original)
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def add_head_lora(model: nn.Module, rank: int) -> nn.Module:
    """Wrap the LM head in a LoRA (A Kaiming, B zero: the delta starts at 0); return the wrapper.

    Table 13's option: on a frozen uptrained model, only this adapter trains. The head's weight
    (tied to the input embedding in many models) stays one shared tensor.
    """
    from rrt.relax import LoopLoRALinear, init_lora

    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_children() if m is head)
    lora = LoopLoRALinear(head, rank, loop_idx=0)
    init_lora(lora, None)
    setattr(model, name, lora)
    return lora


def _reduced_model(original: nn.Module, num_blocks: int) -> nn.Module:
    """Return a random-init model of L/B layers and the original's widths (the paper's small baseline)."""
    from transformers import AutoModelForCausalLM

    num_layers = len(decoder_layers(original))
    check_num_blocks(num_layers, num_blocks)
    cfg = copy.deepcopy(original.config)
    cfg.num_hidden_layers = num_layers // num_blocks
    if isinstance(getattr(cfg, "layer_types", None), list):  # Gemma 2/3: keep the first L/B types
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _set_trainable(model: nn.Module, trainable: str) -> None:
    from rrt.relax import set_trainable

    if trainable == "head_lora":
        head = model.get_output_embeddings()
        for name, p in model.named_parameters():
            p.requires_grad_(False)
        head.lora_A.requires_grad_(True)
        head.lora_B.requires_grad_(True)
    else:
        set_trainable(model, base=trainable in ("all", "base"), lora=trainable in ("all", "lora"))


# ---- command-line flags from the fields -------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --field-name flag per TrainConfig field, typed from its annotation."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.replace(" | None", "")
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs = {"dest": f.name, "required": f.default is dataclasses.MISSING}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, type=float, nargs=2, default=default, **kwargs)
        else:
            convert_value = {"int": int, "float": float, "str": str}[kind]
            typ = (lambda v, c=convert_value: None if v.lower() == "none" else c(v)) if "None" in f.type else convert_value
            parser.add_argument(flag, type=typ, default=default, help=f"default: {default}", **kwargs)


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """Return the TrainConfig of parsed flags (from `add_config_arguments`), with overrides."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(overrides)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
