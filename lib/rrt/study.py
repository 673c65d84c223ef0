"""The fields every study shares (`Study`) and every study that uptrains (`TrainingStudy`); one class per
notebook derives from them in `rrt.plans`. A field named like a `TrainConfig`/`RecursiveSpec` field means that
field. Batches are global: `global_batch_size` sequences per optimiser step over all processes (grad_accum derived).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import torch

from rrt.data import check_corpus
from rrt.devices import resolve_device
from rrt.evaluation import TASKS
from rrt.models import model_config
from rrt.recipes import PAPER_MODELS
from rrt.runs.memory import fit_memory
from rrt.runs.store import PRETRAINED, DataSpec, EvalSpec, Run, make_run
from rrt.trainconfig import TrainConfig
from rrt.spec import (check_at_least, check_choice, check_items, check_num_blocks, check_types, expand_home,
                       valid_num_blocks)

SCALES = ("smoke", "cpu", *PAPER_MODELS)
OUTPUTS = Path(__file__).resolve().parents[2] / "outputs"


# ---------------------------------------------------------------- the fields every study shares

@dataclasses.dataclass(frozen=True, kw_only=True)
class Study:
    """What every notebook shares: which model, where to write, the seed."""
    scale: str = "cpu"                # smoke | cpu | paper-gemma-2b | paper-tinyllama-1.1b | paper-pythia-1b
    model: str = "smollm2-135m"       # rrt.load_model source: what is converted
    run_dir: str = ""                 # tables and figures of this notebook; empty: outputs/<notebook>/<scale>-<time>
    seed: int = 0                     # data order, random init, LoRA A matrices
    device: str = "auto"              # where models load, evaluate and serve: auto (CUDA when torch sees a GPU) |
                                      # cpu | cuda; training follows accelerate (CUDA when present) whatever this says

    notebook: typing.ClassVar[str] = ""
    per_loop: typing.ClassVar[bool] = False  # evaluate every loop exit (static exiting, §3.7), not the last only
    paths: typing.ClassVar[tuple[str, ...]] = ("model", "run_dir")  # fields that may name a path: `~` expanded

    def __post_init__(self):
        check_types(self)
        for f in dataclasses.fields(self):  # YAML gives lists (of lists); a frozen study holds tuples (of tuples)
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, _tuples(getattr(self, f.name)))
        expand_home(self, self.paths)
        check_choice("scale", self.scale, SCALES)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.torch_device()  # an unknown name, or "cuda" where torch sees no GPU, stops here
        self.validate()

    def validate(self) -> None:
        """Raise naming the bad field; subclasses add their own rules."""

    def torch_device(self) -> torch.device:
        """The torch device `device` names ("auto": CUDA when torch sees a GPU, else the CPU)."""
        return resolve_device(self.device)

    def runs(self) -> list[Run]:
        """Return the plan: every training run, dependencies before the runs that read them (computed once)."""
        if "_runs" not in self.__dict__:  # frozen: the cache is set past the dataclass's __setattr__
            object.__setattr__(self, "_runs", tuple(self._plan()))
        return list(self._runs)

    def _plan(self) -> list[Run]:
        """Build the plan (`runs` caches it); subclasses that train define it."""
        return []

    def to_dict(self) -> dict:
        return {"notebook": self.notebook, **{f.name: _lists(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def check_num_blocks(self, key: str, values, *, least: int = 1, needs: str = "", empty: bool = False) -> None:
        """Raise naming `key`, the value and the valid ones unless every B in `values` is an int >= `least` (`needs`
        says why, when over 1) dividing the model's layer count (a paper-* name: its shape's); an empty `values`
        too, unless `empty` (a field whose docs say empty means none of its runs)."""
        layers = model_config(PAPER_MODELS[self.model].model if self.model in PAPER_MODELS else self.model
                              ).num_hidden_layers
        if not values and not empty:  # a grid over no B would plan nothing, or fail reading its first B
            valid = ", ".join(map(str, valid_num_blocks(layers, least)))
            raise ValueError(f"{key} is empty: give at least one B; valid values: {valid} "
                             f"({self.model} has {layers} layers)")
        for b in values:
            try:
                check_num_blocks(layers, b, least=least, needs=needs)
            except ValueError as err:
                raise ValueError(f"{key}: {err} ({self.model} has {layers} layers)") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStudy(Study):
    """The fields of a study that uptrains models (App. G), in TrainConfig's names."""
    runs_root: str = ""               # run store shared by every notebook; empty: outputs/runs
    read_only: bool = False           # read finished runs only: a run not done stops here, named (the sweep's collect job)
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
    gpu_memory_gb: float = 0          # memory per GPU: >0 sizes each run to fit 90% of it (micro-batch, checkpointing,
                                      # loss chunks, bf16 teacher, FSDP; rrt.runs.memory); 0: batch_size as given
    lr: float = 2e-4                  # AdamW peak learning rate (App. G)
    warmup_steps: int = 6             # linear warmup steps, then cosine decay (App. G: 200; 800 for 60B)
    tasks: tuple[str, ...] = ("arc_easy", "piqa")  # few-shot tasks (clusters: all seven)
    task_limit: int | None = 20       # examples per task (None: the full split)

    paths: typing.ClassVar[tuple[str, ...]] = (*Study.paths, "runs_root", "teacher")

    def validate(self):
        check_choice("data_source", self.data_source, ("embedded", "hub"))
        check_corpora(f"train_corpus={self.train_corpus!r}, train_split={self.train_split!r}",
                      [f"{self.train_corpus}/{self.train_split}"], self.data_source)
        check_corpora("eval_corpora", self.eval_corpora, self.data_source)
        check_items("tasks", self.tasks, tuple(TASKS))
        for name in ("seq_len", "max_eval_seqs", "steps", "global_batch_size", "batch_size", "gpus_per_run"):
            check_at_least(name, getattr(self, name), 2 if name == "seq_len" else 1)
        for name in ("max_train_seqs", "task_limit"):
            if getattr(self, name) is not None:
                check_at_least(name, getattr(self, name), 1)
        if self.global_batch_size % (self.batch_size * self.gpus_per_run):
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of batch_size × "
                             f"gpus_per_run = {self.batch_size} × {self.gpus_per_run}; grad_accum must be whole")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.gpu_memory_gb < 0:
            raise ValueError(f"gpu_memory_gb must be >= 0 (0: no memory planning), got {self.gpu_memory_gb}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        runs = self.runs()  # every run's TrainConfig validates itself (and names its field) here
        reads = max((r.config.data_offset + r.samples for r in runs), default=0)
        if self.data_source == "hub" and (self.max_train_seqs or 0) < reads:
            # A run's sample order is a permutation of the packed set: every notebook of a scale must pack the
            # same set for a shared run (01's uptrained model in 04) to be the same run, and none may wrap around.
            raise ValueError(f"max_train_seqs={self.max_train_seqs}: a hub corpus needs an explicit number of packed "
                             f"sequences, at least the {reads} this plan reads (the same in every notebook of a scale)")

    def store(self) -> Path:
        return Path(self.runs_root or OUTPUTS / "runs").resolve()

    def data_spec(self) -> DataSpec:
        """What to pack: corpora, length, and how many training sequences (a hub corpus: max_train_seqs, which
        validation checks covers the furthest-reading run; never all of SlimPajama)."""
        return DataSpec(train_corpus=self.train_corpus, train_split=self.train_split, data_source=self.data_source,
                        seq_len=self.seq_len, max_train_seqs=self.max_train_seqs, eval_corpora=self.eval_corpora,
                        max_eval_seqs=self.max_eval_seqs)

    def eval_spec(self) -> EvalSpec:
        """What a finished run is evaluated on (its results file is keyed by this)."""
        return EvalSpec(eval_corpora=self.eval_corpora, max_eval_seqs=self.max_eval_seqs, seq_len=self.seq_len,
                        data_source=self.data_source, tasks=self.tasks, task_limit=self.task_limit,
                        per_loop=self.per_loop)

    def run(self, name: str, role: str = "study", *, steps: int | None = None, warmup_steps: int | None = None,
            seed: int | None = None, tags: dict | None = None, needs: tuple = (), **fields) -> Run:
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
        if self.gpu_memory_gb:  # batch split, checkpointing and teacher dtype enter the run's hash; the rest not
            config.update(fit_memory(TrainConfig(out="", **config), gpu_memory_gb=self.gpu_memory_gb, name=name))
        return make_run(self.store(), name=name, role=role, tags={**(tags or {}), "seed": seed}, needs=needs, **config)

    def full_size(self, steps: int | None = None, warmup_steps: int | None = None, tags: dict | None = None) -> Run:
        """The full-size model uptrained with the same recipe (CE): Fig. 4/5's reference and App. L's teacher;
        `steps`: uptrained longer instead (Table 12's 60B reference)."""
        return self.run("full-size" + (f" {steps} steps" if steps else ""), "baseline", num_blocks=1, baseline="full",
                        steps=steps, warmup_steps=warmup_steps, tags={"baseline": "full", **(tags or {})})

    def pretrained(self, tags: dict | None = None) -> Run:
        """The original checkpoint itself as a run: evaluated with the plan's evaluation, never trained (role
        "pretrained": Table 12's full-size TinyLlama). Its config trains nothing (steps=1 is TrainConfig's floor)
        and reads no data, so its key differs from every trained run's."""
        return make_run(self.store(), name="full-size (pretrained)", role=PRETRAINED, needs=(),
                        tags={"baseline": "full", "pretrained": True, **(tags or {}), "seed": self.seed},
                        model=self.model, baseline="full", num_blocks=1, steps=1, seq_len=self.seq_len, seed=self.seed)

    def reduced_size(self, b: int) -> Run:
        """The reduced-size model (L/B layers, trained from scratch with the same recipe): Fig. 4/5's other reference."""
        return self.run(f"reduced-size B={b}", "baseline", num_blocks=b, baseline="reduced",
                        tags={"baseline": "reduced", "num_blocks": b})

    def teacher_of(self, teacher: str) -> tuple[str | None, tuple]:
        """Return (TrainConfig.teacher, the runs it needs) for a study's `teacher` field."""
        if teacher == "full-size":
            run = self.full_size()
            return str(run.final_checkpoint), (run.name,)
        return (None, ()) if teacher == "pretrained" else (teacher, ())


def _tuples(value):
    """Lists, nested too, as tuples (a frozen study's fields)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _lists(value):
    """Tuples, nested too, as lists (JSON and the parameters cell)."""
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_corpora(key: str, names, source: str) -> None:
    """Raise ValueError naming `key`, the bad name and the known ones unless every "corpus/split" in `names` is a
    corpus of `source` (a name without a split means its test split, as `load_data` reads it)."""
    for name in names:
        corpus, _, split = name.partition("/")
        try:
            check_corpus(corpus, split or "test", source=source)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
