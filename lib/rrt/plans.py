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
from rrt.recipes import PAPER_MODELS, TABLE8_INIT, TABLE12_KD, TABLE13
from rrt.runs.store import Run
from rrt.serving.engine import KV_POLICIES
from rrt.spec import INITS, RANK_GROUPS, check_at_least, check_choice, check_items
from rrt.study import Study, TrainingStudy, check_corpora

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
    module_rank_sets: tuple[tuple[int, ...], ...] = ()  # Table 8: Average + SVD runs with per-module LoRA ranks
                                      # (q, kv, o, mlp), one run per set and B (the paper: Gemma only)
    # Fig. 4's references, 01's runs (read back when 01 ran first): full-size, reduced-size and Stepwise per B
    baselines: bool = True

    def validate(self):
        check_items("inits", self.inits, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks)
        for key in ("lora_ranks", "zero_init_ranks", "init_curve_ranks"):
            for r in getattr(self, key):
                check_at_least(key, r, 0)
        for ranks in self.module_rank_sets:
            if len(ranks) != len(RANK_GROUPS) or min(ranks) < 0 or max(ranks) == 0:
                raise ValueError(f"module_rank_sets holds {list(ranks)}: each set is {len(RANK_GROUPS)} ranks >= 0 "
                                 f"({', '.join(RANK_GROUPS)}), not all 0")
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
            for ranks in self.module_rank_sets:  # Table 8; tag module_ranks "q/kv/o/mlp"
                label = "/".join(map(str, ranks))
                runs.append(self.run(f"{TABLE8_INIT} B={b} ranks={label}", num_blocks=b, init=TABLE8_INIT,
                                     lora_rank=max(ranks), module_ranks=tuple(ranks),
                                     tags={"init": TABLE8_INIT, "num_blocks": b, "lora_rank": max(ranks),
                                           "lora_init": "svd", "untie_norms": False, "module_ranks": label}))
        return runs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Distillation(TrainingStudy):
    """03_distillation (Fig. 7b, 17, Table 11, 12): CE vs CE + KD from the full-size model, longer uptraining, and
    the final models (Table 12: `long_steps` + FKL; their references: full-size longer, and 75B; reduced-size)."""
    notebook: typing.ClassVar[str] = "03_distillation"
    num_blocks: tuple[int, ...] = (2,)  # B values of Table 11's grid
    init: str = "stepwise"            # the recursive model's init (Table 11, top; Table 12's r = 0 models)
    relaxed_init: str = "average"     # the relaxed model's init (Table 11, bottom; Table 12's r > 0 models)
    relaxed_lora_rank: int = 0        # its LoRA rank (Table 11: 256; 0 leaves the relaxed rows out)
    kds: tuple[str | None, ...] = (None, "fkl")  # KD divergences (None: CE only; Table 11: all four)
    teacher: str = "full-size"        # full-size (App. L: uptrained alike) | pretrained | an rrt.save dir
    long_steps: int = 90              # the longer uptraining (Table 11, 12: 60B tokens)
    long_warmup_steps: int = 9        # its warmup (App. G: 800 for 60B)
    long_kds: tuple[str | None, ...] = ("fkl",)  # Table 11's objectives at long_steps (None: its 60B CE row; fkl:
                                      # Table 12's Stepwise model at num_blocks, listed once, as final)
    kd_ablation: bool = True          # Table 11's grid (kds × both models, long_kds); the paper ran it on Gemma only
    final_num_blocks: tuple[int, ...] = (2, 3)  # Table 12's B values (Gemma 2, 3; the others 2); empty: no Table 12
    final_lora_ranks: tuple[int, ...] = (0, 64)  # Table 12's ranks: 0 the `init` model, r > 0 `relaxed_init` + SVD
                                      # LoRA (Table 12: 0, 64, 128, 256, 512); each long_steps + FKL from `teacher`
    final_full_size: str = "uptrained"  # Table 12's full-size reference: uptrained (long_steps CE, and post_steps
                                      # more on new tokens: Table 14's 75B) | pretrained (the original: TinyLlama)
    post_steps: int = 15              # the 75B full-size's steps past long_steps (App. M: 15B, as 04's post-training)

    def validate(self):
        check_choice("init", self.init, INITS)
        check_choice("relaxed_init", self.relaxed_init, INITS)
        check_choice("final_full_size", self.final_full_size, ("uptrained", "pretrained"))
        check_at_least("relaxed_lora_rank", self.relaxed_lora_rank, 0)
        check_at_least("long_steps", self.long_steps, 1)
        check_at_least("post_steps", self.post_steps, 1)
        for key in ("kds", "long_kds"):
            check_items(key, getattr(self, key), KD_KINDS + (None,))
        for r in self.final_lora_ranks:
            check_at_least("final_lora_ranks", r, 0)
        self.check_num_blocks("num_blocks", self.num_blocks)
        self.check_num_blocks("final_num_blocks", self.final_num_blocks, least=2, needs="a recursive model",
                              empty=True)
        if self.long_warmup_steps > self.long_steps:
            raise ValueError(f"long_warmup_steps={self.long_warmup_steps} exceeds long_steps={self.long_steps}")
        super().validate()

    def _plan(self):
        teacher, needs = self.teacher_of(self.teacher)
        final = self._table12()
        keys = {r.key for r in final}  # a Table 11 run that is a final model (60B + FKL) is listed once, as final
        runs = [self.full_size()] if needs else []
        return runs + [r for r in self._table11(teacher, needs) if r.key not in keys] + final

    def _table11(self, teacher, needs) -> list[Run]:
        if not self.kd_ablation:
            return []
        students = [(self.init, 0)] + ([(self.relaxed_init, self.relaxed_lora_rank)] if self.relaxed_lora_rank else [])
        runs = []
        for b in self.num_blocks:
            for init, rank in students:
                model = f"{init} B={b}" + (f" r={rank}" if rank else "")
                for kd in self.kds:
                    runs.append(self._kd_run(model, kd, teacher, needs, b, init, rank))
            for kd in self.long_kds:
                runs.append(self._kd_run(f"{self.init} B={b}", kd, teacher, needs, b, self.init, 0, long=True))
        return runs

    def _kd_run(self, model, kd, teacher, needs, b, init, rank, long=False, tags=None):
        name = f"{model} {kd or 'ce'}" + (f" {self.long_steps} steps" if long else "")
        return self.run(name, num_blocks=b, init=init, lora_rank=rank, kd=kd,
                        teacher=teacher if kd else None, needs=needs if kd else (),
                        steps=self.long_steps if long else None,
                        warmup_steps=self.long_warmup_steps if long else None,
                        tags={"init": init, "num_blocks": b, "lora_rank": rank, "kd": kd or "ce",
                              "uptrain_steps": self.long_steps if long else self.steps, **(tags or {})})

    def final_model(self, b: int, rank: int) -> Run:
        """Table 12's model at B=b: rank 0 the `init` recursive model, rank > 0 `relaxed_init` with SVD LoRA of that
        rank; long_steps of CE + FKL from `teacher` (04's App. M post-trains it)."""
        teacher, needs = self.teacher_of(self.teacher)
        init = self.relaxed_init if rank else self.init
        return self._kd_run(f"{init} B={b}" + (f" r={rank}" if rank else ""), TABLE12_KD, teacher, needs, b, init,
                            rank, long=True, tags={"final": True})

    def _table12(self) -> list[Run]:
        """Table 12 / Fig. 17: the final models and their references (the full-size model as long, then 15B more
        on new tokens, or the original checkpoint; the reduced-size model at the first B, long + FKL, from scratch)."""
        if not self.final_num_blocks:
            return []
        final = {"uptrain_steps": self.long_steps, "final": True}
        if self.final_full_size == "pretrained":
            runs = [self.pretrained(tags={"final": True})]
        else:
            full = self.full_size(self.long_steps, self.long_warmup_steps, tags=final)
            runs = [full, self.run(f"full-size {self.long_steps}+{self.post_steps} steps", "baseline", num_blocks=1,
                                   baseline="full", init_from=str(full.final_checkpoint), needs=(full.name,),
                                   steps=self.post_steps, warmup_steps=min(self.warmup_steps, self.post_steps),
                                   data_offset=full.samples,
                                   tags={"baseline": "full", "uptrain_steps": self.long_steps + self.post_steps,
                                         "final": True})]
        teacher, needs = self.teacher_of(self.teacher)
        b = self.final_num_blocks[0]
        runs.append(self.run(f"reduced-size B={b} {TABLE12_KD} {self.long_steps} steps", "baseline", num_blocks=b,
                             baseline="reduced", kd=TABLE12_KD, teacher=teacher, needs=needs, steps=self.long_steps,
                             warmup_steps=self.long_warmup_steps,
                             tags={"baseline": "reduced", "num_blocks": b, "kd": TABLE12_KD, **final}))
        return runs + [self.final_model(b, r) for b in self.final_num_blocks for r in self.final_lora_ranks]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyExit(TrainingStudy):
    """04_early_exit (Table 1, 13, 14, 15): Table 13's rows exactly, post-training from 01's uptrained model; App. M:
    03's final models (Table 12) post-trained for early exit on new tokens past their uptraining's."""
    notebook: typing.ClassVar[str] = "04_early_exit"
    per_loop: typing.ClassVar[bool] = True
    num_blocks: tuple[int, ...] = (2,)  # B values of Table 13's rows
    init: str = "stepwise"            # the uptrained model's init (Table 13: Stepwise)
    steps: int = 15                   # post-training steps per early-exit run (App. G: 15B tokens)
    uptrain_steps: int = 60           # steps of the uptraining post-training starts from (01's run, reused)
    exit_coefficients: tuple[float, ...] = (0.1,)  # aggressive coefficients (Table 13: 0.3, 0.1, 0.05, 0.01)
    exit_coefficient: float = 0.1     # the coefficient of the KD, co-training and new-data rows (Table 13: 0.1)
                                      # and of App. M's recursive (r = 0) models
    head_lora_rank: int = 8           # LM-head LoRA of the frozen rows (Table 13: 128)
    exit_ablation: bool = True        # Table 13's rows; the paper ran them on Gemma only
    relaxed_exit_coefficients: tuple[float, ...] = (0.1, 0.3)  # App. M's relaxed (r > 0) models, each coefficient
                                      # (Tables 14-15: 0.1 and 0.3); aggressive CE + self-distillation, new tokens
    no_self_distill_blocks: tuple[int, ...] = ()  # B whose relaxed models post-train without self-distillation
                                      # (Table 14: Gemma's B=3, out of memory with it)

    def validate(self):
        check_choice("init", self.init, INITS)
        self.check_num_blocks("num_blocks", self.num_blocks, least=2, needs="early exit")
        check_at_least("uptrain_steps", self.uptrain_steps, 1)
        check_at_least("head_lora_rank", self.head_lora_rank, 1)
        for c in self.exit_coefficients + self.relaxed_exit_coefficients + (self.exit_coefficient,):
            if not 0 <= c <= 1:
                raise ValueError(f"exit coefficient {c} out of range [0, 1]")
        super().validate()

    def uptrained(self, b: int) -> Run:
        """01's recursive model at this scale (CE, `uptrain_steps`): the starting point of Table 13's post-training."""
        warmup = min(self.warmup_steps, self.uptrain_steps)
        return self.run(f"{self.init} B={b}", "uptrained", num_blocks=b, init=self.init, steps=self.uptrain_steps,
                        warmup_steps=warmup, tags={"init": self.init, "num_blocks": b})

    def uptraining(self) -> Distillation:
        """03's study at this scale (its params file; Table 11's grid off) with this study's recipe, `uptrain_steps`
        as its steps: where App. M's models and references come from (read and validated once)."""
        if "_uptraining" not in self.__dict__:
            recipe = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingStudy)
                      if f.name not in ("run_dir", "steps", "warmup_steps")}
            object.__setattr__(self, "_uptraining", Distillation(**{
                **read_params("03_distillation", self.scale), **recipe, "kd_ablation": False,
                "steps": self.uptrain_steps, "warmup_steps": min(self.warmup_steps, self.uptrain_steps)}))
        return self._uptraining

    def final(self, b: int, rank: int, coefficient: float) -> tuple[Run, Run]:
        """(03's final model at B=b and this LoRA rank, App. M's run post-training it): aggressive CE at
        `coefficient` + self-distillation (unless B is in no_self_distill_blocks and rank > 0), on `steps` new tokens
        past the uptraining's."""
        up = dataclasses.replace(self.uptraining().final_model(b, rank), role="uptrained")
        sd = not (rank and b in self.no_self_distill_blocks)
        c = up.config
        name = f"{c.init} B={b}" + (f" r={rank}" if rank else "") + f" post aggressive {coefficient}"
        post = self.run(name + (" +SD" if sd else "") + " new-data", num_blocks=b, init=c.init, lora_rank=rank, objective="early_exit", init_from=str(up.final_checkpoint),
                        exit_scheme="aggressive", exit_coefficient=coefficient, self_distill=sd, data_offset=up.samples,
                        needs=(up.name,), tags={"init": c.init, "num_blocks": b, "lora_rank": rank, "training": "post",
                                               "exit_scheme": "aggressive", "exit_coefficient": coefficient,
                                               "self_distill": sd, "data": "new", "final": True})
        return up, post

    def _plan(self):
        runs = self._table13() if self.exit_ablation else []
        three = self.uptraining()
        finals = [self.final(b, r, c) for b in three.final_num_blocks for r in three.final_lora_ranks
                  for c in (self.relaxed_exit_coefficients if r else (self.exit_coefficient,))]
        if finals:  # App. M's references (Tables 14-15): the full-size models of Table 12 (not the reduced-size)
            runs += [three.full_size()] + [r for r in three.runs() if r.tags.get("baseline") == "full"
                                           and r.tags.get("final")]
        for up, post in finals:
            runs += [up, post] if up.name not in {r.name for r in runs} else [post]
        return runs

    def _table13(self) -> list[Run]:
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

    The served models are 04's App. M runs at this scale (03's final models, Stepwise at r = 0 and Average
    relaxed at r > 0, post-trained with aggressive `exit_coefficient` + self-distillation on new tokens),
    one per B × LoRA rank, read from the run store and trained there when missing; or one
    `checkpoint`. A `paper-*` scale name as `model` (recipes.PAPER_MODELS) serves that model's shape with dummy
    weights (timing only, no training).
    """
    notebook: typing.ClassVar[str] = "05_throughput"
    checkpoint: str = ""              # an rrt.save directory to serve alone; empty: 04's early-exit models (below)
    runs_root: str = ""               # run store shared by every notebook; empty: outputs/runs
    read_only: bool = False           # read finished runs only: a run not done stops here, named (the sweep's collect job)
    num_blocks: tuple[int, ...] = (2,)  # B of the served models
    lora_ranks: tuple[int, ...] = (0,)  # per-loop LoRA ranks of the served models; r > 0 also runs its LoRA removed
    corpora: tuple[str, ...] = ("wikitext2/test",)  # held-out sets the requests are cut from, one benchmark each,
                                      # averaged (App. N: SlimPajama, RedPajama, PG19)
    data_source: str = "embedded"     # embedded (vendored, offline) | hub (streamed by name)
    num_requests: int = 32            # requests in the offline queue per set (all arrive at once; App. N: 20K)
    shapes: tuple[tuple[int, int], ...] = ((64, 256),)  # App. N's settings: (prompt tokens, most output tokens;
                                      # each request's own length follows its text): 64/256 and 512/2048
    max_active: int = 32              # most live requests (KV slots) of a model; with memory_cap_gb each model serves
                                      # at the largest batch within the cap, up to this
    token_budget: int = 128           # engine rows per step
    repeats: int = 3                  # timed rounds per system after a warm-up (median, min, max)
    threads: int = 1                  # torch CPU threads (1: steadier timings on a shared machine)
    kv_policies: tuple[str, ...] = ("propagate", "copy_kv")  # what exited tokens leave in deeper depths (engine.KV_POLICIES)
    exit_policies: tuple[str, ...] = ("max_prob",)  # confidence exits besides the oracle: max_prob | margin | cosine
    target_agreement: float = 0.9     # confidence thresholds: exits agree with the last loop on this share of tokens
    calibration_corpus: str = "tinystories/test"  # held-out text the thresholds are calibrated on
    arrival_rate: float = 2.0         # requests/s of the Poisson latency run (0: none)
    memory_cap_gb: float = 16.0       # App. N: each model at the largest batch whose weights and KV fit (0: no cap)
    tasks: tuple[str, ...] = ("piqa",)  # few-shot tasks for the accuracy axis of Fig. 8
    task_limit: int | None = 50       # examples per task (None: the full split)

    paths: typing.ClassVar[tuple[str, ...]] = (*Study.paths, "checkpoint", "runs_root")

    def validate(self):
        check_items("tasks", self.tasks, tuple(TASKS))
        check_items("kv_policies", self.kv_policies, KV_POLICIES)
        check_items("exit_policies", self.exit_policies, SCORED_POLICIES)
        if not self.kv_policies:
            raise ValueError("kv_policies must name at least one of: " + ", ".join(KV_POLICIES))
        check_choice("data_source", self.data_source, ("embedded", "hub"))
        if not self.corpora or not self.shapes:
            raise ValueError(f"corpora {list(self.corpora)} and shapes {list(self.shapes)} must each name at least one")
        for key, value in [("corpora", c) for c in self.corpora] + [("calibration_corpus", self.calibration_corpus)]:
            if "/" not in value:
                raise ValueError(f"{key}: {value!r} must be 'corpus/split', e.g. 'wikitext2/test'")
            if self.data_source == "embedded":  # a hub one: from the packed held-out sets (_check_packed)
                check_corpora(key, [value], self.data_source)
        for shape in self.shapes:
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"shapes holds {list(shape)}: each is [prompt tokens, output tokens], both >= 1")
        for key in ("num_requests", "max_active", "token_budget", "repeats", "threads"):
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
            self.check_num_blocks("num_blocks", self.num_blocks, least=2, needs="early exit")
            if self.trains():
                self.runs()  # 04's params at this scale must load, and every run validates
        self._check_packed()

    def _check_packed(self):
        """A hub corpus is read from the packed held-out sets of the served models' recipe (`make pack`), offline."""
        if self.data_source != "hub" or self.model in PAPER_MODELS:  # dummy weights: random ids, no text
            return
        packed = self.training().eval_corpora if self.trains() else ()
        for key, value in [("corpora", c) for c in self.corpora] + [("calibration_corpus", self.calibration_corpus)]:
            if value not in packed:
                raise ValueError(f"{key}: {value!r} with data_source='hub' is read from the held-out sets "
                                 f"`make pack NB=05_throughput` writes, 04's eval_corpora at this scale: "
                                 f"{list(packed) or 'none (a checkpoint trains nothing: nothing is packed)'}")

    def trains(self) -> bool:
        """Whether the served models come from the run store (not a checkpoint, not dummy weights)."""
        return not self.checkpoint and self.model not in PAPER_MODELS

    def training(self) -> "EarlyExit":
        """04's study at this scale (its params file; Table 13's rows off), for this model, store and seed: the served
        models' recipe (read and validated once: the plan, notebook.start and the served models all ask for it)."""
        if "_training" not in self.__dict__:
            object.__setattr__(self, "_training", EarlyExit(**{
                **read_params("04_early_exit", self.scale), "model": self.model, "seed": self.seed,
                "runs_root": self.runs_root, "exit_ablation": False}))
        return self._training

    def _plan(self) -> list[Run]:
        """The KD teacher, then the uptrained and early-exit runs of every served (B, r); [] when nothing trains."""
        if not self.trains():
            return []
        pairs = [run for pair in self.served().values() for run in pair]
        return [self.training().uptraining().full_size()] + list({run.name: run for run in pairs}.values())

    def served(self) -> dict[tuple[int, int], tuple[Run, Run]]:
        """{(B, r): (uptrained run, early-exit run)}: 04's App. M runs, Table 12's final model (Stepwise at r = 0,
        the relaxed Average one at r > 0; long uptraining + KD) post-trained with aggressive `exit_coefficient` CE
        + self-distillation (where 04 uses it) on new tokens."""
        ee = self.training()
        return {(b, r): ee.final(b, r, ee.exit_coefficient) for b in self.num_blocks for r in self.lora_ranks}


STUDIES = {cls.notebook: cls for cls in (Explore, InitAblation, RelaxationSweep, Distillation, EarlyExit, Throughput)}

