"""Relaxation: DESIGN.md invariants 2–5 for every tiny family, merge, per-row-depth LoRA, counts."""
import warnings

import pytest
import torch

import rrt
from rrt.families import decoder_layers, family_of, Fused
from rrt.relax import (FusedLoopLoRALinear, LoopLoRALinear, loop_segments, lora_modules, merge, per_row_lora,
                       set_trainable)
from rrt.serving.rows import per_row_loops
from tests.test_recursive import assert_tied

FULL = 10_000  # larger than any tiny matrix: clamped to full rank


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def num_loras(family):
    """LoRAs per depth at a rank > 0 in every group: one per linear, one per part of a fused linear."""
    return sum(len(g.parts) if isinstance(g, Fused) else 1 for g in family.linears.values())


def full_delta(wrapper):
    """Return the whole [out, in] delta a wrapper adds: each LoRA's B·A on its own rows."""
    delta = torch.zeros_like(wrapper.base_layer.weight)
    for lora in wrapper.loras():
        delta[slice(None) if lora.rows is None else lora.rows] += lora.lora_B @ lora.lora_A
    return delta


def quiet_convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rrt.convert(model, rrt.RecursiveSpec(**kw))


# --------------------------------------------------------------------------- invariant 3

def test_rank_zero_is_the_plain_recursive_model(tiny, tiny_ids):
    _, model, _ = tiny
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average"))
    rank0 = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=0))
    assert not lora_modules(rank0)
    assert torch.equal(rank0(tiny_ids).logits, plain(tiny_ids).logits)


def test_zero_init_lora_leaves_the_recursive_model_exact(tiny, tiny_ids):
    _, model, _ = tiny
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average"))
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=4,
                                                   lora_init="zero"))
    assert len(lora_modules(relaxed)) == 6 * num_loras(family_of(model))
    assert all(m.lora_A.abs().sum() > 0 and not m.lora_B.any() for m in lora_modules(relaxed).values())
    assert torch.equal(relaxed(tiny_ids).logits, plain(tiny_ids).logits)


def test_standard_init_is_gaussian_a_over_rank_and_zero_b():
    """App. J: "random Gaussian for matrix A and zero for B"; A's std 1/r as PEFT's init_lora_weights="gaussian"."""
    from rrt.relax import standard_init
    rank, in_features = 16, 4096  # 65,536 draws: the empirical std is within ~0.3% of the target
    lora_a, lora_b = torch.nn.Parameter(torch.empty(rank, in_features)), torch.nn.Parameter(torch.ones(3000, rank))
    standard_init(lora_a, lora_b, torch.Generator().manual_seed(0))
    assert abs(lora_a.std().item() * rank - 1) < 0.05 and abs(lora_a.mean().item()) < 0.05 / rank
    assert not lora_b.any()
    again = torch.empty_like(lora_a)
    standard_init(again, torch.empty_like(lora_b), torch.Generator().manual_seed(0))
    assert torch.equal(again, lora_a)  # seeded


def test_stepwise_kept_layers_get_the_standard_init_and_start_at_the_recursive_model(tiny, tiny_ids):
    """Stepwise's kept layers (W′ = Wℓ: depths 0 and 5 at B=2 of 6 layers, layers 0, 3, 5 kept) get Gaussian A, B = 0; every other
    depth the SVD of its residual. At init the relaxed model equals the recursive model exactly where B = 0: each
    such linear's output is the plain recursive model's, bit for bit (lora_init="zero": the whole model, above)."""
    _, model, _ = tiny
    rank = 4
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise", lora_rank=rank))
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise"))
    for depth, layer in enumerate(decoder_layers(relaxed)):
        for name in family_of(model).linears:
            wrapper = layer.get_submodule(name)
            kept = torch.equal(wrapper.base_layer.weight, decoder_layers(model)[depth].get_submodule(name).weight)
            assert kept == (depth in (0, 5)), (depth, name)
            for lora in wrapper.loras():
                assert (not lora.lora_B.any()) == kept
                if kept:
                    assert lora.lora_A.std() > 0.5 / lora.lora_A.shape[0]  # Gaussian, std 1/r
            x = torch.randn(3, wrapper.base_layer.weight.shape[1], generator=torch.Generator().manual_seed(depth))
            same = torch.equal(wrapper(x), decoder_layers(plain)[depth].get_submodule(name)(x))
            assert same == kept, (depth, name)


