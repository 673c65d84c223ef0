"""What the engine accepts, checked before any compute: requests (`check_requests`, `check_request`, `token_ids`) and a
model (`check_supported`); and the engine-side records of a request (`Live`) and of a step (`StepProfile`)."""
from __future__ import annotations

import math
import operator
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass, field

import torch

from rrt.spec import spec_of


@dataclass
class Request:
    """A generation request: prompt token ids, how many tokens to generate, when it arrives.

    Generation ends after `max_new_tokens` tokens or at the first emitted token in
    `stop_token_ids` or the engine's `eos_token_id`; that stop token is included in the output
    (HF `generate()`'s convention for eos). A request arrives at engine step `arrival_step` and,
    if `arrival_s` is set, once that many seconds of `Engine.run` have passed (a Poisson load).
    `forced` teacher-forces the output: those tokens are emitted (exits still decided by the
    policy) and `Engine.logprobs` holds, per forced token, its log-probability under the logits of
    its exit loop and whether it was their argmax (lm-eval's loglikelihood, perplexity).
    """
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0            # engine step at which it joins the queue
    request_id: int | str | None = None  # defaults to the submission index
    stop_token_ids: Collection[int] = ()  # per-request stop tokens, alongside the engine's eos
    arrival_s: float | None = None   # seconds after `run` starts
    forced: Sequence[int] | None = None  # exactly max_new_tokens ids to emit instead of the argmax


@dataclass
class Live:
    """Engine-side state of an admitted request."""
    request: Request
    slot: int
    order: int
    tokens: list[int]
    done: list[int]                  # per loop: positions [0, done[b]) have finished loop b
    stop: frozenset = frozenset()    # the engine's eos ids ∪ the request's stop_token_ids
    exit_loops: list[int] = field(default_factory=list)
    filled: dict = field(default_factory=dict)  # position -> exit loop, its deeper depths filled (copy policies)
    logprobs: list[tuple[float, bool]] = field(default_factory=list)  # forced: (log-prob, was the argmax)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]


@dataclass
class StepProfile:
    """Wall-clock per engine phase (`Engine(profile=True)`), and the attention work actually done.

    schedule_s: admission, scheduling and the step layout (row tags, loop segments, attention
    buckets). block_s: the K shared layers (projections, LoRA, KV writes, attention); attn_s: the
    part of block_s in `ragged_attention`. route_s: exit decisions, LM head on the rows that need
    it, bookkeeping, KV fills; head_s: the LM head part of it. scores_computed / scores_needed:
    Σ over layer calls of the attention scores computed vs the allowed (row, key) pairs, whose
    ratio is the padding waste. step_rows / step_block_s: per step, for a fit.
    """
    schedule_s: float = 0.0
    block_s: float = 0.0
    attn_s: float = 0.0
    route_s: float = 0.0
    head_s: float = 0.0
    scores_computed: int = 0
    scores_needed: int = 0
    step_rows: list = field(default_factory=list)
    step_block_s: list = field(default_factory=list)

    @property
    def score_waste(self) -> float:
        return self.scores_computed / max(self.scores_needed, 1)

    def fixed_and_per_row_cost(self) -> tuple[float, float]:
        """Least-squares fit block_s ≈ a + b·rows over steps: (a per call, b per row), in seconds."""
        if len(set(self.step_rows)) < 2:
            return float("nan"), float("nan")
        x = torch.tensor(self.step_rows, dtype=torch.float64)
        y = torch.tensor(self.step_block_s, dtype=torch.float64)
        design = torch.stack([torch.ones_like(x), x], 1)
        a, b = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
        return a, b



def check_limits(*, token_budget, max_active, max_seq_len) -> None:
    """Raise ValueError naming a bad engine limit: rows per step, live requests, KV positions per request."""
    if token_budget < 1 or max_active < 1:
        raise ValueError(f"token_budget and max_active must be >= 1, got {token_budget}, {max_active}")
    if max_seq_len is not None and (not is_int(max_seq_len) or max_seq_len < 1):  # 0 would mean the default
        raise ValueError(f"max_seq_len must be an int >= 1 (KV positions per request) or None (the model's "
                         f"max_position_embeddings), got {max_seq_len!r}")


def check_requests(requests: list, *, first_index: int, in_use, vocab_size: int, max_seq_len: int,
                   exit_policy=None) -> list:
    """Return each request's id (by default its submission index, counting from `first_index`), or raise naming the
    first request that cannot be served: `check_request`'s checks, ids unique within the call and not `in_use(rid)`
    in the engine, and the exit policy's own `check_request` if it has one (an oracle lacking a trajectory).
    Nothing changes here, so the caller queues all the requests or none."""
    ids, objects = [], set()
    check_policy = getattr(exit_policy, "check_request", None)
    for n, request in enumerate(requests):
        default = first_index + n
        if not isinstance(request, Request):
            raise TypeError(f"request {default}: expected an rrt.serving.Request, got {type(request).__name__}")
        rid = request.request_id if request.request_id is not None else default
        if id(request) in objects:  # its one request_id field cannot hold two ids
            raise ValueError(f"request {rid!r}: the same Request object is given twice; give each its own")
        check_request(request, rid, vocab_size=vocab_size, max_seq_len=max_seq_len,
                      in_use=lambda rid=rid: rid in ids or in_use(rid))
        if check_policy is not None:
            check_policy(rid, request)
        ids.append(rid)
        objects.add(id(request))
    return ids


