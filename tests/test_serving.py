"""The CDB engine (rrt.serving): equal to HF generate with exits off, to the sequential reference
with exits on (DESIGN invariant 9), whatever the arrivals and token budget; KV never read unwritten."""
import pytest
import torch

import rrt
from rrt.exits import MaxProbExit, OracleExit, calibrate_threshold, record_oracle_trajectories
from rrt.families import decoder_layers
from rrt.relax import lora_modules
from rrt.serving import Engine, Request, reference_generate
from rrt.serving.kv import ScheduleError
from rrt.serving.packed import packing_supported

TEXTS = ["Hello world, this is", "Ab", "The quick brown fox", "Loops!"]
NEW = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _relaxed(name, num_blocks=2):
    model, tok = rrt.load_model(name)
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_blocks, lora_rank=3))
    # Make every depth's LoRA large and distinct, so a wrong per-row loop LoRA changes the tokens.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in lora_modules(rec).values():
            lora.lora_B.copy_(0.3 * torch.randn(lora.lora_B.shape, generator=gen))
    return rec, [tok(t).input_ids for t in TEXTS]


def _hf_greedy(model, prompt, new=NEW, eos=None):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=0, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _requests(prompts, stagger):
    return [Request(p, NEW, arrival_step=stagger * i) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def llama():
    rec, prompts = _relaxed("tiny-llama", num_blocks=3)  # K=2 shared layers, 3 loops, LoRA rank 3
    return rec, prompts, [_hf_greedy(rec, p) for p in prompts]


@pytest.mark.parametrize("budget,stagger,max_active", [(1, 0, 4), (3, 2, 4), (5, 1, 2), (64, 0, 4), (64, 3, 1)])
def test_exits_off_equals_hf_generate(llama, budget, stagger, max_active):
    rec, prompts, expected = llama
    engine = Engine(rec, token_budget=budget, max_active=max_active, debug=True)
    out = engine.run(_requests(prompts, stagger))
    assert [out[i] for i in range(len(prompts))] == expected
    assert engine.stats["exits_per_loop"] == [0, 0, NEW * len(prompts)]


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-gpt-neox"])
def test_exits_off_equals_hf_generate_every_family(name):
    # gemma2: sliding window 5 + attention softcap; gemma3: depths of one shared layer differ in
    # sliding/global attention and rotary; gpt-neox: partial rotary, parallel residual.
    rec, prompts = _relaxed(name)
    prompts = prompts[:3]
    out = Engine(rec, token_budget=4, debug=True).run(_requests(prompts, 2))
    assert [out[i] for i in range(len(prompts))] == [_hf_greedy(rec, p) for p in prompts]


def test_plain_model_is_one_loop_continuous_batching():
    model, tok = rrt.load_model("tiny-llama")
    prompts = [tok(t).input_ids for t in TEXTS[:2]]
    out = Engine(model, token_budget=7, debug=True).run(_requests(prompts, 1))
    assert [out[0], out[1]] == [_hf_greedy(model, p) for p in prompts]


def test_oracle_exits_equal_full_model_and_reference(llama):
    rec, prompts, expected = llama
    trajectories = record_oracle_trajectories(rec, [p + e for p, e in zip(prompts, expected)])
    policy = OracleExit(dict(enumerate(trajectories)))
    engine = Engine(rec, token_budget=4, exit_policy=policy, debug=True)
    out = engine.run(_requests(prompts, 1))
    for i, p in enumerate(prompts):
        oracle = trajectories[i][len(p) - 1:len(p) - 1 + NEW].tolist()
        assert out[i] == expected[i]                 # oracle exits never change the tokens
        assert engine.exit_loops[i] == oracle
        assert reference_generate(rec, p, NEW, exit_policy=policy, request_id=i) == (expected[i], oracle)
    assert sum(engine.stats["exits_per_loop"][:-1]) > 0  # some tokens did exit early
    assert engine.stats["propagation_items"] > 0         # ... and were carried through later loops


@pytest.mark.parametrize("budget", [2, 64])
def test_threshold_exits_equal_reference(llama, budget):
    rec, prompts, expected = llama
    calib = calibrate_threshold(rec, [p + e for p, e in zip(prompts, expected)], policy="max_prob",
                                target_agreement=0.5)
    policy = MaxProbExit(calib.threshold)
    engine = Engine(rec, token_budget=budget, exit_policy=policy, debug=True)
    out = engine.run(_requests(prompts, 2))
    for i, p in enumerate(prompts):
        assert (out[i], engine.exit_loops[i]) == reference_generate(rec, p, NEW, exit_policy=policy, request_id=i)
    assert sum(engine.stats["exits_per_loop"][:-1]) > 0


def test_debug_mode_catches_read_before_write(llama):
    rec, prompts, _ = llama
    engine = Engine(rec, debug=True)
    engine.submit(Request(prompts[0], 2))
    engine._admit()
    live = engine.active[0]
    with pytest.raises(AssertionError, match="read before written"):
        engine._run_block([(live, 1, 0)])  # position 1 without position 0: a broken schedule
    with pytest.raises(AssertionError, match="written twice"):
        engine._run_block([(live, 0, 0)])
        engine._run_block([(live, 0, 0)])


def test_stats_and_eos(llama):
    rec, prompts, expected = llama
    eos = expected[0][2]
    engine = Engine(rec, token_budget=8, eos_token_id=eos)
    out = engine.run([Request(prompts[0], NEW)])
    assert out[0] == expected[0][:expected[0].index(eos) + 1]
    s = engine.summary()
    assert s["tokens"] == len(out[0]) == sum(s["exits_per_loop"])
    assert 0 < s["mean_batch_fill"] <= 1


def test_refusals():
    model, _ = rrt.load_model("tiny-llama")
    untied = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, untie_norms=True))
    with pytest.raises(ValueError, match="untie_norms"):
        Engine(untied)
    engine = Engine(model, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(Request([5, 6, 7], 6))
    with pytest.raises(ValueError, match="non-empty prompt"):
        engine.submit(Request([], 2))



def test_stop_tokens_per_request_match_hf_generate(llama):
    # Request i stops at its own stop token (included, HF's eos convention); the engine-wide eos
    # list applies to every request alongside; a stop token never emitted changes nothing.
    rec, prompts, expected = llama
    stops = [[expected[0][2]], [expected[1][1], 98], [], [99 - 1]]
    assert 98 not in expected[3]
    eos = [expected[2][3]]
    engine = Engine(rec, token_budget=5, eos_token_id=eos, debug=True)
    out = engine.run([Request(p, NEW, request_id=i, stop_token_ids=s) for i, (p, s) in enumerate(zip(prompts, stops))])
    for i, p in enumerate(prompts):
        assert out[i] == _hf_greedy(rec, p, eos=stops[i] + eos)
    first_stop = [min((e.index(t) for t in s + eos if t in e), default=NEW - 1) for e, s in zip(expected, stops)]
    assert [out[i] for i in range(4)] == [e[:k + 1] for e, k in zip(expected, first_stop)]
    assert first_stop[0] <= 2 and first_stop[1] <= 1 and first_stop[2] <= 3 and out[3] == expected[3]


@pytest.mark.parametrize("change,match", [
    (dict(prompt=[5, 99]), r"request 'r': prompt\[1\] = 99 is not a token id.*\[0, 99\)"),
    (dict(prompt=[-1, 5]), r"prompt\[0\] = -1 is not a token id"),
    (dict(prompt=[5, 6.0]), r"prompt\[1\] = 6.0 is not a token id"),
    (dict(prompt=[True]), r"prompt\[0\] = True is not a token id"),
    (dict(prompt="Hello"), "non-empty prompt"),
    (dict(prompt=[]), "non-empty prompt"),
    (dict(prompt={5, 6}), "non-empty prompt"),  # a set has no order
    (dict(prompt=torch.tensor(5)), "non-empty prompt"),
    (dict(max_new_tokens=2.5), r"request 'r': max_new_tokens must be an int >= 1, got 2.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1, got True"),
    (dict(arrival_step=-1), "arrival_step must be an int >= 0, got -1"),
    (dict(arrival_step=0.5), "arrival_step must be an int >= 0, got 0.5"),
    (dict(stop_token_ids=[3, 120]), r"stop_token_ids\[1\] = 120 is not a token id"),
    (dict(stop_token_ids=7), "stop_token_ids must be a sequence of token ids, got 7"),
    (dict(stop_token_ids={3, 120}), r"stop_token_ids\[.\] = 120 is not a token id"),
    (dict(max_new_tokens=7), r"len\(prompt\) \+ max_new_tokens = 2 \+ 7 exceeds the KV pool's max_seq_len=8"),
    (dict(request_id=["r"]), "request_id must be hashable"),
    (dict(request_id="queued"), "request 'queued': request_id is already in use"),
    (dict(request_id="done"), "request 'done': request_id is already in use"),
])
def test_submit_refuses_bad_requests(change, match):
    model, _ = rrt.load_model("tiny-llama")  # vocab 99
    engine = Engine(model, max_seq_len=8)
    engine.run([Request([5, 6], 2, request_id="done")])
    engine.submit(Request([5, 6], 2, request_id="queued"))
    kwargs = dict(prompt=[5, 6], max_new_tokens=2, request_id="r") | change
    with pytest.raises(ValueError, match=match):
        engine.submit(Request(**kwargs))
    assert [r.request_id for r in engine.queue] == ["queued"]  # refused before anything changed
    assert engine.run() == {"done": [6, 6], "queued": [6, 6]}


def test_integer_ids_of_any_kind_are_accepted_and_engine_eos_is_checked():
    import numpy as np
    model, _ = rrt.load_model("tiny-llama")
    with pytest.raises(ValueError, match=r"engine: eos_token_id\[1\] = 200 is not a token id"):
        Engine(model, eos_token_id=[2, 200])
    engine = Engine(model, max_seq_len=8, eos_token_id=np.int64(97))
    out = engine.run([Request([5, 6], 2, request_id="list"),
                      Request(torch.tensor([5, 6]), np.int64(2), request_id="tensor", stop_token_ids={96}),
                      Request(np.array([5, 6]), 2, request_id="array", stop_token_ids=torch.tensor([96]))])
    assert out["tensor"] == out["array"] == out["list"]


def test_request_ids_unique_until_collected():
    model, _ = rrt.load_model("tiny-llama")
    engine = Engine(model, max_seq_len=8)
    engine.submit(Request([5, 6], 2, request_id=1))
    with pytest.raises(ValueError, match=r"request 1: request_id \(defaulted to the submission index\) is already"):
        engine.submit(Request([7], 2))  # the second submission's default id, 1, is taken
    engine.submit(Request([7], 2, request_id="b"))
    first = engine.run()
    assert list(first) == [1, "b"]
    with pytest.raises(ValueError, match="already in use"):
        engine.submit(Request([7], 2, request_id="b"))  # finished, not collected: still taken
    b = first["b"]
    assert engine.collect("b") == b and list(engine.results) == [1] and "b" not in engine.latency()
    engine.submit(Request([7], 2, request_id="b"))
    assert engine.run()["b"] == b
    with pytest.raises(ValueError, match="no result to collect"):
        engine.collect("nobody")


SEVEN = 7


@pytest.fixture(scope="module")
def seven(llama):
    """Seven clean prompts, their outputs, and a token id none of them reads or emits."""
    rec, prompts, expected = llama
    seven = prompts + [p[::-1] for p in prompts[:3]]
    out = Engine(rec, token_budget=16, debug=True).run([Request(p, NEW) for p in seven])
    used = {t for i, p in enumerate(seven) for t in p + out[i]}
    poison = min(set(range(rec.config.vocab_size)) - used)
    return seven, [out[i] for i in range(SEVEN)], poison


def _install_fault(kind, engine, poison):
    """Make the step fail for any batch with the poisoned token's loop-0 row; return hook handles."""
    embed = engine.model.get_input_embeddings()
    if kind == "nan":  # a non-finite embedding row: it poisons every row that attends to its keys
        def nan_row(module, args, out):
            out[args[0] == poison] = float("nan")
            return out
        return [embed.register_forward_hook(nan_row)]
    seen = [False]

    def mark(module, args, out):
        seen[0] = bool((args[0] == poison).any())

    def raise_late(module, args, out):  # in the last shared layer: earlier layers wrote KV already
        hit, seen[0] = seen[0], False
        if hit:
            raise RuntimeError("injected fault")
    return [embed.register_forward_hook(mark),
            engine.layers[engine.num_shared - 1].register_forward_hook(raise_late)]


@pytest.mark.parametrize("kind,error", [("raise", "RuntimeError: injected fault"),
                                        ("nan", "FloatingPointError: non-finite hidden state"),
                                        ("oov_after_submit", "IndexError"),
                                        ("exit_policy", "KeyError: 'poison'")])
def test_fault_fails_only_the_poisoned_request(llama, seven, kind, error):
    rec, _, _ = llama
    prompts, expected, poison = seven
    policy = None
    if kind == "exit_policy":  # oracle exits with no trajectory for the poisoned request
        trajectories = record_oracle_trajectories(rec, [p + e for p, e in zip(prompts, expected)])
        policy = OracleExit(dict(enumerate(trajectories)))
        assert Engine(rec, token_budget=16, exit_policy=policy).run(
            [Request(p, NEW, request_id=i) for i, p in enumerate(prompts)]) == dict(enumerate(expected))
        policy.trajectories["poison"] = trajectories[3]  # long enough to pass submit's check
    engine = Engine(rec, token_budget=16, exit_policy=policy, debug=True)
    bad = Request(prompts[3][::-1] + [poison], NEW, request_id="poison")  # fails after its first chunk
    requests = [Request(p, NEW, request_id=i) for i, p in enumerate(prompts)]
    for r in requests[:3] + [bad] + requests[3:]:
        engine.submit(r)
    if kind == "oov_after_submit":
        bad.prompt[-1] = rec.config.vocab_size  # corrupted after validation
    if kind == "exit_policy":
        del policy.trajectories["poison"]  # taken away after validation (submit refuses a request without one)
    hooks = _install_fault(kind, engine, poison) if kind in ("raise", "nan") else []
    fail, slots = engine._fail, []
    engine._fail = lambda live, e: (slots.append(live.slot), fail(live, e))  # which slot it held
    try:
        while "poison" not in engine.failed and (engine.queue or engine.active):
            engine.step()
        assert "poison" in engine.failed
        assert slots[0] in engine.kv.free and not engine.kv.written[slots[0]].any()  # freed at once
        assert len(engine.active) == SEVEN
        out = engine.run()
    finally:
        for h in hooks:
            h.remove()
    assert out == dict(enumerate(expected))  # token-identical to the run without it
    assert list(engine.failed) == ["poison"] and engine.failed["poison"].startswith(error)
    assert engine.active == [] and sorted(engine.kv.free) == list(range(8)) and not engine.kv.written.any()
    assert engine.collect(0) == expected[0]
    engine.submit(Request(prompts[0], NEW, request_id=0))  # a further request (the policy knows id 0)
    assert engine.run()[0] == expected[0]
    with pytest.raises(RuntimeError, match="request 'poison' failed: " + error):
        engine.collect("poison")
    assert engine.failed == {}


def test_batch_fault_blamed_on_no_request_is_retried(llama, seven):
    # A fault of the batch, not of a request (raised once): re-run per request, nobody fails.
    rec, _, _ = llama
    prompts, expected, _ = seven
    engine = Engine(rec, token_budget=16, debug=True)
    calls = [0]

    def once(module, args, out):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("transient")
    hook = engine.layers[1].register_forward_hook(once)
    try:
        out = engine.run([Request(p, NEW, request_id=i) for i, p in enumerate(prompts)])
    finally:
        hook.remove()
    assert out == dict(enumerate(expected)) and engine.failed == {}


def test_fault_in_every_request_leaves_engine_serving(llama):
    rec, prompts, expected = llama
    engine = Engine(rec, token_budget=4, debug=True)

    def broken(module, args, out):
        raise RuntimeError("broken layer")
    hook = engine.layers[0].register_forward_hook(broken)
    try:
        assert engine.run([Request(p, NEW) for p in prompts]) == {}
    finally:
        hook.remove()
    assert engine.failed == {i: "RuntimeError: broken layer" for i in range(len(prompts))}
    assert sorted(engine.kv.free) == list(range(engine.max_active)) and not engine.kv.written.any()
    assert engine.run([Request(prompts[1], NEW, request_id="next")])["next"] == expected[1]


def test_debug_schedule_errors_are_not_isolated(llama):
    # A broken KV invariant is an engine bug: step raises instead of failing a request.
    rec, prompts, _ = llama
    engine = Engine(rec, debug=True)
    engine.submit(Request(prompts[0], 2))
    engine._schedule = lambda: [(engine.active[0], 1, 0)]  # position 1 before position 0
    with pytest.raises(ScheduleError, match="read before written"):
        engine.step()


# --------------------------------------------------------------------------- KV policies, arrivals, layout

@pytest.mark.parametrize("kv_policy", ["copy_kv", "copy_hidden"])
def test_kv_policies_without_exits_equal_hf_generate(llama, kv_policy):
    rec, prompts, expected = llama
    engine = Engine(rec, token_budget=5, kv_policy=kv_policy, debug=True)
    out = engine.run(_requests(prompts, 1))
    assert [out[i] for i in range(len(prompts))] == expected  # nothing exits early: nothing is filled
    assert engine.stats["filled_rows"] == 0


@pytest.mark.parametrize("kv_policy", ["copy_kv", "copy_hidden"])
def test_kv_policies_fill_instead_of_running_and_are_schedule_independent(llama, kv_policy):
    rec, prompts, expected = llama
    trajectories = record_oracle_trajectories(rec, [p + e for p, e in zip(prompts, expected)])
    policy = OracleExit(dict(enumerate(trajectories)))
    batched = Engine(rec, token_budget=4, exit_policy=policy, kv_policy=kv_policy, debug=True)
    out = batched.run(_requests(prompts, 1))
    assert batched.stats["propagation_items"] == 0 and batched.stats["filled_rows"] > 0
    exact = Engine(rec, token_budget=4, exit_policy=policy, debug=True)
    exact.run(_requests(prompts, 1))
    assert batched.stats["items"] < exact.stats["items"]  # the exited tokens' deeper loops never ran
    # the copied keys change later tokens' attention, but not with the schedule: one request at a time
    for i, p in enumerate(prompts):
        alone = Engine(rec, token_budget=1, exit_policy=policy, kv_policy=kv_policy, max_active=1, debug=True)
        assert alone.run([Request(p, NEW, request_id=i)])[i] == out[i]
        assert alone.exit_loops[i] == batched.exit_loops[i]


def test_copy_kv_writes_the_exit_loops_keys_into_deeper_depths(llama):
    rec, prompts, _ = llama
    k = 2  # tiny-llama B=3: 2 shared layers
    engine = Engine(rec, exit_policy=OracleExit({0: [0] * 40}), kv_policy="copy_kv", debug=True)
    engine.submit(Request(prompts[0], 3))
    while not engine.results:  # step until done, keeping the pool: check before release
        engine.step()
        live = engine.active[0] if engine.active else None
        if live is None:
            break
        for p in live.filled:
            for j in range(k):
                for deeper in (1, 2):
                    torch.testing.assert_close(engine.kv.keys[live.slot, deeper * k + j, p],
                                               engine.kv.keys[live.slot, j, p], rtol=0, atol=0)
    assert engine.results[0] and engine.stats["filled_rows"] == 2 * 3  # three tokens, two deeper loops each


def test_unknown_kv_policy_refused(llama):
    with pytest.raises(ValueError, match="unknown kv_policy 'skip'; valid: propagate, copy_kv, copy_hidden"):
        Engine(llama[0], kv_policy="skip")


def test_arrival_seconds_delay_admission_and_latency_is_timed(llama):
    rec, prompts, expected = llama
    engine = Engine(rec, token_budget=8)
    requests = [Request(prompts[0], NEW, arrival_s=0.0), Request(prompts[1], NEW, arrival_s=0.3)]
    out = engine.run(requests)
    assert [out[0], out[1]] == expected[:2]
    assert engine.arrived_at[1] - engine._t0 >= 0.3   # admitted no earlier than it arrived
    for rid in (0, 1):
        assert engine.arrived_at[rid] <= engine.first_token_at[rid] <= engine.finished_at[rid]
    with pytest.raises(ValueError, match="arrival_s must be a number of seconds"):
        Engine(rec).submit(Request(prompts[0], 2, arrival_s=-1.0))


def test_forced_requests_score_the_given_tokens(llama):
    rec, prompts, expected = llama
    forced = [t + 1 for t in expected[0]]  # not what the model would say
    engine = Engine(rec, token_budget=3)
    out = engine.run([Request(prompts[0], NEW, forced=forced)])
    assert out[0] == forced
    ids = torch.tensor([prompts[0] + forced])
    want = rec(ids).logits[0, len(prompts[0]) - 1:-1].float().log_softmax(-1)
    got = engine.logprobs[0]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got]), want[torch.arange(NEW), torch.tensor(forced)],
                               rtol=1e-4, atol=1e-4)
    assert [g for _, g in got] == (want.argmax(-1) == torch.tensor(forced)).tolist()
    with pytest.raises(ValueError, match="forced must be a sequence of exactly max_new_tokens=6"):
        Engine(rec).submit(Request(prompts[0], NEW, forced=forced[:2]))


