"""Per-row loop LoRA for one call of the shared block (§2.4): the building block of depth-wise batching.

Lives with the serving code, not in `rrt.relax`: it needs the model's tied groups (`rrt.recursive`),
and `rrt.recursive.convert` already imports `rrt.relax`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

from torch import nn

from rrt.models import decoder_layers
from rrt.recursive import spec_of, tied_groups
from rrt.relax import loop_segments, lora_modules

__all__ = ["per_row_loops", "loop_segments"]


@contextmanager
def per_row_loops(model: nn.Module, segments: Sequence[tuple[int, int, int]]):
    """Within the block, running shared layer j (depth j < K) applies each row's own loop LoRA.

    `segments` are (loop, lo, hi) runs over the rows of the hidden states fed to the layer (their
    leading dims flattened, e.g. [batch, seq] row-major); `loop_segments(loop_idx)` builds them.
    """
    layers = decoder_layers(model)
    groups = tied_groups(len(layers), spec_of(model).num_blocks)
    touched = []
    for group in groups:
        for name, lora in lora_modules(layers[group[0]]).items():
            lora.row_loras = [(m.lora_A, m.lora_B) for m in
                              (layers[d].get_submodule(name) for d in group)]
            lora.row_segments = list(segments)
            touched.append(lora)
    try:
        yield
    finally:
        for lora in touched:
            lora.row_loras = lora.row_segments = None
