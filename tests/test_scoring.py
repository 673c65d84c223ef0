"""Scores as served by the CDB engine (rrt.serving.scoring): exact against teacher-forced forwards when the
serving is exact (no exits, or oracle exits with propagated KV), batch-free when it is not (copy KV policies)."""
import math

import pytest
import torch
from lm_eval.api.instance import Instance

import rrt
from rrt import evaluation
from rrt.exits import MaxProbExit, OracleExit, record_oracle_trajectories
from rrt.relax import lora_modules
from rrt.serving.scoring import EngineLM, serve_forced, served_few_shot, served_loglikelihood, served_perplexity

pytestmark = pytest.mark.usefixtures("one_thread")

# (context, continuation) lengths: one-token contexts and continuations, and both longer than the budget
LENGTHS = [(1, 9), (3, 1), (7, 6), (12, 4), (5, 8)]


@pytest.fixture(scope="module")
def relaxed():
    """tiny-llama as 3 loops of K=2 shared layers, LoRA rank 2 made large and distinct per loop."""
    model, tok = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, lora_rank=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in lora_modules(rec).values():
            lora.lora_B.copy_(0.3 * torch.randn(lora.lora_B.shape, generator=gen))
    return rec, tok


@pytest.fixture(scope="module")
def pairs():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 99, (c,), generator=gen).tolist(), torch.randint(0, 99, (x,), generator=gen).tolist())
            for c, x in LENGTHS]


def _token_logprobs(logits, context, continuation):
    """Log-probs [len(continuation)] of the continuation under teacher-forced logits [seq, vocab] of context + it."""
    lp = logits.float().log_softmax(-1)[len(context) - 1:len(context) - 1 + len(continuation)]
    return lp[torch.arange(len(continuation)), torch.tensor(continuation)]


def test_no_exit_equals_teacher_forced_forward(relaxed, pairs):
    model, _ = relaxed
    served = serve_forced(model, pairs, exit_policy="none", max_active=2, token_budget=3)
    summed = served_loglikelihood(model, pairs, exit_policy="none", max_active=2, token_budget=3)
    for (c, x), s, (total, greedy) in zip(pairs, served, summed):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + x])).logits[0]
        expected = _token_logprobs(logits, c, x)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=1e-4, atol=1e-4)
        argmax = logits[len(c) - 1:len(c) - 1 + len(x)].argmax(-1).tolist()
        assert s.greedy == [a == t for a, t in zip(argmax, x)]
        assert s.exit_loops == [2] * len(x)
        assert total == pytest.approx(expected.sum().item(), abs=1e-4) and greedy == all(s.greedy)


def test_oracle_with_propagated_kv_equals_each_positions_oracle_loop(relaxed, pairs):
    model, _ = relaxed
    served = serve_forced(model, pairs, exit_policy="oracle", max_active=2, token_budget=3)
    trajectories = record_oracle_trajectories(model, [c + x for c, x in pairs])
    for (c, x), s, oracle in zip(pairs, served, trajectories):
        with torch.no_grad():
            exits = rrt.loop_logits(model, torch.tensor([c + x]))  # per loop [1, seq, vocab]
        loops = oracle[len(c) - 1:len(c) - 1 + len(x)].tolist()
        assert s.exit_loops == loops
        expected = torch.stack([_token_logprobs(exits[b][0], c, x)[k] for k, b in enumerate(loops)])
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=1e-4, atol=1e-4)
    early = sum(b < 2 for s in served for b in s.exit_loops)
    assert 5 <= early < sum(len(x) for _, x in pairs)  # the oracle exits early at some positions, not at all
    # an OracleExit object keyed by pair index is the same policy
    same = serve_forced(model, pairs, exit_policy=OracleExit(dict(enumerate(trajectories))), max_active=2,
                        token_budget=3)
    assert same == served


@pytest.mark.parametrize("kv_policy", ["copy_kv", "copy_hidden"])
def test_copy_policies_without_exits_equal_propagate_exactly(relaxed, pairs, kv_policy):
    model, _ = relaxed
    kw = dict(exit_policy="none", max_active=2, token_budget=3)
    assert serve_forced(model, pairs, kv_policy=kv_policy, **kw) == serve_forced(model, pairs, **kw)


@pytest.mark.parametrize("kv_policy", ["copy_kv", "copy_hidden"])
def test_copy_policies_with_exits_change_scores_but_not_with_batching(relaxed, pairs, kv_policy):
    model, _ = relaxed
    propagate = serve_forced(model, pairs, exit_policy="oracle", max_active=4, token_budget=5)
    batched = serve_forced(model, pairs, exit_policy="oracle", kv_policy=kv_policy, max_active=4, token_budget=5)
    alone = serve_forced(model, pairs, exit_policy="oracle", kv_policy=kv_policy, max_active=1, token_budget=5)
    flat = [torch.tensor([lp for s in served for lp in s.logprobs]) for served in (propagate, batched, alone)]
    torch.testing.assert_close(flat[1], flat[2], rtol=0, atol=1e-5)
    assert [s.exit_loops for s in batched] == [s.exit_loops for s in propagate]  # the oracle's loops
    # tokens after an early exit attend to copied keys: their scores move
    assert (flat[1] - flat[0]).abs().max() > 1e-3
    # ... but not a request's first token: every prompt position ran all its loops
    assert [s.logprobs[0] for s in batched] == pytest.approx([s.logprobs[0] for s in propagate], abs=1e-5)


