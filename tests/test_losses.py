"""Tests for rrt.losses: KD divergences against hand-computed values, masking, loop weights."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrt.losses import (cross_entropy, early_exit_loss, kd_loss, loop_weights,
                        shift_for_next_token, uptrain_loss)

KINDS = ("fkl", "rkl", "jsd", "tvd")
LN = math.log

# Three tokens, vocab 3; logits = log-probabilities so softmax gives these exact distributions.
TEACHER_P = [[1 / 2, 1 / 4, 1 / 4], [1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, 1 / 3]]
STUDENT_Q = [[1 / 4, 1 / 2, 1 / 4], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]
# Per-token divergences worked out by hand (token 3 has P == Q, so 0):
HAND = {
    # KL(P‖Q) = Σ p ln(p/q): token 1: ½ln2 + ¼ln½ = ¼ln2; token 2: ½ln(3/2) + 2·¼ln(3/4) = ½ln(9/8)
    "fkl": (LN(2) / 4 + LN(9 / 8) / 2) / 3,
    # KL(Q‖P): token 1: ¼ln½ + ½ln2 = ¼ln2; token 2: ⅓(ln(2/3) + 2 ln(4/3)) = ⅓ln(32/27)
    "rkl": (LN(2) / 4 + LN(32 / 27) / 3) / 3,
    # M1 = (3/8, 3/8, 1/4): ½[½ln(4/3) + ¼ln(2/3)] + ½[¼ln(2/3) + ½ln(4/3)]
    # M2 = (5/12, 7/24, 7/24): ½[½ln(6/5) + ½ln(6/7)] + ½[⅓ln(4/5) + ⅔ln(8/7)]
    "jsd": ((LN(4 / 3) / 2 + LN(2 / 3) / 4)
            + 0.5 * (LN(6 / 5) / 2 + LN(6 / 7) / 2) + 0.5 * (LN(4 / 5) / 3 + 2 * LN(8 / 7) / 3)) / 3,
    # ½Σ|P−Q|: token 1: ½(¼+¼) = ¼; token 2: ½(1/6 + 1/12 + 1/12) = 1/6
    "tvd": (1 / 4 + 1 / 6) / 3,
}


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(0)  # [1, 3, 3]


def _np_divergence(kind, s, t, temperature=1.0):
    """Independent numpy reference: mean over tokens of D(softmax(t/T), softmax(s/T))."""
    def softmax(x):
        e = np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(np.asarray(t, dtype=np.float64)), softmax(np.asarray(s, dtype=np.float64))
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    m = (p + q) / 2
    d = {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m),
         "tvd": 0.5 * np.abs(p - q).sum(-1)}[kind]
    return d.mean()


@pytest.mark.parametrize("kind", KINDS)
def test_kd_matches_hand_computed_value(kind):
    got = kd_loss(_logits(STUDENT_Q), _logits(TEACHER_P), kind=kind)
    assert got.item() == pytest.approx(HAND[kind], rel=1e-12, abs=1e-15)
    # and the numpy reference agrees with the hand algebra
    assert _np_divergence(kind, _logits(STUDENT_Q).numpy(), _logits(TEACHER_P).numpy()) \
        == pytest.approx(HAND[kind], rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_random_logits_match_numpy(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64), \
        torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    assert kd_loss(s, t, kind=kind).item() == pytest.approx(_np_divergence(kind, s.numpy(), t.numpy()),
                                                            rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_is_zero_when_student_equals_teacher(kind):
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    assert kd_loss(x, x.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_symmetry_and_asymmetry():
    s, t = _logits(STUDENT_Q), _logits(TEACHER_P)
    for kind in ("jsd", "tvd"):
        assert kd_loss(s, t, kind=kind).item() == pytest.approx(kd_loss(t, s, kind=kind).item(),
                                                                rel=1e-12)
    assert kd_loss(s, t, kind="fkl").item() != pytest.approx(kd_loss(s, t, kind="rkl").item(),
                                                             rel=1e-3)
    # FKL(s, t) is RKL(t, s)
    assert kd_loss(s, t, kind="fkl").item() == pytest.approx(kd_loss(t, s, kind="rkl").item(),
                                                             rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_softens_both_and_scales_by_t_squared(kind):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 3, 7, generator=g, dtype=torch.float64), \
        torch.randn(1, 3, 7, generator=g, dtype=torch.float64)
    expected = 4.0 * _np_divergence(kind, s.numpy(), t.numpy(), temperature=2.0)
    assert kd_loss(s, t, kind=kind, temperature=2.0).item() == pytest.approx(expected, rel=1e-10)
    assert kd_loss(s, t, kind=kind, temperature=2.0).item() == pytest.approx(
        4.0 * kd_loss(s / 2, t / 2, kind=kind).item(), rel=1e-12)


def test_cross_entropy_hand_value_and_ignore_index():
    logits = _logits(TEACHER_P)
    labels = torch.tensor([[0, 1, 2]])
    assert cross_entropy(logits, labels).item() == pytest.approx(
        (LN(2) + LN(4) + LN(3)) / 3, rel=1e-12)
    labels = torch.tensor([[0, -100, 2]])
    assert cross_entropy(logits, labels).item() == pytest.approx((LN(2) + LN(3)) / 2, rel=1e-12)
    assert cross_entropy(logits, torch.full((1, 3), -100)).item() == 0.0


def _padded_batch():
    """Batch of 2: sequence 0 has 3 real tokens, sequence 1 has 1; pads hold garbage."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    return s, t, labels


