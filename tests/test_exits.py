"""Exit policies and oracle trajectories (rrt.exits)."""
import pytest
import torch

import rrt
from rrt.exits import (CosineExit, MarginExit, MaxProbExit, NoExit, OracleExit, calibrate_threshold,
                       exit_scores, loop_states, record_oracle_trajectories)


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
    states, _ = loop_states(rec, ids)
    for h, logits in zip(states, rrt.loop_logits(rec, ids)):
        torch.testing.assert_close(rrt.models.head_logits(rec, h), logits, rtol=0, atol=0)


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
    strict = calibrate_threshold(rec, seqs, policy=policy, target_agreement=1.0)
    loose = calibrate_threshold(rec, seqs, policy=policy, target_agreement=0.0)
    assert strict.agreement == 1.0 and loose.agreement >= 0.0
    assert loose.threshold <= strict.threshold and loose.mean_exit_loop <= strict.mean_exit_loop
    mid = calibrate_threshold(rec, seqs, policy=policy, target_agreement=0.6)
    assert mid.agreement >= 0.6


def test_calibration_rejects_bad_arguments(rec_and_seqs):
    rec, seqs = rec_and_seqs
    with pytest.raises(ValueError, match="valid: max_prob, margin, cosine"):
        calibrate_threshold(rec, seqs, policy="entropy")
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate_threshold(rec, seqs, policy="margin", target_agreement=1.5)
