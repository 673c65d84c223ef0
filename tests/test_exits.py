"""Exit policies and oracle trajectories (rrt.exits)."""
import pytest
import torch

import rrt
from rrt.exits import (CosineExit, MarginExit, MaxProbExit, NoExit, OracleExit, calibrate_threshold,
                       exit_scores, _loop_states, record_oracle_trajectories)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rec_and_seqs():
    model, tok = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3))
    seqs = [tok(t).input_ids for t in ["The quick brown fox jumps", "Loops share one block."]]
    return rec, seqs


def test_loop_states_match_loop_logits(rec_and_seqs):
    rec, seqs = rec_and_seqs
    ids = torch.tensor([seqs[0]])
    states, _ = _loop_states(rec, ids)
    for h, logits in zip(states, rrt.loop_logits(rec, ids)):
        torch.testing.assert_close(rrt.families.head_logits(rec, h), logits, rtol=0, atol=0)


def test_oracle_is_first_loop_agreeing_with_last(rec_and_seqs):
    rec, seqs = rec_and_seqs
    traj = record_oracle_trajectories(rec, seqs)
    for seq, t in zip(seqs, traj):
        preds = torch.stack([lg[0].argmax(-1) for lg in rrt.loop_logits(rec, torch.tensor([seq]))])
        assert t.shape == (len(seq),)
        for p in range(len(seq)):
            b = int(t[p])
            assert preds[b, p] == preds[-1, p] and all(preds[c, p] != preds[-1, p] for c in range(b))


def test_policies_on_hand_made_inputs():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    prev = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loop = torch.tensor([1, 1])
    kw = dict(loop=loop, logits=logits, hidden=hidden, prev_hidden=prev, keys=[(0, 3), (1, 5)])
    assert NoExit().exit_mask(**kw).tolist() == [False, False]
    assert MaxProbExit(0.9).exit_mask(**kw).tolist() == [True, False]
    assert MarginExit(0.1).exit_mask(**kw).tolist() == [True, False]   # equal top-2: margin 0
    assert CosineExit(0.5).exit_mask(**kw).tolist() == [True, False]   # cos 1 and 0
    assert OracleExit({0: [2, 2, 2, 1], 1: [0] * 6}).exit_mask(**kw).tolist() == [True, True]
    first = exit_scores("cosine", loop=torch.tensor([0, 1]), logits=logits, hidden=hidden, prev_hidden=prev)
    assert first[0] == float("-inf")  # no previous loop to compare with at loop 0


@pytest.mark.parametrize("policy", ["max_prob", "margin", "cosine"])
def test_calibration_meets_target(rec_and_seqs, policy):
    rec, seqs = rec_and_seqs

    def exits_with(threshold):
        """(agreement, mean exit loop) of the policy's own exit_mask, loop by loop, over every token."""
        rule = {"max_prob": MaxProbExit, "margin": MarginExit, "cosine": CosineExit}[policy](threshold)
        agree, exit_loop = [], []
        for seq in seqs:
            ids = torch.tensor([seq])
            states, embeddings = _loop_states(rec, ids)
            logits = rrt.loop_logits(rec, ids)
            first = torch.full((len(seq),), len(states) - 1)  # the last loop always exits
            for b in reversed(range(len(states) - 1)):  # the first exiting loop wins
                prev = embeddings[0] if b == 0 else states[b - 1][0]
                mask = rule.exit_mask(loop=torch.full((len(seq),), b), logits=logits[b][0], hidden=states[b][0],
                                      prev_hidden=prev, keys=None)
                first = torch.where(mask, b, first)
            preds = torch.stack([lg[0].argmax(-1) for lg in logits])  # [loops, seq]
            agree.append(preds.gather(0, first[None])[0] == preds[-1])
            exit_loop.append(first)
        return torch.cat(agree).float().mean().item(), torch.cat(exit_loop).float().mean().item()

    strict = calibrate_threshold(rec, seqs, policy=policy, target_agreement=1.0)
    mid = calibrate_threshold(rec, seqs, policy=policy, target_agreement=0.6)
    loose = calibrate_threshold(rec, seqs, policy=policy, target_agreement=0.0)
    for calib in (strict, mid, loose):  # the reported numbers are what the threshold does
        agreement, mean_exit_loop = exits_with(calib.threshold)
        assert calib.agreement == agreement and calib.mean_exit_loop == pytest.approx(mean_exit_loop, abs=1e-6)
    assert strict.agreement == 1.0 and mid.agreement >= 0.6
    # The random model's early loops disagree somewhere, so the loose threshold trades agreement
    # for depth: it is the lowest candidate, every token exits at its first scored loop (cosine
    # has no score at loop 0), earlier than under the strict threshold.
    assert loose.agreement < 1.0
    assert loose.mean_exit_loop == (1.0 if policy == "cosine" else 0.0) < strict.mean_exit_loop
    assert loose.threshold <= mid.threshold <= strict.threshold


def test_calibration_rejects_bad_arguments(rec_and_seqs):
    rec, seqs = rec_and_seqs
    with pytest.raises(ValueError, match="valid: max_prob, margin, cosine"):
        calibrate_threshold(rec, seqs, policy="entropy")
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate_threshold(rec, seqs, policy="margin", target_agreement=1.5)


def test_cosine_calibration_at_two_loops_never_exits_early():
    """At B = 2 cosine has no earlier loop to compare with before the last: the only threshold is +inf."""
    model, tok = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
    cal = calibrate_threshold(rec, [tok("Hello world, loops").input_ids], policy="cosine", target_agreement=0.9)
    assert cal.threshold == float("inf") and cal.agreement == 1.0 and cal.mean_exit_loop == 1.0