@pytest.mark.parametrize("kind", KINDS)
def test_padding_garbage_does_not_change_loss(kind):
    s, t, labels = _padded_batch()
    mask = labels != -100
    clean_kd = kd_loss(s, t, mask, kind=kind)
    clean_ce = cross_entropy(s, labels)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e4, -float("inf")  # garbage only at padded positions
    s2.requires_grad_(True)
    assert kd_loss(s2, t2, mask, kind=kind).item() == pytest.approx(clean_kd.item(), rel=1e-12)
    assert kd_loss(s2, t2, mask.long(), kind=kind).item() == pytest.approx(clean_kd.item(), rel=1e-12)
    loss = cross_entropy(s2, labels) + kd_loss(s2, t2, mask, kind=kind)
    assert loss.item() == pytest.approx((clean_ce + clean_kd).item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(s2.grad).all() and (s2.grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_averaging_is_token_weighted(kind):
    s, t, labels = _padded_batch()
    mask = labels != -100
    per_token = [kd_loss(s[b, i:i + 1], t[b, i:i + 1], kind=kind).item()
                 for b, i in [(0, 0), (0, 1), (0, 2), (1, 0)]]
    got = kd_loss(s, t, mask, kind=kind).item()
    assert got == pytest.approx(sum(per_token) / 4, rel=1e-12)
    per_sequence = (sum(per_token[:3]) / 3 + per_token[3]) / 2
    assert got != pytest.approx(per_sequence, rel=1e-6)
    ce_tok = [F.cross_entropy(s[b, i], labels[b, i]).item() for b, i in [(0, 0), (0, 1), (0, 2), (1, 0)]]
    assert cross_entropy(s, labels).item() == pytest.approx(sum(ce_tok) / 4, rel=1e-12)


def test_shift_for_next_token_left_and_right_padding():
    logits = torch.randn(2, 4, 5)
    input_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    shifted, labels = shift_for_next_token(logits, input_ids, attention_mask)
    assert torch.equal(shifted, logits[:, :-1])
    # left padding: the first real token (3) is predicted from a pad position -> ignored
    assert labels.tolist() == [[6, 7, 8], [-100, -100, 4]]
    _, labels = shift_for_next_token(torch.randn(1, 4, 5), torch.tensor([[1, 2, 0, 0]]),
                                     torch.tensor([[1, 1, 0, 0]]))
    assert labels.tolist() == [[2, -100, -100]]
    _, labels = shift_for_next_token(torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]]))
    assert labels.tolist() == [[2, 3]]


def test_loop_weights():
    assert loop_weights(3, "weighted") == pytest.approx([1 / 6, 2 / 6, 3 / 6], rel=1e-15)
    assert loop_weights(2, "weighted") == pytest.approx([1 / 3, 2 / 3], rel=1e-15)
    assert loop_weights(3, "aggressive", 0.1) == [0.1, 0.1, 1.0]
    assert loop_weights(2, "aggressive", 0.3) == [0.3, 1.0]  # not normalised, as in §3.7
    assert loop_weights(1, "aggressive", 0.1) == [1.0]
    assert loop_weights(1, "weighted") == [1.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_loops=2, scheme="aggressive", coefficient=1.5), r"\[0, 1\].*1.5"),
    (dict(num_loops=2, scheme="aggressive", coefficient=-0.1), r"\[0, 1\].*-0.1"),
    (dict(num_loops=2, scheme="aggressive"), r"\[0, 1\].*None"),
    (dict(num_loops=2, scheme="weighted", coefficient=0.1), r"aggressive"),
    (dict(num_loops=2, scheme="linear"), r"'linear'.*weighted.*aggressive"),
    (dict(num_loops=0, scheme="weighted"), r"num_loops.*0"),
])
def test_loop_weights_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loop_weights(**kwargs)


