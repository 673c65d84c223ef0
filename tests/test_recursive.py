"""Recursive conversion: DESIGN.md invariants 1, 2, 6, 7, 8 for every tiny family, and the inits."""
import copy
import math

import pytest
import torch

import rrt
from rrt.families import decoder_layers
from rrt.recursive import stepwise_indices, tied_groups


def shared_parameter_report(model) -> dict[str, int]:
    """Return {depth-qualified name: data_ptr} for every layer parameter (the tie checks)."""
    return {f"{d}.{n}": p.data_ptr() for d, layer in enumerate(decoder_layers(model))
            for n, p in layer.named_parameters(remove_duplicate=False)}


def assert_tied(model, num_blocks):
    """Invariant 2: every depth's tied tensor is the shared layer's, by data_ptr (and object)."""
    layers = decoder_layers(model)
    for group in tied_groups(len(layers), num_blocks):
        shared = dict(layers[group[0]].named_parameters())
        for depth in group[1:]:
            for name, p in layers[depth].named_parameters():
                if "lora_" in name or (model.config.rrt["untie_norms"] and p.ndim == 1):
                    continue  # per-depth by design
                assert p is shared[name], (depth, name)
                assert p.data_ptr() == shared[name].data_ptr()


# --------------------------------------------------------------------------- invariant 1

def test_one_block_reproduces_original(tiny, tiny_ids):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=1))
    assert torch.equal(rec(tiny_ids).logits, model(tiny_ids).logits)


# --------------------------------------------------------------------------- invariant 2

@pytest.mark.parametrize("num_blocks", [2, 3])
def test_sharing_by_cycle(tiny, num_blocks):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_blocks))
    assert_tied(rec, num_blocks)
    # depth ℓ uses shared layer ℓ mod K (CYCLE, eq. 2): 6 layers, B=3 → K=2
    k = 6 // num_blocks
    ptrs = shared_parameter_report(rec)
    for name in dict(decoder_layers(rec)[0].named_parameters()):
        assert [ptrs[f"{d}.{name}"] for d in range(6)] == [ptrs[f"{d % k}.{name}"] for d in range(6)]


def test_parameter_count_drops_and_optimizer_sees_each_tensor_once(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
    layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    before, after = rrt.count_parameters(model), rrt.count_parameters(rec)
    assert after["embedding"] == before["embedding"]
    assert before["non_embedding"] - after["non_embedding"] == 3 * per_layer
    opt = torch.optim.AdamW(rec.parameters())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in rec.parameters()})


def test_ties_survive_dtype_change_and_a_training_step(tiny, tiny_ids):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="average"))
    rec.train()
    opt = torch.optim.AdamW(rec.parameters(), lr=1e-2)
    rec(tiny_ids, labels=tiny_ids).loss.backward()
    opt.step()
    assert_tied(rec, 2)
    rec = rec.to(torch.bfloat16)
    assert_tied(rec, 2)


def test_input_model_untouched(tiny, tiny_ids):
    _, model, _ = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ref = model(tiny_ids).logits
    for init in rrt.spec.INITS:
        rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init=init))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert torch.equal(model(tiny_ids).logits, ref)
    assert not getattr(model.config, "rrt", None)


# --------------------------------------------------------------------------- looped-layer inits

@pytest.mark.parametrize("num_layers,num_blocks,expected", [
    # round(j·(L−1)/(K−1)), halves rounded up; first and last layer always kept (fixed ends)
    (18, 2, [0, 2, 4, 6, 9, 11, 13, 15, 17]),          # Gemma 2B: 8.5 → 9
    (22, 2, [0, 2, 4, 6, 8, 11, 13, 15, 17, 19, 21]),  # TinyLlama: 10.5 → 11
    (16, 2, [0, 2, 4, 6, 9, 11, 13, 15]),              # Pythia 1B: 8.57 → 9
    (30, 3, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]),    # SmolLM2, B=3: 9.67 → 10
    (6, 2, [0, 3, 5]),                                  # tiny models: 2.5 → 3
    (6, 6, [0]),                                        # K=1: the first layer
])
def test_stepwise_picks(num_layers, num_blocks, expected):
    assert stepwise_indices(num_layers, num_layers // num_blocks) == expected


def _layer_params(model, idx):
    return dict(decoder_layers(model)[idx].named_parameters())


def test_stepwise_copies_picked_layers(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise"))
    for j, src in enumerate([0, 3, 5]):
        for name, p in _layer_params(rec, j).items():
            assert torch.equal(p, _layer_params(model, src)[name]), (j, name)


@pytest.mark.parametrize("num_layers,num_blocks,expected", [
    (30, 2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]),  # SmolLM2: the last layer (29) left out
    (18, 3, [0, 3, 6, 9, 12, 15]),                                      # Gemma 2B, B=3
    (6, 6, [0]),
])
def test_stepwise_start_picks(num_layers, num_blocks, expected):
    assert rrt.recursive.stepwise_start_indices(num_layers, num_layers // num_blocks) == expected


def test_stepwise_start_copies_picked_layers_and_differs_from_fixed_ends(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise_start"))
    for j, src in enumerate([0, 2, 4]):  # fixed ends would take [0, 3, 5]
        for name, p in _layer_params(rec, j).items():
            assert torch.equal(p, _layer_params(model, src)[name]), (j, name)
    assert rrt.spec.spec_of(rec).init == "stepwise_start"


def test_lower_copies_first_k_layers(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, init="lower"))
    for j in range(2):
        for name, p in _layer_params(rec, j).items():
            assert torch.equal(p, _layer_params(model, j)[name])


@pytest.mark.parametrize("norm_init", [None, "average", "choice", "zero"])
def test_average_is_mean_of_tied_layers(tiny, norm_init):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, init="average", norm_init=norm_init))
    layer0 = decoder_layers(rec)[0]
    for j, group in enumerate(tied_groups(6, 3)):  # K=2: groups [0,2,4], [1,3,5]
        for name, p in _layer_params(rec, j).items():
            values = torch.stack([_layer_params(model, i)[name] for i in group])
            is_norm = rrt.recursive._is_norm_param(layer0, name)
            if not is_norm or norm_init in (None, "average"):
                torch.testing.assert_close(p, values.mean(0), rtol=0, atol=1e-7)
            elif norm_init == "choice":
                assert torch.equal(p, values[0])
            else:
                assert not p.any()


