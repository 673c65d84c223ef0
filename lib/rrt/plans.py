"""Study plans: one frozen dataclass per notebook, whose fields *are* the notebook's parameters.

A study validates itself completely when it is built, from the model's config alone (no weights):
types, choices, every B dividing the layer count, and every run's `TrainConfig` (lr > 0, warmup <=
steps, …). `study.runs()` expands it into the explicit list of runs — the **plan** — each a
`TrainConfig` plus its tags. The notebooks (`resolve`), the params YAML files, `make plan`
(`python -m rrt.plans NB SCALE`), the cluster sweep and the tests all go through these classes.

Naming: a field named like a `TrainConfig`/`RecursiveSpec` field means that field; a grid axis takes
the plural (`inits`, `lora_ranks`, `exit_coefficients`; `num_blocks` is its own plural and is a list
in every study that trains). Batches are given globally: `global_batch_size` sequences per optimiser
step over all processes, so tokens per run hold whatever `gpus_per_run` is (grad_accum is derived).

Runs live in a run store shared by every notebook (`runs_root`, default outputs/runs/), one
directory per config hash: 01's full-size model is 03's KD teacher (App. L) and 01's Stepwise model
is where 04's early-exit post-training starts, each trained once and reused when present.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rrt.evaluation import TASKS
from rrt.losses import KD_KINDS
from rrt.models import model_config
from rrt.recursive import INITS, check_num_blocks
from rrt.rundir import read_json, write_json
from rrt.trainconfig import TrainConfig

# Fig. 11 (App. I), InitAblation.variants: each variant's (init, norm_init)
INIT_VARIANTS = {"stepwise_start": ("stepwise_start", None), "norm_choice": ("average", "choice"),
                 "norm_zero": ("average", "zero")}
SCALES = ("smoke", "cpu", "paper-gemma-2b", "paper-tinyllama-1.1b", "paper-pythia-1b")
REPO = Path(__file__).resolve().parents[2]
OUTPUTS = REPO / "outputs"
# Cost rule printed with every plan: training 6·N·T FLOPs (N = parameters a token passes through:
# every depth's block, its LoRAs and the LM head), + 2·N_teacher·T for an online KD teacher,
# + 6·V·d·T per extra early-exit head; H100 at 989 TFLOP/s dense bf16 and this utilisation.
H100_FLOPS = 989e12
MFU = 0.4
COST_RULE = (f"FLOPs = 6·N·T (+2·N_teacher·T with KD, +6·V·d·T per intermediate exit); "
             f"H100 hours = FLOPs / ({H100_FLOPS / 1e12:.0f} TFLOP/s × {MFU:.0%} MFU) / 3600")

SEED_SUFFIX = r" seed=\d+$"  # InitAblation names a repeated seed's run "<model> seed=<n>"


def label_of(run: str) -> str:
    """A run's name without its repeat seed ("stepwise B=2 seed=1" → "stepwise B=2"): repeats share a label."""
    return re.sub(SEED_SUFFIX, "", str(run))


def tag_is_true(value) -> bool:
    """A boolean tag read back from a table (True, "True", 1, "1.0" after a CSV round trip)."""
    return str(value).lower() in ("true", "1", "1.0")


# ---------------------------------------------------------------- the fields every study shares

@dataclass(frozen=True, kw_only=True)
class Study:
    """What every notebook shares: which model, where to write, the seed."""
    scale: str = "cpu"                # smoke | cpu | paper-gemma-2b | paper-tinyllama-1.1b | paper-pythia-1b
    model: str = "smollm2-135m"       # rrt.load_model source: what is converted
    run_dir: str = ""                 # tables and figures of this notebook; empty: outputs/<notebook>/<scale>-<time>
    seed: int = 0                     # data order, random init, LoRA A matrices

    notebook: typing.ClassVar[str] = ""
    per_loop: typing.ClassVar[bool] = False  # evaluate every loop exit (static exiting, §3.7), not the last only

    def __post_init__(self):
        _check_types(self)
        for name in _fields(self):  # YAML gives lists; a frozen study holds tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _choice("scale", self.scale, SCALES)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.validate()

    def validate(self) -> None:
        """Raise naming the bad field; subclasses add their own rules."""

    def runs(self) -> list["Run"]:
        """Return the plan: every training run, dependencies before the runs that read them."""
        return []

    def to_dict(self) -> dict:
        return {"notebook": self.notebook, **{k: _jsonable(getattr(self, k)) for k in _fields(self)}}


