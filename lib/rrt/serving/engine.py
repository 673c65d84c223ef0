"""Continuous depth-wise batching (§2.4, Fig. 3): one call of the shared block serves tokens at any loop.

A *work item* is (request, position, loop). Each engine step:
1. admits arrived requests from the queue into free KV slots;
2. schedules ready items up to `token_budget`, deepest loop first (finishing in-flight tokens
   unblocks their requests' next tokens), then loop 0 (next tokens, new prefills), requests in
   arrival order. Item (r, p, b) is ready when p has finished loop b−1 and every p' < p has
   finished loop b or runs at loop b in this same batch (their keys are written before attention);
   so per request and loop the ready positions are one contiguous range [done[b], done[b−1]);
3. runs the K shared layers once over all items, laid out once per step (`kv.StepLayout`: rows
   sorted by loop, request, position; per-row loop LoRA over loop segments via `rows.RowLoRAs`;
   ragged attention by key-length buckets; item at loop b, shared layer j reads and writes the KV
   of depth b·K + j);
4. routes: the latest token of a request that finished loop b is asked to the exit policy (through
   the LM head first only if the policy reads logits); on exit (always at the last loop) the LM head
   gives the greedy next token, appended and a loop-0 item at once. Every other item moves on.

What an exited token leaves in the depths it skipped is the `kv_policy` (`KV_POLICIES`):
"propagate" (App. A, state propagation): it keeps running its remaining loops as ordinary items in
later batches, writing KV only (no output), so its keys equal the full model's: exits change which
token is emitted, never the cache. "copy_kv" (the CDB anchor's `last_exited`) copies each shared
layer's exit-loop keys/values into the deeper loops' depths at once; "copy_hidden" (CALM) feeds the
exit hidden state to every deeper depth's attention, which computes only its keys/values. Both
cost (almost) nothing and change later tokens' keys; `serving.scoring` measures what that costs.

Bad input and faults: `submit` refuses a malformed request before any compute (`ValueError` naming
the request and the value); `run(requests)` checks them all first, so it queues all or none. A fault inside a step (an exception in the block or the routing, or a
non-finite hidden state) is isolated: the step's KV writes are undone and its items re-run one
request at a time; a request whose own items still fail is moved to `failed` with the error, its
slot freed, and the others are served on. (A non-finite key poisons every row of the batch that
gathers it — 0·NaN — so isolation re-runs the rows rather than trusting the batch's outputs.)
"""
from __future__ import annotations

import inspect
import itertools
import operator
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import AttentionInterface

from rrt.exits import NoExit
from rrt.families import decoder_layers, head_logits
from rrt.relax import lora_modules
from rrt.serving.kv import KVPool, ScheduleError, StepLayout, per_row_rotary, ragged_attention, rotary_tables
from rrt.serving.packed import PackedLinears, packing_supported
from rrt.serving.requests import (Live, Request, StepProfile, attention_of, check_kv_only, check_limits,
                                  check_requests, check_supported, is_int, token_ids)
from rrt.serving.rows import RowLoRAs
from rrt.spec import check_choice, num_loops

AttentionInterface.register("rrt_ragged", ragged_attention)

# What an exited token leaves in the depths it skips (App. A; the CDB anchor's KV cache policies):
# - "propagate": it runs its remaining loops as KV-only rows: keys equal the full model's (exact).
# - "copy_kv": each shared layer's keys/values of the exit loop are copied into the deeper loops'
#   depths (the anchor's `last_exited`): no compute, the deeper keys are approximations.
# - "copy_hidden": the exit hidden state is fed to every deeper depth's attention input, which
#   computes only its keys/values (CALM's state copying): K·(B−1−b) projections instead of layers.
KV_POLICIES = ("propagate", "copy_kv", "copy_hidden")


