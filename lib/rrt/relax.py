"""Relaxed Recursive Transformers (§2.3, eq. 3–5, App. E): a LoRA per depth on every shared linear.

Depth ℓ computes h = W′x + B_ℓ A_ℓ x, where W′ is the shared weight (the same nn.Parameter at every
depth of its tied group) and (A_ℓ, B_ℓ) belong to depth ℓ alone. The delta is exactly B·A: no α/r
factor, so SVD init (eq. 4) puts W′ + BA on the truncated SVD of the original Wℓ.

Rank groups (Table 8) map onto module names through models.FAMILIES: Llama/Gemma q_proj → "q",
k_proj and v_proj → "kv", o_proj → "o", gate/up/down_proj → "mlp"; GPT-NeoX's fused
query_key_value → "q", dense → "o", dense_h_to_4h and dense_4h_to_h → "mlp".

Why our own module and not PEFT: PEFT's LoRA scales by α/r (foldable), but it keys adapters by
name, not by loop, and its mixed-batch path (`adapter_names` per row) dispatches through Python
per adapter name over whole sequences; we need a per-row loop index inside one layer call, and the
shared base weight held by every depth's wrapper. A 30-line module keeps both explicit.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from rrt.models import decoder_layers, family_of
from rrt.recursive import tied_groups


class LoopLoRALinear(nn.Module):
    """One depth's view of a shared linear: base_layer(x) + x Aᵀ Bᵀ (eq. 3), B·A added unscaled."""

    def __init__(self, base_layer: nn.Linear, rank: int, loop_idx: int):
        super().__init__()
        self.base_layer = base_layer  # holds the shared W′ (tied across the group's depths)
        self.loop_idx = loop_idx
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        # Set by `per_row_loops`: every loop's (A, B) of this shared linear and a loop index per row.
        self.row_loras: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.row_loop_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.row_loras is not None:
            flat = x.reshape(-1, x.shape[-1])  # [rows, in]
            delta = per_row_lora(flat, self.row_loop_idx.reshape(-1), self.row_loras)
            return out + delta.reshape(out.shape)
        return out + (x @ self.lora_A.t()) @ self.lora_B.t()


