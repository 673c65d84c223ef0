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
