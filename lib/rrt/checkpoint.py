"""Compact save/load of (relaxed) recursive models: unique tensors once, ties rebuilt on load."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"  # beside the weights in train.py's checkpoints: step, scheduler


def save(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write config (with the recursion spec) + each unique tensor once to `path`; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file(unique_state_dict(model), path / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state dict with every shared tensor once, under its first (shallowest) key."""
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach().contiguous()
    return out


def load(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Return the model saved by `save`, ties and LoRAs rebuilt from its spec; needs no original model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rrt.recursive import spec_of, tie_layers

    path = _checked(path)
    config = AutoConfig.from_pretrained(path)
    state = load_file(path / WEIGHTS)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    spec = spec_of(model)  # refuses a spec that does not fit the model's layer count
    tie_layers(model, spec)
    if any(spec.ranks.values()):
        from rrt.relax import add_lora_modules
        add_lora_modules(model, spec)
    if spec.head_lora_rank:
        from rrt.relax import add_head_lora
        add_head_lora(model, spec.head_lora_rank)
    _load_unique(model, state)
    return model.to(device=device, dtype=dtype or model.dtype).eval()


def load_into(model: nn.Module, path: str | Path) -> int | None:
    """Copy a `save` directory's unique tensors into `model` in place (ties survive); return the training
    step stored beside them (a train.py checkpoint), or None. The model must have exactly those tensors."""
    path = _checked(path)
    state, own = load_file(path / WEIGHTS), unique_state_dict(model)
    if set(state) != set(own):
        raise ValueError(f"{path} does not match the model: tensors in one but not the other: "
                         f"{sorted(set(state) ^ set(own))[:5]}")
    _load_unique(model, state)
    if not (path / TRAINING_STATE).exists():
        return None
    return torch.load(path / TRAINING_STATE, weights_only=False)["step"]


def _checked(path: str | Path) -> Path:
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise ValueError(f"{path} holds no {WEIGHTS}: not a directory written by rrt.save")
    return path


def _load_unique(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the unique tensors in; every key left out must alias one that was loaded."""
    full = model.state_dict(keep_vars=True)
    unknown = set(state) - set(full)
    if unknown:
        raise ValueError(f"checkpoint has tensors the model lacks: {sorted(unknown)[:5]}")
    loaded = {id(full[k]) for k in state}
    missing = [k for k, t in full.items() if k not in state and id(t) not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            full[key].copy_(value)