@dataclass(frozen=True, kw_only=True)
class TrainingStudy(Study):
    """The fields of a study that uptrains models (App. G), in TrainConfig's names."""
    runs_root: str = ""               # run store shared by every notebook; empty: outputs/runs
    train_corpus: str = "wikitext2"   # uptraining corpus (clusters: "slimpajama")
    train_split: str = "validation"   # WikiText-2's train split is not vendored: uptrain on validation
    data_source: str = "embedded"     # embedded (vendored, offline) | hub (streamed by name)
    eval_corpora: tuple[str, ...] = ("wikitext2/test", "tinystories/test")  # held-out perplexity sets
    seq_len: int = 128                # tokens per packed training sequence (App. G: 2048)
    max_train_seqs: int | None = None  # packed training sequences (None: all; a hub corpus needs a number)
    max_eval_seqs: int = 16           # sequences per held-out set
    steps: int = 60                   # optimiser steps per run
    global_batch_size: int = 4        # sequences per optimiser step over all processes (App. G: ~2M tokens)
    batch_size: int = 4               # sequences per micro-batch per process (grad_accum is derived)
    gpus_per_run: int = 1             # processes (GPUs) each run is launched with
    lr: float = 2e-4                  # AdamW peak learning rate (App. G)
    warmup_steps: int = 6             # linear warmup steps, then cosine decay (App. G: 200; 800 for 60B)
    tasks: tuple[str, ...] = ("arc_easy", "piqa")  # few-shot tasks (clusters: all seven)
    task_limit: int | None = 20       # examples per task (None: the full split)

    def validate(self):
        _choice("data_source", self.data_source, ("embedded", "hub"))
        _items("tasks", self.tasks, tuple(TASKS))
        for name in ("seq_len", "max_eval_seqs", "steps", "global_batch_size", "batch_size", "gpus_per_run"):
            _at_least(name, getattr(self, name), 2 if name == "seq_len" else 1)
        for name in ("max_train_seqs", "task_limit"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.global_batch_size % (self.batch_size * self.gpus_per_run):
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of batch_size × "
                             f"gpus_per_run = {self.batch_size} × {self.gpus_per_run}; grad_accum must be whole")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        runs = self.runs()  # every run's TrainConfig validates itself (and names its field) here
        reads = max((r.config.data_offset + r.samples for r in runs), default=0)
        if self.data_source == "hub" and (self.max_train_seqs or 0) < reads:
            # A run's sample order is a permutation of the packed set: every notebook of a scale must pack the
            # same set for a shared run (01's uptrained model in 04) to be the same run, and none may wrap around.
            raise ValueError(f"max_train_seqs={self.max_train_seqs}: a hub corpus needs an explicit number of packed "
                             f"sequences, at least the {reads} this plan reads (the same in every notebook of a scale)")

    @property
    def num_layers(self) -> int:
        return model_config(self.model).num_hidden_layers

    def check_num_blocks(self, key: str, values) -> None:
        for b in values:
            try:
                check_num_blocks(self.num_layers, b)
            except ValueError as err:
                raise ValueError(f"{key}: {err} ({self.model} has {self.num_layers} layers)") from None

    def store(self) -> Path:
        return Path(self.runs_root or OUTPUTS / "runs").resolve()

    def run(self, name: str, role: str = "study", *, steps: int | None = None, warmup_steps: int | None = None,
            seed: int | None = None, tags: dict | None = None, needs: tuple = (), **fields) -> "Run":
        """Return one run of this study's recipe (TrainConfig fields override it)."""
        steps = steps or self.steps
        seed = self.seed if seed is None else seed
        config = dict(model=self.model, steps=steps,
                      warmup_steps=self.warmup_steps if warmup_steps is None else warmup_steps,
                      batch_size=self.batch_size, num_processes=self.gpus_per_run,
                      grad_accum=self.global_batch_size // (self.batch_size * self.gpus_per_run),
                      lr=self.lr, seq_len=self.seq_len, seed=seed, save_every=max(1, min(steps, 1000)),
                      data=f"{self.data_source}:{self.train_corpus}/{self.train_split}@{self.seq_len}"
                           + (f"[:{self.max_train_seqs}]" if self.max_train_seqs else ""), **fields)
        store = self.store()
        # the key hashes the config with checkpoints read from the store (teacher, init_from) named relative
        # to it: the same plan has the same run directories wherever the store lives
        relative = {k: str(Path(v).relative_to(store)) if k in ("teacher", "init_from") and v and Path(v).is_relative_to(store)
                    else v for k, v in config.items()}
        key = TrainConfig(out="", **relative).hash()
        out = store / f"{_slug(self.model)}-{key}"
        return Run(name=name, role=role, config=TrainConfig(out=str(out), **config),
                   tags={**(tags or {}), "seed": seed}, needs=needs)

    def full_size(self) -> "Run":
        """The full-size model uptrained with the same recipe (CE): Fig. 4/5's reference and App. L's teacher."""
        return self.run("full-size", "baseline", num_blocks=1, baseline="full", tags={"baseline": "full"})

    def reduced_size(self, b: int) -> "Run":
        """The reduced-size model (L/B layers, trained from scratch with the same recipe): Fig. 4/5's other reference."""
        return self.run(f"reduced-size B={b}", "baseline", num_blocks=b, baseline="reduced",
                        tags={"baseline": "reduced", "num_blocks": b})

    def teacher_of(self, teacher: str) -> tuple[str | None, tuple]:
        """Return (TrainConfig.teacher, the runs it needs) for a study's `teacher` field."""
        if teacher == "full-size":
            run = self.full_size()
            return str(run.final_checkpoint), (run.name,)
        return (None, ()) if teacher == "pretrained" else (teacher, ())


# ---------------------------------------------------------------- one class per notebook

