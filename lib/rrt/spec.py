"""The bottom floor: `RecursiveSpec` (how a model is made recursive), `spec_of(model)`, the loop count, and the
one set of validation helpers every schema (spec, `TrainConfig`, the studies) raises through.

Every other module of rrt may read this one; it reads none of them (the core's import circle was
models ↔ recursive ↔ relax ↔ checkpoint, each reaching for the spec through the others).
"""
from __future__ import annotations

import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields

# stepwise_start: Stepwise's "fixed-start" variant (App. I, Fig. 11a): layer 0, then every B-th layer
INITS = ("stepwise", "average", "lower", "random", "stepwise_start")
NORM_INITS = ("average", "choice", "zero")
LORA_INITS = ("svd", "zero")
RANK_GROUPS = ("q", "kv", "o", "mlp")


# ---------------------------------------------------------------- the one validation helper

def check_choice(name: str, value, valid) -> None:
    """Raise ValueError naming `value` and the valid ones unless value is in `valid`."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def check_items(name: str, values, valid) -> None:
    """Raise ValueError naming the first item of `values` not in `valid`, and the valid ones."""
    for v in values:
        if v not in valid:
            raise ValueError(f"{name} holds {v!r}; valid: {', '.join(map(str, valid))}")


def check_int(name: str, value, low: int) -> None:
    """Raise ValueError unless value is an int (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_at_least(name: str, value, low) -> None:
    """Raise ValueError unless the number value >= low."""
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")


def expand_home(obj, names) -> None:
    """Replace a leading `~` in the path fields `names` of frozen dataclass `obj` by the home directory: a quoted or
    YAML `~/runs` reaches Python unexpanded, and would otherwise be a directory named "~" under the working one."""
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, str) and value.startswith("~"):
            object.__setattr__(obj, name, os.path.expanduser(value))


