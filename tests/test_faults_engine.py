"""Issue 29 ("Nothing used silently"), probes of the engine area:

- probe 10: a bad `num_blocks` (empty, zero, negative, not dividing the layer count) in a study's params, a
  RecursiveSpec or a TrainConfig is a ValueError naming the field, the value and the valid values, before any
  directory is created or model built;
- probe 11: `Engine.run(requests)` is all-or-nothing: every request of the call is checked before any model
  call; a refused call leaves the engine as it was, and it then serves the next call token-identically to a
  fresh engine and to HF `generate()`;
- a bare decoder (`LlamaModel`, no LM head) given to `rrt.convert` is refused naming the ...ForCausalLM needed.
"""
import dataclasses

import pytest
import torch
import transformers

import rrt
from rrt.exits import OracleExit, record_oracle_trajectories
from rrt.models import tiny_config
from rrt.notebook import load_params
from rrt.plans import STUDIES
from rrt.relax import lora_modules
from rrt.serving import Engine, Request
from rrt.train import train
from tests.test_serving import _hf_greedy
from tests.test_train import TRAIN
from tests.test_train import tiny_config as train_config

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- probe 10: num_blocks

LISTED = ["01_init_ablation", "02_relaxation_rank_sweep", "03_distillation", "04_early_exit", "05_throughput"]
EARLY_EXIT = ("04_early_exit", "05_throughput")  # B >= 2: an exit needs a loop before the last


def _outside(study_cls, tmp_path) -> dict:
    """Overrides that send every directory a study may create under tmp_path (so none can be missed)."""
    names = {f.name for f in dataclasses.fields(study_cls)}
    return {k: str(tmp_path / k) for k in ("run_dir", "runs_root") if k in names}


@pytest.mark.parametrize("notebook", LISTED)
@pytest.mark.parametrize("value,named", [
    ([], r"num_blocks is empty"),
    ([0], r"num_blocks=0 is not a positive int"),
    ([-2], r"num_blocks=-2 is not a positive int"),
    ([2, 0], r"num_blocks=0 is not a positive int"),
    ([4], r"num_blocks=4 does not divide the 6 layers"),
])
def test_a_bad_num_blocks_list_is_named_with_the_valid_values(notebook, value, named, tmp_path):
    valid = "2, 3, 6" if notebook in EARLY_EXIT else "1, 2, 3, 6"  # tiny-llama: 6 layers
    with pytest.raises(ValueError, match=named + r".*valid values: " + valid) as err:
        load_params(notebook, "smoke", num_blocks=value, **_outside(STUDIES[notebook], tmp_path))
    assert str(err.value).startswith("num_blocks")  # the field first
    assert list(tmp_path.iterdir()) == []       # no run directory, no run store


@pytest.mark.parametrize("value,named", [(0, "num_blocks=0 is not a positive int"),
                                         (-2, "num_blocks=-2 is not a positive int"),  # -2 "divides" 6
                                         (4, "num_blocks=4 does not divide the 6 layers")])