@dataclass(frozen=True, kw_only=True)
class Explore(Study):
    """00_explore: one model, interactively (not a grid)."""
    notebook: typing.ClassVar[str] = "00_explore"
    num_blocks: int = 2               # B of the one model explored here
    init: str = "stepwise"            # looped-layer init
    lora_rank: int = 64               # per-depth LoRA rank (SVD init)
    untie_norms: bool = False         # per-depth norms (full rank then reproduces the original)
    prompt: str = "The capital of France is"
    exit_policy: str = "max_prob"     # none | max_prob | margin | cosine
    exit_threshold: float = 0.5       # the policy's threshold, in [0, 1]
    max_new_tokens: int = 12          # generated tokens in the early-exit demo

    def validate(self):
        _choice("init", self.init, INITS)
        _choice("exit_policy", self.exit_policy, ("none", "max_prob", "margin", "cosine"))
        _at_least("lora_rank", self.lora_rank, 0)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        if not 0 <= self.exit_threshold <= 1:
            raise ValueError(f"exit_threshold={self.exit_threshold} out of range [0, 1]")
        check_num_blocks(model_config(self.model).num_hidden_layers, self.num_blocks)


@dataclass(frozen=True, kw_only=True)
class InitAblation(TrainingStudy):
    """01_init_ablation (Fig. 5, 11, Table 5): every looped-layer init × B, full- and reduced-size baselines, init variants."""
    notebook: typing.ClassVar[str] = "01_init_ablation"
    inits: tuple[str, ...] = ("stepwise", "average", "lower")  # looped-layer inits (Fig. 2; Table 5 adds random)
    repeat_seeds: tuple[int, ...] = (1,)  # the repeat_inits' runs again at these seeds: the spread over seeds (Fig. 5)
    repeat_inits: tuple[str, ...] = ("stepwise",)  # the inits repeated (members of inits; cpu: the headline init)
    num_blocks: tuple[int, ...] = (2,)  # B values, each dividing the layer count (Table 5: Gemma 2, 3)
    baselines: bool = True            # also the full-size model (same recipe) and reduced-size (L/B layers, scratch)
    # Fig. 11's init variants, at the first B: stepwise_start (Stepwise "fixed-start", against 01's fixed ends),
    # norm_choice / norm_zero (Average with the tied norms picked / zeroed, against its averaged norms)
    variants: tuple[str, ...] = ("stepwise_start", "norm_zero")
    kd: str | None = None             # KD during uptraining (Table 5: none): None | fkl | rkl | jsd | tvd
    teacher: str = "full-size"        # with kd: full-size (App. L) | pretrained | an rrt.save dir

    def validate(self):
        _items("inits", self.inits, INITS)
        _items("variants", self.variants, tuple(INIT_VARIANTS))
        stray = sorted(set(self.repeat_inits) - set(self.inits))
        if stray:
            raise ValueError(f"repeat_inits {stray} are not in inits {list(self.inits)}")
        self.check_num_blocks("num_blocks", self.num_blocks)
        for seed in self.repeat_seeds:
            _at_least("repeat_seeds", seed, 0)
        if self.seed in self.repeat_seeds or len(set(self.repeat_seeds)) < len(self.repeat_seeds):
            raise ValueError(f"repeat_seeds {list(self.repeat_seeds)} must be distinct and differ from seed={self.seed}")
        if self.kd is not None:
            _choice("kd", self.kd, KD_KINDS)
        super().validate()

    def runs(self):
        teacher, needs = self.teacher_of(self.teacher) if self.kd else (None, ())
        runs = [self.full_size()] if self.baselines or needs else []
        runs += [self.run(f"{init} B={b}" + (f" seed={seed}" if seed != self.seed else ""), num_blocks=b, init=init,
                          kd=self.kd, teacher=teacher, needs=needs, seed=seed, tags={"init": init, "num_blocks": b})
                 for seed in (self.seed, *self.repeat_seeds) for b in self.num_blocks for init in self.inits
                 if seed == self.seed or init in self.repeat_inits]
        if self.baselines:
            runs += [self.reduced_size(b) for b in self.num_blocks]
        b = self.num_blocks[0]
        for variant in self.variants:
            init, norm_init = INIT_VARIANTS[variant]
            runs.append(self.run(f"{init} B={b}" + (f" norm={norm_init}" if norm_init else ""), "variant", num_blocks=b,
                                 init=init, norm_init=norm_init, kd=self.kd, teacher=teacher, needs=needs,
                                 tags={"init": init, "num_blocks": b, "norm_init": norm_init or "-"}))
        return runs