def test_step_layout_buckets_pad_at_most_one_and_a_half_times():
    from rrt.serving.kv import PAD_RATIO, KVPool, StepLayout
    pool = KVPool(max_active=8, num_depths=4, max_seq_len=128)
    lengths = [100, 70, 66, 40, 27, 10, 9, 1]
    rows = sorted((loop, slot, n - 1) for slot, (n, loop) in enumerate(zip(lengths, [0, 1, 0, 1, 0, 1, 0, 1])))
    layout = StepLayout(pool, [(s, b, p) for b, s, p in rows], num_shared=2, depth_window=[0] * 4, device="cpu")
    assert layout.segments == [(0, 0, 4), (1, 4, 8)]  # rows sorted by loop: one LoRA matmul pair per loop
    covered = sorted(r for b in layout.buckets for r in b.rows.tolist())
    assert covered == list(range(8)) and not layout.chunks
    for b in layout.buckets:
        own = b.valid.sum(1)
        assert b.length == own.max() and b.length <= PAD_RATIO * own.min()
    assert layout.scores_needed == sum(lengths) and layout.scores_computed <= PAD_RATIO * sum(lengths)
    # a prefill chunk: one group of several rows, causal
    chunk = StepLayout(pool, [(0, 0, p) for p in range(5)], num_shared=2, depth_window=[0] * 4, device="cpu")
    assert [(c.lo, c.hi, c.start) for c in chunk.chunks] == [(0, 5, 0)] and chunk.scores_needed == 15


