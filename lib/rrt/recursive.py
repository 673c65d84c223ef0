"""Recursive Transformers (§2.2, eq. 2): tie an L-layer model into B loops of K = L/B shared layers.

A converted model stays an ordinary HF model of its own class with L layer modules (one per depth,
each with its own `layer_idx`, so each (loop, layer) gets its own KV-cache slot), but depth ℓ holds
the very same nn.Parameter objects as shared layer ℓ mod K (CYCLE order). `model.parameters()`
yields each shared tensor once and gradients from every depth accumulate into it.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from rrt.models import decoder_layers, head_logits

# stepwise_start: Stepwise's "fixed-start" variant (App. I, Fig. 11a): layer 0, then every B-th layer
INITS = ("stepwise", "average", "lower", "random", "stepwise_start")
NORM_INITS = ("average", "choice", "zero")
LORA_INITS = ("svd", "zero")
RANK_GROUPS = ("q", "kv", "o", "mlp")


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
    lora_rank: int | dict = 0      # per-depth LoRA rank (§2.3); a dict sets it per group q|kv|o|mlp
    lora_init: str = "svd"         # svd (eq. 4-5) | zero (A random, B zero)
    untie_norms: bool = False      # per-depth copies of norm weights and biases (see relax.py)
    # A LoRA on the LM head for the intermediate loop exits only (Table 13's frozen-model rows: the
    # last loop keeps the model's own head, Δ +0.0); needs num_blocks >= 2. See relax.HeadLoRA.
    head_lora_rank: int = 0
    seed: int = 0                  # for init="random" and the random LoRA A matrices
    ranks: dict = field(init=False, repr=False, compare=False)  # lora_rank per group, resolved

    def __post_init__(self):
        _check_choice("init", self.init, INITS)
        if self.norm_init is not None:
            _check_choice("norm_init", self.norm_init, NORM_INITS)
        _check_choice("lora_init", self.lora_init, LORA_INITS)
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
        if not isinstance(self.untie_norms, bool):
            raise TypeError(f"untie_norms must be a bool, got {self.untie_norms!r}")
        rank = self.head_lora_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"head_lora_rank must be an int >= 0, got {rank!r}")
        if rank and self.num_blocks < 2:
            raise ValueError(f"head_lora_rank={rank} needs num_blocks >= 2: the head LoRA acts on "
                             f"intermediate loop exits only, and num_blocks={self.num_blocks} has none")
        object.__setattr__(self, "ranks", _resolve_ranks(self.lora_rank))

    def to_dict(self) -> dict:
        """Return the spec as JSON-ready values (stored in model.config.rrt)."""
        d = asdict(self)
        d.pop("ranks")
        return d


def spec_of(model: nn.Module) -> RecursiveSpec:
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
        check_num_blocks(len(decoder_layers(model)), spec.num_blocks)
    except ValueError as err:
        raise ValueError(f"model.config.rrt does not fit this model: {err}") from None
    return spec


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _resolve_ranks(lora_rank) -> dict:
    """Return {group: rank} for an int rank or a per-group dict (missing groups get 0)."""
    if isinstance(lora_rank, dict):
        unknown = set(lora_rank) - set(RANK_GROUPS)
        if unknown:
            raise ValueError(f"unknown lora_rank groups {sorted(unknown)}; valid: {', '.join(RANK_GROUPS)}")
        ranks = {g: lora_rank.get(g, 0) for g in RANK_GROUPS}
    else:
        ranks = {g: lora_rank for g in RANK_GROUPS}
    for group, r in ranks.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"lora_rank for {group!r} must be an int >= 0, got {r!r}")
    return ranks


def convert(model: nn.Module, spec: RecursiveSpec) -> nn.Module:
    """Return a new Recursive (or, with lora_rank > 0, Relaxed Recursive) model; `model` is untouched."""
    if not isinstance(spec, RecursiveSpec):
        raise TypeError(f"spec must be a RecursiveSpec, got {type(spec).__name__}")
    if getattr(model.config, "rrt", None):
        raise ValueError("model is already recursive (config.rrt is set); convert the original model")
    num_layers = len(decoder_layers(model))
    check_num_blocks(num_layers, spec.num_blocks)
    rec = copy.deepcopy(model)
    _init_shared_layers(rec, model, spec)
    tie_layers(rec, spec)
    if spec.untie_norms:
        untie_values(rec, model)
    rec.config.rrt = spec.to_dict()
    if any(spec.ranks.values()):
        from rrt.relax import relax
        relax(rec, model, spec)
    if spec.head_lora_rank:
        from rrt.relax import add_head_lora
        add_head_lora(rec, spec.head_lora_rank, seed=spec.seed)
    return rec


def check_num_blocks(num_layers: int, num_blocks: int) -> None:
    """Raise unless num_blocks divides num_layers, naming the values that do."""
    if num_layers % num_blocks:
        valid = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
        raise ValueError(f"num_blocks={num_blocks} does not divide the {num_layers} layers of this model; "
                         f"valid values: {', '.join(map(str, valid))}")


def stepwise_indices(num_layers: int, num_shared: int) -> list[int]:
    """Return the K layers Stepwise keeps: evenly spaced with fixed ends (first and last, App. I).

    Shared layer j takes layer round(j·(L−1)/(K−1)), rounding halves up (exact integer arithmetic).
    """
    if num_shared == 1:
        return [0]
    span, steps = num_layers - 1, num_shared - 1
    return [(2 * j * span + steps) // (2 * steps) for j in range(num_shared)]


def stepwise_start_indices(num_layers: int, num_shared: int) -> list[int]:
    """Return the K layers Stepwise's "fixed-start" variant keeps (App. I, Fig. 11a): layer 0, then every
    (L/K)-th layer, so the last layer is left out whenever L/K > 1."""
    return list(range(0, num_layers, num_layers // num_shared))[:num_shared]


def tied_groups(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Return, for each shared layer j, the depths that loop through it: [j, j+K, j+2K, …]."""
    k = num_layers // num_blocks
    return [list(range(j, num_layers, k)) for j in range(k)]


