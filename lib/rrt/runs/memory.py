"""The memory model of a run: per-GPU bytes by component from shapes alone (`estimate_memory`), what a plan sizes
its micro-batch, checkpointing, loss chunking, teacher dtype and sharding by, and what a run is refused on before
any weights load.

Components, per process: fp32 master parameters (FSDP2: a 1/n shard, plus the unsharded copy it all-gathers: a
shared layer is used again at every depth, so every layer stays gathered through forward and backward); the
working copy bf16 autocast caches of every weight it casts; fp32 gradients of what trains (DDP: plus its bucket
copy); AdamW's two fp32 moments; the frozen teacher in teacher_dtype; activations saved for backward; the exits'
logits and their loss tensors; a named allowance for workspace and fragmentation.

Activations per token of one decoder-layer pass (`LAYER_BYTES`) were counted, not derived: every tensor the HF
modules (transformers 5, SDPA attention, which saves q, k, v, the output and a per-head fp32 logsumexp, no
[seq, seq] probabilities; eager attention would add heads·seq·4 bytes per token) hand to autograd's
saved_tensors_hooks, measured at two sequence lengths, two depths and three widths on this CPU, bf16 autocast and
fp32. Korthikanti et al. (2022) give the same shape of formula (34·h + 5·a·s per token for GPT-3 in fp16); ours
differ because RMSNorm upcasts to fp32 and the residual stream stays fp32 under autocast (fp32 master weights).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import torch
from transformers import AutoModelForCausalLM

from rrt.devices import native_bf16
from rrt.models import model_config
from rrt.recursive import convert, count_parameters
from rrt.spec import RecursiveSpec
from rrt.trainconfig import TrainConfig

GB = 1e9
# Bytes saved for backward per token by one decoder-layer pass: coefficients of (hidden, q_dim = heads·head_dim,
# kv_dim, intermediate, heads, 1), by family and compute dtype (bf16 autocast | fp32), measured as the module
# docstring says. Llama and Gemma share one layer shape (gated MLP: gate, up, act, product; 2 RMSNorms in fp32);
# GPT-NeoX's fused qkv counts in `hidden` (q_dim = kv_dim = hidden) and its MLP has no gate.
LAYER_BYTES = {
    ("llama", "bf16"): (26, 4, 4, 8, 4, 8), ("llama", "fp32"): (24, 8, 8, 16, 4, 8),
    ("gpt_neox", "bf16"): (22, 0, 0, 4, 4, 16), ("gpt_neox", "fp32"): (40, 0, 0, 8, 4, 16),
}
LAYER_SHAPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma": "llama", "gemma2": "llama",
               "gemma3_text": "llama", "gpt_neox": "gpt_neox"}
# A relaxed layer's LoRAs (relax.py), per token: autocast casts each LoRA'd linear's fp32 input to bf16 again for
# its A (inputs: coefficients of hidden, q_dim, intermediate) and each LoRA saves its rank-r A·x (how many LoRAs:
# GPT-NeoX's fused qkv holds one per part).
LORA_INPUTS = {"llama": ((5, 1, 1), 7), "gpt_neox": ((5, 0, 1), 6)}
# Per token and vocabulary entry, in bytes, measured as peak RSS on this CPU (tests/test_memory.py): each exit keeps
# its head output's kept rows and CE's fp32 log-softmax (8 under bf16 autocast); backward adds one exit's fp32
# logit gradient at a time (4); KD adds the student's second kept+upcast copy, its log-softmax and the divergence's
# fp32 terms; the teacher its logits, kept rows, upcast and log-softmax (rrt.losses). fp32 rows: the same tensors
# at 4 bytes (not measured: this CPU trains in bf16).
LOGIT_BYTES = {"bf16": {"exit": 8, "backward": 4, "kd": 18, "teacher": 12},
               "fp32": {"exit": 12, "backward": 4, "kd": 20, "teacher": 16}}
# Allowance for what torch does not count as tensors: the CUDA context, cuBLAS/NCCL workspaces (~1 GB together),
# and allocator fragmentation (5% of the rest).
CUDA_CONTEXT = 1.0 * GB
FRAGMENTATION = 0.05
MEMORY_RULE = ("estimate_memory: fp32 weights, grads and AdamW moments of what trains, bf16 autocast copies, "
               "activations saved by every depth's layer passes, every exit's logits, CUDA context + 5%")
# A memory plan fits each run's estimate in this share of the card (10% headroom for what the model leaves out).
HEADROOM = 0.9
# Loss chunk a memory plan chooses: 1024 tokens' logits at Gemma's 256K vocabulary are 1 GB per fp32 copy; a
# smaller chunk saves little more and costs the same recompute (the head once more per token).
PLAN_CHUNK_TOKENS = 1024
# A sharded FSDP2 step's extra time (all-gathers in forward and backward, a reduce-scatter; mostly overlapped).
FSDP_OVERHEAD = 0.05


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per process of one run by component (estimate_memory); `total` their sum."""
    parameters: int      # fp32 master weights (FSDP: this process's shard)
    working_copy: int    # bf16 autocast casts of the weights; FSDP: the all-gathered unsharded parameters
    gradients: int       # fp32 gradients of trainable parameters (DDP: + its bucket copy; FSDP: the shard)
    optimizer: int       # AdamW's two fp32 moments (FSDP: the shard)
    teacher: int         # the frozen KD teacher in teacher_dtype
    activations: int     # saved for backward by every decoder-layer pass of every depth (and each exit's norm)
    logits: int          # every exit's logits and loss tensors (loss_chunk_tokens: one chunk's)
    overlap: int         # <= 0: what is never live at once. Backward peaks at its start (working copy, every
                         # activation and logit, the head's gradient, the first allocated) or at its end (every
                         # gradient, the rest freed): total counts the larger, not both
    workspace: int       # CUDA context, library workspaces, fragmentation
    checkpoint: int      # bytes on disk of one checkpoint (weights + optimizer state): not in `total`

    @property
    def total(self) -> int:
        return sum(v for k, v in self.to_dict().items() if k != "checkpoint")

    @property
    def gb(self) -> float:
        return self.total / GB

    def to_dict(self) -> dict[str, int]:
        """Return {component: bytes}, the checkpoint size last."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Return the components in GB, one per line, and the total."""
        rows = [f"{k:>13} {v / GB:8.2f} GB" for k, v in self.to_dict().items() if k != "checkpoint"]
        return "\n".join([*rows, f"{'total':>13} {self.gb:8.2f} GB", f"{'checkpoint':>13} "
                          f"{self.checkpoint / GB:8.2f} GB on disk"])