@dataclass(frozen=True, kw_only=True)
class RelaxationSweep(TrainingStudy):
    """02_relaxation_rank_sweep (Fig. 4, 6, 7a, 7c, Table 9): init × per-depth LoRA rank, SVD init vs zero."""
    notebook: typing.ClassVar[str] = "02_relaxation_rank_sweep"
    num_blocks: tuple[int, ...] = (2,)  # B values
    inits: tuple[str, ...] = ("average",)  # looped-layer inits (Table 9: stepwise, average, lower)
    lora_ranks: tuple[int, ...] = (0, 64)  # per-depth LoRA ranks, SVD init (0: the plain recursive model)
    zero_init_ranks: tuple[int, ...] = (64,)  # ranks that also run with zero LoRA init (Table 9: 512 only)
    untie_norms: tuple[bool, ...] = (False,)  # per-depth norms (the paper ties them: False)
    init_curve_ranks: tuple[int, ...] = (0, 64, 256, 576)  # ranks of the no-training perplexity curve
    # Fig. 4's references, 01's runs (read back when 01 ran first): full-size, reduced-size and Stepwise per B
    baselines: bool = True

    def validate(self):
        _items("inits", self.inits, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks)
        for key in ("lora_ranks", "zero_init_ranks", "init_curve_ranks"):
            for r in getattr(self, key):
                _at_least(key, r, 0)
        stray = set(self.zero_init_ranks) - set(self.lora_ranks) | ({0} & set(self.zero_init_ranks))
        if stray:
            raise ValueError(f"zero_init_ranks {sorted(stray)} must be nonzero members of lora_ranks {list(self.lora_ranks)}")
        super().validate()

    def runs(self):
        runs = self._relaxed()
        baselines = [self.full_size()] if self.baselines else []
        for b in self.num_blocks if self.baselines else ():
            baselines.append(self.reduced_size(b))
            baselines.append(self.run(f"stepwise B={b}", "baseline", num_blocks=b, init="stepwise",
                                      tags={"init": "stepwise", "num_blocks": b, "lora_rank": 0}))
        planned_keys = {r.key for r in runs}  # "stepwise B=b r=0" of the sweep is already 01's Stepwise run
        return [r for r in baselines if r.key not in planned_keys] + runs

    def _relaxed(self) -> list["Run"]:
        runs = []
        for b in self.num_blocks:
            for init in self.inits:
                for untie in self.untie_norms:
                    for rank in self.lora_ranks:
                        for lora_init in ("svd", "zero") if rank in self.zero_init_ranks else ("svd",):
                            name = f"{init} B={b} r={rank}" + (f" {lora_init}" if rank else "") + (" untied" if untie else "")
                            runs.append(self.run(name, num_blocks=b, init=init, lora_rank=rank, untie_norms=untie,
                                                 lora_init=lora_init if rank else "svd",
                                                 tags={"init": init, "num_blocks": b, "lora_rank": rank,
                                                       "lora_init": lora_init if rank else "-", "untie_norms": untie}))
        return runs


@dataclass(frozen=True, kw_only=True)
class Distillation(TrainingStudy):
    """03_distillation (Fig. 7b, Table 11, 12): CE vs CE + KD from the full-size model, and longer uptraining."""
    notebook: typing.ClassVar[str] = "03_distillation"
    num_blocks: tuple[int, ...] = (2,)  # B values
    init: str = "stepwise"            # the recursive model's init (Table 11, top)
    relaxed_init: str = "average"     # the relaxed model's init (Table 11, bottom)
    relaxed_lora_rank: int = 0        # its LoRA rank (Table 11: 256; 0 leaves the relaxed rows out)
    kds: tuple[str | None, ...] = (None, "fkl")  # KD divergences (None: CE only; Table 11: all four)
    teacher: str = "full-size"        # full-size (App. L: uptrained alike) | pretrained | an rrt.save dir
    long_steps: int = 90              # the longer uptraining (Table 11: 60B tokens)
    long_warmup_steps: int = 9        # its warmup (App. G: 800 for 60B)
    long_kds: tuple[str | None, ...] = ("fkl",)  # its objectives (Table 11: None, 60B alone; Table 12: fkl)

    def validate(self):
        _choice("init", self.init, INITS)
        _choice("relaxed_init", self.relaxed_init, INITS)
        _at_least("relaxed_lora_rank", self.relaxed_lora_rank, 0)
        _at_least("long_steps", self.long_steps, 1)
        for key in ("kds", "long_kds"):
            _items(key, getattr(self, key), KD_KINDS + (None,))
        self.check_num_blocks("num_blocks", self.num_blocks)
        if self.long_warmup_steps > self.long_steps:
            raise ValueError(f"long_warmup_steps={self.long_warmup_steps} exceeds long_steps={self.long_steps}")
        super().validate()

    def runs(self):
        teacher, needs = self.teacher_of(self.teacher)
        students = [(self.init, 0)] + ([(self.relaxed_init, self.relaxed_lora_rank)] if self.relaxed_lora_rank else [])
        runs = [self.full_size()] if needs else []
        for b in self.num_blocks:
            for init, rank in students:
                model = f"{init} B={b}" + (f" r={rank}" if rank else "")
                for kd in self.kds:
                    runs.append(self._kd_run(model, kd, teacher, needs, b, init, rank))
            for kd in self.long_kds:
                runs.append(self._kd_run(f"{self.init} B={b}", kd, teacher, needs, b, self.init, 0, long=True))
        return runs

    def _kd_run(self, model, kd, teacher, needs, b, init, rank, long=False):
        name = f"{model} {kd or 'ce'}" + (f" {self.long_steps} steps" if long else "")
        return self.run(name, num_blocks=b, init=init, lora_rank=rank, kd=kd,
                        teacher=teacher if kd else None, needs=needs if kd else (),
                        steps=self.long_steps if long else None,
                        warmup_steps=self.long_warmup_steps if long else None,
                        tags={"init": init, "num_blocks": b, "lora_rank": rank, "kd": kd or "ce",
                              "uptrain_steps": self.long_steps if long else self.steps})