def is_norm_param(layer: nn.Module, name: str) -> bool:
    """True for parameters that belong to a non-linear module of a layer (norm weights and biases)."""
    owner = layer.get_submodule(name.rpartition(".")[0])
    return not isinstance(owner, nn.Linear)


def _init_shared_layers(rec: nn.Module, original: nn.Module, spec: RecursiveSpec) -> None:
    """Write the looped-layer init (§2.2, Fig. 2; App. I) into rec's depths 0..K-1."""
    src, dst = decoder_layers(original), decoder_layers(rec)
    groups = tied_groups(len(src), spec.num_blocks)
    k = len(groups)
    picks = {"stepwise": stepwise_indices(len(src), k), "stepwise_start": stepwise_start_indices(len(src), k),
             "lower": list(range(k)),
             "average": list(range(k)), "random": list(range(k))}[spec.init]
    fresh = _fresh_layers(rec, k, spec.seed) if spec.init == "random" else None
    norm_init = spec.norm_init or ("average" if spec.init == "average" else None)
    with torch.no_grad():
        for j, group in enumerate(groups):
            src_params = [dict(src[i].named_parameters()) for i in group]
            for name, p in dst[j].named_parameters():
                norm = is_norm_param(dst[j], name)
                if spec.init == "random":
                    value = dict(fresh[j].named_parameters())[name]
                elif spec.init == "average" and not norm:
                    value = torch.stack([sp[name].float() for sp in src_params]).mean(0)
                else:
                    value = dict(src[picks[j]].named_parameters())[name]
                if norm and norm_init is not None:
                    value = _norm_value(norm_init, [sp[name] for sp in src_params],
                                        dict(src[picks[j]].named_parameters())[name])
                p.copy_(value.to(p.dtype))