def estimate_memory(config: TrainConfig, *, device_kind: str = "cuda") -> MemoryEstimate:
    """Return the peak memory per process of training `config` on `device_kind` ("cuda" | "cpu"), from shapes alone
    (meta-device models: no weights, no hub beyond the config)."""
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"device_kind={device_kind!r}: valid values are 'cuda', 'cpu'")
    compute = "bf16" if config.precision == "bf16" or (config.precision == "auto" and native_bf16(device_kind)) \
        else "fp32"
    cfg = model_config(config.model)
    family = LAYER_SHAPE.get(cfg.model_type)
    if family is None:
        raise ValueError(f"model_type {cfg.model_type!r} has no memory model; valid: {sorted(LAYER_SHAPE)}")
    counts = _counts(config.model, config.num_blocks if config.baseline == "reduced" else 1,
                     config.num_blocks if config.baseline is None else 1,
                     config.lora_rank if config.baseline is None else 0, config.head_lora_rank, config.module_ranks)
    stored, trains = counts["total"], counts[config.trainable]
    shards = config.num_processes if config.sharding == "fsdp" else 1
    ddp = config.num_processes > 1 and config.sharding == "none"
    cast = 2 if compute == "bf16" else 4
    tokens = config.batch_size * (config.seq_len or cfg.max_position_embeddings)
    parameters = 4 * stored // shards
    working_copy = cast * stored if compute == "bf16" or shards > 1 else 0
    gradients = 4 * trains // shards
    buckets = 4 * trains if ddp else 0  # DDP's flat gradient buckets, allocated once beside param.grad
    optimizer = 8 * trains // shards
    teacher = (_counts(config.model, 1, 1, 0, 0)["total"] * (4 if config.teacher_dtype == "float32" else 2)
               if config.kd else 0)
    activations = _activations(config, cfg, family, compute, tokens, counts["depths"])
    logits = _logits(config, cfg, compute, tokens)
    head = 4 * cfg.vocab_size * cfg.hidden_size // shards if config.trainable in ("all", "base") else 0
    backward = working_copy + activations + logits
    overlap = max(gradients, backward + head) - gradients - backward
    subtotal = parameters + working_copy + gradients + buckets + optimizer + teacher + activations + logits + overlap
    # torch's CPU allocator hands freed blocks back (large ones are mmapped); CUDA's caching allocator keeps them
    workspace = int(FRAGMENTATION * subtotal + CUDA_CONTEXT) if device_kind == "cuda" else 0
    return MemoryEstimate(parameters=parameters, working_copy=working_copy, gradients=gradients + buckets,
                          optimizer=optimizer, teacher=teacher, activations=activations, logits=logits,
                          overlap=overlap, workspace=workspace, checkpoint=4 * stored + 8 * trains)


