"""Relaxed Recursive Transformers (§2.3, eq. 3–5, App. E): a LoRA per depth on every shared linear.

Depth ℓ computes h = W′x + B_ℓ A_ℓ x, where W′ is the shared weight (the same nn.Parameter at every
depth of its tied group) and (A_ℓ, B_ℓ) belong to depth ℓ alone. The delta is exactly B·A: no α/r
factor, so SVD init (eq. 4) puts W′ + BA on the truncated SVD of the original Wℓ.

Rank groups (Table 8) map onto module names through models.FAMILIES: Llama/Gemma q_proj → "q",
k_proj and v_proj → "kv", o_proj → "o", gate/up/down_proj → "mlp"; GPT-NeoX's fused
query_key_value gets three LoRAs, q → "q", k and v → "kv", each writing only its own (per-head
interleaved) output rows (FusedLoopLoRALinear); dense → "o", dense_h_to_4h and dense_4h_to_h → "mlp".

Why our own module and not PEFT: PEFT's LoRA scales by α/r (foldable), but it keys adapters by
name, not by loop, and its mixed-batch path (`adapter_names` per row) dispatches through Python
per adapter name over whole sequences; we need a per-row loop index inside one layer call, and the
shared base weight held by every depth's wrapper. A 30-line module keeps both explicit.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from rrt.families import Fused, decoder_layers, family_of
from rrt.spec import spec_of


class LoRA(nn.Module):
    """A rank-r delta x Aᵀ Bᵀ (eq. 3), unscaled, onto `rows` of a fused linear's output (None: all rows)."""

    def __init__(self, in_features: int, out_features: int, rank: int, rows: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        # not saved: the family table rebuilds it (models.Fused)
        self.register_buffer("rows", rows, persistent=False)
        # Set by `rrt.serving.rows.RowLoRAs.apply`: every loop's (A, B) of this shared LoRA, the
        # step's rows as (loop, lo, hi) segments of the flattened leading dims, and, when the step
        # holds several loops or the weights are prepacked, the loops' pairs packed side by side
        # with each row's column mask.
        self.row_loras: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.row_segments: list[tuple[int, int, int]] | None = None
        # (x → x·A_catᵀ or None, z → z·B_catᵀ, mask, x → x·[W′; A_cat]ᵀ or None): one of the two
        # A sides is set
        self.row_pack: tuple[Callable, Callable, torch.Tensor, Callable | None] | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Return B·A x for x [.., in] → [.., out_features]; per row its own loop's inside per_row_loops."""
        if self.row_loras is not None:
            flat = x.reshape(-1, x.shape[-1])  # [rows, in]
            if self.row_pack is not None:  # the loops' packed pair, other loops' columns zeroed
                linear_a, linear_b, mask, linear_wa = self.row_pack
                z = linear_a(flat) if linear_a is not None else linear_wa(flat)[:, self.lora_B.shape[0]:]
                delta = linear_b(z * mask)
            else:
                delta = per_row_lora(flat, self.row_segments, self.row_loras)
            return delta.reshape(*x.shape[:-1], -1)
        return (x @ self.lora_A.t()) @ self.lora_B.t()

    def own_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the rows of a whole linear's [out, in] tensor that this LoRA writes."""
        return weight if self.rows is None else weight[self.rows]


class LoopLoRALinear(LoRA):
    """One depth's view of a shared linear: base_layer(x) + x Aᵀ Bᵀ (eq. 3), B·A added unscaled."""

    def __init__(self, base_layer: nn.Linear, rank: int, loop_idx: int):
        w = base_layer.weight
        super().__init__(w.shape[1], w.shape[0], rank, dtype=w.dtype, device=w.device)
        self.base_layer = base_layer  # holds the shared W′ (tied across the group's depths)
        self.loop_idx = loop_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_pack is not None and self.row_pack[3] is not None:  # serving: W′ and the loops' A in one call
            _, linear_b, mask, linear_wa = self.row_pack
            y = linear_wa(x)  # [.., out + Σ ranks]
            out = self.base_layer.out_features
            return y[..., :out] + linear_b(y[..., out:] * mask)
        return self.base_layer(x) + self.delta(x)

    def loras(self) -> list[LoRA]:
        return [self]


class FusedLoopLoRALinear(nn.Module):
    """One depth's view of a shared fused linear (GPT-NeoX query_key_value): a LoRA per part.

    Part p adds B_p·A_p x to its own output rows only (models.Fused lays them out), so q, k and v
    each get a rank-r delta, and full rank on every part reaches any Wℓ.
    """

    def __init__(self, base_layer: nn.Linear, ranks: dict[str, int], rows: dict[str, torch.Tensor],
                 loop_idx: int):
        super().__init__()
        self.base_layer = base_layer  # holds the shared W′ (tied across the group's depths)
        self.loop_idx = loop_idx
        w = base_layer.weight
        self.parts = nn.ModuleDict({
            part: LoRA(w.shape[1], len(rows[part]), rank, rows[part].to(w.device), dtype=w.dtype, device=w.device)
            for part, rank in ranks.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # [.., out]
        for lora in self.parts.values():
            out = out.index_add(-1, lora.rows, lora.delta(x))
        return out

    def loras(self) -> list[LoRA]:
        return list(self.parts.values())


def per_row_lora(x: torch.Tensor, segments: Sequence[tuple[int, int, int]],
                 loras: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """Return B_{loop}A_{loop}x for x [rows, in] whose rows [lo, hi) are at `loop`, per (loop, lo, hi) → [rows, out].

    One matmul pair per segment: the engine sorts a step's rows by loop, so that is one pair per loop
    present (no per-row gather of A, which would cost rows·r·in memory; no per-call unique/nonzero).
    The engine runs the loops' packed pair instead (`rrt.serving.rows.RowLoRAs`), except unpacked for
    steps of one loop. Segments must cover the rows in order. Ranks may differ per loop;
    None means no LoRA at that loop.
    """
    out_dim = next(b.shape[0] for lora in loras if lora is not None for b in [lora[1]])
    parts = []
    for loop, lo, hi in segments:
        if loras[loop] is None:
            parts.append(x.new_zeros(hi - lo, out_dim))
        else:
            lora_a, lora_b = loras[loop]
            parts.append((x[lo:hi] @ lora_a.t()) @ lora_b.t())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def loop_segments(loop_idx: Sequence[int]) -> list[tuple[int, int, int]]:
    """Return the runs of equal loop index in row order as (loop, lo, hi)."""
    segments, start = [], 0
    for i in range(1, len(loop_idx) + 1):
        if i == len(loop_idx) or loop_idx[i] != loop_idx[start]:
            segments.append((int(loop_idx[start]), start, i))
            start = i
    return segments


def relax(rec: nn.Module, original: nn.Module, spec) -> None:
    """Add a LoRA to every shared linear of every depth of `rec`, initialised per spec.lora_init."""
    modules = add_lora_modules(rec, spec)
    orig_layers = decoder_layers(original)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for (depth, name), lora in modules.items():
            target = orig_layers[depth].get_submodule(name).weight if spec.lora_init == "svd" else None
            _init_lora(lora, target)


def lora_ranks(model: nn.Module, spec) -> dict[str, int | dict[str, int]]:
    """Return {linear name in a layer: rank} ({part: rank} for a Fused linear), each clamped to its
    matrix's min(out, in) and zeros left out; warn once if any clamped."""
    layer = decoder_layers(model)[0]
    ranks, clamped = {}, []

    def clamp(label, rank, full):
        if rank > full:
            clamped.append(f"{label} ({rank}→{full})")
        return min(rank, full)

    for name, group in family_of(model).linears.items():
        weight = layer.get_submodule(name).weight  # [out, in]
        if isinstance(group, Fused):
            part_rows = weight.shape[0] // len(group.parts)
            parts = {part: clamp(f"{name}.{part}", spec.ranks[g], min(part_rows, weight.shape[1]))
                     for part, g in group.parts}
            ranks[name] = {part: r for part, r in parts.items() if r > 0}
        else:
            ranks[name] = clamp(name, spec.ranks[group], min(weight.shape))
    if clamped:
        warnings.warn(f"lora_rank larger than a matrix's min dimension; clamped to full rank: {', '.join(clamped)}")
    return {n: r for n, r in ranks.items() if r}


def add_lora_modules(model: nn.Module, spec) -> dict[tuple[int, str], LoopLoRALinear | FusedLoopLoRALinear]:
    """Wrap each depth's shared linears in LoopLoRALinear or FusedLoopLoRALinear (zeros);
    return {(depth, name): wrapper}."""
    layers = decoder_layers(model)
    linears = family_of(model).linears
    k = len(layers) // spec.num_blocks
    out = {}
    for name, rank in lora_ranks(model, spec).items():
        for depth, layer in enumerate(layers):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(linears[name], Fused):
                rows = linears[name].rows(model.config, base.weight.shape[0])
                lora = FusedLoopLoRALinear(base, rank, rows, loop_idx=depth // k)
            else:
                lora = LoopLoRALinear(base, rank, loop_idx=depth // k)
            setattr(parent, child, lora)
            out[(depth, name)] = lora
    return out


@torch.no_grad()
def _init_lora(lora: LoopLoRALinear | FusedLoopLoRALinear, target: torch.Tensor | None) -> None:
    """SVD init (eq. 4–5) towards `target` Wℓ: each LoRA of the wrapper gets B = UᵣΣᵣ, A = Vᵣᵀ of its
    own rows of Wℓ − W′ (all rows, or a fused part's); standard init where None or those rows of Wℓ = W′.
    """
    residual = None if target is None else target.double() - lora.base_layer.weight.double()  # float64
    for part in lora.loras():
        _init_one(part, None if residual is None else part.own_rows(residual))


@torch.no_grad()
def standard_init(lora_a: nn.Parameter, lora_b: nn.Parameter, generator: torch.Generator | None = None) -> None:
    """LoRA's standard zero init (App. J: "random Gaussian for matrix A and zero for B"), so B·A starts at 0.

    A ~ N(0, 1/r²): PEFT's `init_lora_weights="gaussian"` (peft/tuners/lora/layer.py, reset_lora_parameters:
    `nn.init.normal_(lora_A, std=1 / r)`), not its default Kaiming-uniform. Drawn on the CPU in fp32, so a
    generator (or the global seed) fixes it on any device and dtype.
    """
    a = torch.empty(lora_a.shape)
    nn.init.normal_(a, std=1 / lora_a.shape[0], generator=generator)
    lora_a.copy_(a)
    lora_b.zero_()


def _init_one(lora: LoRA, residual: torch.Tensor | None) -> None:
    if residual is None or not residual.any():
        standard_init(lora.lora_A, lora.lora_B)
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


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """Return every LoRA (a LoopLoRALinear, or a part of a FusedLoopLoRALinear) by its qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRA)}


def set_trainable(model: nn.Module, *, base: bool = True, lora: bool = True) -> None:
    """Choose what trains: the shared base (everything but LoRA) and/or the LoRAs. Default: all (§2.3)."""
    for name, p in model.named_parameters():
        p.requires_grad_(lora if "lora_" in name else base)


def merge(model: nn.Module) -> nn.Module:
    """Return a plain HF model of the original class: every depth untied, W′ + B_ℓA_ℓ folded in."""
    merged = copy.deepcopy(model)
    layers = decoder_layers(merged)
    with torch.no_grad():
        for layer in layers:
            for name, p in list(layer.named_parameters()):  # untie: each depth its own tensors
                owner, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(owner), attr, nn.Parameter(p.detach().clone(), p.requires_grad))
            wrappers = {n: m for n, m in layer.named_modules() if isinstance(m, (LoopLoRALinear, FusedLoopLoRALinear))}
            for name, wrapper in wrappers.items():
                base = wrapper.base_layer
                for lora in wrapper.loras():
                    delta = (lora.lora_B.double() @ lora.lora_A.double()).to(base.weight.dtype)
                    if lora.rows is None:
                        base.weight.add_(delta)
                    else:
                        base.weight.index_add_(0, lora.rows, delta)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, base)
    del merged.config.rrt
    del merged.save_pretrained  # recursive.SavePretrainedRefused: a plain HF model saves as one again
    if hasattr(merged, "head_lora"):  # intermediate exits only: a merged one-loop model has none
        del merged.head_lora
    return merged


# ---- a LoRA on the LM head for intermediate exits (Table 13) ------------------------------------

class HeadLoRA(nn.Module):
    """A LoRA delta on the LM head, x Aᵀ Bᵀ, added to the logits of intermediate loop exits only.

    Table 13's frozen-model rows train only this adapter and leave the final loop unchanged (Δ +0.0):
    the head itself is not wrapped, so the model's forward and the last loop's logits stay exactly
    the frozen model's. `models.head_logits` applies it, given the loop index.
    """

    def __init__(self, head: nn.Linear, rank: int):
        super().__init__()
        w = head.weight  # [vocab, hidden]; often tied to the input embedding, left untouched
        self.lora_A = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, intermediate) -> torch.Tensor:
        """Return logits [.., vocab] plus the delta where `intermediate` (a bool, or a bool tensor of hidden's
        leading dims) is set; the other rows' logits are returned as they are, bit for bit."""
        if not isinstance(intermediate, torch.Tensor):
            return logits + (hidden @ self.lora_A.t()) @ self.lora_B.t() if intermediate else logits
        if not intermediate.any():
            return logits
        delta = (hidden @ self.lora_A.t()) @ self.lora_B.t()  # [.., vocab]
        return torch.where(intermediate[..., None], logits + delta, logits)


def add_head_lora(model: nn.Module, rank: int, seed: int = 0) -> HeadLoRA:
    """Give a recursive model a head LoRA for its intermediate exits (standard init, seeded); return it.

    Its rank is recorded in the model's spec (config.rrt `head_lora_rank`), so rrt.save / rrt.load
    rebuild it. The model must have num_blocks >= 2 (RecursiveSpec refuses otherwise).
    """
    from dataclasses import replace

    spec = replace(spec_of(model), head_lora_rank=rank)  # validates rank and num_blocks
    head = model.get_output_embeddings()
    if rank > min(head.weight.shape):
        raise ValueError(f"head_lora_rank={rank} exceeds the LM head's min dimension {min(head.weight.shape)}")
    lora = HeadLoRA(head, rank)
    standard_init(lora.lora_A, lora.lora_B, torch.Generator().manual_seed(seed))  # the delta starts at 0
    model.head_lora = lora
    model.config.rrt = spec.to_dict()
    return lora
