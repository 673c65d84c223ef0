"""The one table of per-family knowledge (STYLE.md): where each architecture keeps its decoder layers,
final norm and linears, and the exit head every loop reads (`head_logits`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rrt.spec import num_loops


@dataclass(frozen=True)
class Fused:
    """A linear whose output stacks several projections ("parts"), each with its own LoRA rank group.

    The output is laid out as [.., groups, parts·part_dim] (GPT-NeoX's query_key_value: one group per
    attention head, each head's slice split into q, k, v), so a part's rows are not contiguous.
    """
    parts: tuple[tuple[str, str], ...]  # (part, rank group), in their order within each group
    groups: str                         # the config attribute holding the number of groups (heads)

    def rows(self, config, out_features: int) -> dict[str, torch.Tensor]:
        """Return {part: the output rows it owns}, as index tensors of out_features / len(parts) rows."""
        num_groups = getattr(config, self.groups)
        if out_features % (num_groups * len(self.parts)):
            raise ValueError(f"{out_features} output rows do not split into {num_groups} {self.groups} "
                             f"x {len(self.parts)} parts")
        grid = torch.arange(out_features).view(num_groups, len(self.parts), -1)  # [groups, parts, part_dim]
        return {part: grid[:, i].reshape(-1) for i, (part, _) in enumerate(self.parts)}


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps what recursion touches (paths relative to the model / a layer)."""
    layers: str                 # nn.ModuleList of decoder layers, one per depth
    final_norm: str             # the norm applied before the LM head
    # linear inside a layer -> its LoRA rank group (Table 8: q, kv, o, mlp), or a Fused spec giving
    # one rank group per part
    linears: dict[str, str | Fused]
    # state-dict keys one tensor has had across transformers versions (checkpoints use either name)
    aliases: tuple[tuple[str, str], ...] = ()


_LLAMA_LINEARS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv",
    "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp",
}
_LLAMA = Family(layers="model.layers", final_norm="model.norm", linears=_LLAMA_LINEARS)
# GPT-NeoX fuses q, k and v into one linear and splits its output per head
# (modeling_gpt_neox: view(.., heads, 3·head_dim).chunk(3)): q, k and v each get their own LoRA, as
# the paper's Pythia sizes count them (Table 17: 0.44B at r=64 … 0.70B at r=512).
_QKV_PER_HEAD = Fused(parts=(("q", "q"), ("k", "kv"), ("v", "kv")), groups="num_attention_heads")
# The one table of per-family knowledge (STYLE.md).
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gemma": _LLAMA, "gemma2": _LLAMA, "gemma3_text": _LLAMA,
    "gpt_neox": Family(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", linears={
        "attention.query_key_value": _QKV_PER_HEAD, "attention.dense": "o",
        "mlp.dense_h_to_4h": "mlp", "mlp.dense_4h_to_h": "mlp"},
        # transformers 5 renamed the head embed_out -> lm_head; hub checkpoints (and its save_pretrained,
        # conversion_mapping.py) keep embed_out, rrt.save writes the running version's name
        aliases=(("embed_out.weight", "lm_head.weight"),)),
}


def family_of(model: nn.Module) -> Family:
    """Return the Family entry for a model, or raise naming the supported model types."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the model's decoder layers (one module per depth); a bare decoder (no LM head) is refused."""
    path = family_of(model).layers
    try:
        return model.get_submodule(path)
    except AttributeError:  # e.g. transformers.LlamaModel: its layers sit at `layers`, and it has no head
        raise ValueError(f"{type(model).__name__} has no decoder layers at {path!r}: rrt needs a causal LM with its "
                         f"LM head (a ...ForCausalLM, e.g. AutoModelForCausalLM.from_pretrained or rrt.load_model), "
                         f"not the bare decoder") from None


def head_logits(model: nn.Module, hidden: torch.Tensor, loop_idx: int | torch.Tensor | None = None) -> torch.Tensor:
    """Return loop `loop_idx`'s exit logits for decoder output `hidden` [batch, seq, hidden]: final norm,
    LM head, the head LoRA at intermediate loops (Table 13, relax.HeadLoRA), softcap.

    loop_idx: an int, or a LongTensor of per-row loops shaped like hidden's leading dims [batch, seq];
    None means the model's own head (its forward's, the last loop's), refused if it has a head LoRA.
    Every op is per token, so with an int loop_idx any leading dims work: a chunk of tokens [n, hidden]
    gives those tokens' logits, equal up to float rounding (the chunked losses rely on it, `recursive.loop_heads`).
    """
    hidden = model.get_submodule(family_of(model).final_norm)(hidden)
    logits = model.get_output_embeddings()(hidden)
    head_lora = getattr(model, "head_lora", None)
    if head_lora is not None:
        if loop_idx is None:
            raise ValueError("this model has a head LoRA for intermediate exits: pass loop_idx "
                             "(0-based) to head_logits")
        logits = head_lora(hidden, logits, intermediate=loop_idx < num_loops(model) - 1)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma 2/3: the same three ops as their modeling files, for exact equality
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits
