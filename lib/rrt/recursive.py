"""Recursive Transformers (§2.2, eq. 2): tie an L-layer model into B loops of K = L/B shared layers.

A converted model stays an ordinary HF model of its own class with L layer modules (one per depth,
each with its own `layer_idx`, so each (loop, layer) gets its own KV-cache slot), but depth ℓ holds
the very same nn.Parameter objects as shared layer ℓ mod K (CYCLE order). `model.parameters()`
yields each shared tensor once and gradients from every depth accumulate into it.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from rrt.families import decoder_layers, head_logits
from rrt.relax import add_head_lora, relax
from rrt.spec import RecursiveSpec, check_num_blocks, num_loops


def convert(model: nn.Module, spec: RecursiveSpec) -> nn.Module:
    """Return a new Recursive (or, with lora_rank > 0, Relaxed Recursive) model; `model` is untouched."""
    if not isinstance(spec, RecursiveSpec):
        raise TypeError(f"spec must be a RecursiveSpec, got {type(spec).__name__}")
    if getattr(model.config, "rrt", None):
        raise ValueError("model is already recursive (config.rrt is set); convert the original model")
    num_layers = len(decoder_layers(model))
    check_num_blocks(num_layers, spec.num_blocks)
    # init="random" (Table 5: no pretrained weights) starts from a fresh model: the shared layers are its own
    rec = _fresh_model(model, spec.seed) if spec.init == "random" else copy.deepcopy(model)
    source = rec if spec.init == "random" else model
    _init_shared_layers(rec, source, spec)
    tie_layers(rec, spec)
    if spec.untie_norms:
        _untie_values(rec, source)
    rec.config.rrt = spec.to_dict()
    if any(spec.ranks.values()):
        relax(rec, model, spec)
    if spec.head_lora_rank:
        add_head_lora(rec, spec.head_lora_rank, seed=spec.seed)
    return rec


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


def _is_norm_param(layer: nn.Module, name: str) -> bool:
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
    norm_init = spec.norm_init or ("average" if spec.init == "average" else None)
    with torch.no_grad():
        for j, group in enumerate(groups):
            src_params = [dict(src[i].named_parameters()) for i in group]
            for name, p in dst[j].named_parameters():
                norm = _is_norm_param(dst[j], name)
                if spec.init == "average" and not norm:
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


def _fresh_model(model: nn.Module, seed: int) -> nn.Module:
    """Return a model of `model`'s class and config with no pretrained tensor (init="random", Table 5): every
    weight (embeddings, norms, LM head, layers) from the model's own `_init_weights`, seeded, tied embeddings tied.

    Drawn in fp32 on the CPU, so the seed fixes it on any device, then cast to `model`'s dtype and device
    (on the meta device for a meta model: shapes only).
    """
    p = next(model.parameters())
    config = copy.deepcopy(model.config)
    if p.device.type == "meta":
        with torch.device("meta"):
            return type(model)._from_config(config, dtype=p.dtype).train(model.training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)._from_config(config, dtype=torch.float32)  # post_init: _init_weights, tie_weights
    fresh = fresh.to(device=p.device, dtype=p.dtype).train(model.training)
    fresh.config.dtype = model.config.dtype
    return fresh


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
    model.save_pretrained = SavePretrainedRefused()  # an instance attribute: copies keep it, rrt.merge drops it


class SavePretrainedRefused:
    """A recursive model's `save_pretrained`: refused, naming rrt.save. An HF checkpoint has no place for ties
    between depths or per-loop LoRAs: transformers refuses the shared tensors, and a copy saved untied would
    reload through from_pretrained as a plain model, its LoRAs dropped."""

    def __call__(self, save_directory, *args, **kwargs):
        raise ValueError(f"save_pretrained cannot store a recursive model (config.rrt: layers shared across "
                         f"depths, per-loop LoRAs): use rrt.save(model, {str(save_directory)!r}, tokenizer=tok), "
                         f"loaded back by rrt.load or rrt.load_model; for a plain HF model (every depth untied, "
                         f"LoRAs folded in) use rrt.merge(model).save_pretrained(...)")


def _untie_values(rec: nn.Module, original: nn.Module) -> None:
    """Copy every per-depth vector (norm weights, biases) from the original model's same depth."""
    with torch.no_grad():
        for dst, src in zip(decoder_layers(rec), decoder_layers(original)):
            src_params = dict(src.named_parameters())
            for name, p in dst.named_parameters():
                if p.ndim == 1:
                    p.copy_(src_params[name])


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


def loop_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> list[torch.Tensor]:
    """Return one logits tensor per loop exit (§3.7): loop b's output through final norm + LM head
    (+ the head LoRA at intermediate loops, if the model has one).

    The last entry equals model(input_ids).logits (DESIGN invariant 7).
    """
    states = loop_hidden_states(model, input_ids, attention_mask, **kwargs)
    return [head(h) for head, h in zip(loop_heads(model), states)]


def loop_heads(model: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Return each loop exit's head, loop 1 first: loop b's output [..., hidden] -> logits [..., vocab]
    (`head_logits` at loop_idx b: final norm, LM head, head LoRA at intermediate loops, softcap).

    Per token, so a chunk of tokens gives those tokens' logits (losses.chunked_*); `loop_logits` applies them.
    """
    return [functools.partial(head_logits, model, loop_idx=b) for b in range(num_loops(model))]


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