def check_types(obj) -> None:
    """Raise TypeError naming the first field of dataclass `obj` whose value is not of its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if not _is_a(value, kind):
            hint = ""
            if isinstance(value, str) and typing.get_origin(kind) is tuple:
                hint = f"; papermill -p passes text, pass lists with -y '{{{f.name}: [...]}}' or in a params file"
            raise TypeError(f"parameter {f.name}={value!r} must be {_type_name(kind)}, got {type(value).__name__}{hint}")


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


# ---------------------------------------------------------------- the recursion spec

@dataclass(frozen=True)
class RecursiveSpec:
    """How to turn a pretrained model into a (Relaxed) Recursive Transformer."""
    num_blocks: int = 2            # B: loops over the shared block; must divide the layer count L
    init: str = "stepwise"         # looped-layer init (§2.2, Fig. 2): stepwise|average|lower|random|stepwise_start
    # Norm weights of the shared layers (App. I, Fig. 11b): average|choice|zero over each tied group.
    # None follows the init as the paper does: averaged for "average", the picked layer's for
    # "stepwise"/"lower"/"stepwise_start", fresh for "random". "choice" takes the group's first layer (its picked
    # layer under stepwise).
    norm_init: str | None = None
    lora_rank: int = 0             # per-depth LoRA rank (§2.3); max(module_ranks) when those are set
    # Per-module ranks (Table 8) in RANK_GROUPS order (q, kv, o, mlp); None: lora_rank for all. 0 leaves that
    # module unrelaxed. GPT-NeoX's fused query_key_value takes a LoRA per part: q the q rank, k and v the kv rank.
    module_ranks: tuple[int, int, int, int] | None = None
    lora_init: str = "svd"         # svd (eq. 4-5) | zero (A Gaussian, B zero: App. J, relax.standard_init)
    untie_norms: bool = False      # per-depth copies of norm weights and biases (see relax.py)
    # A LoRA on the LM head for the intermediate loop exits only (Table 13's frozen-model rows: the
    # last loop keeps the model's own head, Δ +0.0); needs num_blocks >= 2. See relax.HeadLoRA.
    head_lora_rank: int = 0
    seed: int = 0                  # for init="random" and the random LoRA A matrices
    ranks: dict = field(init=False, repr=False, compare=False)  # lora_rank per group, resolved

    def __post_init__(self):
        check_choice("init", self.init, INITS)
        if self.norm_init is not None:
            check_choice("norm_init", self.norm_init, NORM_INITS)
        check_choice("lora_init", self.lora_init, LORA_INITS)
        if not _is_positive_int(self.num_blocks):
            raise ValueError(f"num_blocks must be a positive int dividing the model's layer count (B loops of L/B "
                             f"shared layers), got {self.num_blocks!r}")
        if not isinstance(self.untie_norms, bool):
            raise TypeError(f"untie_norms must be a bool, got {self.untie_norms!r}")
        check_int("head_lora_rank", self.head_lora_rank, 0)
        if self.head_lora_rank and self.num_blocks < 2:
            raise ValueError(f"head_lora_rank={self.head_lora_rank} needs num_blocks >= 2: the head LoRA acts on "
                             f"intermediate loop exits only, and num_blocks={self.num_blocks} has none")
        if isinstance(self.lora_rank, dict):
            raise ValueError(f"lora_rank={self.lora_rank!r}: set per-module ranks with module_ranks=(q, kv, o, mlp) "
                             f"and lora_rank=max of them")
        check_int("lora_rank", self.lora_rank, 0)
        if self.init == "random" and (self.norm_init in ("average", "choice") or (self.lora_rank and
                                                                                  self.lora_init == "svd")):
            raise ValueError(f"init='random' uses no pretrained weight (Table 5), but norm_init={self.norm_init!r}, "
                             f"lora_rank={self.lora_rank}, lora_init={self.lora_init!r} would read the original's: use "
                             f"norm_init None or 'zero', and lora_init='zero' with a LoRA")
        if self.module_ranks is not None:
            object.__setattr__(self, "module_ranks", _check_module_ranks(self.module_ranks, self.lora_rank))
        ranks = self.module_ranks if self.module_ranks is not None else (self.lora_rank,) * len(RANK_GROUPS)
        object.__setattr__(self, "ranks", dict(zip(RANK_GROUPS, ranks)))

    def to_dict(self) -> dict:
        """Return the spec as JSON-ready values (stored in model.config.rrt)."""
        d = asdict(self)
        d.pop("ranks")
        if self.module_ranks is not None:
            d["module_ranks"] = list(self.module_ranks)
        return d


def spec_of(model) -> RecursiveSpec:
    """Return the RecursiveSpec a converted model holds (model.config.rrt); the one reader of it.

    An ordinary model reads as RecursiveSpec(num_blocks=1): one loop, nothing shared (invariant 1).
    A stored spec that is not a valid RecursiveSpec, or whose num_blocks does not divide the model's
    layer count, is refused naming the bad value.
    """
    stored = getattr(model.config, "rrt", None)
    if not stored:
        return RecursiveSpec(num_blocks=1)
    valid = [f.name for f in fields(RecursiveSpec) if f.init]
    unknown = sorted(set(stored) - set(valid))
    if unknown:
        raise ValueError(f"model.config.rrt holds unknown spec fields {unknown}; valid: {', '.join(valid)}")
    spec = RecursiveSpec(**stored)
    try:
        check_num_blocks(model.config.num_hidden_layers, spec.num_blocks)
    except ValueError as err:
        raise ValueError(f"model.config.rrt does not fit this model: {err}") from None
    return spec


def num_loops(model) -> int:
    """Return B for a recursive model, 1 for an ordinary one."""
    return spec_of(model).num_blocks


def check_num_blocks(num_layers: int, num_blocks, *, least: int = 1, needs: str = "") -> None:
    """Raise unless num_blocks is an int >= `least` (`needs` says why, when over 1) dividing num_layers, naming the
    values that are."""
    if not _is_positive_int(num_blocks):  # 0 would divide by zero; -2 "divides" 6
        problem = "is not a positive int"
    elif num_layers % num_blocks:
        problem = f"does not divide the {num_layers} layers of this model"
    elif num_blocks < least:
        problem = f"is under {least}: {needs} needs B >= {least}"
    else:
        return
    raise ValueError(f"num_blocks={num_blocks!r} {problem}; valid values: "
                     f"{', '.join(map(str, valid_num_blocks(num_layers, least)))}")


def valid_num_blocks(num_layers: int, least: int = 1) -> list[int]:
    """The B values >= `least` that divide num_layers."""
    return [b for b in range(least, num_layers + 1) if num_layers % b == 0]


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_module_ranks(module_ranks, lora_rank: int) -> tuple[int, ...]:
    """Return module_ranks as a tuple of 4 ints >= 0 whose max is lora_rank, or raise naming the bad value."""
    if not isinstance(module_ranks, (tuple, list)) or len(module_ranks) != len(RANK_GROUPS):
        raise ValueError(f"module_ranks must be {len(RANK_GROUPS)} ints ({', '.join(RANK_GROUPS)}), "
                         f"got {module_ranks!r}")
    for group, r in zip(RANK_GROUPS, module_ranks):
        check_int(f"module_ranks {group!r}", r, 0)
    if lora_rank != max(module_ranks):
        raise ValueError(f"lora_rank={lora_rank} must equal max(module_ranks)={max(module_ranks)} when module_ranks "
                         f"is set (module_ranks={tuple(module_ranks)})")
    return tuple(module_ranks)