@dataclass(frozen=True, kw_only=True)
class EarlyExit(TrainingStudy):
    """04_early_exit (Table 1, 13): Table 13's rows exactly, post-training from 01's uptrained model."""
    notebook: typing.ClassVar[str] = "04_early_exit"
    per_loop: typing.ClassVar[bool] = True
    num_blocks: tuple[int, ...] = (2,)  # B values
    init: str = "stepwise"            # the uptrained model's init (Table 13: Stepwise)
    steps: int = 15                   # post-training steps per early-exit run (App. G: 15B tokens)
    uptrain_steps: int = 60           # steps of the uptraining post-training starts from (01's run, reused)
    exit_coefficients: tuple[float, ...] = (0.1,)  # aggressive coefficients (Table 13: 0.3, 0.1, 0.05, 0.01)
    exit_coefficient: float = 0.1     # the coefficient of the KD, co-training and new-data rows (Table 13: 0.1)
    head_lora_rank: int = 8           # LM-head LoRA of the frozen rows (Table 13: 128)

    def validate(self):
        _choice("init", self.init, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks)
        _at_least("uptrain_steps", self.uptrain_steps, 1)
        _at_least("head_lora_rank", self.head_lora_rank, 1)
        for c in self.exit_coefficients + (self.exit_coefficient,):
            if not 0 <= c <= 1:
                raise ValueError(f"exit coefficient {c} out of range [0, 1]")
        if min(self.num_blocks) < 2:
            raise ValueError(f"num_blocks {list(self.num_blocks)}: early exit needs B >= 2")
        super().validate()

    def uptrained(self, b: int) -> "Run":
        """01's recursive model at this scale (CE, `uptrain_steps`): the starting point of post-training."""
        warmup = min(self.warmup_steps, self.uptrain_steps)
        return self.run(f"{self.init} B={b}", "uptrained", num_blocks=b, init=self.init, steps=self.uptrain_steps,
                        warmup_steps=warmup, tags={"init": self.init, "num_blocks": b})

    def runs(self):
        runs = []
        c = self.exit_coefficient
        for b in self.num_blocks:
            up = self.uptrained(b)
            post = dict(num_blocks=b, init=self.init, objective="early_exit", init_from=str(up.final_checkpoint))
            rows = [("post", "weighted", None, False, "all", "ovlp")]
            rows += [("post", "aggressive", x, False, "all", "ovlp") for x in self.exit_coefficients]
            rows += [("post", "weighted", None, True, "all", "ovlp"), ("post", "aggressive", c, True, "all", "ovlp"),
                     ("post", "standard", None, False, "head_lora", "ovlp"),
                     ("post", "standard", None, True, "head_lora", "ovlp"),
                     ("co", "aggressive", c, False, "all", "ovlp"), ("post", "aggressive", c, False, "all", "new")]
            runs.append(up)
            for train, scheme, coef, sd, trainable, data in rows:
                name = (f"B={b} {train} {scheme}" + (f" {coef}" if coef is not None else "") + (" +SD" if sd else "")
                        + (" frozen+head-LoRA" if trainable == "head_lora" else "") + (" new-data" if data == "new" else ""))
                fields = post if train == "post" else dict(num_blocks=b, init=self.init, objective="early_exit")
                # Table 13's "Standard" CE on a frozen model: the intermediate exit at full weight (the last loop
                # cannot change: the head LoRA acts on intermediate exits only).
                exit_scheme, coefficient = ("aggressive", 1.0) if scheme == "standard" else (scheme, coef)
                runs.append(self.run(
                    name, **fields, exit_scheme=exit_scheme, exit_coefficient=coefficient, self_distill=sd,
                    trainable=trainable, head_lora_rank=self.head_lora_rank if trainable == "head_lora" else 0,
                    data_offset=up.samples if data == "new" else 0, needs=(up.name,) if train == "post" else (),
                    tags={"init": self.init, "num_blocks": b, "training": train, "exit_scheme": scheme,
                          "exit_coefficient": "-" if coef is None else coef, "self_distill": sd,
                          "trainable": trainable, "data": data}))
        return runs


