"""Study plans: one frozen dataclass per notebook, whose fields *are* the notebook's parameters.

A study validates itself completely when it is built, from the model's config alone (no weights);
`study.runs()` expands it into the plan, the explicit list of `rrt.runs.Run`s (computed once). A field
named like a `TrainConfig`/`RecursiveSpec` field means that field; a grid axis takes the plural
(`inits`, `lora_ranks`; `num_blocks` is its own plural, a list in every study that trains). Batches
are global: `global_batch_size` sequences per optimiser step over all processes (grad_accum derived).
"""
from __future__ import annotations

import dataclasses
import typing

from rrt.evaluation import TASKS
from rrt.exits import POLICIES, SCORED_POLICIES
from rrt.losses import KD_KINDS
from rrt.params import read_params
from rrt.recipes import PAPER_MODELS, TABLE13
from rrt.runs.store import Run
from rrt.serving.engine import KV_POLICIES
from rrt.spec import INITS, check_at_least, check_choice, check_items
from rrt.study import Study, TrainingStudy

# Fig. 11 (App. I), InitAblation.variants: each variant's (init, norm_init)
INIT_VARIANTS = {"stepwise_start": ("stepwise_start", None), "norm_choice": ("average", "choice"),
                 "norm_zero": ("average", "zero")}


# ---------------------------------------------------------------- one class per notebook

@dataclasses.dataclass(frozen=True, kw_only=True)
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
        check_choice("init", self.init, INITS)
        check_choice("exit_policy", self.exit_policy, [p for p in POLICIES if p != "oracle"])
        check_at_least("lora_rank", self.lora_rank, 0)
        check_at_least("max_new_tokens", self.max_new_tokens, 1)
        if not 0 <= self.exit_threshold <= 1:
            raise ValueError(f"exit_threshold={self.exit_threshold} out of range [0, 1]")
        self.check_num_blocks("num_blocks", (self.num_blocks,))