def per_row_lora(x: torch.Tensor, loop_idx: torch.Tensor,
                 loras: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """Return B_{loop}A_{loop}x for each row of x [rows, in] tagged with loop_idx [rows] → [rows, out].

    A segmented matmul: rows are grouped by loop and each loop's LoRA is two matmuls over its rows,
    so cost is that of one LoRA per row whatever the mix (a gather of A per row would cost
    rows·r·in memory; a concatenated-LoRA matmul, the paper's App. A choice, B× the FLOPs). Ranks
    may differ per loop; None means no LoRA at that loop.
    """
    out_dim = next(b.shape[0] for lora in loras if lora is not None for b in [lora[1]])
    out = x.new_zeros(x.shape[0], out_dim)
    for loop in torch.unique(loop_idx).tolist():
        if loras[loop] is None:
            continue
        lora_a, lora_b = loras[loop]
        rows = (loop_idx == loop).nonzero().squeeze(1)
        out.index_copy_(0, rows, (x[rows] @ lora_a.t()) @ lora_b.t())
    return out


def relax(rec: nn.Module, original: nn.Module, spec) -> None:
    """Add a LoRA to every shared linear of every depth of `rec`, initialised per spec.lora_init."""
    modules = add_lora_modules(rec, spec)
    orig_layers = decoder_layers(original)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for (depth, name), lora in modules.items():
            target = orig_layers[depth].get_submodule(name).weight if spec.lora_init == "svd" else None
            init_lora(lora, target)


def lora_ranks(model: nn.Module, spec) -> dict[str, int]:
    """Return {linear name in a layer: rank}, clamped to min(out, in); warn once if any clamped."""
    layer = decoder_layers(model)[0]
    ranks, clamped = {}, []
    for name, group in family_of(model).linears.items():
        weight = layer.get_submodule(name).weight
        full = min(weight.shape)
        rank = spec.ranks[group]
        if rank > full:
            clamped.append(f"{name} ({rank}→{full})")
        ranks[name] = min(rank, full)
    if clamped:
        warnings.warn(f"lora_rank larger than a matrix's min dimension; clamped to full rank: {', '.join(clamped)}")
    return {n: r for n, r in ranks.items() if r > 0}


def add_lora_modules(model: nn.Module, spec) -> dict[tuple[int, str], LoopLoRALinear]:
    """Wrap each depth's shared linears in LoopLoRALinear (zeros); return {(depth, name): module}."""
    layers = decoder_layers(model)
    k = len(layers) // spec.num_blocks
    out = {}
    for name, rank in lora_ranks(model, spec).items():
        for depth, layer in enumerate(layers):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            lora = LoopLoRALinear(getattr(parent, child), rank, loop_idx=depth // k)
            setattr(parent, child, lora)
            out[(depth, name)] = lora
    return out


@torch.no_grad()
def init_lora(lora: LoopLoRALinear, target: torch.Tensor | None) -> None:
    """SVD init (eq. 4–5) towards `target` Wℓ: B = UᵣΣᵣ, A = Vᵣᵀ of Wℓ − W′; standard init if None or Wℓ = W′.

    The standard init (App. E) is PEFT's: A Kaiming-uniform, B zero, so the delta starts at 0.
    """
    base = lora.base_layer.weight
    residual = None if target is None else target.double() - base.double()  # float64 whatever the dtype
    if residual is None or not residual.any():
        nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
        lora.lora_B.zero_()
        return
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    r = lora.lora_A.shape[0]
    lora.lora_B.copy_(u[:, :r] * s[:r])
    lora.lora_A.copy_(vh[:r])


@torch.no_grad()
def truncate_lora(model: nn.Module, rank: int) -> None:
    """Keep the first `rank` components of every LoRA, in place (rank 0 leaves a zero delta).

    An SVD-initialised LoRA is ordered by singular value, so truncating a full-rank init gives the
    rank-r init of eq. 4 without another SVD: how a rank sweep converts once per init.
    """
    for lora in lora_modules(model).values():
        lora.lora_A = nn.Parameter(lora.lora_A[:rank].clone())
        lora.lora_B = nn.Parameter(lora.lora_B[:, :rank].clone())


def lora_modules(model: nn.Module) -> dict[str, LoopLoRALinear]:
    """Return every LoopLoRALinear of a model by its qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoopLoRALinear)}


def set_trainable(model: nn.Module, *, base: bool = True, lora: bool = True) -> None:
    """Choose what trains: the shared base (everything but LoRA) and/or the LoRAs. Default: all (§2.3)."""
    for name, p in model.named_parameters():
        p.requires_grad_(lora if "lora_" in name else base)


@contextmanager
def per_row_loops(model: nn.Module, loop_idx: torch.Tensor):
    """Within the block, running shared layer j (depth j < K) applies each row's own loop LoRA.

    `loop_idx` has the leading shape of the hidden states fed to the layer ([batch, seq] or [rows]):
    the building block of continuous depth-wise batching (§2.4), where one call of the shared
    block carries tokens at different loops.
    """
    layers = decoder_layers(model)
    groups = tied_groups(len(layers), model.config.rrt["num_blocks"])
    touched = []
    for group in groups:
        for name, lora in lora_modules(layers[group[0]]).items():
            lora.row_loras = [(m.lora_A, m.lora_B) for m in
                              (layers[d].get_submodule(name) for d in group)]
            lora.row_loop_idx = loop_idx
            touched.append(lora)
    try:
        yield
    finally:
        for lora in touched:
            lora.row_loras = lora.row_loop_idx = None


def merge(model: nn.Module) -> nn.Module:
    """Return a plain HF model of the original class: every depth untied, W′ + B_ℓA_ℓ folded in."""
    merged = copy.deepcopy(model)
    layers = decoder_layers(merged)
    with torch.no_grad():
        for layer in layers:
            for name, p in list(layer.named_parameters()):  # untie: each depth its own tensors
                owner, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(owner), attr, nn.Parameter(p.detach().clone(), p.requires_grad))
            for name, lora in lora_modules(layer).items():
                base = lora.base_layer
                base.weight.add_((lora.lora_B.double() @ lora.lora_A.double()).to(base.weight.dtype))
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, base)
    del merged.config.rrt
    return merged