@dataclass(frozen=True, kw_only=True)
class Throughput(Study):
    """05_throughput (§3.8, Fig. 8, Tables 16–19, App. N): trained early-exit models served by the CDB engine.

    The served models are 04's early-exit recipe at this scale (aggressive `exit_coefficient` +
    self-distillation, post-trained from the uptrained Stepwise model), one per B × LoRA rank, read
    from the run store (the B, r = 0 one is 04's own run) and trained there when missing; or one
    `checkpoint`. A `bench.PAPER_CONFIGS` model name serves dummy weights (timing only, no training).
    """
    notebook: typing.ClassVar[str] = "05_throughput"
    checkpoint: str = ""              # an rrt.save directory to serve alone; empty: 04's early-exit models (below)
    runs_root: str = ""               # run store shared by every notebook; empty: outputs/runs
    num_blocks: tuple[int, ...] = (2,)  # B of the served models
    lora_ranks: tuple[int, ...] = (0,)  # per-loop LoRA ranks of the served models; r > 0 also runs its LoRA removed
    corpus: str = "wikitext2/test"    # held-out documents the requests are cut from (App. N: SlimPajama, RedPajama, PG19)
    data_source: str = "embedded"     # embedded (vendored, offline) | hub (streamed by name)
    num_requests: int = 8             # requests in the offline queue (all arrive at once, as in App. N)
    prefix_len: int = 32              # prompt tokens per request (App. N: 64 or 512)
    decode_len: int = 32              # most output tokens; each request's own length follows its text (App. N: 256/2048)
    max_active: int = 8               # live requests (KV slots) for every system
    token_budget: int = 64            # engine rows per step
    repeats: int = 3                  # timed rounds per system after a warm-up (median, min, max)
    threads: int = 1                  # torch CPU threads (1: steadier timings on a shared machine)
    kv_policies: tuple[str, ...] = ("propagate", "copy_kv")  # what exited tokens leave in deeper depths (engine.KV_POLICIES)
    exit_policies: tuple[str, ...] = ("max_prob",)  # confidence exits besides the oracle: max_prob | margin | cosine
    target_agreement: float = 0.9     # confidence thresholds: exits agree with the last loop on this share of tokens
    calibration_corpus: str = "tinystories/test"  # held-out text the thresholds are calibrated on
    arrival_rate: float = 2.0         # requests/s of the Poisson latency run (0: none)
    memory_cap_gb: float = 0.0        # Tables 16/18: largest batch within this memory (0: no cap)
    tasks: tuple[str, ...] = ("piqa",)  # few-shot tasks for the accuracy axis of Fig. 8
    task_limit: int | None = 50       # examples per task (None: the full split)

    def validate(self):
        from rrt.exits import SCORED_POLICIES
        from rrt.serving.bench import PAPER_CONFIGS
        from rrt.serving.engine import KV_POLICIES

        _items("tasks", self.tasks, tuple(TASKS))
        _items("kv_policies", self.kv_policies, KV_POLICIES)
        _items("exit_policies", self.exit_policies, SCORED_POLICIES)
        if not self.kv_policies:
            raise ValueError("kv_policies must name at least one of: " + ", ".join(KV_POLICIES))
        _choice("data_source", self.data_source, ("embedded", "hub"))
        for key in ("corpus", "calibration_corpus"):
            if "/" not in getattr(self, key):
                raise ValueError(f"{key}={getattr(self, key)!r} must be 'corpus/split', e.g. 'wikitext2/test'")
        for key in ("num_requests", "prefix_len", "decode_len", "max_active", "token_budget", "repeats", "threads"):
            _at_least(key, getattr(self, key), 1)
        for r in self.lora_ranks:
            _at_least("lora_ranks", r, 0)
        if self.task_limit is not None:
            _at_least("task_limit", self.task_limit, 1)
        if not 0 < self.target_agreement <= 1:
            raise ValueError(f"target_agreement={self.target_agreement} out of range (0, 1]")
        if self.arrival_rate < 0 or self.memory_cap_gb < 0:
            raise ValueError(f"arrival_rate and memory_cap_gb must be >= 0, got {self.arrival_rate}, {self.memory_cap_gb}")
        if not self.checkpoint:
            layers = model_config(PAPER_CONFIGS.get(self.model, self.model)).num_hidden_layers
            for b in self.num_blocks:
                check_num_blocks(layers, b)
            if min(self.num_blocks) < 2:
                raise ValueError(f"num_blocks {list(self.num_blocks)}: early exit needs B >= 2")
            if self.trains():
                self.runs()  # 04's params at this scale must load, and every run validates

    def trains(self) -> bool:
        """Whether the served models come from the run store (not a checkpoint, not dummy weights)."""
        from rrt.serving.bench import PAPER_CONFIGS
        return not self.checkpoint and self.model not in PAPER_CONFIGS

    def training(self) -> "EarlyExit":
        """04's study at this scale (its params file), for this model, store and seed: the served models' recipe."""
        return load_params("04_early_exit", self.scale, model=self.model, seed=self.seed, runs_root=self.runs_root,
                           num_blocks=list(self.num_blocks))

    def runs(self) -> list["Run"]:
        """The uptrained and early-exit runs of every served (B, r), dependencies first; [] when nothing trains."""
        return [run for pair in self.served().values() for run in pair] if self.trains() else []

    def served(self) -> dict[tuple[int, int], tuple["Run", "Run"]]:
        """{(B, r): (uptrained run, early-exit run)}: 04's aggressive + self-distillation row, with LoRA rank r."""
        ee = self.training()
        c = ee.exit_coefficient
        out = {}
        for b in self.num_blocks:
            for r in self.lora_ranks:
                tags = {"init": ee.init, "num_blocks": b, "lora_rank": r}
                up = ee.uptrained(b) if r == 0 else ee.run(
                    f"{ee.init} B={b} r={r}", "uptrained", num_blocks=b, init=ee.init, lora_rank=r,
                    steps=ee.uptrain_steps, warmup_steps=min(ee.warmup_steps, ee.uptrain_steps), tags=tags)
                post = ee.run(f"B={b} r={r} post aggressive {c} +SD", num_blocks=b, init=ee.init, lora_rank=r,
                              objective="early_exit", init_from=str(up.final_checkpoint), exit_scheme="aggressive",
                              exit_coefficient=c, self_distill=True, trainable="all", head_lora_rank=0,
                              data_offset=0, needs=(up.name,), tags=tags)
                out[(b, r)] = (up, post)
        return out


STUDIES = {cls.notebook: cls for cls in (Explore, InitAblation, RelaxationSweep, Distillation, EarlyExit, Throughput)}


# ---------------------------------------------------------------- one run of a plan