# --------------------------------------------------------------------------- invariant 4

@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_full_rank_with_untied_norms_reproduces_original(tiny, tiny_ids, init):
    _, model, _ = tiny
    relaxed = quiet_convert(model, num_blocks=2, init=init, lora_rank=FULL, untie_norms=True)
    assert rel_err(relaxed(tiny_ids).logits, model(tiny_ids).logits) < 1e-4


def test_full_rank_with_tied_norms_does_not(tiny, tiny_ids):
    """Why untie_norms exists: LoRA cannot express per-depth norm weights (or biases)."""
    _, model, _ = tiny
    relaxed = quiet_convert(model, num_blocks=2, init="average", lora_rank=FULL)
    assert rel_err(relaxed(tiny_ids).logits, model(tiny_ids).logits) > 1e-3


def test_rank_clamp_warns_once(tiny):
    _, model, _ = tiny
    with pytest.warns(UserWarning, match="clamped to full rank") as record:
        rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=FULL))
    assert len([w for w in record if "clamped" in str(w.message)]) == 1


# --------------------------------------------------------------------------- invariant 5

@pytest.mark.parametrize("init", ["stepwise", "average"])
def test_svd_residual_is_the_dropped_singular_values(tiny, init):
    _, model, _ = tiny
    rank = 3
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init=init, lora_rank=rank))
    orig, layers = decoder_layers(model), decoder_layers(relaxed)
    for depth in range(6):
        for name in family_of(model).linears:
            wrapper = layers[depth].get_submodule(name)
            for lora in wrapper.loras():  # a fused linear's part: the SVD of its own rows (eq. 4-5)
                target = lora.own_rows(orig[depth].get_submodule(name).weight.double())
                shared = lora.own_rows(wrapper.base_layer.weight.double())
                s = torch.linalg.svdvals(target - shared)
                approx = shared + lora.lora_B.double() @ lora.lora_A.double()
                dropped = s[rank:].norm()
                torch.testing.assert_close((target - approx).norm(), dropped, rtol=1e-5, atol=1e-6)
                if torch.equal(target, shared):  # App. E: the layer Stepwise picked gets standard init
                    assert not lora.lora_B.any() and lora.lora_A.any()


def test_svd_delta_is_exactly_BA(tiny, tiny_ids):
    """No α/r factor: the forward adds x·Aᵀ·Bᵀ and nothing else."""
    _, model, _ = tiny
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=2))
    for name in family_of(model).linears:
        wrapper = decoder_layers(relaxed)[4].get_submodule(name)
        x = torch.randn(5, wrapper.base_layer.weight.shape[1])
        expected = wrapper.base_layer(x) + x @ full_delta(wrapper).t()
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-6, atol=1e-6)


def test_rank_groups_map_to_module_names(tiny):
    _, model, _ = tiny
    ranks = {"q": 3, "kv": 2, "o": 0, "mlp": 5}
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=5, module_ranks=(3, 2, 0, 5)))
    layer = decoder_layers(relaxed)[4]
    for name, group in family_of(model).linears.items():
        module = layer.get_submodule(name)
        if isinstance(group, Fused):  # GPT-NeoX query_key_value: q → "q", k and v → "kv"
            assert isinstance(module, FusedLoopLoRALinear) and module.loop_idx == 2 * 4 // 6
            assert {p: lora.lora_A.shape[0] for p, lora in module.parts.items()} == {
                p: ranks[g] for p, g in group.parts if ranks[g]}
        elif ranks[group] == 0:
            assert not isinstance(module, LoopLoRALinear)
        else:
            assert module.lora_A.shape[0] == ranks[group] and module.loop_idx == 2 * 4 // 6