def test_served_perplexity_equals_teacher_forced_perplexity(relaxed):
    model, _ = relaxed
    seqs = torch.randint(0, 99, (5, 17), generator=torch.Generator().manual_seed(2))
    seqs[:, 0] = 1  # a BOS: context only, in both
    out = served_perplexity(model, seqs, exit_policy="none", max_active=3, token_budget=7)
    reference = evaluation.token_nll(model, seqs, batch_size=2, bos_token_id=1)
    assert out["tokens"] == reference["tokens"] == 5 * 16
    assert out["nll"] == pytest.approx(reference["nll"], rel=1e-5)
    assert out["perplexity"] == pytest.approx(evaluation.perplexity(model, seqs), rel=1e-5)
    assert out["mean_nll"] == pytest.approx(out["nll"] / 80) and out["mean_exit_loop"] == 2
    # lists of different lengths pool token-weighted; an exit policy lowers the mean exit loop
    ragged = served_perplexity(model, [seqs[0].tolist(), seqs[1, :9].tolist()], exit_policy="oracle")
    assert ragged["tokens"] == 16 + 8 and ragged["mean_exit_loop"] < 2


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_engine_lm_scores_what_hflm_scores(relaxed):
    # lm-eval's own tokenisation: trailing context whitespace moves to the continuation; an empty
    # context is the prefix token; too long inputs are cut from the left; rolling windows
    model, tok = relaxed
    args = [("The quick brown", " fox"), ("Loops share one block ", "of layers."), ("", "Hello there"),
            ("A context too long to fit in thirty-two tokens, which is cut", " from the left")]
    engine_lm = EngineLM(model, tok, max_active=2, token_budget=5)
    hf_lm = evaluation._loop_lm(model, tok, loop_idx=None, batch_size=3)
    engine_lm._max_length = hf_lm._max_length = 32
    served = engine_lm.loglikelihood(_instances("loglikelihood", args))
    expected = hf_lm.loglikelihood(_instances("loglikelihood", args))
    assert [g for _, g in served] == [g for _, g in expected]
    assert [lp for lp, _ in served] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    texts = [("One two three four five six seven eight nine ten eleven twelve.",), ("Short.",)]
    assert engine_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)) == pytest.approx(
        hf_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)), abs=1e-4)
    assert engine_lm.tokens_served > 0 and engine_lm.mean_exit_loop == 2
    with pytest.raises(NotImplementedError, match="log-likelihoods only"):
        engine_lm.generate_until(_instances("generate_until", [("Once", {"until": ["."]})]))


COLUMNS = ["model", "task", "loop_idx", "metric", "value", "stderr", "n", "num_fewshot", "source",
           "gold_ll", "gold_ll_stderr", "gold_margin", "exit_policy", "kv_policy", "mean_exit_loop"]


def test_served_few_shot_without_exits_is_few_shot(relaxed):
    model, tok = relaxed
    kw = dict(tasks=["piqa"], limit=6, model_name="tiny")
    served = served_few_shot(model, tok, exit_policy="none", kv_policy="propagate", max_active=4, **kw)
    assert served.columns.tolist() == COLUMNS
    plain = evaluation.few_shot(model, tok, batch_size=4, **kw)
    exact = [c for c in plain.columns if not c.startswith("gold_")]
    assert served[exact].equals(plain[exact])  # the same accuracy, stderr, n and tags
    # the gold answer's log-likelihood: the engine's and HFLM's logits agree to float precision
    gold = ["gold_ll", "gold_ll_stderr", "gold_margin"]
    assert served[gold].values.tolist()[0] == pytest.approx(plain[gold].values.tolist()[0], rel=1e-4)
    assert served[["exit_policy", "kv_policy", "mean_exit_loop"]].values.tolist() == [["none", "propagate", 2.0]]


def test_served_few_shot_under_exits_labels_each_task(relaxed):
    model, tok = relaxed
    df = served_few_shot(model, tok, tasks=["winogrande", "piqa"], limit=3, exit_policy=MaxProbExit(0.015),
                         kv_policy="copy_kv")
    assert df["task"].tolist() == ["winogrande", "piqa"] and (df["n"] == 3).all()
    assert (df["exit_policy"] == "max_prob(0.015)").all() and (df["kv_policy"] == "copy_kv").all()
    assert ((0 < df["mean_exit_loop"]) & (df["mean_exit_loop"] < 2)).all()  # some tokens exited early, not all
    assert df["value"].between(0, 1).all()


@pytest.mark.parametrize("bad, message", [
    (dict(exit_policy="early"), r"exit_policy must be one of \['none', 'oracle'\] or a policy.*got 'early'"),
    (dict(exit_policy=None), r"exit_policy must be one of .*got None"),
    (dict(kv_policy="copy"), r"unknown kv_policy 'copy'; valid: propagate, copy_kv, copy_hidden"),
])
def test_bad_policies_are_refused_before_any_compute(relaxed, pairs, bad, message):
    model, tok = relaxed
    with pytest.raises(ValueError, match=message):
        serve_forced(model, pairs, **bad)
    with pytest.raises(ValueError, match=message):
        EngineLM(model, tok, **bad)
    with pytest.raises(ValueError, match="exit_policy='oracle'"):  # lm-eval's requests have no stable ids
        EngineLM(model, tok, exit_policy=OracleExit({}))


def test_bad_pairs_and_sequences_are_refused(relaxed):
    model, _ = relaxed
    with pytest.raises(ValueError, match="at least one"):
        served_loglikelihood(model, [])
    with pytest.raises(ValueError, match=r"pair 1: .*got 2 and 0 tokens"):
        served_loglikelihood(model, [([1], [2]), ([3, 4], [])])
    with pytest.raises(ValueError, match=r">= 2 token ids, got lengths \[3, 1\]"):
        served_perplexity(model, [[1, 2, 3], [4]])
    assert math.isnan(EngineLM(model, relaxed[1]).mean_exit_loop)  # nothing served yet