@dataclasses.dataclass(frozen=True, kw_only=True)
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
        check_items("inits", self.inits, INITS)
        check_items("variants", self.variants, tuple(INIT_VARIANTS))
        stray = sorted(set(self.repeat_inits) - set(self.inits))
        if stray:
            raise ValueError(f"repeat_inits {stray} are not in inits {list(self.inits)}")
        self.check_num_blocks("num_blocks", self.num_blocks)
        for seed in self.repeat_seeds:
            check_at_least("repeat_seeds", seed, 0)
        if self.seed in self.repeat_seeds or len(set(self.repeat_seeds)) < len(self.repeat_seeds):
            raise ValueError(f"repeat_seeds {list(self.repeat_seeds)} must be distinct and differ from seed={self.seed}")
        if self.kd is not None:
            check_choice("kd", self.kd, KD_KINDS)
        super().validate()

    def _plan(self):
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
        check_items("inits", self.inits, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks)
        for key in ("lora_ranks", "zero_init_ranks", "init_curve_ranks"):
            for r in getattr(self, key):
                check_at_least(key, r, 0)
        stray = set(self.zero_init_ranks) - set(self.lora_ranks) | ({0} & set(self.zero_init_ranks))
        if stray:
            raise ValueError(f"zero_init_ranks {sorted(stray)} must be nonzero members of lora_ranks {list(self.lora_ranks)}")
        super().validate()

    def _plan(self):
        runs = self._relaxed()
        baselines = [self.full_size()] if self.baselines else []
        for b in self.num_blocks if self.baselines else ():
            baselines.append(self.reduced_size(b))
            baselines.append(self.run(f"stepwise B={b}", "baseline", num_blocks=b, init="stepwise",
                                      tags={"init": "stepwise", "num_blocks": b, "lora_rank": 0}))
        planned_keys = {r.key for r in runs}  # "stepwise B=b r=0" of the sweep is already 01's Stepwise run
        return [r for r in baselines if r.key not in planned_keys] + runs

    def _relaxed(self) -> list[Run]:
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
        check_choice("init", self.init, INITS)
        check_choice("relaxed_init", self.relaxed_init, INITS)
        check_at_least("relaxed_lora_rank", self.relaxed_lora_rank, 0)
        check_at_least("long_steps", self.long_steps, 1)
        for key in ("kds", "long_kds"):
            check_items(key, getattr(self, key), KD_KINDS + (None,))
        self.check_num_blocks("num_blocks", self.num_blocks)
        if self.long_warmup_steps > self.long_steps:
            raise ValueError(f"long_warmup_steps={self.long_warmup_steps} exceeds long_steps={self.long_steps}")
        super().validate()

    def _plan(self):
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
        check_choice("init", self.init, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks)
        check_at_least("uptrain_steps", self.uptrain_steps, 1)
        check_at_least("head_lora_rank", self.head_lora_rank, 1)
        for c in self.exit_coefficients + (self.exit_coefficient,):
            if not 0 <= c <= 1:
                raise ValueError(f"exit coefficient {c} out of range [0, 1]")
        if min(self.num_blocks) < 2:
            raise ValueError(f"num_blocks {list(self.num_blocks)}: early exit needs B >= 2")
        super().validate()

    def uptrained(self, b: int) -> Run:
        """01's recursive model at this scale (CE, `uptrain_steps`): the starting point of post-training."""
        warmup = min(self.warmup_steps, self.uptrain_steps)
        return self.run(f"{self.init} B={b}", "uptrained", num_blocks=b, init=self.init, steps=self.uptrain_steps,
                        warmup_steps=warmup, tags={"init": self.init, "num_blocks": b})

    def _plan(self):
        runs = []
        c = self.exit_coefficient
        for b in self.num_blocks:
            up = self.uptrained(b)
            post = dict(num_blocks=b, init=self.init, objective="early_exit", init_from=str(up.final_checkpoint))
            # Table 13's rows in its order: its aggressive sweep at `exit_coefficients`, its other 0.1 rows at `c`
            sweep = [("post", "aggressive", x, False, False, "ovlp") for x in self.exit_coefficients]
            rest = [row[:2] + (c if row[2] is not None else None,) + row[3:] for row in TABLE13[5:]]
            runs.append(up)
            for train, scheme, coef, sd, frozen, data in [TABLE13[0], *sweep, *rest]:
                trainable = "head_lora" if frozen else "all"
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Throughput(Study):
    """05_throughput (§3.8, Fig. 8, Tables 16–19, App. N): trained early-exit models served by the CDB engine.

    The served models are 04's early-exit recipe at this scale (aggressive `exit_coefficient` +
    self-distillation, post-trained from the uptrained Stepwise model), one per B × LoRA rank, read
    from the run store (the B, r = 0 one is 04's own run) and trained there when missing; or one
    `checkpoint`. A `paper-*` scale name as `model` (recipes.PAPER_MODELS) serves that model's shape with dummy
    weights (timing only, no training).
    """
    notebook: typing.ClassVar[str] = "05_throughput"
    checkpoint: str = ""              # an rrt.save directory to serve alone; empty: 04's early-exit models (below)
    runs_root: str = ""               # run store shared by every notebook; empty: outputs/runs
    read_only: bool = False           # read finished runs only: a run not done stops here, named (the sweep's collect job)
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
        check_items("tasks", self.tasks, tuple(TASKS))
        check_items("kv_policies", self.kv_policies, KV_POLICIES)
        check_items("exit_policies", self.exit_policies, SCORED_POLICIES)
        if not self.kv_policies:
            raise ValueError("kv_policies must name at least one of: " + ", ".join(KV_POLICIES))
        check_choice("data_source", self.data_source, ("embedded", "hub"))
        for key in ("corpus", "calibration_corpus"):
            if "/" not in getattr(self, key):
                raise ValueError(f"{key}={getattr(self, key)!r} must be 'corpus/split', e.g. 'wikitext2/test'")
        for key in ("num_requests", "prefix_len", "decode_len", "max_active", "token_budget", "repeats", "threads"):
            check_at_least(key, getattr(self, key), 1)
        for r in self.lora_ranks:
            check_at_least("lora_ranks", r, 0)
        if self.task_limit is not None:
            check_at_least("task_limit", self.task_limit, 1)
        if not 0 < self.target_agreement <= 1:
            raise ValueError(f"target_agreement={self.target_agreement} out of range (0, 1]")
        if self.arrival_rate < 0 or self.memory_cap_gb < 0:
            raise ValueError(f"arrival_rate and memory_cap_gb must be >= 0, got {self.arrival_rate}, {self.memory_cap_gb}")
        if not self.checkpoint:
            self.check_num_blocks("num_blocks", self.num_blocks)
            if min(self.num_blocks) < 2:
                raise ValueError(f"num_blocks {list(self.num_blocks)}: early exit needs B >= 2")
            if self.trains():
                self.runs()  # 04's params at this scale must load, and every run validates
        self._check_packed()

    def _check_packed(self):
        """A hub corpus is read from the packed held-out sets of the served models' recipe (`make pack`), offline."""
        if self.data_source != "hub" or self.model in PAPER_MODELS:  # dummy weights: random ids, no text
            return
        packed = self.training().eval_corpora if self.trains() else ()
        for key in ("corpus", "calibration_corpus"):
            if getattr(self, key) not in packed:
                raise ValueError(f"{key}={getattr(self, key)!r} with data_source='hub' is read from the held-out sets "
                                 f"`make pack NB=05_throughput` writes, 04's eval_corpora at this scale: "
                                 f"{list(packed) or 'none (a checkpoint trains nothing: nothing is packed)'}")

    def trains(self) -> bool:
        """Whether the served models come from the run store (not a checkpoint, not dummy weights)."""
        return not self.checkpoint and self.model not in PAPER_MODELS

    def training(self) -> "EarlyExit":
        """04's study at this scale (its params file), for this model, store and seed: the served models' recipe
        (read and validated once: the plan, notebook.start and the served models all ask for it)."""
        if "_training" not in self.__dict__:
            object.__setattr__(self, "_training", EarlyExit(**{
                **read_params("04_early_exit", self.scale), "model": self.model, "seed": self.seed,
                "runs_root": self.runs_root, "num_blocks": list(self.num_blocks)}))
        return self._training

    def _plan(self) -> list[Run]:
        """The uptrained and early-exit runs of every served (B, r), dependencies first; [] when nothing trains."""
        return [run for pair in self.served().values() for run in pair] if self.trains() else []

    def served(self) -> dict[tuple[int, int], tuple[Run, Run]]:
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