class Engine:
    """Serve greedy generation from a (relaxed) recursive model with continuous depth-wise batching."""

    def __init__(self, model, *, token_budget: int = 64, exit_policy=None, max_active: int = 8,
                 max_seq_len: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 kv_policy: str = "propagate", profile: bool = False, debug: bool = False,
                 pack_weights: bool | None = None):
        check_supported(model)
        if pack_weights and not packing_supported(model):
            raise ValueError("pack_weights=True needs a bf16 model on a CPU with oneDNN (rrt.serving.packed); "
                             "pass None to pack only where it runs")
        check_limits(token_budget=token_budget, max_active=max_active, max_seq_len=max_seq_len)
        check_choice("kv_policy", kv_policy, KV_POLICIES)
        self.model, self.token_budget, self.max_active = model, token_budget, max_active
        self.kv_policy = kv_policy
        self.exit_policy = exit_policy if exit_policy is not None else NoExit()
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_id = eos_token_id  # one id or several (HF generation_config style)
        eos = [] if eos_token_id is None else [eos_token_id] if is_int(eos_token_id) else eos_token_id
        self.eos_token_ids = frozenset(token_ids(eos, "engine", "eos_token_id", self.vocab_size))
        self.layers = decoder_layers(model)
        self.num_loops = num_loops(model)
        self.num_shared = len(self.layers) // self.num_loops
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.kv = KVPool(max_active=max_active, num_depths=len(self.layers),
                         max_seq_len=self.max_seq_len, debug=debug)
        self.hidden = None  # [slots, max_seq_len, hidden]: each position's latest loop output
        # The shared layers' and the LM head's weights, reordered once for oneDNN (bitwise the same
        # outputs, faster calls: rrt.serving.packed), and the loops' LoRAs packed side by side.
        pack = packing_supported(model) if pack_weights is None else pack_weights
        self.row_loras = RowLoRAs(model, pack=pack) if lora_modules(model) else None
        self.packed = PackedLinears([*self.layers[:self.num_shared], model.get_output_embeddings()],
                                    skip=self.row_loras.fused_bases if self.row_loras else ()) if pack else None
        self.packed_bytes = ((self.packed.nbytes if self.packed else 0)
                             + (self.row_loras.nbytes if self.row_loras else 0))  # copies held while serving
        # GPT-NeoX layers take the cache as `layer_past`, Llama/Gemma ones as `past_key_values`.
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kwarg = "layer_past" if "layer_past" in params else "past_key_values"
        self.attention = [attention_of(layer) for layer in self.layers[:self.num_shared]]
        self._attn_configs = list({id(a.config): a.config for a in self.attention}.values())
        if kv_policy == "copy_hidden":
            check_kv_only(self.layers[0])
        rotary = model.base_model.rotary_emb
        self.rotary_by_type = "layer_type" in inspect.signature(rotary.forward).parameters
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.depth_type = types
        window = getattr(model.config, "sliding_window", None) or 0
        self.depth_window = [window if t == "sliding_attention" else 0 for t in types]
        self.profile = StepProfile() if profile else None
        self.queue: list[Request] = []
        self.active: list[Live] = []
        self.results: dict = {}          # request_id -> generated ids, until `collect`ed
        self.failed: dict = {}           # request_id -> error message of a fault in its items
        self.exit_loops: dict = {}
        self.logprobs: dict = {}         # request_id -> per forced token (log-prob at its exit loop, was the argmax)
        self.arrived_at: dict = {}       # request_id -> perf_counter() when it arrived (first step at/after it)
        self.first_token_at: dict = {}   # request_id -> perf_counter() of its first emitted token
        self.finished_at: dict = {}      # request_id -> perf_counter() when its last token was emitted
        self.step_count = 0
        self._order = itertools.count()
        self._submitted = 0
        self._t0: float | None = None    # perf_counter() at which `run` started (arrival_s origin)
        self.stats = {"steps": 0, "idle_steps": 0, "items": 0, "propagation_items": 0, "filled_rows": 0,
                      "tokens": 0, "exits_per_loop": [0] * self.num_loops, "seconds": 0.0}

    # ------------------------------------------------------------------ public

    def submit(self, request: Request) -> None:
        """Queue a request (validated now, so a bad one fails before any compute)."""
        self._enqueue([request])

    def collect(self, request_id) -> list[int]:
        """Return a finished request's generated ids and forget it (its id may be reused).

        A failed request raises RuntimeError with its error, like `Future.result()`.
        """
        if request_id in self.failed:
            error = self.failed.pop(request_id)
            self.arrived_at.pop(request_id, None)
            self.first_token_at.pop(request_id, None)
            raise RuntimeError(f"request {request_id!r} failed: {error}")
        if request_id not in self.results:
            raise ValueError(f"request {request_id!r} has no result to collect; finished: "
                             f"{list(self.results)}, failed: {list(self.failed)}")
        self.exit_loops.pop(request_id)
        self.logprobs.pop(request_id, None)
        self.arrived_at.pop(request_id, None)
        self.first_token_at.pop(request_id, None)
        self.finished_at.pop(request_id)
        return self.results.pop(request_id)

    def run(self, requests: list[Request] | None = None) -> dict:
        """Serve until every queued request finishes; return {request_id: generated token ids}.

        Requests whose items faulted are not in it: see `failed` {request_id: error message}.
        While nothing is live and the next request arrives later (`arrival_s`), the engine sleeps.
        All or nothing: a bad request (`submit`'s checks, ids unique in the call) raises before any is queued.
        """
        self._enqueue(list(requests or []))
        start = self._t0 = time.perf_counter()
        with self._packed():  # once for the run (the block and head calls inside it switch nothing)
            while self.queue or self.active:
                if not self.active and self.queue and self.queue[0].arrival_step <= self.step_count:
                    wait = (self.queue[0].arrival_s or 0.0) - (time.perf_counter() - self._t0)
                    if wait > 0:
                        time.sleep(wait)
                self.step()
        self.stats["seconds"] += time.perf_counter() - start
        return self.results

    @torch.no_grad()
    def step(self) -> None:
        """Run one engine step: admit, schedule one batch, run the shared block once, route."""
        t = time.perf_counter()
        elapsed = t - self._t0 if self._t0 is not None else float("inf")
        for r in self.queue:  # sorted by arrival_step
            if r.arrival_step > self.step_count:
                break
            if r.arrival_s is None or r.arrival_s <= elapsed:
                self.arrived_at.setdefault(r.request_id, t)
        self._admit(elapsed)
        items = self._schedule()
        self.step_count += 1
        if self.profile:
            self.profile.schedule_s += time.perf_counter() - t
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

    def _enqueue(self, requests: list) -> None:
        """Check every request, then queue them all with their ids set (all or none)."""
        ids = check_requests(requests, first_index=self._submitted, in_use=self._in_use, vocab_size=self.vocab_size,
                             max_seq_len=self.max_seq_len, exit_policy=self.exit_policy)
        for request, rid in zip(requests, ids):
            request.request_id = rid
            self.queue.append(request)
        self._submitted += len(requests)
        # stable: submission order within a step
        self.queue.sort(key=lambda r: (r.arrival_step, r.arrival_s or 0.0))

    def _in_use(self, rid) -> bool:
        return (rid in self.results or rid in self.failed or any(q.request_id == rid for q in self.queue)
                or any(live.request.request_id == rid for live in self.active))

    # ------------------------------------------------------------------ scheduling

    def _admit(self, elapsed: float = float("inf")) -> None:
        while (self.queue and self.queue[0].arrival_step <= self.step_count
               and len(self.active) < self.max_active):
            if self.queue[0].arrival_s is not None and self.queue[0].arrival_s > elapsed:
                # arrival_s is a second key after arrival_step: a later one may not overtake it
                break
            r = self.queue.pop(0)
            tokens = [operator.index(t) for t in r.prompt]
            stop = self.eos_token_ids | {operator.index(t) for t in r.stop_token_ids}
            self.active.append(Live(r, self.kv.allocate(), next(self._order), tokens,
                                     [0] * self.num_loops, stop))

    def _schedule(self) -> list[tuple[Live, int, int]]:
        """Return ready items (live, position, loop), deepest loop first, up to the token budget.

        Positions whose deeper depths were filled at their exit (copy policies) are skipped at those
        loops: `done` moves past them, and a ready range stops before one (rows stay contiguous).
        """
        segments = []
        for live in self.active:
            if live.filled:
                for b in range(1, self.num_loops):
                    while live.done[b] < live.done[b - 1] and live.filled.get(live.done[b], b) < b:
                        live.done[b] += 1
            for b in range(self.num_loops):
                hi = len(live.tokens) if b == 0 else live.done[b - 1]
                lo = live.done[b]
                if live.filled and b:
                    hi = next((p for p in range(lo, hi) if live.filled.get(p, b) < b), hi)
                if hi > lo:
                    segments.append((-b, live.order, live, b, lo, hi))
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
        items, outputs, inputs = self._run_block(items)
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

    def _fail(self, live: Live, error: Exception) -> None:
        rid = live.request.request_id
        self.failed[rid] = f"{type(error).__name__}: {error}"
        self.active.remove(live)
        self.kv.release(live.slot)

    # ------------------------------------------------------------------ compute

    def _run_block(self, items):
        """Run the K shared layers once over the items; return (items sorted by loop, slot, position;
        outputs; inputs), the last two [rows, hidden]."""
        t = time.perf_counter()
        items = sorted(items, key=lambda it: (it[2], it[0].slot, it[1]))
        dev = self.model.device
        layout = StepLayout(self.kv, [(live.slot, b, p) for live, p, b in items], num_shared=self.num_shared,
                            depth_window=self.depth_window, device=dev)
        if self.hidden is None:
            self.hidden = torch.zeros(self.max_active, self.max_seq_len, self.model.config.hidden_size,
                                      dtype=self.model.dtype, device=dev)
        first = layout.segments[0][2] if layout.segments[0][0] == 0 else 0  # loop-0 rows lead
        parts = []
        if first:
            ids = torch.tensor([live.tokens[p] for live, p, _ in items[:first]], device=dev)
            parts.append(self.model.get_input_embeddings()(ids).to(self.hidden.dtype))
        if first < len(items):
            parts.append(self.hidden[layout.slot[first:], layout.position[first:]])
        inputs = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.profile:
            self.profile.schedule_s += time.perf_counter() - t
            t = time.perf_counter()
        h = self._layers(inputs[None], layout, kv_only=False)
        if self.profile:
            seconds = time.perf_counter() - t
            self.profile.block_s += seconds
            self.profile.step_rows.append(len(items))
            self.profile.step_block_s.append(seconds)
            self.profile.scores_computed += layout.scores_computed * self.num_shared
            self.profile.scores_needed += layout.scores_needed * self.num_shared
        return items, h[0], inputs

    def _layers(self, h, layout: StepLayout, *, kv_only: bool):
        """Run the K shared layers over rows h [1, rows, hidden] laid out by `layout`.

        kv_only (copy_hidden fills): each layer only writes the keys/values its attention computes
        from h (input norm + projections); h is not updated and no MLP runs.
        """
        rotary = rotary_tables(self.model.base_model.rotary_emb, h, layout.position,
                               set(self.depth_type) if self.rotary_by_type else None)
        with self._ragged_attention(), (self.row_loras.apply(layout.segments) if self.row_loras
                                        else nullcontext()), self._packed():
            for j in range(self.num_shared):
                cache = layout.cache(j)
                cache.profile = self.profile
                cos_sin = per_row_rotary(rotary, layout.loop * self.num_shared + j, self.depth_type)
                if kv_only:
                    cache.kv_only = True
                    normed = self.layers[j].input_layernorm(h)
                    self.attention[j](normed, attention_mask=None, position_ids=layout.position[None],
                                      position_embeddings=cos_sin, rrt_cache=cache, **{self.cache_kwarg: cache})
                    continue
                out = self.layers[j](h, attention_mask=None, position_ids=layout.position[None],
                                     position_embeddings=cos_sin, rrt_cache=cache, **{self.cache_kwarg: cache})
                h = out[0] if isinstance(out, tuple) else out
        return h

    def _packed(self):
        """The prepacked linears switched on (a no-op when not packing, or already on)."""
        return self.packed.apply() if self.packed else nullcontext()

    @contextmanager
    def _ragged_attention(self):
        """Point the shared layers' attention at `ragged_attention` for this step (restored after)."""
        saved = [c._attn_implementation for c in self._attn_configs]
        for c in self._attn_configs:
            c._attn_implementation = "rrt_ragged"
        try:
            yield
        finally:
            for c, impl in zip(self._attn_configs, saved):
                c._attn_implementation = impl

    # ------------------------------------------------------------------ routing

    def _route(self, items, inputs, outputs):
        """Store outputs, advance loops, ask the exit policy for each request's latest token.

        The LM head runs only on rows that need it: every deciding row if the policy scores logits
        (max_prob, margin), else only the rows that exit. Everything that can fail (finiteness, LM
        head, exit policy) runs before any state changes.
        """
        t = time.perf_counter()
        finite = torch.isfinite(outputs).all(-1)  # [rows]
        if not bool(finite.all()):
            live, p, b = items[int((~finite).nonzero()[0])]
            raise FloatingPointError(f"non-finite hidden state at position {p}, loop {b}")
        last = self.num_loops - 1
        deciding = [i for i, (live, p, _) in enumerate(items) if p == len(live.tokens) - 1]
        exits = []
        if deciding:
            loops = [items[i][2] for i in deciding]
            exit_rows, exit_logits = self._decide(items, deciding, loops, inputs, outputs)
            if exit_rows:
                # fp32 argmax, as HF generate takes it (the same ids; a bf16 argmax is 3× slower on CPU)
                next_tokens = exit_logits.float().argmax(-1).tolist()
                forced = [n for n, i in enumerate(exit_rows) if items[i][0].request.forced is not None]
                logprobs = {}
                if forced:
                    targets = [items[exit_rows[n]][0].request.forced[len(items[exit_rows[n]][0].generated)]
                               for n in forced]
                    lp = exit_logits[forced].float().log_softmax(-1)
                    values = lp[torch.arange(len(forced)), torch.tensor(targets, device=lp.device)].tolist()
                    logprobs = {n: (tok, (v, tok == next_tokens[n]))
                                for n, tok, v in zip(forced, targets, values)}
                exits = [(i, *logprobs.get(n, (next_tokens[n], None))) for n, i in enumerate(exit_rows)]
        early = [(i, items[i]) for i, _, _ in exits if items[i][2] < last]
        if early and self.kv_policy != "propagate":  # KV writes only, like the block's (can fail: before state)
            self._fill([item for _, item in early], outputs, [i for i, _ in early])
        # state changes from here on
        slot = torch.tensor([live.slot for live, _, _ in items], device=outputs.device)
        position = torch.tensor([p for _, p, _ in items], device=outputs.device)
        self.hidden[slot, position] = outputs
        for live, p, b in items:
            live.done[b] += 1
            if len(live.request.prompt) - 1 <= p < len(live.tokens) - 1:  # emitted already: KV only
                self.stats["propagation_items"] += 1
        if self.kv_policy != "propagate":
            for _, (live, p, b) in early:
                live.filled[p] = b
                self.stats["filled_rows"] += self.num_loops - 1 - b
        for i, token, logprob in exits:
            self._emit(items[i][0], token, items[i][2], logprob)
        if self.profile:
            self.profile.route_s += time.perf_counter() - t

    def _decide(self, items, deciding, loops, inputs, outputs):
        """Return (rows that exit now, their LM-head logits [n, vocab])."""
        last = self.num_loops - 1
        policy = self.exit_policy
        dev = outputs.device
        rows_t = torch.tensor(deciding, device=dev)
        loop = torch.tensor(loops, device=dev)
        logits = self._head(outputs, deciding, loops) if policy.needs_logits else None
        exit_now = policy.exit_mask(loop=loop, logits=logits, hidden=outputs[rows_t], prev_hidden=inputs[rows_t],
                                    keys=[(items[i][0].request.request_id, items[i][1]) for i in deciding])
        exit_now = (exit_now | (loop == last)).tolist()
        picked = [n for n, e in enumerate(exit_now) if e]
        rows = [deciding[n] for n in picked]
        if not rows:
            return [], None
        if logits is not None:
            return rows, logits[picked]
        return rows, self._head(outputs, rows, [loops[n] for n in picked])

    def _head(self, outputs, rows, loops):
        t = time.perf_counter()
        dev = outputs.device
        idx = torch.tensor(rows, device=dev)
        with self._packed():
            logits = head_logits(self.model, outputs[idx][None], loop_idx=torch.tensor(loops, device=dev)[None])[0]
        if self.profile:
            self.profile.head_s += time.perf_counter() - t
        return logits

    def _fill(self, exited, outputs, rows):
        """Give exited tokens' deeper depths their keys/values without running the loops (copy policies)."""
        k = self.num_shared
        if self.kv_policy == "copy_kv":
            self.kv.copy_depths([(live.slot, p, b * k + j, d * k + j) for live, p, b in exited for j in range(k)
                                 for d in range(b + 1, self.num_loops)])
            return
        # copy_hidden: every deeper loop's layers compute keys/values from the exit hidden state
        fill = sorted(((d, live.slot, p, n) for n, (live, p, b) in enumerate(exited)
                       for d in range(b + 1, self.num_loops)))
        layout = StepLayout(self.kv, [(s, d, p) for d, s, p, _ in fill], num_shared=k,
                            depth_window=self.depth_window, device=outputs.device)
        src = torch.tensor([rows[n] for *_, n in fill], device=outputs.device)
        self._layers(outputs[src][None], layout, kv_only=True)

    def _emit(self, live: Live, token: int, loop: int, logprob: tuple[float, bool] | None = None) -> None:
        live.tokens.append(token)
        live.exit_loops.append(loop)
        if logprob is not None:
            live.logprobs.append(logprob)
        self.stats["tokens"] += 1
        self.stats["exits_per_loop"][loop] += 1
        r = live.request
        now = time.perf_counter()
        self.first_token_at.setdefault(r.request_id, now)
        forced = r.forced is not None
        if len(live.generated) == r.max_new_tokens or (token in live.stop and not forced):
            self.results[r.request_id] = live.generated
            self.exit_loops[r.request_id] = live.exit_loops
            if forced:
                self.logprobs[r.request_id] = live.logprobs
            self.finished_at[r.request_id] = now
            self.active.remove(live)
            self.kv.release(live.slot)
