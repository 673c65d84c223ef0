"""Per-row loop LoRA for one call of the shared block (§2.4): the building block of depth-wise batching.

Lives with the serving code, not in `rrt.relax`: it needs the model's tied groups (`rrt.recursive`),
and `rrt.recursive.convert` already imports `rrt.relax`.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rrt.families import decoder_layers
from rrt.recursive import tied_groups
from rrt.spec import spec_of
from rrt.relax import LoopLoRALinear, loop_segments, lora_modules
from rrt.serving.packed import pack_weight

__all__ = ["RowLoRAs", "per_row_loops", "loop_segments"]


class RowLoRAs:
    """Every shared LoRA's loops, gathered once per served model, applied per row for a step's block call.

    Each shared LoRA (the one at the first depth of its tied group) gets its loops' (A, B) pairs and
    the pairs packed side by side: A_cat [Σ ranks, in] (rows: loop 0's A, loop 1's, ...) and
    B_cat [out, Σ ranks]. The packed pair runs once over all rows, with each row's columns of
    x·A_catᵀ outside its own loop zeroed, so every row gets exactly B_loop·A_loop·x (`LoRA.delta`).
    Unpacked (pack=False), a step whose rows hold one loop runs that loop's pair alone.

    Why packed: on the CPU these matmuls are tiny (a few rows by rank 64) and cost per call, not per
    FLOP. Measured on SmolLM2-135M's seven linears of one layer, bf16, 8 rows in two loops, one
    thread: base linears alone 0.41 ms, plus one LoRA pair per loop 1.07 ms, plus the packed pair
    0.80 ms, though the packed pair does B× the LoRA FLOPs (the paper's App. A choice).

    pack (bf16 on a CPU, `rrt.serving.packed`): the weights are also reordered once for oneDNN, and
    a LoopLoRALinear's shared W′ and A_cat become one weight [W′; A_cat], so x·W′ᵀ and x·A_catᵀ are
    one call (`fused_bases`: the base linears this covers). Every step then takes the packed path.
    The weights are copied at construction (`nbytes`): build it for serving a frozen model.
    """

    def __init__(self, model: nn.Module, *, pack: bool = False):
        layers = decoder_layers(model)
        self.pack = pack
        self.entries = []  # (shared LoRA, its loops' (A, B), row_pack without its mask, ranks)
        self.fused_bases: list[nn.Linear] = []
        self.nbytes = 0
        for group in tied_groups(len(layers), spec_of(model).num_blocks):
            for name, lora in lora_modules(layers[group[0]]).items():
                pairs = [(m.lora_A, m.lora_B) for m in (layers[d].get_submodule(name) for d in group)]
                with torch.no_grad():
                    a_cat = torch.cat([a for a, _ in pairs]).detach()
                    b_cat = torch.cat([b for _, b in pairs], dim=1).detach()
                linear_a = linear_wa = None
                if pack and isinstance(lora, LoopLoRALinear):  # A_cat rides in [W′; A_cat]
                    base = lora.base_layer
                    with torch.no_grad():
                        wa = torch.cat([base.weight.detach(), a_cat])
                        bias = None if base.bias is None else torch.cat([base.bias.detach(), a_cat.new_zeros(len(a_cat))])
                    linear_wa = partial(pack_weight(wa), bias=bias)
                    self.fused_bases.append(base)
                    self.nbytes += wa.numel() * wa.element_size()
                else:
                    linear_a = pack_weight(a_cat) if pack else partial(F.linear, weight=a_cat)
                    self.nbytes += a_cat.numel() * a_cat.element_size()
                linear_b = pack_weight(b_cat) if pack else partial(F.linear, weight=b_cat)
                self.nbytes += b_cat.numel() * b_cat.element_size()
                self.entries.append((lora, pairs, (linear_a, linear_b, linear_wa), tuple(a.shape[0] for a, _ in pairs)))

    @contextmanager
    def apply(self, segments: Sequence[tuple[int, int, int]]):
        """Within the block, shared layer j (depth j < K) applies each row's own loop LoRA.

        `segments` are (loop, lo, hi) runs over the rows of the hidden states fed to the layer (their
        leading dims flattened, e.g. [batch, seq] row-major), covering them in order (the engine sorts
        rows by loop, so one run per loop; any order works); `loop_segments(loop_idx)` builds them.
        """
        segments = list(segments)
        masks = {}  # ranks → [rows, Σ ranks] 0/1: row i keeps its loop's columns of x·A_catᵀ
        packed = self.pack or len({loop for loop, _, _ in segments}) > 1
        for lora, pairs, (linear_a, linear_b, linear_wa), ranks in self.entries:
            lora.row_loras, lora.row_segments, lora.row_pack = pairs, segments, None
            if packed:
                if ranks not in masks:
                    masks[ranks] = _loop_mask(segments, ranks, pairs[0][0])
                lora.row_pack = (linear_a, linear_b, masks[ranks], linear_wa)
        try:
            yield
        finally:
            for lora, *_ in self.entries:
                lora.row_loras = lora.row_segments = lora.row_pack = None


def _loop_mask(segments, ranks, like: torch.Tensor) -> torch.Tensor:
    offsets = [0]
    for rank in ranks:
        offsets.append(offsets[-1] + rank)
    mask = like.new_zeros(segments[-1][2], offsets[-1])
    for loop, lo, hi in segments:
        mask[lo:hi, offsets[loop]:offsets[loop + 1]] = 1
    return mask


@contextmanager
def per_row_loops(model: nn.Module, segments: Sequence[tuple[int, int, int]]):
    """`RowLoRAs(model).apply(segments)` for one call (the engine builds its RowLoRAs once)."""
    with RowLoRAs(model).apply(segments):
        yield