def _norm_value(norm_init: str, group_values: list[torch.Tensor], picked: torch.Tensor) -> torch.Tensor:
    """Return a shared norm vector: mean over the tied group, the picked layer's, or zeros (App. I)."""
    if norm_init == "average":
        return torch.stack([v.float() for v in group_values]).mean(0)
    if norm_init == "choice":
        return picked
    return torch.zeros_like(picked)


def _fresh_layers(model: nn.Module, k: int, seed: int) -> list[nn.Module]:
    """Return k freshly initialised decoder layers (init="random": the paper's baseline)."""
    layers = decoder_layers(model)
    std = model.config.initializer_range
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for j in range(k):
            layer = type(layers[j])(model.config, layer_idx=j)  # norms get their family's identity init
            for module in layer.modules():
                if isinstance(module, nn.Linear):  # HF's _init_weights for linears: N(0, std), zero bias
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            out.append(layer)
    return out


def tie_layers(model: nn.Module, spec: RecursiveSpec) -> None:
    """Make depth ℓ hold shared layer (ℓ mod K)'s nn.Parameter objects (CYCLE, eq. 2).

    With untie_norms, norm weights and linear biases stay per-depth (their values are set by the
    caller: the original layer's for convert, the checkpoint's for load).
    """
    layers = decoder_layers(model)
    for group in tied_groups(len(layers), spec.num_blocks):
        shared = layers[group[0]]
        for depth in group[1:]:
            for name, p in shared.named_parameters():
                if spec.untie_norms and (p.ndim == 1):
                    continue
                owner_name, _, attr = name.rpartition(".")
                setattr(layers[depth].get_submodule(owner_name), attr, p)


def untie_values(rec: nn.Module, original: nn.Module) -> None:
    """Copy every per-depth vector (norm weights, biases) from the original model's same depth."""
    with torch.no_grad():
        for dst, src in zip(decoder_layers(rec), decoder_layers(original)):
            src_params = dict(src.named_parameters())
            for name, p in dst.named_parameters():
                if p.ndim == 1:
                    p.copy_(src_params[name])


def shared_parameter_report(model: nn.Module) -> dict[str, int]:
    """Return {depth-qualified name: data_ptr} for every layer parameter (for tie checks)."""
    return {f"{d}.{n}": p.data_ptr() for d, layer in enumerate(decoder_layers(model))
            for n, p in layer.named_parameters(remove_duplicate=False)}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Return unique parameter counts: non_embedding (incl. LoRA), embedding, lora, total."""
    params = {id(p): p for p in model.parameters()}  # shared tensors count once
    emb_ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        emb_ids.add(id(head.weight))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    embedding = sum(params[i].numel() for i in emb_ids if i in params)
    total = sum(p.numel() for p in params.values())
    return {"non_embedding": total - embedding, "embedding": embedding, "lora": lora, "total": total}


def num_loops(model: nn.Module) -> int:
    """Return B for a recursive model, 1 for an ordinary one."""
    return spec_of(model).num_blocks


def loop_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> list[torch.Tensor]:
    """Return one logits tensor per loop exit (§3.7): loop b's output through final norm + LM head
    (+ the head LoRA at intermediate loops, if the model has one).

    The last entry equals model(input_ids).logits (DESIGN invariant 7).
    """
    states = loop_hidden_states(model, input_ids, attention_mask, **kwargs)
    return [head_logits(model, h, loop_idx=b) for b, h in enumerate(states)]


def loop_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       **kwargs) -> list[torch.Tensor]:
    """Return each loop's output hidden states [batch, seq, hidden] (before the final norm)."""
    layers = decoder_layers(model)
    k = len(layers) // num_loops(model)
    exits: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        exits.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layers[d].register_forward_hook(grab) for d in range(k - 1, len(layers), k)]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return exits
