"""Continuous depth-wise batching (§2.4, Fig. 3): one call of the shared block serves tokens at any loop.

A *work item* is (request, position, loop). Each engine step:
1. admits arrived requests from the queue into free KV slots;
2. schedules ready items up to `token_budget`, deepest loop first (finishing in-flight tokens
   unblocks their requests' next tokens), then loop 0 (next tokens, new prefills), requests in
   arrival order. Item (r, p, b) is ready when p has finished loop b−1 and every p' < p has
   finished loop b or runs at loop b in this same batch (their keys are written before attention);
   so per request and loop the ready positions are one contiguous range [done[b], done[b−1]);
3. runs the K shared layers once over all items (per-row loop LoRA via `per_row_loops`; item at
   loop b, shared layer j reads and writes the KV of depth b·K + j);
4. routes: the latest token of a request that finished loop b goes through the LM head and the
   exit policy; on exit (always at the last loop) the greedy next token is appended and becomes a
   loop-0 item at once. Every other item just moves on to its next loop.

State propagation (App. A, CALM): an exited token keeps running its remaining loops as ordinary
items in later batches, writing KV only (no output), so deeper depths always hold keys for every
earlier position. Its keys therefore equal the full model's: exits change which token is emitted,
never the cache. Not done: copying the exited hidden state into deeper KV without running the
layers (CALM's cheaper variant) — it needs no extra compute but changes the keys.

Bad input and faults: `submit` refuses a malformed request before any compute (`ValueError` naming
the request and the value). A fault inside a step (an exception in the block or the routing, or a
non-finite hidden state) is isolated: the step's KV writes are undone and its items re-run one
request at a time; a request whose own items still fail is moved to `failed` with the error, its
slot freed, and the others are served on. (A non-finite key poisons every row of the batch that
gathers it — 0·NaN — so isolation re-runs the rows rather than trusting the batch's outputs.)
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
import itertools
import operator
import time
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass, field

import torch

from rrt.exits import NoExit
from rrt.models import decoder_layers, head_logits
from rrt.recursive import num_loops, spec_of
from rrt.relax import lora_modules, per_row_loops
from rrt.serving.kv import KVPool, ScheduleError


@dataclass
class Request:
    """A generation request: prompt token ids, how many tokens to generate, when it arrives.

    Generation ends after `max_new_tokens` tokens or at the first emitted token in
    `stop_token_ids` or the engine's `eos_token_id`; that stop token is included in the output
    (HF `generate()`'s convention for eos).
    """
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0            # engine step at which it joins the queue
    request_id: int | str | None = None  # defaults to the submission index
    stop_token_ids: Collection[int] = ()  # per-request stop tokens, alongside the engine's eos


@dataclass
class _Live:
    """Engine-side state of an admitted request."""
    request: Request
    slot: int
    order: int
    tokens: list[int]
    done: list[int]                  # per loop: positions [0, done[b]) have finished loop b
    hidden: torch.Tensor             # [max_seq_len, hidden]: each position's latest loop output
    stop: frozenset = frozenset()    # the engine's eos ids ∪ the request's stop_token_ids
    exit_loops: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]


class Engine:
    """Serve greedy generation from a (relaxed) recursive model with continuous depth-wise batching."""

    def __init__(self, model, *, token_budget: int = 64, exit_policy=None, max_active: int = 8,
                 max_seq_len: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 debug: bool = False):
        _check_supported(model)
        if token_budget < 1 or max_active < 1:
            raise ValueError(f"token_budget and max_active must be >= 1, got {token_budget}, {max_active}")
        self.model, self.token_budget, self.max_active = model, token_budget, max_active
        self.exit_policy = exit_policy if exit_policy is not None else NoExit()
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_id = eos_token_id  # one id or several (HF generation_config style)
        eos = [] if eos_token_id is None else [eos_token_id] if _is_int(eos_token_id) else eos_token_id
        self.eos_token_ids = frozenset(self._token_ids(eos, "engine", "eos_token_id"))
        self.layers = decoder_layers(model)
        self.num_loops = num_loops(model)
        self.num_shared = len(self.layers) // self.num_loops
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.kv = KVPool(num_slots=max_active, num_depths=len(self.layers),
                         max_seq_len=self.max_seq_len, debug=debug)
        self.has_lora = bool(lora_modules(model))
        # GPT-NeoX layers take the cache as `layer_past`, Llama/Gemma ones as `past_key_values`.
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kwarg = "layer_past" if "layer_past" in params else "past_key_values"
        rotary = model.base_model.rotary_emb
        self.rotary_by_type = "layer_type" in inspect.signature(rotary.forward).parameters
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.depth_type = types
        window = getattr(model.config, "sliding_window", None) or 0
        self.depth_window = torch.tensor([window if t == "sliding_attention" else 0 for t in types],
                                         device=model.device)
        self.queue: list[Request] = []
        self.active: list[_Live] = []
        self.results: dict = {}          # request_id -> generated ids, until `collect`ed
        self.failed: dict = {}           # request_id -> error message of a fault in its items
        self.exit_loops: dict = {}
        self.arrived_at: dict = {}       # request_id -> perf_counter() at its first step >= arrival_step
        self.finished_at: dict = {}      # request_id -> perf_counter() when its last token was emitted
        self.step_count = 0
        self._order = itertools.count()
        self._submitted = 0
        self.stats = {"steps": 0, "idle_steps": 0, "items": 0, "propagation_items": 0,
                      "tokens": 0, "exits_per_loop": [0] * self.num_loops, "seconds": 0.0}

    # ------------------------------------------------------------------ public

    def submit(self, request: Request) -> None:
        """Queue a request (validated now, so a bad one fails before any compute)."""
        rid = request.request_id if request.request_id is not None else self._submitted
        self._validate(request, rid)
        request.request_id = rid
        self._submitted += 1
        self.queue.append(request)
        self.queue.sort(key=lambda r: r.arrival_step)  # stable: submission order within a step

    def collect(self, request_id) -> list[int]:
        """Return a finished request's generated ids and forget it (its id may be reused).

        A failed request raises RuntimeError with its error, like `Future.result()`.
        """
        if request_id in self.failed:
            error = self.failed.pop(request_id)
            self.arrived_at.pop(request_id, None)
            raise RuntimeError(f"request {request_id!r} failed: {error}")
        if request_id not in self.results:
            raise ValueError(f"request {request_id!r} has no result to collect; finished: "
                             f"{list(self.results)}, failed: {list(self.failed)}")
        self.exit_loops.pop(request_id)
        self.arrived_at.pop(request_id, None)
        self.finished_at.pop(request_id)
        return self.results.pop(request_id)

    def run(self, requests: list[Request] | None = None) -> dict:
        """Serve until every queued request finishes; return {request_id: generated token ids}.

        Requests whose items faulted are not in it: see `failed` {request_id: error message}.
        """
        for r in requests or []:
            self.submit(r)
        start = time.perf_counter()
        while self.queue or self.active:
            self.step()
        self.stats["seconds"] += time.perf_counter() - start
        return self.results

    @torch.no_grad()
    def step(self) -> None:
        """Run one engine step: admit, schedule one batch, run the shared block once, route."""
        now = time.perf_counter()
        for r in self.queue:  # sorted by arrival_step
            if r.arrival_step > self.step_count:
                break
            self.arrived_at.setdefault(r.request_id, now)
        self._admit()
        items = self._schedule()
        self.step_count += 1
        if not items:
            self.stats["idle_steps"] += 1
            return
        try:
            self._serve(items)
        except ScheduleError:  # debug mode caught an engine bug: no request is to blame
            raise
        except Exception:  # noqa: BLE001 - a fault in some request's items: find it, serve the rest
            self._unwrite(items)
            self._isolate(items)
        self.stats["steps"] += 1
        self.stats["items"] += len(items)

    def latency(self) -> dict:
        """Return {request_id: seconds from its arrival to its last token} for finished requests."""
        return {rid: t - self.arrived_at[rid] for rid, t in self.finished_at.items()}

    def summary(self) -> dict:
        """Return stats plus derived numbers: mean batch fill and tokens per second."""
        s = dict(self.stats)
        s["mean_batch_fill"] = s["items"] / max(s["steps"], 1) / self.token_budget
        s["tokens_per_s"] = s["tokens"] / s["seconds"] if s["seconds"] else float("nan")
        return s

    # ------------------------------------------------------------------ validation

    def _validate(self, r: Request, rid) -> None:
        """Raise ValueError naming request `rid` and the bad value, if `r` cannot be served."""
        def bad(what):
            return ValueError(f"request {rid!r}: {what}")
        try:
            hash(rid)
        except TypeError:
            raise bad(f"request_id must be hashable (int or str), got {type(rid).__name__}") from None
        if (rid in self.results or rid in self.failed or any(q.request_id == rid for q in self.queue)
                or any(live.request.request_id == rid for live in self.active)):
            default = " (defaulted to the submission index)" if r.request_id is None else ""
            raise bad(f"request_id{default} is already in use: queued, active, or finished and not "
                      f"collected (`Engine.collect` frees it); give each request a unique request_id")
        for name in ("max_new_tokens", "arrival_step"):
            value = getattr(r, name)
            if not _is_int(value) or value < (1 if name == "max_new_tokens" else 0):
                raise bad(f"{name} must be an int >= {1 if name == 'max_new_tokens' else 0}, got {value!r}")
        if not _is_ids(r.prompt) or isinstance(r.prompt, Set) or len(r.prompt) == 0:  # a set has no order
            raise bad(f"needs a non-empty prompt (a sequence of token ids), got {r.prompt!r}")
        self._token_ids(r.prompt, f"request {rid!r}", "prompt")
        self._token_ids(r.stop_token_ids, f"request {rid!r}", "stop_token_ids")
        if len(r.prompt) + r.max_new_tokens > self.max_seq_len:
            raise bad(f"len(prompt) + max_new_tokens = {len(r.prompt)} + {r.max_new_tokens} exceeds "
                      f"the KV pool's max_seq_len={self.max_seq_len}")

    def _token_ids(self, ids, owner: str, name: str) -> list[int]:
        """Return `ids` as Python ints, or raise ValueError naming the first one outside the vocabulary."""
        if not _is_ids(ids):
            raise ValueError(f"{owner}: {name} must be a sequence of token ids, got {ids!r}")
        for i, t in enumerate(ids):
            if not _is_int(t) or not 0 <= operator.index(t) < self.vocab_size:
                raise ValueError(f"{owner}: {name}[{i}] = {t!r} is not a token id: "
                                 f"valid ids are ints in [0, {self.vocab_size})")
        return [operator.index(t) for t in ids]

    # ------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        while (self.queue and self.queue[0].arrival_step <= self.step_count
               and len(self.active) < self.max_active):
            r = self.queue.pop(0)
            hidden = torch.zeros(self.max_seq_len, self.model.config.hidden_size,
                                 dtype=self.model.dtype, device=self.model.device)
            tokens = [operator.index(t) for t in r.prompt]
            stop = self.eos_token_ids | {operator.index(t) for t in r.stop_token_ids}
            self.active.append(_Live(r, self.kv.allocate(), next(self._order), tokens,
                                     [0] * self.num_loops, hidden, stop))

    def _schedule(self) -> list[tuple[_Live, int, int]]:
        """Return ready items (live, position, loop), deepest loop first, up to the token budget."""
        segments = []
        for live in self.active:
            for b in range(self.num_loops):
                hi = len(live.tokens) if b == 0 else live.done[b - 1]
                if hi > live.done[b]:
                    segments.append((-b, live.order, live, b, live.done[b], hi))
        segments.sort(key=lambda s: s[:2])
        items, budget = [], self.token_budget
        for _, _, live, b, lo, hi in segments:
            take = min(hi - lo, budget)
            items += [(live, p, b) for p in range(lo, lo + take)]
            budget -= take
            if budget == 0:
                break
        return items

    # ------------------------------------------------------------------ faults

    def _serve(self, items) -> None:
        """Run and route one batch; on an exception nothing but its KV writes has changed."""
        outputs, inputs = self._run_block(items)
        self._route(items, inputs, outputs)

    def _isolate(self, items) -> None:
        """Re-run a failed batch one request at a time; fail the requests whose own items still fail."""
        by_request: dict[int, list] = {}
        for item in items:
            by_request.setdefault(id(item[0]), []).append(item)
        for own in by_request.values():  # a request's items depend only on its own KV
            try:
                self._serve(own)
            except ScheduleError:
                raise
            except Exception as error:  # noqa: BLE001
                self._unwrite(own)
                self._fail(own[0][0], error)

    def _unwrite(self, items) -> None:
        """Clear the written marks the items' K layer calls may have set (their keys are rewritten)."""
        dev = self.kv.written.device
        slot = torch.tensor([live.slot for live, _, _ in items], device=dev).repeat_interleave(self.num_shared)
        position = torch.tensor([p for _, p, _ in items], device=dev).repeat_interleave(self.num_shared)
        depth = torch.tensor([b * self.num_shared + j for _, _, b in items for j in range(self.num_shared)],
                             device=dev)
        self.kv.unwrite(slot=slot, depth=depth, position=position)

    def _fail(self, live: _Live, error: Exception) -> None:
        rid = live.request.request_id
        self.failed[rid] = f"{type(error).__name__}: {error}"
        self.active.remove(live)
        self.kv.release(live.slot)

    # ------------------------------------------------------------------ compute

    def _run_block(self, items):
        """Run the K shared layers once over the items; return (outputs, inputs), each [rows, hidden]."""
        dev = self.model.device
        position = torch.tensor([p for _, p, _ in items], device=dev)
        loop = torch.tensor([b for _, _, b in items], device=dev)
        slot = torch.tensor([live.slot for live, _, _ in items], device=dev)
        hidden = torch.stack([live.hidden[p] for live, p, _ in items])  # [rows, hidden]
        first = (loop == 0).nonzero().squeeze(1)
        if len(first):
            ids = torch.tensor([items[i][0].tokens[items[i][1]] for i in first.tolist()], device=dev)
            hidden[first] = self.model.get_input_embeddings()(ids).to(hidden.dtype)
        inputs = hidden
        h = hidden[None]  # [1, rows, hidden]: the ragged batch is one "sequence" of rows
        rotary = self._rotary(h, position)
        with per_row_loops(self.model, loop[None]) if self.has_lora else nullcontext():
            for j in range(self.num_shared):
                depth = loop * self.num_shared + j
                cache = self.kv.layer_cache(slot=slot, depth=depth, position=position,
                                            window=self.depth_window[depth], dtype=h.dtype)
                cos_sin = self._per_row_rotary(rotary, depth)
                out = self.layers[j](h, attention_mask=cache.mask, position_ids=position[None],
                                     position_embeddings=cos_sin, **{self.cache_kwarg: cache})
                h = out[0] if isinstance(out, tuple) else out
        return h[0], inputs

    def _rotary(self, h, position):
        """Return {layer type: (cos, sin) [1, rows, head_dim]} (Gemma 3 has one rotary per type)."""
        rotary = self.model.base_model.rotary_emb
        if not self.rotary_by_type:
            return {None: rotary(h, position[None])}
        return {t: rotary(h, position[None], t) for t in set(self.depth_type)}

    def _per_row_rotary(self, rotary, depth):
        if None in rotary:
            return rotary[None]
        types = [self.depth_type[d] for d in depth.tolist()]
        cos, sin = rotary[types[0]]
        for t in set(types) - {types[0]}:
            rows = torch.tensor([x == t for x in types], device=depth.device)[None, :, None]
            cos = torch.where(rows, rotary[t][0], cos)
            sin = torch.where(rows, rotary[t][1], sin)
        return cos, sin

    # ------------------------------------------------------------------ routing

    def _route(self, items, inputs, outputs):
        """Store outputs, advance loops, ask the exit policy for each request's latest token.

        Everything that can fail (finiteness, LM head, exit policy) runs before any state changes.
        """
        finite = torch.isfinite(outputs).all(-1)  # [rows]
        if not finite.all():
            live, p, b = items[int((~finite).nonzero()[0])]
            raise FloatingPointError(f"non-finite hidden state at position {p}, loop {b}")
        deciding = [i for i, (live, p, _) in enumerate(items) if p == len(live.tokens) - 1]
        exits = []
        if deciding:
            rows = torch.tensor(deciding, device=outputs.device)
            loop = torch.tensor([items[i][2] for i in deciding], device=outputs.device)
            logits = head_logits(self.model, outputs[rows][None], loop_idx=loop[None])[0]  # [n, vocab]
            exit_now = self.exit_policy.exit_mask(
                loop=loop, logits=logits, hidden=outputs[rows], prev_hidden=inputs[rows],
                keys=[(items[i][0].request.request_id, items[i][1]) for i in deciding])
            exit_now = (exit_now | (loop == self.num_loops - 1)).tolist()
            next_tokens = logits.argmax(-1).tolist()
            exits = [(i, next_tokens[n]) for n, i in enumerate(deciding) if exit_now[n]]
        for i, (live, p, b) in enumerate(items):
            live.hidden[p] = outputs[i]
            live.done[b] += 1
            if len(live.request.prompt) - 1 <= p < len(live.tokens) - 1:  # emitted already: KV only
                self.stats["propagation_items"] += 1
        for i, token in exits:
            self._emit(items[i][0], token, items[i][2])

    def _emit(self, live: _Live, token: int, loop: int) -> None:
        live.tokens.append(token)
        live.exit_loops.append(loop)
        self.stats["tokens"] += 1
        self.stats["exits_per_loop"][loop] += 1
        r = live.request
        if len(live.generated) == r.max_new_tokens or token in live.stop:
            self.results[r.request_id] = live.generated
            self.exit_loops[r.request_id] = live.exit_loops
            self.finished_at[r.request_id] = time.perf_counter()
            self.active.remove(live)
            self.kv.release(live.slot)


def _is_ids(x) -> bool:
    """True for a 1-D collection of would-be token ids (list, tuple, set, 1-D tensor or array), not a string."""
    if isinstance(x, (str, bytes)):
        return False
    ndim = getattr(x, "ndim", None)
    return ndim == 1 if ndim is not None else isinstance(x, Collection)


def _is_int(value) -> bool:
    """True for an integer (Python, NumPy or 0-d integer tensor), False for bool, float and the rest."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                   and (value.is_floating_point() or value.dtype == torch.bool)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_supported(model) -> None:
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
