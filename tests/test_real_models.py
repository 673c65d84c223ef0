"""The real embedded models (SmolLM2-135M, Gemma-3-270M), offline. Slower; CI runs them."""
import warnings

import pandas as pd
import pytest
import torch

import rrt
from rrt.families import decoder_layers

pytestmark = pytest.mark.real

PROMPT = "The capital of France is Paris. Recursive Transformers share one block of layers."


def parameter_table(model, blocks):
    rows = [{"num_blocks": b, **rrt.count_parameters(rrt.convert(model, rrt.RecursiveSpec(num_blocks=b)))}
            for b in blocks]
    return pd.DataFrame(rows).set_index("num_blocks")


def test_smollm2_conversion(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and len(decoder_layers(model)) == 30
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model(ids).logits
    assert torch.equal(rrt.convert(model, rrt.RecursiveSpec(num_blocks=1))(ids).logits, ref)
    table = parameter_table(model, [1, 2, 3, 5])
    print("\nSmolLM2-135M parameter counts by num_blocks (stepwise)\n" + table.to_markdown())
    block = sum(p.numel() for p in decoder_layers(model).parameters())
    halved = table.loc[1, "non_embedding"] - table.loc[2, "non_embedding"]
    assert halved == block // 2  # B=2 stores 15 of the 30 layers
    assert (table["embedding"] == table.loc[1, "embedding"]).all()
    with pytest.raises(ValueError, match="num_blocks=4 does not divide the 30 layers.*1, 2, 3, 5, 6, 10, 15, 30"):
        rrt.convert(model, rrt.RecursiveSpec(num_blocks=4))


def test_smollm2_relaxation_interpolates(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model(ids).logits
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average"))
    rank0 = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=0))
    assert torch.equal(rank0(ids).logits, plain(ids).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=1536,
                                                    untie_norms=True))
    assert ((full(ids).logits - ref).norm() / ref.norm()).item() < 1e-4


def test_gemma3_conversion():
    model, tok = rrt.load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(decoder_layers(model)) == 18
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=1))
    assert torch.equal(rec(ids).logits, model(ids).logits)
    table = parameter_table(model, [1, 2, 3])
    print("\nGemma-3-270M parameter counts by num_blocks (stepwise)\n" + table.to_markdown())
    assert table.loc[2, "non_embedding"] < 0.51 * table.loc[1, "non_embedding"]
