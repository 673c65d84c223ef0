"""The CDB engine (rrt.serving): equal to HF generate with exits off, to the sequential reference
with exits on (DESIGN invariant 9), whatever the arrivals and token budget; KV never read unwritten."""
import pytest
import torch

import rrt
from rrt.exits import MaxProbExit, OracleExit, calibrate_threshold, record_oracle_trajectories
from rrt.relax import lora_modules
from rrt.serving import Engine, Request, reference_generate

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


def _hf_greedy(model, prompt, new=NEW):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=0, eos_token_id=None, pad_token_id=0)
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

