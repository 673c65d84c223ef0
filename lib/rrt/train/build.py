"""The models a `TrainConfig` describes: the student to train and the frozen KD teacher."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rrt.checkpoint import WEIGHTS, load
from rrt.families import decoder_layers
from rrt.models import load_model, model_config
from rrt.recursive import convert
from rrt.relax import add_head_lora, set_trainable
from rrt.spec import check_num_blocks, spec_of
from rrt.trainconfig import TrainConfig


def build_student(config: TrainConfig, original: nn.Module) -> nn.Module:
    """Return the model to train (fp32 master weights), its trainable parameters set; `original` untouched.

    Conversion of `original` (co-training; baseline "full" is num_blocks=1, identical to it), the
    `init_from` checkpoint (post-training; given a head LoRA if the config asks for one), or a
    random L/B-layer model (baseline "reduced").
    """
    if config.baseline == "reduced":
        model = _reduced_model(original, config.num_blocks)
    elif config.init_from is not None:
        model = load(config.init_from, dtype=torch.float32)
        _check_init_from(config, spec_of(model))
        if config.head_lora_rank and not spec_of(model).head_lora_rank:
            add_head_lora(model, config.head_lora_rank, seed=config.seed)
    else:
        model = convert(original, config.spec()).float()
    _set_trainable_parts(model, config.trainable)
    return model.train()


def check_fits(config: TrainConfig, original: nn.Module | None) -> None:
    """Raise unless config.num_blocks divides the layer count of the model it converts (`original`, else
    config.model's config: shapes only), so a bad B stops before any run directory is made or model loaded."""
    if config.init_from is not None:  # a saved recursive model: its own spec is checked against the config on load
        return
    layers = len(decoder_layers(original)) if original is not None else model_config(config.model).num_hidden_layers
    try:
        check_num_blocks(layers, config.num_blocks)
    except ValueError as err:
        raise ValueError(f"TrainConfig.num_blocks: {err} (model {config.model!r})") from None


def _check_init_from(config: TrainConfig, saved) -> None:
    """Raise unless the init_from model's spec is the config's (a head LoRA may be added to it, Table 13)."""
    wanted = config.spec().to_dict()
    got = saved.to_dict()
    if got["head_lora_rank"] == 0:
        got["head_lora_rank"] = wanted["head_lora_rank"]
    diff = {k: (got[k], wanted[k]) for k in wanted if k != "seed" and got[k] != wanted[k]}
    if diff:
        raise ValueError(f"init_from={config.init_from!r} holds another spec; differing fields (saved, config): {diff}")


def build_teacher(config: TrainConfig, original: nn.Module, device) -> nn.Module | None:
    """Return the KD teacher, frozen, eval mode, on `device` (None without KD): `config.teacher` loaded
    (an rrt.save dir or a load_model source), or `original` itself when teacher is None."""
    if config.kd is None:
        return None
    dtype = getattr(torch, config.teacher_dtype)
    if config.teacher is not None:
        if (Path(config.teacher) / WEIGHTS).exists():
            original = load(config.teacher, dtype=dtype)
        else:
            original = load_model(config.teacher, dtype=dtype)[0]
    # a cast copies (the caller's original stays as it was); same dtype: the very same model, no copy
    teacher = original if next(original.parameters()).dtype == dtype else copy.deepcopy(original)
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def _reduced_model(original: nn.Module, num_blocks: int) -> nn.Module:
    """Return a random-init model of L/B layers and the original's widths (the paper's small baseline)."""
    num_layers = len(decoder_layers(original))
    check_num_blocks(num_layers, num_blocks)
    cfg = copy.deepcopy(original.config)
    cfg.num_hidden_layers = num_layers // num_blocks
    if isinstance(getattr(cfg, "layer_types", None), list):  # Gemma 2/3: keep the first L/B types
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _set_trainable_parts(model: nn.Module, trainable: str) -> None:
    """all: everything; base: all but LoRAs; lora: the LoRAs (the head LoRA too); head_lora: it alone."""
    if trainable == "head_lora":
        model.requires_grad_(False)
        model.head_lora.requires_grad_(True)
    else:
        set_trainable(model, base=trainable in ("all", "base"), lora=trainable in ("all", "lora"))
