"""Compact save/load: exact logits, sharing rebuilt, unique tensors stored once, no original needed."""
import pytest
import torch
from safetensors.torch import load_file

import rrt
from rrt.checkpoint import WEIGHTS
from tests.test_recursive import assert_tied


@pytest.mark.parametrize("spec", [dict(num_blocks=2, init="stepwise"), dict(num_blocks=3, init="average"),
                                  dict(num_blocks=2, init="lower", untie_norms=True)])
def test_round_trip(tiny, tiny_ids, tmp_path, spec):
    _, model, tok = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(**spec))
    rrt.save(rec, tmp_path, tokenizer=tok)
    loaded = rrt.load(tmp_path)
    assert type(loaded) is type(rec) and loaded.config.rrt == rec.config.rrt
    assert torch.equal(loaded(tiny_ids).logits, rec(tiny_ids).logits)
    assert_tied(loaded, spec["num_blocks"])
    assert rrt.count_parameters(loaded) == rrt.count_parameters(rec)
    stored = load_file(tmp_path / WEIGHTS)
    unique = {id(t) for t in rec.state_dict(keep_vars=True).values()}
    assert len(stored) == len(unique) < len(rec.state_dict())  # each shared tensor once


def test_load_rejects_a_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="not a directory written by rrt.save"):
        rrt.load(tmp_path)


def test_round_trip_with_a_head_lora(tmp_path):
    model, _ = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, lora_rank=2, head_lora_rank=4))
    with torch.no_grad():
        rec.head_lora.lora_B.normal_()  # a trained adapter, not the zero init
    rrt.save(rec, tmp_path)
    loaded = rrt.load(tmp_path)
    assert loaded.config.rrt == rec.config.rrt and loaded.config.rrt["head_lora_rank"] == 4
    x = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(rrt.loop_logits(loaded, x), rrt.loop_logits(rec, x)))
    assert rrt.count_parameters(loaded) == rrt.count_parameters(rec)


def test_load_refuses_a_spec_that_does_not_fit_the_layers(tmp_path):
    import json

    model, _ = rrt.load_model("tiny-llama")
    rrt.save(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rrt"]["num_blocks"] = 4  # 6 layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.rrt does not fit this model: num_blocks=4 does not divide "
                                         "the 6 layers.*valid values: 1, 2, 3, 6"):
        rrt.load(tmp_path)


def test_load_into_copies_in_place_and_keeps_ties(tmp_path):
    from rrt.checkpoint import TRAINING_STATE, load_into

    model, _ = rrt.load_model("tiny-llama")
    trained = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=2, seed=1))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    rrt.save(trained, tmp_path)
    target = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=2))
    ptrs = {n: p.data_ptr() for n, p in target.named_parameters()}
    assert load_into(target, tmp_path) is None  # no training state beside the weights
    assert {n: p.data_ptr() for n, p in target.named_parameters()} == ptrs  # in place
    assert_tied(target, 2)
    x = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert torch.equal(target.eval()(x).logits, trained(x).logits)
    torch.save({"step": 7}, tmp_path / TRAINING_STATE)
    assert load_into(target, tmp_path) == 7
    with pytest.raises(ValueError, match="does not match the model"):
        load_into(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2)), tmp_path)