def check_request(r: Request, rid, *, in_use, vocab_size: int, max_seq_len: int) -> None:
    """Raise ValueError naming request `rid` and the bad value, if `r` cannot be served (`in_use()`: whether
    its hashable id is already taken in the engine)."""
    def bad(what):
        return ValueError(f"request {rid!r}: {what}")
    try:
        hash(rid)
    except TypeError:
        raise bad(f"request_id must be hashable (int or str), got {type(rid).__name__}") from None
    if in_use():
        default = " (defaulted to the submission index)" if r.request_id is None else ""
        raise bad(f"request_id{default} is already in use: queued, active, or finished and not "
                  f"collected (`Engine.collect` frees it); give each request a unique request_id")
    for name in ("max_new_tokens", "arrival_step"):
        value = getattr(r, name)
        if not is_int(value) or value < (1 if name == "max_new_tokens" else 0):
            raise bad(f"{name} must be an int >= {1 if name == 'max_new_tokens' else 0}, got {value!r}")
    if r.arrival_s is not None and (isinstance(r.arrival_s, bool) or not isinstance(r.arrival_s, (int, float))
                                    or not 0 <= r.arrival_s < math.inf):  # inf: `run` would sleep forever
        raise bad(f"arrival_s must be a number of seconds, finite and >= 0, or None, got {r.arrival_s!r}")
    if not _is_ids(r.prompt) or isinstance(r.prompt, Set) or len(r.prompt) == 0:  # a set has no order
        raise bad(f"needs a non-empty prompt (a sequence of token ids), got {r.prompt!r}")
    token_ids(r.prompt, f"request {rid!r}", "prompt", vocab_size)
    token_ids(r.stop_token_ids, f"request {rid!r}", "stop_token_ids", vocab_size)
    if r.forced is not None:
        if not _is_ids(r.forced) or len(r.forced) != r.max_new_tokens:
            raise bad(f"forced must be a sequence of exactly max_new_tokens={r.max_new_tokens} token ids, "
                      f"got {r.forced!r}")
        token_ids(r.forced, f"request {rid!r}", "forced", vocab_size)
    if len(r.prompt) + r.max_new_tokens > max_seq_len:
        raise bad(f"len(prompt) + max_new_tokens = {len(r.prompt)} + {r.max_new_tokens} exceeds "
                  f"the KV pool's max_seq_len={max_seq_len}")

def token_ids(ids, owner: str, name: str, vocab_size: int) -> list[int]:
    """Return `ids` as Python ints, or raise ValueError naming the first one outside the vocabulary."""
    if not _is_ids(ids):
        raise ValueError(f"{owner}: {name} must be a sequence of token ids, got {ids!r}")
    for i, t in enumerate(ids):
        if not is_int(t) or not 0 <= operator.index(t) < vocab_size:
            raise ValueError(f"{owner}: {name}[{i}] = {t!r} is not a token id: "
                             f"valid ids are ints in [0, {vocab_size})")
    return [operator.index(t) for t in ids]


def _is_ids(x) -> bool:
    """True for a 1-D collection of would-be token ids (list, tuple, set, 1-D tensor or array), not a string."""
    if isinstance(x, (str, bytes)):
        return False
    ndim = getattr(x, "ndim", None)
    return ndim == 1 if ndim is not None else isinstance(x, Collection)


def is_int(value) -> bool:
    """True for an integer (Python, NumPy or 0-d integer tensor), False for bool, float and the rest."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                   and (value.is_floating_point() or value.dtype == torch.bool)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def attention_of(layer):
    """A decoder layer's attention module (Llama/Gemma `self_attn`, GPT-NeoX `attention`)."""
    attention = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if attention is None or not hasattr(attention, "config"):
        raise ValueError(f"{type(layer).__name__} has no self_attn/attention module with a config: not supported")
    return attention


def check_kv_only(layer) -> None:
    """copy_hidden needs the layer's attention input norm, to compute keys/values without the layer."""
    if not hasattr(layer, "input_layernorm"):
        raise ValueError(f"kv_policy='copy_hidden' needs an `input_layernorm` on {type(layer).__name__}; "
                         f"use 'propagate' or 'copy_kv'")


def check_supported(model) -> None:
    """Refuse what the engine does not implement, before any compute."""
    if spec_of(model).untie_norms:
        raise ValueError("untie_norms=True models are not supported by the engine: their per-depth "
                         "norm weights would need a per-row norm gather; use untie_norms=False")
    impl = model.config._attn_implementation
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"attention implementation {impl!r} is not supported (the engine passes "
                         f"an explicit ragged mask); valid: eager, sdpa")
    if getattr(model.config, "layer_types", None) is None and getattr(model.config, "sliding_window", None) \
            and getattr(model.config, "use_sliding_window", True):
        raise ValueError("sliding_window without config.layer_types is not supported")
