"""Model loading: tiny configs, local dirs offline, embedded names, clear errors."""
import socket

import pytest
import torch

import rrt
from rrt.models import TINY, decoder_layers


def test_tiny_models_are_deterministic_and_odd_sized():
    a, tok = rrt.load_model("tiny-llama")
    b, _ = rrt.load_model("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tok) == 99 and a.config.intermediate_size == 37
    assert tok.decode(tok("Hi there!").input_ids) == "Hi there!"


def test_local_directory_loads_offline(tmp_path, monkeypatch):
    """The hub/local-dir path cluster users take, on a tiny model saved to a temp dir."""
    model, tok = rrt.load_model("tiny-gemma3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded, tok2 = rrt.load_model(str(tmp_path))
    ids = tok("abc", return_tensors="pt").input_ids
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok2.decode(ids[0]) == "abc"


def test_unknown_source_lists_known_names():
    with pytest.raises(ValueError, match=r"smollm2-135m.*tiny-llama"):
        rrt.load_model("smollm3")


def test_missing_hub_model_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="could not load 'nobody/no-such-model'"):
        rrt.load_model("nobody/no-such-model")


@pytest.mark.parametrize("name", TINY)
def test_dtype_and_device(name):
    model, _ = rrt.load_model(name, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(decoder_layers(model)) == 6