def _full_module_ranks(model):
    """Return (q, kv, o, mlp) ranks that are exactly full rank for every matrix of the group (no clamping)."""
    layer, full = decoder_layers(model)[0], {}
    for name, group in family_of(model).linears.items():
        out, in_ = layer.get_submodule(name).weight.shape
        parts = group.parts if isinstance(group, Fused) else [(name, group)]
        for _, g in parts:
            full.setdefault(g, set()).add(min(out // len(parts), in_))
    assert all(len(v) == 1 for v in full.values()), full  # one full rank per group in the tiny models
    return tuple(full[g].pop() for g in rrt.spec.RANK_GROUPS)


def test_module_ranks_count_by_hand(tiny):
    """Table 8: rank r_g on every linear of group g adds r_g·(in + out) per depth (a fused part: out/parts)."""
    _, model, _ = tiny
    module_ranks = (3, 2, 0, 5)
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=5, module_ranks=module_ranks))
    rank = dict(zip(rrt.spec.RANK_GROUPS, module_ranks))
    per_depth = 0
    for name, group in family_of(model).linears.items():
        out, in_ = decoder_layers(model)[0].get_submodule(name).weight.shape
        parts = group.parts if isinstance(group, Fused) else [(name, group)]
        per_depth += sum(rank[g] * (in_ + out // len(parts)) for _, g in parts)
    counts = rrt.count_parameters(relaxed)
    assert counts["lora"] == 6 * per_depth
    assert counts["non_embedding"] == rrt.count_parameters(rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
                                                           )["non_embedding"] + 6 * per_depth


def test_full_module_ranks_reproduce_the_original(tiny, tiny_ids):
    """Each group at its own full rank (q, kv, o and mlp differ in width) reaches every Wℓ, as lora_rank=FULL does."""
    _, model, _ = tiny
    module_ranks = _full_module_ranks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly full: nothing clamped
        relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=max(module_ranks),
                                                       module_ranks=module_ranks, untie_norms=True))
    assert rel_err(relaxed(tiny_ids).logits, model(tiny_ids).logits) < 1e-4


def test_module_rank_zero_leaves_that_module_unrelaxed(tiny, tiny_ids):
    _, model, _ = tiny
    q, kv, _, mlp = _full_module_ranks(model)
    spec = rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=max(q, kv, mlp), module_ranks=(q, kv, 0, mlp),
                             untie_norms=True)
    relaxed = rrt.convert(model, spec)
    layers = decoder_layers(relaxed)
    for name, group in family_of(model).linears.items():
        modules = [layer.get_submodule(name) for layer in layers]
        if group == "o":  # a plain linear, its weight the shared average at every depth of the tied group
            assert all(type(m) is torch.nn.Linear for m in modules)
            assert modules[0].weight is modules[3].weight
        else:
            assert all(isinstance(m, (LoopLoRALinear, FusedLoopLoRALinear)) for m in modules)
    assert rel_err(relaxed(tiny_ids).logits, model(tiny_ids).logits) > 1e-3  # o stays shared: not the original


# Table 8 (Gemma 2B, B=2, Avg, SVD): ranks (q, kv, o, mlp) and the N-emb it prints, in B. Our counts are within
# 0.006B of every row; two rows (1.2859B → "1.28", 1.2752B → "1.27") are ~0.005 above the printed value where the
# others round to it, and no one rounding reproduces all ten.
TABLE_8 = [((256, 256, 256, 256), 1.30), ((128, 256, 128, 256), 1.28), ((256, 128, 256, 256), 1.29),
           ((256, 256, 256, 128), 1.18), ((128, 128, 128, 256), 1.27), ((128, 128, 128, 128), 1.15),
           ((64, 128, 64, 128), 1.14), ((128, 64, 128, 128), 1.14), ((128, 128, 128, 64), 1.08),
           ((64, 64, 64, 128), 1.13)]


@pytest.mark.parametrize("module_ranks,expected", TABLE_8)
def test_module_ranks_gemma_2b_counts_match_table_8(module_ranks, expected):
    rec = rrt.convert(_meta_model("gemma-2b"), rrt.RecursiveSpec(
        num_blocks=2, init="average", lora_rank=max(module_ranks), module_ranks=module_ranks, lora_init="zero"))
    assert abs(rrt.count_parameters(rec)["non_embedding"] / 1e9 - expected) < 0.006


def test_fused_qkv_parts_write_their_own_per_head_rows():
    """GPT-NeoX splits query_key_value's output per head (view(.., heads, 3·head_dim).chunk(3)):
    a q-only LoRA must change queries only, a kv-only one keys and values only."""
    model, _ = rrt.load_model("tiny-gpt-neox")
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for ranks, changed in [((2, 0, 0, 0), [True, False, False]), ((0, 2, 0, 0), [False, True, True])]:
        relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=2, module_ranks=ranks))
        qkv = decoder_layers(relaxed)[4].attention.query_key_value
        got = qkv(x).view(5, heads, 3 * head_dim).chunk(3, dim=-1)  # q, k, v: [5, heads, head_dim] each
        base = qkv.base_layer(x).view(5, heads, 3 * head_dim).chunk(3, dim=-1)
        assert [not torch.equal(g, b) for g, b in zip(got, base)] == changed
        for i, part in enumerate("qkv"):
            if part in qkv.parts:
                torch.testing.assert_close(got[i] - base[i], qkv.parts[part].delta(x).view(5, heads, head_dim))
    q_rows = qkv.parts["k"].rows - head_dim  # the q rows: the first head_dim of each head's 3·head_dim
    assert q_rows.tolist() == [h * 3 * head_dim + i for h in range(heads) for i in range(head_dim)]


