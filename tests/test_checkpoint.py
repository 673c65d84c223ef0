"""Compact save/load: exact logits, sharing rebuilt, unique tensors stored once, no original needed."""
import pytest
import torch
from safetensors.torch import load_file

import rrt
from rrt.checkpoint import MANIFEST, WEIGHTS, UnverifiedCheckpointWarning, write_manifest
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
    write_manifest(tmp_path)  # edited on purpose: vouched for (else the load refuses the altered config.json)
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


# ---------------------------------------------------------------- a spec that does not match the tensors

def _edit_config(path, edit):
    import json

    config = json.loads((path / "config.json").read_text())
    edit(config["rrt"])
    (path / "config.json").write_text(json.dumps(config))
    write_manifest(path)  # edited on purpose: vouched for (else the load refuses the altered config.json)


def test_load_refuses_num_blocks_edited_to_another_divisor(tmp_path):
    """B=2 on 6 layers stores shared layers 0, 1, 2; read as B=3, layer 2 would overwrite layer 0 (they tie)."""
    model, _ = rrt.load_model("tiny-llama")
    rrt.save(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2)), tmp_path)
    _edit_config(tmp_path, lambda rrt_spec: rrt_spec.update(num_blocks=3))
    with pytest.raises(ValueError, match=r"stores 'model.layers.0.*' and 'model.layers.2.*' as two tensors but "
                                         r"this model ties them"):
        rrt.load(tmp_path)


@pytest.mark.parametrize("saved, edited, error", [
    (1, 3, r"shapes differ.*lora_A \(1, 32\) != \(3, 32\)"),  # copy_ would broadcast rank 1 into rank 3
    (2, 4, r"shapes differ.*lora_A \(2, 32\) != \(4, 32\)"),
    (2, 0, r"tensors the model lacks: \[.*lora_A"),
    (0, 2, r"tensors the model lacks: \['model.layers.0.mlp.down_proj.weight'"),  # LoRA linears hold base_layer
])
def test_load_refuses_an_edited_lora_rank(tmp_path, saved, edited, error):
    model, _ = rrt.load_model("tiny-llama")
    rrt.save(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=saved)), tmp_path)
    _edit_config(tmp_path, lambda rrt_spec: rrt_spec.update(lora_rank=edited))
    with pytest.raises(ValueError, match=error):
        rrt.load(tmp_path)


def test_load_reads_gpt_neox_heads_under_either_name(tmp_path):
    """An rrt.save from transformers 4 (head `embed_out`) and a Pythia-style HF file load exactly."""
    from safetensors.torch import save_file

    model, _ = rrt.load_model("tiny-gpt-neox")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, lora_rank=2))
    rrt.save(rec, tmp_path / "rec")
    state = load_file(tmp_path / "rec" / WEIGHTS)
    state["embed_out.weight"] = state.pop("lm_head.weight")
    save_file(state, tmp_path / "rec" / WEIGHTS)
    (tmp_path / "rec" / MANIFEST).unlink()  # rrt.save wrote none then
    model.save_pretrained(tmp_path / "hf")  # stores embed_out.weight, the hub's name
    x = torch.randint(3, 99, (2, 11))
    with torch.no_grad(), pytest.warns(UnverifiedCheckpointWarning, match="manifest.json is missing"):
        assert torch.equal(rrt.load(tmp_path / "rec")(x).logits, rec(x).logits)
        assert torch.equal(rrt.load(tmp_path / "hf")(x).logits, model(x).logits)


def test_load_accepts_a_stored_tied_head_only_if_it_equals_the_embedding(tmp_path):
    from safetensors.torch import save_file

    model, _ = rrt.load_model("tiny-llama")  # tied embeddings
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # as some hub checkpoints store it
    save_file(state, tmp_path / WEIGHTS)
    x = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert torch.equal(rrt.load(tmp_path)(x).logits, model(x).logits)
    state["lm_head.weight"] += 1
    save_file(state, tmp_path / WEIGHTS)
    either = r"'(lm_head|model.embed_tokens).weight'"
    with pytest.raises(ValueError, match=rf"stores {either} and {either} as two tensors but this model ties them"):
        rrt.load(tmp_path)


def test_a_manifest_verifies_a_saved_directory_and_names_each_altered_file(tmp_path):
    """write_manifest: each file's size and sha256 with the caller's fields; verify_manifest names what changed."""
    from rrt.checkpoint import MANIFEST, CheckpointError, file_digest, verify_manifest, write_manifest

    model, _ = rrt.load_model("tiny-llama")
    rrt.save(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2)), tmp_path)
    (tmp_path / "rank0.pt").write_bytes(b"optimiser state")
    manifest = write_manifest(tmp_path, {"rank0.pt": file_digest(tmp_path / "rank0.pt")}, step=4, config_hash="abc")
    assert verify_manifest(tmp_path) == manifest and manifest["step"] == 4 and manifest["config_hash"] == "abc"
    assert set(manifest["files"]) == {"config.json", WEIGHTS, "rank0.pt"}
    rrt.load(tmp_path)  # the manifest beside the weights leaves the directory loadable
    (tmp_path / "rank0.pt").write_bytes(b"optimiser stat!")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"rank0.pt: sha256 differs"):
        verify_manifest(tmp_path)
    (tmp_path / "rank0.pt").write_bytes(b"optimiser")
    with pytest.raises(CheckpointError, match=r"rank0.pt has 9 bytes, the manifest says 15 \(truncated or rewritten"):
        verify_manifest(tmp_path)
    (tmp_path / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank0.pt is missing"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"files": {')
    with pytest.raises(CheckpointError, match=r"manifest.json is not valid JSON"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        verify_manifest(tmp_path)