@dataclass(frozen=True)
class Run:
    """One training run of a plan: its TrainConfig (config.out is its directory in the run store) and tags."""
    name: str                 # unique within the plan, e.g. "stepwise B=2"
    role: str                 # study | baseline | uptrained (a starting point) — what the notebook shows it as
    config: TrainConfig
    tags: dict = field(default_factory=dict)  # the fields that tell it apart, for tables and plots
    needs: tuple = ()         # names of runs whose final checkpoint it reads (teacher, init_from)

    @property
    def dir(self) -> Path:
        return Path(self.config.out)

    @property
    def key(self) -> str:
        """The run's identity in the store: its directory is <model>-<key> (a hash of its config)."""
        return self.dir.name.rsplit("-", 1)[-1]

    @property
    def final_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / f"step-{self.config.steps:08d}"

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * c.num_processes * c.seq_len

    @property
    def samples(self) -> int:
        """Training sequences this run reads (its data_offset first skipped)."""
        c = self.config
        return c.steps * c.batch_size * c.grad_accum * c.num_processes

    @property
    def tokens(self) -> int:
        return self.config.steps * self.tokens_per_step

    def trained(self) -> bool:
        return (self.final_checkpoint / "model.safetensors").exists()


def plan_table(study: TrainingStudy, runs: list[Run] | None = None) -> "pd.DataFrame":
    """Return the plan as a table: what each run trains, on what, for how long, and what it costs (COST_RULE)."""
    import pandas as pd

    runs = study.runs() if runs is None else runs
    by_name = {r.name: r for r in runs}
    rows = []
    for r in runs:
        c = r.config
        flops, active = train_flops(study.model, c)
        starts = (f"{by_name[r.needs[0]].name} ({by_name[r.needs[0]].dir.name})" if c.init_from and r.needs
                  else c.init_from or ("random init" if c.baseline == "reduced" else f"convert {c.model}"))
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
            "trained": r.trained(), "run_dir": r.dir.name, "config_hash": r.key})
    return pd.DataFrame(rows)


def train_flops(model: str, config: TrainConfig) -> tuple[float, int]:
    """Return (training FLOPs, parameters per token) of one run by COST_RULE, from shapes alone."""
    shape = _shape(model, config.num_blocks if config.baseline == "reduced" else 1, config.lora_rank,
                   config.num_blocks if config.baseline is None else 1)
    full = _shape(model, 1, 0, 1)
    head = shape["head"]
    active = shape["block"] + shape["lora"] + head
    tokens = config.steps * config.batch_size * config.grad_accum * config.num_processes * (config.seq_len or 0)
    flops = 6 * active * tokens
    if config.kd:
        flops += 2 * (full["block"] + head) * tokens
    if config.objective == "early_exit":
        flops += 6 * head * (config.num_blocks - 1) * tokens
    return float(flops), int(active)


@functools.lru_cache(maxsize=64)
def _shape(model: str, reduce_by: int, lora_rank: int, num_blocks: int) -> dict:
    """Parameters a token passes through: every depth's block (L/reduce_by layers), its LoRAs, the LM head."""
    import copy
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    import rrt

    cfg = copy.deepcopy(model_config(model))
    cfg.num_hidden_layers //= reduce_by
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    counts = rrt.count_parameters(m)
    lora = 0
    if lora_rank:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamped ranks
            rec = rrt.convert(m, rrt.RecursiveSpec(num_blocks=num_blocks, lora_rank=lora_rank, lora_init="zero"))
        lora = rrt.count_parameters(rec)["lora"]
    return {"block": counts["non_embedding"], "lora": lora, "head": cfg.vocab_size * cfg.hidden_size}


# ---------------------------------------------------------------- notebooks and the command line

def resolve(notebook: str, namespace: dict) -> Study:
    """Return the notebook's study from its namespace (the parameters cell + papermill's overrides).

    papermill silently accepts a misspelt `-p num_blcks 2` as a new variable: every name that is
    not a field stops the run here, with the closest field and the allowed ones.
    """
    if notebook not in STUDIES:
        raise ValueError(f"unknown notebook {notebook!r}; known: {', '.join(STUDIES)}")
    return from_dict(notebook, {k: v for k, v in namespace.items() if _is_param(k, v)})


def from_dict(notebook: str, values: dict) -> Study:
    """Return the study of `notebook` with `values` (unknown keys named, with the closest field)."""
    cls = STUDIES[notebook]
    allowed = _fields(cls)
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown parameter {key!r}{hint} for {notebook}; allowed: {', '.join(allowed)}")
    return cls(**values)


def load_params(notebook: str, scale: str, **overrides) -> Study:
    """Return the study of params/<notebook>/<scale>.yaml, or of a YAML file's path given as `scale`
    (overrides of the dataclass defaults), then `overrides`."""
    import yaml

    path = Path(scale) if scale.endswith((".yaml", ".yml")) else REPO / "params" / notebook / f"{scale}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (REPO / "params" / notebook).glob("*.yaml"))
        raise ValueError(f"no params file {path}; scales of {notebook}: {known}")
    return from_dict(notebook, {**(yaml.safe_load(path.read_text()) or {}), **overrides})