# --------------------------------------------------------------------------- invariant 2 + save/load

def test_sharing_intact_after_relax_step_and_save_load(tiny, tiny_ids, tmp_path):
    _, model, tok = tiny
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, init="average", lora_rank=4))
    assert_tied(relaxed, 3)
    loras = lora_modules(relaxed)
    assert len({id(m.lora_A) for m in loras.values()}) == len(loras)  # one LoRA per depth
    relaxed.train()
    opt = torch.optim.AdamW(relaxed.parameters(), lr=1e-2)
    relaxed(tiny_ids, labels=tiny_ids).loss.backward()
    opt.step()
    relaxed.eval()
    assert_tied(relaxed, 3)
    rrt.save(relaxed, tmp_path / "ckpt", tokenizer=tok)
    loaded = rrt.load(tmp_path / "ckpt")
    assert_tied(loaded, 3)
    assert torch.equal(loaded(tiny_ids).logits, relaxed(tiny_ids).logits)
    assert rrt.count_parameters(loaded) == rrt.count_parameters(relaxed)


def test_freeze_shared_base(tiny, tiny_ids):
    _, model, _ = tiny
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=2))
    set_trainable(relaxed, base=False)
    relaxed(tiny_ids, labels=tiny_ids).loss.backward()
    for name, p in relaxed.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


# --------------------------------------------------------------------------- merge

def test_merge_is_a_plain_model_equal_to_the_relaxed_one(tiny, tiny_ids):
    _, model, _ = tiny
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=3,
                                                   untie_norms=True))
    merged = merge(relaxed)
    assert type(merged) is type(model) and not getattr(merged.config, "rrt", None)
    assert not lora_modules(merged)
    assert rrt.count_parameters(merged)["non_embedding"] == rrt.count_parameters(model)["non_embedding"]
    assert rel_err(merged(tiny_ids).logits, relaxed(tiny_ids).logits) < 1e-5
    assert lora_modules(relaxed)  # the relaxed model itself is left as it was


# --------------------------------------------------------------------------- per-row-depth LoRA

@pytest.mark.parametrize("assignment", ["random", "all_last", "one_per_loop"])
def test_per_row_path_equals_per_depth_path(tiny, assignment):
    _, model, _ = tiny
    num_blocks = 3
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_blocks, init="average",
                                                   lora_rank=5, module_ranks=(3, 2, 1, 5)))
    layers, k = decoder_layers(relaxed), 6 // num_blocks
    gen = torch.Generator().manual_seed(0)
    rows = {"random": 11, "all_last": 7, "one_per_loop": num_blocks}[assignment]
    loop_idx = {"random": torch.randint(0, num_blocks, (rows,), generator=gen),
                "all_last": torch.full((rows,), num_blocks - 1),
                "one_per_loop": torch.arange(num_blocks)}[assignment]
    for name in family_of(model).linears:
        for j in range(k):
            x = torch.randn(rows, layers[j].get_submodule(name).base_layer.weight.shape[1], generator=gen)
            with per_row_loops(relaxed, loop_segments(loop_idx.tolist())):
                got = layers[j].get_submodule(name)(x)
                # several loops in the call: the loops' packed pair with a row mask; one loop: its own pair
                packed = [m.row_pack is not None for m in lora_modules(layers[j]).values()]
                assert packed and all(p == (assignment != "all_last") for p in packed)
            want = torch.stack([layers[j + int(b) * k].get_submodule(name)(x[i]) for i, b in enumerate(loop_idx)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(m.row_loras is None for m in lora_modules(relaxed).values())  # context cleaned up


def test_per_row_lora_mixed_ranks_and_missing_loops():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen)
    loras = [(torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen)), None,
             (torch.randn(5, 6, generator=gen), torch.randn(4, 5, generator=gen))]
    loop_idx = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    segments = loop_segments(loop_idx.tolist())
    assert len(segments) == 7  # runs of equal loop, in row order
    got = per_row_lora(x, segments, loras)
    for i, b in enumerate(loop_idx.tolist()):
        want = torch.zeros(4) if loras[b] is None else loras[b][1] @ (loras[b][0] @ x[i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- parameter counts

def test_lora_count(tiny):
    _, model, _ = tiny
    rank = 3
    relaxed = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=rank))
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
    # rank·(in + out) per linear; a fused linear's parts each rank·(in + out/parts)
    per_depth = sum(rank * (out + in_ * (len(g.parts) if isinstance(g, Fused) else 1))
                    for n, g in family_of(model).linears.items()
                    for out, in_ in [decoder_layers(model)[0].get_submodule(n).weight.shape])
    counts = rrt.count_parameters(relaxed)
    assert counts["lora"] == 6 * per_depth
    assert counts["non_embedding"] == rrt.count_parameters(plain)["non_embedding"] + 6 * per_depth