def fit_memory(config: TrainConfig, *, gpu_memory_gb: float, name: str = "") -> dict:
    """Return the execution fields that fit `config` in HEADROOM × gpu_memory_gb per GPU at the least extra time:
    batch_size (the largest divisor of its sequences per process and step, batch_size × grad_accum, not above
    batch_size) with grad_accum keeping the global batch, gradient_checkpointing, loss_chunk_tokens, teacher_dtype,
    sharding. Ties go to the larger micro-batch, then to the fewest changes. Raise ValueError naming the run and
    its smallest estimate when nothing fits."""
    budget = HEADROOM * gpu_memory_gb * GB
    per_process = config.batch_size * config.grad_accum
    options = []
    for micro in (d for d in range(config.batch_size, 0, -1) if per_process % d == 0):
        for checkpointing in dict.fromkeys((config.gradient_checkpointing, True)):
            for chunk in dict.fromkeys((config.loss_chunk_tokens, PLAN_CHUNK_TOKENS)):
                for teacher in dict.fromkeys((config.teacher_dtype, "bfloat16") if config.kd else
                                             (config.teacher_dtype,)):
                    for sharding in dict.fromkeys((config.sharding, "fsdp") if config.num_processes > 1 else
                                                  (config.sharding,)):
                        fields = dict(batch_size=micro, grad_accum=per_process // micro,
                                      gradient_checkpointing=checkpointing, loss_chunk_tokens=chunk,
                                      teacher_dtype=teacher, sharding=sharding)
                        candidate = dataclasses.replace(config, **fields)
                        changes = sum(getattr(config, k) != v for k, v in fields.items())
                        options.append((round(extra_time(candidate), 4), -micro, changes, fields, candidate))
    options.sort(key=lambda o: o[:3])
    for *_, fields, candidate in options:
        if estimate_memory(candidate).total <= budget:
            return fields
    least = min(estimate_memory(o[-1]).total for o in options)
    raise ValueError(f"run {name!r} does not fit {HEADROOM:.0%} of gpu_memory_gb={gpu_memory_gb}: "
                     f"{least / GB:.1f} GB per GPU at best (micro-batch 1, gradient checkpointing, loss chunks "
                     f"of {PLAN_CHUNK_TOKENS} tokens, a bf16 teacher, FSDP over {config.num_processes}); "
                     f"use more GPUs per run or a larger card")


def check_fits(config: TrainConfig, *, name: str, limit_bytes: int, where: str) -> MemoryEstimate:
    """Return the run's estimate, or raise RuntimeError naming the run, its estimate by component and the limit
    when it exceeds `limit_bytes` (`where`: what the limit is, for the message)."""
    estimate = estimate_memory(config)
    if estimate.total > limit_bytes:
        raise RuntimeError(
            f"run {name!r} needs ~{estimate.gb:.1f} GB per GPU but {where} has {limit_bytes / GB:.1f} GB; refused "
            f"before loading weights. Its estimate (rrt.runs.memory):\n{estimate.table()}\nPlan it with "
            f"gpu_memory_gb set (make plan sizes micro-batch, checkpointing, loss chunks, teacher dtype, sharding), "
            f"or lower batch_size / set gradient_checkpointing, loss_chunk_tokens, teacher_dtype='bfloat16', "
            f"sharding='fsdp'")
    return estimate