def start(study: Study) -> Path:
    """Create the notebook's run directory; write config.json, versions.json and (training studies) plan.csv."""
    import datetime as dt

    from rrt.rundir import write_config, write_versions

    run_dir = Path(study.run_dir) if study.run_dir else (
        OUTPUTS / study.notebook / f"{study.scale}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, study.to_dict())
    write_versions(run_dir)
    recipe = planned(study)
    if recipe is not None:
        plan_table(recipe, study.runs()).to_csv(run_dir / "plan.csv", index=False)
        write_run_files(recipe, study.runs())
    return run_dir


def planned(study: Study) -> TrainingStudy | None:
    """The training study whose recipe a study's runs follow (itself; 05: 04's at its scale), or None."""
    if isinstance(study, TrainingStudy):
        return study
    if isinstance(study, Throughput) and study.trains():
        return study.training()
    return None


RUN_FILE = "run.json"


def write_run_files(study: TrainingStudy, runs: list[Run]) -> list[Path]:
    """Write <run dir>/run.json for every run: all `python -m rrt.train --config` needs to train and
    evaluate it as its own (multi-GPU) job, e.g. `accelerate launch --num_processes N -m rrt.train --config F`."""
    from rrt.studies import data_spec, evaluation_spec

    data, evaluation = data_spec(study), evaluation_spec(study)
    paths = []
    for run in runs:
        paths.append(write_json(run.dir / RUN_FILE, {
            "name": run.name, "role": run.role, "tags": run.tags, "needs": list(run.needs),
            "config": run.config.to_dict(), "data": data, "evaluation": evaluation}))
    return paths


def read_run_file(path: str | Path) -> tuple[Run, dict, dict]:
    """Return (run, data spec, evaluation spec) from a run.json written by `write_run_files`."""
    spec = read_json(path)
    if spec is None:
        raise ValueError(f"no run file {path}: write it with `make sweep` or rrt.plans.start")
    run = Run(name=spec["name"], role=spec["role"], config=TrainConfig.from_dict(spec["config"]), tags=spec["tags"],
              needs=tuple(spec["needs"]))
    return run, spec["data"], spec["evaluation"]


def execute_run(path: str | Path):
    """Train and evaluate the run of a run.json (`python -m rrt.train --config`): the cluster's unit of work.

    Under a multi-process launcher every process trains (DDP/ZeRO); each node's first process packs
    the data while the others wait; the main process evaluates and writes the run's results file.
    """
    import torch
    from accelerate import PartialState

    from rrt.models import load_model
    from rrt.studies import execute, study_data

    run, data, evaluation = read_run_file(path)
    original, tokenizer = load_model(run.config.model)
    with PartialState(cpu=not torch.cuda.is_available()).local_main_process_first():
        packed = study_data(data, tokenizer)
    results = execute(run, original=original, tokenizer=tokenizer, data=packed, evaluation=evaluation)
    if results:
        print(f"run {run.name!r} done: {run.dir}")
    return results


def main(argv=None):
    """`make plan NB=01_init_ablation SCALE=paper-gemma-2b`: print the plan; loads no weights."""
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("notebook", choices=sorted(STUDIES))
    parser.add_argument("scale", help=f"a params file: {', '.join(SCALES)}, or the path of a YAML file")
    parser.add_argument("--csv", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        study = load_params(args.notebook, args.scale)
    except (ValueError, TypeError) as err:  # a bad plan: its message names the key, no traceback needed
        parser.exit(2, f"{parser.prog}: bad plan {args.notebook} {args.scale}: {err}\n")
    recipe = planned(study)
    if recipe is None:
        print(f"{args.notebook} trains nothing; its parameters:\n{json.dumps(study.to_dict(), indent=2)}")
        return None
    table = plan_table(recipe, study.runs())
    show = table.drop(columns=["config_hash", "batch_size", "grad_accum", "active_params"])
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        print(show.to_string(index=False, formatters={"tokens": _tokens, "tokens_per_step": _tokens,
                                                       "flops": "{:.2e}".format, "h100_hours": "{:,.1f}".format}))
    todo = table[~table.trained]
    print(f"\n{len(table)} runs ({len(todo)} to train), {_tokens(table.tokens.sum())} tokens, "
          f"{table.flops.sum():.2e} FLOPs, {table.h100_hours.sum():,.0f} H100 hours "
          f"({todo.h100_hours.sum():,.0f} still to spend); {COST_RULE}.\nrun store: {_shown(recipe.store())}")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return table


# ---------------------------------------------------------------- helpers

def _fields(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _check_types(study) -> None:
    hints = typing.get_type_hints(type(study))
    for name in _fields(study):
        value, kind = getattr(study, name), hints[name]
        if not _is_a(value, kind):
            hint = ""
            if isinstance(value, str) and typing.get_origin(kind) is tuple:
                hint = f"; papermill -p passes text, pass lists with -y '{{{name}: [...]}}' or in a params file"
            raise TypeError(f"parameter {name}={value!r} must be {_type_name(kind)}, got {type(value).__name__}{hint}")


def _is_a(value, kind) -> bool:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, k) for k in typing.get_args(kind))
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, (list, tuple)) and all(_is_a(v, item) for v in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return "None" if kind is type(None) else kind.__name__


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"parameter {name}={value!r} is not allowed; allowed: {', '.join(map(str, valid))}")


def _items(name, values, valid):
    for v in values:
        if v not in valid:
            raise ValueError(f"parameter {name} holds {v!r}; allowed items: {', '.join(map(str, valid))}")


def _at_least(name, value, low):
    if value < low:
        raise ValueError(f"parameter {name}={value!r} must be >= {low}")


def _is_param(name, value):
    return not (name.startswith("_") or name in {"In", "Out", "get_ipython", "exit", "quit"}
                or isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value))


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.split("/")[-1])


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _tokens(n) -> str:
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


if __name__ == "__main__":
    main()