def test_norm_init_with_stepwise_averages_group_norms(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise", norm_init="average"))
    layer0 = decoder_layers(rec)[0]
    for name, p in _layer_params(rec, 1).items():  # shared layer 1 = original 3; group [1, 4]
        if rrt.recursive._is_norm_param(layer0, name):
            expected = (_layer_params(model, 1)[name] + _layer_params(model, 4)[name]) / 2
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)
        else:
            assert torch.equal(p, _layer_params(model, 3)[name])


def _pretrained_like(model):
    """A copy of `model` with every tensor moved off its initial value (the tiny models keep HF's identity final norm)."""
    copied = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return copied


def test_random_init_uses_no_pretrained_tensor(tiny, tiny_ids):
    """Table 5's Random: embeddings, norms, LM head and layers all the model's own fresh init, seeded."""
    _, model, _ = tiny
    original = _pretrained_like(model)
    a = rrt.convert(original, rrt.RecursiveSpec(num_blocks=2, init="random", seed=1))
    b = rrt.convert(original, rrt.RecursiveSpec(num_blocks=2, init="random", seed=1))
    c = rrt.convert(original, rrt.RecursiveSpec(num_blocks=2, init="random", seed=2))
    assert torch.equal(a(tiny_ids).logits, b(tiny_ids).logits)
    assert not torch.equal(a(tiny_ids).logits, c(tiny_ids).logits)
    pretrained = original.state_dict()
    shared = [n for n, p in a.state_dict().items() if torch.equal(p, pretrained[n])]
    assert not shared, shared
    assert_tied(a, 2)
    tied = a.get_output_embeddings().weight is a.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)
    vocab = model.config.vocab_size
    loss = a(tiny_ids, labels=tiny_ids).loss.item()  # fresh weights: near-uniform next-token distribution
    assert abs(loss - math.log(vocab)) < 0.05, (loss, math.log(vocab))


def test_random_init_keeps_the_depth_sharing_and_zeroes_norms_on_request(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, init="random", norm_init="zero", seed=4))
    layer0 = decoder_layers(rec)[0]
    for name, p in _layer_params(rec, 0).items():
        if rrt.recursive._is_norm_param(layer0, name):
            assert not p.any(), name
        elif p.ndim == 2:  # fresh linear weights (their biases start at zero)
            assert p.any(), name
    assert_tied(rec, 3)


# --------------------------------------------------------------------------- invariants 6, 7

@pytest.mark.parametrize("num_blocks", [2, 3])
def test_loop_logits_last_equals_forward(tiny, tiny_ids, num_blocks):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_blocks, init="average"))
    exits = rrt.loop_logits(rec, tiny_ids)
    assert len(exits) == num_blocks
    assert torch.equal(exits[-1], rec(tiny_ids).logits)
    assert not torch.allclose(exits[0], exits[-1])


def test_loop_logits_of_plain_model(tiny, tiny_ids):
    _, model, _ = tiny
    exits = rrt.loop_logits(model, tiny_ids)
    assert len(exits) == 1 and torch.equal(exits[0], model(tiny_ids).logits)


def _greedy_by_recomputation(model, ids, steps):
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_generate_equals_recomputation(tiny, tiny_ids):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, init="stepwise"))
    prompt = tiny_ids[:1, :9]
    cached = rec.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0)
    assert torch.equal(cached, _greedy_by_recomputation(rec, prompt, 12))


# --------------------------------------------------------------------------- invariant 8

