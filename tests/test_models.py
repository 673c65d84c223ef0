"""Model loading: tiny configs, local dirs offline, embedded names, clear errors."""
import socket

import pytest
import torch

import rrt
from rrt.families import decoder_layers
from rrt.models import TINY


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
    def devices(model):
        return {t.device for t in [*model.parameters(), *model.buffers()]}
    model, _ = rrt.load_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu") and devices(model) == {torch.device("cpu")}  # the default
    assert len(decoder_layers(model)) == 6
    for device in ("meta", torch.device("meta")):  # not the default: shows the argument is honoured
        moved, _ = rrt.load_model(name, device=device)
        assert moved.device == torch.device("meta") and devices(moved) == {torch.device("meta")}
        assert {p.dtype for p in moved.parameters()} == {torch.float32}


# ---------------------------------------------------------------- directories load exactly, or not at all

def _saved_relaxed(tmp_path, tokenizer=True):
    """A relaxed tiny-llama (trained-looking LoRA) written by rrt.save; returns the directory."""
    model, tok = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=2))
    with torch.no_grad():
        for name, p in rec.named_parameters():
            if "lora_B" in name:
                p.normal_()  # not the SVD init: a partly random load could not match by chance
    return rrt.save(rec, tmp_path / "rec", tokenizer=tok if tokenizer else None)


def test_load_model_reads_an_rrt_save_directory_exactly(tmp_path):
    path = _saved_relaxed(tmp_path)
    model, tok = rrt.load_model(str(path))
    reference = rrt.load(path)
    ids = tok(["Loops share one block."], return_tensors="pt").input_ids
    assert model.config.rrt == reference.config.rrt
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tok.decode(ids[0]) == "Loops share one block."


def test_load_model_refuses_an_rrt_save_directory_without_a_tokenizer(tmp_path):
    path = _saved_relaxed(tmp_path, tokenizer=False)
    with pytest.raises(ValueError, match=r"rrt.save directory without a tokenizer: load the model with rrt.load"):
        rrt.load_model(str(path))


def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("gpt_neox.layers.3.mlp.dense_4h_to_h.weight"), r"lacks.*gpt_neox.layers.3.mlp.dense_4h_to_h"),
    (lambda s: s.pop("embed_out.weight"), r"lacks.*\['lm_head.weight'\]"),  # untied: a random head
    (lambda s: s.update(bogus=torch.zeros(3)), r"no place for \['bogus'\]"),
])
def test_load_model_refuses_a_directory_that_leaves_weights_random(tmp_path, edit, named):
    model, tok = rrt.load_model("tiny-gpt-neox")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=named):
        rrt.load_model(str(tmp_path))


def test_load_model_accepts_a_tied_head_that_is_not_stored(tmp_path):
    model, tok = rrt.load_model("tiny-llama")  # tie_word_embeddings: save_pretrained stores no lm_head
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = rrt.load_model(str(tmp_path))
    ids = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("head", ["embed_out.weight", "lm_head.weight"])
def test_load_model_reads_gpt_neox_checkpoints_under_either_head_name(tmp_path, head):
    """HF checkpoints (Pythia) and save_pretrained name the head embed_out; transformers 5's model, lm_head."""
    from safetensors.torch import load_file

    model, tok = rrt.load_model("tiny-gpt-neox")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert "embed_out.weight" in load_file(tmp_path / "model.safetensors")  # the hub's name
    _edit_weights(tmp_path, lambda s: s.__setitem__(head, s.pop("embed_out.weight")))
    ids = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert torch.equal(rrt.load_model(str(tmp_path))[0](ids).logits, model(ids).logits)
        assert torch.equal(rrt.load(tmp_path)(ids).logits, model(ids).logits)