def test_profile_is_a_hook_of_the_engine(llama):
    rec, prompts, _ = llama
    engine = Engine(rec, token_budget=8, profile=True)
    engine.run(_requests(prompts, 0))
    p = engine.profile
    assert len(p.step_rows) == engine.stats["steps"] and sum(p.step_rows) == engine.stats["items"]
    assert 0 < p.attn_s < p.block_s and 0 < p.head_s <= p.route_s
    assert 1.0 <= p.score_waste <= 1.5
    assert Engine(rec).profile is None


@pytest.mark.skipif(not packing_supported(torch.nn.Linear(2, 2).to(torch.bfloat16)),
                    reason="prepacked linears need oneDNN on a CPU")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt-neox"])
def test_prepacked_weights_serve_the_same_tokens_in_bf16(name):
    # Serving in bf16 on a CPU runs the shared layers' linears, the LM head and the loops' packed
    # LoRA pairs through oneDNN prepacked weights: the same outputs as eager, so the same tokens and
    # exits under an oracle that mixes loops in one step; the model is left as it was.
    rec, prompts = _relaxed(name, num_blocks=3)
    rec = rec.to(torch.bfloat16)
    expected = [_hf_greedy(rec, p) for p in prompts]
    trajectories = record_oracle_trajectories(rec, [p + e for p, e in zip(prompts, expected)])
    runs = {}
    for pack in (False, True):
        engine = Engine(rec, token_budget=6, exit_policy=OracleExit(dict(enumerate(trajectories))), pack_weights=pack)
        assert (engine.packed is not None) == pack
        if pack:  # every weight the block and head compute with is held once more, packed
            linears = {m for layer in decoder_layers(rec)[:engine.num_shared] for m in layer.modules()
                       if isinstance(m, torch.nn.Linear)} | {rec.get_output_embeddings()}
            assert engine.packed_bytes >= sum(m.weight.numel() * m.weight.element_size() for m in linears)
        out = engine.run(_requests(prompts, 1))
        runs[pack] = ([out[i] for i in range(len(prompts))], [engine.exit_loops[i] for i in range(len(prompts))])
    assert runs[True] == runs[False]
    assert sum(loop < 2 for loops in runs[True][1] for loop in loops) > 0  # steps held several loops
    assert not any("forward" in vars(m) for m in rec.modules())