def test_a_bad_num_blocks_of_explore_is_named(value, named, tmp_path):
    with pytest.raises(ValueError, match=named + r".*valid values: 1, 2, 3, 6"):
        load_params("00_explore", "smoke", num_blocks=value, run_dir=str(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


def test_final_num_blocks_may_be_empty_but_not_zero_or_one(tmp_path):
    where = _outside(STUDIES["03_distillation"], tmp_path)
    assert load_params("03_distillation", "smoke", final_num_blocks=[], **where).final_num_blocks == ()  # no Table 12
    with pytest.raises(ValueError, match=r"final_num_blocks: num_blocks=0 is not a positive int.*valid values"):
        load_params("03_distillation", "smoke", final_num_blocks=[0], **where)
    with pytest.raises(ValueError, match=r"final_num_blocks: num_blocks=1 is under 2: a recursive model needs B >= 2; "
                                         r"valid values: 2, 3, 6"):
        load_params("03_distillation", "smoke", final_num_blocks=[1], **where)
    with pytest.raises(ValueError, match=r"num_blocks: num_blocks=1 is under 2: early exit needs B >= 2; "
                                         r"valid values: 2, 3, 6"):
        load_params("04_early_exit", "smoke", num_blocks=[1], **_outside(STUDIES["04_early_exit"], tmp_path))


@pytest.mark.parametrize("value", [0, -2, True, 2.0])
def test_spec_and_train_config_refuse_a_non_positive_num_blocks(value, tmp_path):
    with pytest.raises(ValueError, match=rf"num_blocks must be a positive int.*divid.*got {value!r}"):
        rrt.RecursiveSpec(num_blocks=value)
    with pytest.raises(ValueError, match=rf"num_blocks must be a positive int.*got {value!r}"):
        train_config(tmp_path, num_blocks=value)
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_num_blocks_not_dividing_the_model_before_its_run_directory(tmp_path, monkeypatch):
    config = train_config(tmp_path, num_blocks=4)  # tiny-llama: 6 layers; the config alone cannot know
    built = []
    monkeypatch.setattr("rrt.train.loop.load_model", lambda *a, **k: built.append(a) or rrt.load_model(*a, **k))
    with pytest.raises(ValueError, match=r"num_blocks=4 does not divide the 6 layers.*valid values: 1, 2, 3, 6"):
        train(config, train_seqs=TRAIN)
    assert list(tmp_path.iterdir()) == [] and built == []  # no run directory, no model loaded


# ---------------------------------------------------------------- probe 11: Engine.run is all-or-nothing

PROMPTS = [[5, 17, 23, 42, 8], [61, 3], [9, 9, 30, 71, 12, 4, 55]]
NEW = 5
MAX_SEQ = 12  # KV positions per slot


@pytest.fixture(scope="module")
def relaxed():
    model, _ = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, lora_rank=3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct per-loop LoRAs, so a wrong loop's LoRA changes the tokens
        for lora in lora_modules(rec).values():
            lora.lora_B.copy_(0.3 * torch.randn(lora.lora_B.shape, generator=gen))
    return rec, [_hf_greedy(rec, p, new=NEW) for p in PROMPTS]


def _model_calls(engine):
    """Count every call of the embeddings and the shared layers (a list that the hooks append to)."""
    calls = []
    modules = [engine.model.get_input_embeddings(), *engine.layers[:engine.num_shared]]
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in modules]
    return calls, handles


BAD = [  # (the bad request, what the error names)
    (dict(prompt=[]), "request 'bad': needs a non-empty prompt"),
    (dict(prompt=[5] * 10), r"request 'bad': len\(prompt\) \+ max_new_tokens = 10 \+ 5 exceeds the KV pool's "
                            r"max_seq_len=12"),
    (dict(prompt=[5, 99]), r"request 'bad': prompt\[1\] = 99 is not a token id"),
    (dict(prompt=[-1]), r"request 'bad': prompt\[0\] = -1 is not a token id"),
    (dict(max_new_tokens=0), "request 'bad': max_new_tokens must be an int >= 1, got 0"),
    (dict(stop_token_ids=[120]), r"request 'bad': stop_token_ids\[0\] = 120 is not a token id"),
    (dict(forced=[1, 2]), "request 'bad': forced must be a sequence of exactly max_new_tokens=5"),
    (dict(arrival_s=float("inf")), "request 'bad': arrival_s must be a number of seconds, finite and >= 0, or None, got inf"),
    (dict(request_id="good"), "request 'good': request_id is already in use"),  # a duplicate within the call
    (dict(request_id=1), r"request 1: request_id is already in use"),           # the good ones default to 0, 1
]


@pytest.mark.parametrize("bad,named", BAD)
def test_run_checks_every_request_before_any_model_call(relaxed, bad, named):
    rec, expected = relaxed
    engine = Engine(rec, token_budget=4, max_seq_len=MAX_SEQ, debug=True)
    calls, handles = _model_calls(engine)
    good = [Request(PROMPTS[0], NEW), Request(PROMPTS[1], NEW), Request(PROMPTS[2], NEW, request_id="good")]
    try:
        with pytest.raises(ValueError, match=named):
            engine.run(good + [Request(**{"prompt": [5, 6], "max_new_tokens": NEW, "request_id": "bad"} | bad)])
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and engine.step_count == 0          # no model call, no step
    assert engine.queue == engine.active == [] and engine.results == {} and engine.failed == {}
    assert [r.request_id for r in good] == [None, None, "good"]  # the caller's requests untouched
    # The same engine serves the next call exactly: ids default from 0 again, tokens equal generate()'s.
    out = engine.run(good)
    assert out == {0: expected[0], 1: expected[1], "good": expected[2]}
    fresh = Engine(rec, token_budget=4, max_seq_len=MAX_SEQ, debug=True)
    assert fresh.run([Request(p, NEW) for p in PROMPTS]) == dict(enumerate(expected))
    assert engine.stats["tokens"] == fresh.stats["tokens"] and engine.step_count == fresh.step_count


def test_run_refuses_a_non_request_and_the_same_request_twice(relaxed):
    rec, expected = relaxed
    engine = Engine(rec, max_seq_len=MAX_SEQ)
    one = Request(PROMPTS[0], NEW)
    with pytest.raises(TypeError, match=r"request 1: expected an rrt.serving.Request, got list"):
        engine.run([one, PROMPTS[1]])
    with pytest.raises(ValueError, match=r"request 1: the same Request object is given twice"):
        engine.run([one, one])
    assert engine.queue == [] and one.request_id is None
    assert engine.run([one]) == {0: expected[0]}


def test_oracle_exit_without_a_trajectory_is_refused_before_any_compute(relaxed):
    rec, expected = relaxed
    trajectories = record_oracle_trajectories(rec, [p + e for p, e in zip(PROMPTS, expected)])
    policy = OracleExit(dict(enumerate(trajectories[:2])))  # none for request 2
    engine = Engine(rec, token_budget=4, max_seq_len=MAX_SEQ, exit_policy=policy, debug=True)
    calls, handles = _model_calls(engine)
    try:
        with pytest.raises(ValueError, match=r"request 2: the oracle exit policy has no trajectory for it"):
            engine.run([Request(p, NEW) for p in PROMPTS])
        with pytest.raises(ValueError, match=r"request 0: the oracle exit policy's trajectory covers 3 positions; "
                                             r"this request's first decision is at position 4"):
            OracleExit({0: trajectories[0][:3]}).check_request(0, Request(PROMPTS[0], NEW))
    finally:
        for h in handles:
            h.remove()
    assert calls == [] and engine.queue == []
    assert engine.run([Request(p, NEW) for p in PROMPTS[:2]]) == {0: expected[0], 1: expected[1]}


@pytest.mark.parametrize("max_seq_len", [0, -4, 8.0])
def test_engine_refuses_a_max_seq_len_it_would_replace_or_crash_on(relaxed, max_seq_len):
    with pytest.raises(ValueError, match=rf"max_seq_len must be an int >= 1 .*got {max_seq_len!r}"):
        Engine(relaxed[0], max_seq_len=max_seq_len)  # 0 used to mean the model's 256 positions, silently


# ---------------------------------------------------------------- a bare decoder given to convert

def test_convert_refuses_a_bare_decoder_naming_the_causal_lm_needed():
    bare = transformers.LlamaModel(tiny_config("tiny-llama"))
    with pytest.raises(ValueError, match=r"LlamaModel has no decoder layers at 'model.layers'.*causal LM.*"
                                         r"ForCausalLM"):
        rrt.convert(bare, rrt.RecursiveSpec(num_blocks=2))