def test_bad_num_blocks_names_divisors(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=r"num_blocks=4 does not divide the 6 layers.*1, 2, 3, 6"):
        rrt.convert(model, rrt.RecursiveSpec(num_blocks=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="stepwize"), "stepwise, average, lower, random"),
    (dict(norm_init="mean"), "average, choice, zero"),
    (dict(lora_init="pissa"), "svd, zero"),
    (dict(lora_rank=-1), "must be an int >= 0"),
    (dict(lora_rank={"q": 8}), "module_ranks=\\(q, kv, o, mlp\\)"),
    (dict(lora_rank=8, module_ranks=(8, 8, 8)), "4 ints \\(q, kv, o, mlp\\)"),
    (dict(lora_rank=8, module_ranks=(8, 8, -1, 8)), "module_ranks 'o' must be an int >= 0"),
    (dict(lora_rank=8, module_ranks=(4, 4, 4, 4)), r"lora_rank=8 must equal max\(module_ranks\)=4"),
    (dict(num_blocks=0), "positive int"),
    (dict(init="random", lora_rank=4), "init='random' uses no pretrained weight"),  # SVD reads the original
    (dict(init="random", norm_init="average"), "init='random' uses no pretrained weight"),
])
def test_bad_spec_fails_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rrt.RecursiveSpec(**kwargs)


def test_module_ranks_pass_from_train_config_through_save_and_load(tiny, tiny_ids, tmp_path):
    from rrt.trainconfig import TrainConfig

    _, model, tok = tiny
    config = TrainConfig(out="", num_blocks=2, lora_rank=3, module_ranks=[2, 3, 0, 1])  # a list, as JSON gives
    assert config.module_ranks == (2, 3, 0, 1) and TrainConfig.from_dict(config.to_dict()) == config
    assert config.spec().ranks == {"q": 2, "kv": 3, "o": 0, "mlp": 1}
    with pytest.raises(ValueError, match=r"lora_rank=2 must equal max\(module_ranks\)=3"):
        TrainConfig(out="", lora_rank=2, module_ranks=(2, 3, 0, 1))
    rec = rrt.convert(model, config.spec())
    rrt.save(rec, tmp_path / "ckpt", tokenizer=tok)
    loaded = rrt.load(tmp_path / "ckpt")
    assert rrt.spec_of(loaded) == config.spec()
    assert torch.equal(loaded(tiny_ids).logits, rec(tiny_ids).logits)


def test_converting_twice_is_refused(tiny):
    _, model, _ = tiny
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
    with pytest.raises(ValueError, match="already recursive"):
        rrt.convert(rec, rrt.RecursiveSpec(num_blocks=2))


# --------------------------------------------------------------------------- spec_of, head LoRA

def test_spec_of_reads_the_converted_spec_and_a_plain_model_as_one_loop(tiny):
    from rrt.spec import spec_of

    _, model, _ = tiny
    spec = rrt.RecursiveSpec(num_blocks=3, init="average", untie_norms=True, seed=5)
    assert spec_of(rrt.convert(model, spec)) == spec
    assert spec_of(model) == rrt.RecursiveSpec(num_blocks=1)


def test_spec_of_refuses_unknown_fields():
    from rrt.spec import spec_of

    rec = rrt.convert(rrt.load_model("tiny-llama")[0], rrt.RecursiveSpec(num_blocks=2))
    rec.config.rrt = {**rec.config.rrt, "lora_ranks": 4}
    with pytest.raises(ValueError, match=r"unknown spec fields \['lora_ranks'\]; valid: num_blocks"):
        spec_of(rec)


def test_head_lora_changes_intermediate_exits_only():
    """Table 13's head LoRA: loop_logits[-1] (invariant 7) and forward stay the model's own head."""
    model, _ = rrt.load_model("tiny-gemma2")  # with a final logit softcap
    tiny_ids = torch.randint(3, 99, (2, 13), generator=torch.Generator().manual_seed(0))
    plain = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3))
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, head_lora_rank=2))
    assert not rec.head_lora.lora_B.any() and rec.head_lora.lora_A.any()  # the delta starts at 0
    with torch.no_grad():
        rec.head_lora.lora_B.normal_()
        got, want = rrt.loop_logits(rec, tiny_ids), rrt.loop_logits(plain, tiny_ids)
        assert torch.equal(got[-1], want[-1]) and torch.equal(rec(tiny_ids).logits, want[-1])
        assert not torch.allclose(got[0], want[0]) and not torch.allclose(got[1], want[1])
        hidden = rrt.recursive.loop_hidden_states(rec, tiny_ids)[1]
        per_row = torch.tensor([[1], [2]]).expand(tiny_ids.shape)  # row 0 at loop 1, row 1 at the last loop
        mixed = rrt.families.head_logits(rec, hidden, loop_idx=per_row)
        assert torch.equal(mixed[0], got[1][0])
        assert torch.equal(mixed[1], rrt.families.head_logits(plain, hidden, loop_idx=2)[1])
        with pytest.raises(ValueError, match="pass loop_idx"):
            rrt.families.head_logits(rec, hidden)