def test_unknown_kind_and_shape_errors():
    s, t, labels = _padded_batch()
    with pytest.raises(ValueError, match=r"'kl'.*fkl.*rkl.*jsd.*tvd"):
        kd_loss(s, t, kind="kl")
    with pytest.raises(ValueError, match=r"'kl'.*fkl"):
        uptrain_loss(s, labels, t, kind="kl")
    with pytest.raises(ValueError, match=r"'mse'.*fkl"):
        early_exit_loss([s, s], labels, coefficient=0.1, self_distill=True, self_distill_kind="mse")
    with pytest.raises(ValueError, match=r"'mse'.*fkl"):
        early_exit_loss([s, s], labels, coefficient=0.1, kd_kind="mse")
    with pytest.raises(ValueError, match=r"same shape"):
        kd_loss(s, t[..., :-1])
    with pytest.raises(ValueError, match=r"mask shape"):
        kd_loss(s, t, labels[:, :-1] != -100)
    with pytest.raises(ValueError, match=r"labels shape"):
        cross_entropy(s, labels[:, :-1])
    with pytest.raises(ValueError, match=r"one shape"):
        early_exit_loss([s, s[:, :-1]], labels, coefficient=0.1)
    with pytest.raises(ValueError, match=r"labels shape"):
        early_exit_loss([s, s], labels[:, :-1], coefficient=0.1)
    with pytest.raises(ValueError, match=r"teacher logits"):
        early_exit_loss([s, s], labels, coefficient=0.1, teacher_logits=t[..., :-1])
    with pytest.raises(ValueError, match=r"temperature.*0"):
        kd_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match=r"input_ids.*\(2, 3\)"):
        shift_for_next_token(s, labels[:, :-1])
    with pytest.raises(ValueError, match=r"same shape"):
        uptrain_loss(s, labels, t[..., :-1])


def test_uptrain_loss_is_ce_plus_weighted_kd():
    s, t, labels = _padded_batch()
    loss, parts = uptrain_loss(s, labels, t, kd_weight=0.5, kind="rkl", temperature=2.0)
    ce, kd = cross_entropy(s, labels), kd_loss(s, t, labels != -100, "rkl", 2.0)
    assert loss.item() == pytest.approx((ce + 0.5 * kd).item(), rel=1e-12)
    assert parts["loss/ce"].item() == pytest.approx(ce.item()) and parts["loss/kd"].item() == pytest.approx(kd.item())
    loss, parts = uptrain_loss(s, labels)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-12) and "kd" not in parts


def test_half_precision_computed_in_float32():
    s, t, labels = _padded_batch()
    assert kd_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    assert cross_entropy(s.half(), labels).dtype == torch.float32


def _loops(num_loops=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    loops = [torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(num_loops)]
    return loops, torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])


@pytest.mark.parametrize("kind", KINDS)
def test_self_distill_sends_no_gradient_to_final_loop(kind):
    grads, firsts = [], []
    for self_distill in (False, True):
        loops, labels = _loops()
        loss, _ = early_exit_loss(loops, labels, scheme="aggressive", coefficient=0.1,
                                  self_distill=self_distill, self_distill_kind=kind)
        loss.backward()
        grads.append(loops[-1].grad.clone())
        firsts.append(loops[0].grad.clone())
    assert torch.equal(grads[0], grads[1])          # final loop: CE gradient only
    assert not torch.allclose(firsts[0], firsts[1])  # but the term is active on loop 1


def test_early_exit_loss_value_and_parts():
    loops, labels = _loops(3)
    teacher = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    loss, parts = early_exit_loss(loops, labels, scheme="weighted", self_distill=True,
                                  self_distill_kind="jsd", teacher_logits=teacher, kd_weight=0.7,
                                  kd_kind="fkl", temperature=1.5)
    keep = labels != -100
    ce = [cross_entropy(x, labels) for x in loops]
    sd = [kd_loss(x, loops[-1], keep, "jsd", 1.5) for x in loops[:2]]
    kd = kd_loss(loops[-1], teacher, keep, "fkl", 1.5)
    expected = (1 / 6) * (ce[0] + sd[0]) + (2 / 6) * (ce[1] + sd[1]) + (3 / 6) * (ce[2] + 0.7 * kd)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert parts["loss/self_distill/loop_1"].item() == pytest.approx(sd[1].item())
    assert parts["loss/kd"].item() == pytest.approx(kd.item())
    assert parts["weight/loop_2"] == pytest.approx(0.5) and "loss/self_distill/loop_2" not in parts
    loss.backward()
    assert teacher.grad is None  # the teacher is frozen (App. L)


def test_single_loop_early_exit_equals_uptrain_loss():
    loops, labels = _loops(1)
    teacher = torch.randn(2, 4, 9, dtype=torch.float64)
    a, _ = early_exit_loss(loops, labels, coefficient=0.1, teacher_logits=teacher, kd_weight=0.3,
                           kd_kind="tvd", temperature=2.0)
    b, _ = uptrain_loss(loops[0], labels, teacher, kd_weight=0.3, kind="tvd", temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