def test_prepacking_refused_where_it_cannot_run(llama):
    rec, _, _ = llama  # fp32
    with pytest.raises(ValueError, match="pack_weights=True needs a bf16 model"):
        Engine(rec, pack_weights=True)
    assert Engine(rec).packed is None


@pytest.mark.skipif(not packing_supported(torch.nn.Linear(2, 2).to(torch.bfloat16)),
                    reason="prepacked linears need oneDNN on a CPU")
def test_prepacked_row_loras_give_each_row_its_own_loop():
    # RowLoRAs(pack=True): W′ stacked with the loops' A in one prepacked call, then the masked B_cat;
    # every row gets its own depth's linear, whatever the order of the loops in the rows
    from rrt.serving.rows import RowLoRAs
    rec, _ = _relaxed("tiny-llama", num_blocks=3)
    rec = rec.to(torch.bfloat16)
    layers, k = decoder_layers(rec), 2
    loop_idx = [2, 0, 1, 1, 0, 2, 2]
    row_loras = RowLoRAs(rec, pack=True)
    assert row_loras.fused_bases and row_loras.nbytes > 0
    gen = torch.Generator().manual_seed(0)
    for name in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]:
        x = torch.randn(len(loop_idx), layers[0].get_submodule(name).base_layer.in_features, generator=gen).to(torch.bfloat16)
        with row_loras.apply(rrt.relax.loop_segments(loop_idx)):
            got = layers[0].get_submodule(name)(x).float()
            delta = layers[0].get_submodule(name).delta(x).float()
        want = torch.stack([layers[b * k].get_submodule(name)(x[i]) for i, b in enumerate(loop_idx)]).float()
        base = layers[0].get_submodule(name).base_layer(x).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(delta, want - base, rtol=5e-2, atol=5e-2)