def _paper_config(name):
    import transformers as tf
    return {
        # published dimensions (paper Table 2)
        "gemma-2b": tf.GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                   num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                   head_dim=256),
        "tinyllama-1.1b": tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                         num_hidden_layers=22, num_attention_heads=32,
                                         num_key_value_heads=4),
        "pythia-1b": tf.GPTNeoXConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=8, tie_word_embeddings=False),
    }[name]


def _meta_model(name):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_paper_config(name))


@pytest.mark.parametrize("name,non_emb,emb", [("gemma-2b", 1.98, 0.52), ("tinyllama-1.1b", 0.97, 0.13),
                                              ("pythia-1b", 0.81, 0.21)])
def test_full_size_counts_match_table_2(name, non_emb, emb):
    counts = rrt.count_parameters(_meta_model(name))
    assert round(counts["non_embedding"] / 1e9, 2) == non_emb
    assert round(counts["embedding"] / 1e9, 2) == emb


@pytest.mark.parametrize("rank,expected", [(0, 0.99), (64, 1.07), (128, 1.15), (256, 1.30), (512, 1.60)])
def test_relaxed_gemma_2b_counts_match_table_17(rank, expected):
    """N-emb of recursive Gemma B=2 and its relaxed variants; r=512 clamps k/v (256 wide) to 256."""
    model = _meta_model("gemma-2b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=rank, lora_init="zero"))
    assert round(rrt.count_parameters(rec)["non_embedding"] / 1e9, 2) == expected


@pytest.mark.parametrize("rank,expected", [(0, 0.40), (64, 0.44), (128, 0.48), (256, 0.55), (512, 0.70)])
def test_relaxed_pythia_1b_counts_match_table_17(rank, expected):
    """N-emb of recursive Pythia 1B B=2 and its relaxed variants: q, k and v of the fused
    query_key_value each carry a rank-r LoRA (one LoRA on the fused linear gives 0.671B at r=512)."""
    rec = rrt.convert(_meta_model("pythia-1b"), rrt.RecursiveSpec(num_blocks=2, lora_rank=rank, lora_init="zero"))
    assert round(rrt.count_parameters(rec)["non_embedding"] / 1e9, 2) == expected


def test_kv_rank_counts_on_gpt_neox():
    """Table 8's "kv" rank reaches GPT-NeoX through the k and v parts of query_key_value."""
    model = _meta_model("pythia-1b")
    lora = {kv: rrt.count_parameters(rrt.convert(model, rrt.RecursiveSpec(
        num_blocks=2, lora_rank=64, module_ranks=(64, kv, 0, 0), lora_init="zero")))["lora"] for kv in (0, 32)}
    assert lora[0] == 16 * 64 * (2048 + 2048)  # 16 depths, the q part only
    assert lora[32] - lora[0] == 16 * 2 * 32 * (2048 + 2048)  # plus k and v at rank 32


def test_truncating_a_full_rank_init_equals_converting_at_that_rank(tiny, tiny_ids):
    from rrt.relax import truncate_lora
    _, model, _ = tiny
    full = quiet_convert(model, num_blocks=2, init="average", lora_rank=FULL)
    truncate_lora(full, 3)
    direct = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average", lora_rank=3))
    assert rel_err(full(tiny_ids).logits, direct(tiny_ids).logits) < 1e-5
    assert rrt.count_parameters(full) == rrt.count_parameters(direct)
    truncate_lora(full, 0)
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average"))
    assert torch.equal(full(tiny_ids).logits, plain(tiny_ids).logits)