def extra_time(config: TrainConfig) -> float:
    """Return the fraction of training time the memory savers of `config` add (0: none): gradient checkpointing
    recomputes every layer's forward (2·N of 6·N FLOPs), loss chunking the LM head's (2·V·d per token and exit,
    of the 6·N·T a step costs), FSDP its collectives (FSDP_OVERHEAD); a bf16 teacher costs nothing."""
    cfg = model_config(config.model)
    counts = _counts(config.model, config.num_blocks if config.baseline == "reduced" else 1,
                     config.num_blocks if config.baseline is None else 1,
                     config.lora_rank if config.baseline is None else 0, config.head_lora_rank, config.module_ranks)
    head = cfg.vocab_size * cfg.hidden_size
    exits = config.num_blocks if config.objective == "early_exit" else 1
    layers = counts["passed"]
    step = 6 * (layers + head * exits)
    extra = 0.0
    if config.gradient_checkpointing:
        extra += 2 * layers / step
    if config.loss_chunk_tokens:
        extra += 2 * head * exits / step
    if config.sharding == "fsdp" and config.num_processes > 1:
        extra += FSDP_OVERHEAD
    return extra


def _activations(config: TrainConfig, cfg, family: str, compute: str, tokens: int, depths: int) -> int:
    """Bytes saved for backward by the decoder-layer passes (and the exits' final norms) of one micro-batch."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    coef = LAYER_BYTES[(family, compute)]
    per_layer = (coef[0] * h + coef[1] * heads * head_dim + coef[2] * kv_heads * head_dim + coef[3] * inter
                 + coef[4] * heads + coef[5])
    if config.lora_rank and config.baseline is None:
        (a, b, c), loras = LORA_INPUTS[family]
        recast = 2 * (a * h + b * heads * head_dim + c * inter) if compute == "bf16" else 0
        # every LoRA's [tokens, rank] output at lora_rank: per-module ranks (Table 8) keep less, bounded by this
        per_layer += recast + loras * (2 if compute == "bf16" else 4) * config.lora_rank
    exits = config.num_blocks if config.objective == "early_exit" else 1
    norms = exits * 10 * h  # each exit's fp32 final norm and its cast for the head
    if config.gradient_checkpointing:
        # every pass keeps only its fp32 input; one pass's full activations live again during its recompute
        return tokens * (depths * 4 * h + per_layer + norms)
    return tokens * (depths * per_layer + norms)


def _logits(config: TrainConfig, cfg, compute: str, tokens: int) -> int:
    """Bytes of the exits' logits and loss tensors: every exit's [tokens, vocab] at once, or one chunk's."""
    rows = min(config.loss_chunk_tokens, tokens) if config.loss_chunk_tokens else tokens
    per = LOGIT_BYTES[compute]
    exits = config.num_blocks if config.objective == "early_exit" else 1
    # the teacher distils the last exit only; self-distillation every intermediate exit from the detached last
    distilled = (1 if config.kd else 0) + (exits - 1 if config.self_distill else 0)
    per_token = exits * per["exit"] + per["backward"] + distilled * per["kd"] + (per["teacher"] if config.kd else 0)
    return rows * cfg.vocab_size * per_token


@functools.lru_cache(maxsize=64)
def _counts(model: str, reduce_by: int, num_blocks: int, lora_rank: int, head_lora_rank: int,
            module_ranks: tuple[int, int, int, int] | None = None) -> dict:
    """Parameters of the model a run trains, stored once however many depths share them: total and what each
    `trainable` choice trains; `depths`, the decoder-layer passes of a forward; `passed`, the non-embedding
    parameters a token passes through (every depth's)."""
    cfg = copy.deepcopy(model_config(model))
    cfg.num_hidden_layers //= reduce_by
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    passed = count_parameters(m)["non_embedding"]
    if num_blocks > 1 or lora_rank or head_lora_rank:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamped ranks
            m = convert(m, RecursiveSpec(num_blocks=num_blocks, lora_rank=lora_rank, lora_init="zero",
                                         module_ranks=module_ranks if lora_rank else None,
                                         head_lora_rank=head_lora_rank))
    counts = count_parameters(m)
    head_lora = sum(p.numel() for n, p in m.named_parameters() if n.startswith("head_lora"))
    lora = counts["lora"] - sum(p.numel() for n, p in m.named_parameters() if n.startswith("head_lora")
                                and "lora_" in n)
    return {"total": counts["total"], "all": counts["total"], "base": counts["total"] - lora - head_lora,
            "lora": lora + head_lora, "head_lora": head_lora, "depths": cfg.num_hidden_layers, "passed": passed}
