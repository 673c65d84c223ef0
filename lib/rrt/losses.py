"""Uptraining and early-exit losses on logits (§3.6–3.7, App. L, M; Tables 1, 11, 13), and their
token-chunked forms on hidden states and a head (`chunked_*`: the same values, one chunk's logits at a time).

Conventions, one place for each:
- Alignment. Every loss takes logits already aligned with their targets: position t of
  `logits` predicts position t of `labels`. `shift_for_next_token` does the causal shift once.
- Masking. CE ignores `labels == ignore_index`; KD takes a `mask` of the same leading shape
  (True / 1 = keep). Masked positions are dropped *before* any arithmetic, so garbage (even inf)
  in padded logits cannot reach the value or the gradient.
- Averaging. Token-weighted: sum over every kept token of the batch / number of kept tokens
  (not a per-sequence mean), so a long sequence counts as much as its tokens.
- Precision. Half-precision logits are upcast to float32; float64 stays float64.
- Temperature. Both distributions use logits / T, and the divergence is multiplied by T²
  (Hinton et al., 2015) so its gradient keeps the same scale as T changes; T = 1 is the plain
  divergence. The paper states no temperature, so 1.0 is the default.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("fkl", "rkl", "jsd", "tvd")
LOOP_SCHEMES = ("weighted", "aggressive")


def shift_for_next_token(logits, input_ids, attention_mask=None, ignore_index=-100):
    """Return (logits [b, s-1, V], labels [b, s-1]) aligned for next-token prediction.

    Position t predicts input_ids[t+1]. A target is ignored when it, or the position that
    predicts it, is padding (attention_mask == 0): with left padding the first real token is
    otherwise "predicted" from a pad position.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [batch, seq, vocab] and input_ids [batch, seq]; "
                         f"got {tuple(logits.shape)} and {tuple(input_ids.shape)}")
    labels = input_ids[:, 1:].clone()  # [b, s-1]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                             f"input_ids shape {tuple(input_ids.shape)}")
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        labels[~keep] = ignore_index
    return logits[:, :-1, :], labels


def cross_entropy(logits, labels, ignore_index=-100):
    """Return the token-averaged CE of logits [..., V] against labels [...]."""
    _check_leading(logits, labels, "labels")
    keep = labels != ignore_index                       # [...]
    logits, labels = _upcast(_kept(logits, keep)), _kept(labels, keep)  # [n, V], [n]
    # sum / count (not F.cross_entropy's mean) so an all-padding batch gives 0, not nan
    return F.cross_entropy(logits, labels, reduction="sum") / max(labels.numel(), 1)


def kd_loss(student_logits, teacher_logits, mask=None, kind="fkl", temperature=1.0):
    """Return the token-averaged divergence between teacher and student, times T² (App. L).

    kind: "fkl" KL(teacher‖student) — the paper's choice (§3.6, Table 11); "rkl"
    KL(student‖teacher); "jsd" ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2; "tvd" ½Σ|P−Q|.
    Gradients reach both inputs: detach the teacher (or run it under no_grad) yourself.
    """
    _check_kind(kind)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    _check_leading(student_logits, mask, "mask")
    keep = mask.bool()
    student, teacher = _kept(student_logits, keep), _kept(teacher_logits, keep)  # [n, V] each
    return _divergence_sum(student, teacher, kind, temperature) / max(student.shape[0], 1) * temperature**2


def uptrain_loss(student_logits, labels, teacher_logits=None, kd_weight=1.0, kind="fkl",
                 temperature=1.0, ignore_index=-100):
    """Return (CE + kd_weight · KD, parts) for uptraining with an online teacher (§3.6, App. L).

    KD covers the tokens CE counts. The teacher is frozen, so its logits are detached.
    The paper gives no KD weight; 1.0 is the default. parts (detached; metric names, never a run's tag): "loss/ce", "loss/kd", "loss".
    """
    _check_kind(kind)
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0; got {kd_weight}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    ce = cross_entropy(student_logits, labels, ignore_index)
    kd = None
    if teacher_logits is not None:
        kd = kd_loss(student_logits, teacher_logits.detach(), labels != ignore_index, kind,
                     temperature)
    return _uptrain_total(ce, kd, kd_weight)


def loop_weights(num_loops, scheme="aggressive", coefficient=None):
    """Return the loss coefficient of each loop exit, loop 1 first (§3.7, App. M, Table 13).

    "weighted": αᵢ = i / Σⱼ j (§3.7, after Schuster et al. 2022; Bae et al. 2023); sums to 1.
    "aggressive": `coefficient` on every intermediate loop, 1 on the last. The paper does not
    normalise ("maintaining a coefficient of 1 for the final output", §3.7), so neither do we.
    It found c = 0.1 best (0.3, 0.05, 0.01 tried, Table 13).
    """
    if not isinstance(num_loops, int) or num_loops < 1:
        raise ValueError(f"num_loops must be an int >= 1; got {num_loops!r}")
    if scheme not in LOOP_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {LOOP_SCHEMES}")
    if scheme == "weighted":
        if coefficient is not None:
            raise ValueError(f"coefficient={coefficient} applies only to scheme='aggressive'; "
                             f"scheme='weighted' fixes αᵢ = i/Σj")
        return [i / (num_loops * (num_loops + 1) / 2) for i in range(1, num_loops + 1)]
    if coefficient is None or not 0.0 <= coefficient <= 1.0:
        raise ValueError(f"aggressive coefficient must be in [0, 1]; got {coefficient!r}")
    return [float(coefficient)] * (num_loops - 1) + [1.0]


def early_exit_loss(loop_logits, labels, *, scheme="aggressive", coefficient=None,
                    self_distill=False, self_distill_kind="fkl", teacher_logits=None,
                    kd_weight=1.0, kd_kind="fkl", temperature=1.0, ignore_index=-100):
    """Return (Σᵢ αᵢ·Lᵢ, parts) over the B loop exits, the last loop last (§3.7, App. M).

    Lᵢ = CEᵢ, plus for i < B (if self_distill) the KD of loop i from the *detached* final-loop
    distribution (§3.7: "knowledge distillation from the detached final outputs"), plus for
    i = B (if teacher_logits) kd_weight · KD from the teacher (App. L). The self-distillation
    term sits inside αᵢ: the paper gives it no separate weight, and it keeps the intermediate
    loops' whole share at αᵢ. αᵢ from `loop_weights(B, scheme, coefficient)`.
    parts (detached; loops numbered from 0): "loss", "loss/ce/loop_i", "loss/self_distill/loop_i",
    "loss/kd", "weight/loop_i".
    """
    _check_kind(self_distill_kind)
    _check_kind(kd_kind)
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0; got {kd_weight}")
    if len(loop_logits) == 0:
        raise ValueError("loop_logits is empty; expected one logits tensor per loop exit")
    shapes = {tuple(x.shape) for x in loop_logits}
    if len(shapes) != 1:
        raise ValueError(f"every loop's logits must have one shape; got {sorted(shapes)}")
    weights = loop_weights(len(loop_logits), scheme, coefficient)
    final = loop_logits[-1]
    _check_leading(final, labels, "labels")
    if teacher_logits is not None and teacher_logits.shape != final.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must match the loop "
                         f"logits {tuple(final.shape)}")
    keep = labels != ignore_index  # [...] the tokens every term averages over
    ce = [cross_entropy(logits, labels, ignore_index) for logits in loop_logits]
    # detached: the final loop is the target, never pulled towards the early exits
    sd = [kd_loss(logits, final.detach(), keep, self_distill_kind, temperature)
          for logits in loop_logits[:-1]] if self_distill else None
    kd = None
    if teacher_logits is not None:
        kd = kd_loss(final, teacher_logits.detach(), keep, kd_kind, temperature)
    return _early_exit_total(ce, sd, kd, weights, kd_weight)


# ---- token-chunked forms: the head inside the loss, never the whole batch's logits ---------------
# At paper scale (vocab 256K, 8 × 2048 tokens) one exit's fp32 logits are 16.8 GB, one copy per exit and
# one for the teacher. These forms take hidden states and a head instead, and walk the tokens in chunks:
# each chunk's logits, and the summed losses over its tokens, are computed under torch.utils.checkpoint
# (non-reentrant), so forward keeps only the sums and backward recomputes that chunk's logits. Chunks are
# of tokens, not of the vocabulary, because every divergence needs a token's whole distribution (its
# softmax normaliser). Liger-Kernel's fused linear CE / JSD do this as Triton kernels (GPU only) taking the
# head as one weight matrix; our intermediate exits add a head LoRA to it, and training runs on CPU too.

def chunked_uptrain_loss(student_hidden, student_head, labels, teacher_hidden=None, teacher_head=None, *,
                         chunk_tokens, kd_weight=1.0, kind="fkl", temperature=1.0, ignore_index=-100):
    """Return `uptrain_loss`'s (loss, parts) for logits student_head(student_hidden) and
    teacher_head(teacher_hidden), holding at most chunk_tokens tokens' logits of each at once.

    *_hidden [..., hidden] are aligned with labels [...] as logits are (position t predicts labels[t]);
    a head maps hidden [n, hidden] to logits [n, vocab] (`recursive.loop_heads`). The teacher's chunk
    logits are computed under no_grad. The same values up to float summation order.
    """
    _check_kind(kind)
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0; got {kd_weight}")
    sums, n = _chunked_sums([student_hidden], [student_head], labels, teacher_hidden, teacher_head,
                            chunk_tokens=chunk_tokens, self_distill_kind=None, kd_kind=kind,
                            temperature=temperature, ignore_index=ignore_index)
    kd = None if teacher_hidden is None else sums["kd"] / n * temperature**2
    return _uptrain_total(sums["ce", 0] / n, kd, kd_weight)


def chunked_early_exit_loss(loop_hidden, loop_heads, labels, *, chunk_tokens, scheme="aggressive",
                            coefficient=None, self_distill=False, self_distill_kind="fkl",
                            teacher_hidden=None, teacher_head=None, kd_weight=1.0, kd_kind="fkl",
                            temperature=1.0, ignore_index=-100):
    """Return `early_exit_loss`'s (loss, parts) for loop logits loop_heads[i](loop_hidden[i]), holding at
    most chunk_tokens tokens' logits per exit (and of the teacher) at once.

    loop_hidden: one [..., hidden] tensor per loop exit, the last loop last, aligned with labels [...];
    loop_heads: each exit's head, hidden [n, hidden] -> logits [n, vocab] (`recursive.loop_heads`).
    """
    _check_kind(self_distill_kind)
    _check_kind(kd_kind)
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be >= 0; got {kd_weight}")
    if len(loop_hidden) == 0:
        raise ValueError("loop_hidden is empty; expected one hidden-state tensor per loop exit")
    weights = loop_weights(len(loop_hidden), scheme, coefficient)
    sums, n = _chunked_sums(loop_hidden, loop_heads, labels, teacher_hidden, teacher_head,
                            chunk_tokens=chunk_tokens, self_distill_kind=self_distill_kind if self_distill else None,
                            kd_kind=kd_kind, temperature=temperature, ignore_index=ignore_index)
    last = len(loop_hidden) - 1
    ce = [sums["ce", i] / n for i in range(last + 1)]
    sd = [sums["self_distill", i] / n * temperature**2 for i in range(last)] if self_distill else None
    kd = None if teacher_hidden is None else sums["kd"] / n * temperature**2
    return _early_exit_total(ce, sd, kd, weights, kd_weight)


def _chunked_sums(hiddens, heads, labels, teacher_hidden, teacher_head, *, chunk_tokens, self_distill_kind,
                  kd_kind, temperature, ignore_index):
    """Return ({term: its loss summed over the kept tokens}, max(kept tokens, 1)), a chunk of tokens at a time.

    Terms: ("ce", i) per exit; ("self_distill", i) per intermediate exit if self_distill_kind is set, from
    the detached last exit; "kd" of the last exit from the teacher (no T², no mean: the caller's).
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1; got {chunk_tokens!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if len(heads) != len(hiddens) or not all(callable(h) for h in heads):
        raise ValueError(f"expected one callable head per hidden-state tensor; got {len(heads)} heads "
                         f"for {len(hiddens)} tensors")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head go together: pass both or neither")
    named = {f"hidden states of exit {i}": h for i, h in enumerate(hiddens)}
    if teacher_hidden is not None:
        named["teacher_hidden"] = teacher_hidden
    for name, h in named.items():
        if h.shape[:-1] != labels.shape:
            raise ValueError(f"{name} {tuple(h.shape)} must be labels' shape {tuple(labels.shape)} plus a hidden dim")
    keep = labels != ignore_index  # [...]
    labels = _kept(labels, keep)                  # [n]
    hiddens = [_kept(h, keep) for h in hiddens]   # B × [n, hidden]
    teacher = None if teacher_hidden is None else _kept(teacher_hidden, keep)  # [n, teacher hidden]
    last = len(hiddens) - 1
    names = [("ce", i) for i in range(last + 1)]
    names += [("self_distill", i) for i in range(last)] if self_distill_kind is not None else []
    names += ["kd"] if teacher is not None else []

    def chunk_sums(labels_c, teacher_c, *hiddens_c):  # [c], [c, hidden] or None, B × [c, hidden] -> [terms]
        logits = [head(h) for head, h in zip(heads, hiddens_c)]  # B × [c, vocab]
        sums = [F.cross_entropy(_upcast(lg), labels_c, reduction="sum") for lg in logits]
        if self_distill_kind is not None:
            sums += [_divergence_sum(lg, logits[-1].detach(), self_distill_kind, temperature) for lg in logits[:-1]]
        if teacher_c is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_c)  # [c, vocab]
            sums.append(_divergence_sum(logits[-1], teacher_logits, kd_kind, temperature))
        return torch.stack(sums)

    n = labels.shape[0]
    # max(n, 1): an all-padding batch still runs one empty chunk, so the loss is 0 with a graph, as unchunked
    per_chunk = [checkpoint(chunk_sums, labels[s:s + chunk_tokens],
                            None if teacher is None else teacher[s:s + chunk_tokens],
                            *(h[s:s + chunk_tokens] for h in hiddens), use_reentrant=False)
                 for s in range(0, max(n, 1), chunk_tokens)]
    totals = torch.stack(per_chunk).sum(0)  # [terms]
    return dict(zip(names, totals.unbind())), max(n, 1)


def _uptrain_total(ce, kd, kd_weight):
    """Return (ce + kd_weight · kd, detached parts), kd None without a teacher (uptrain_loss's)."""
    parts = {"loss/ce": ce.detach()}
    loss = ce
    if kd is not None:
        parts["loss/kd"] = kd.detach()
        loss = ce + kd_weight * kd
    parts["loss"] = loss.detach()
    return loss, parts


def _early_exit_total(ce, sd, kd, weights, kd_weight):
    """Return (Σᵢ αᵢ·Lᵢ, detached parts) from per-loop CE, intermediate self-distillation (or None) and
    the last loop's teacher KD (or None) (early_exit_loss's)."""
    total, parts = 0.0, {}
    last = len(ce) - 1
    for i, weight in enumerate(weights):
        loss_i = ce[i]
        parts[f"loss/ce/loop_{i}"] = loss_i.detach()
        if sd is not None and i < last:
            parts[f"loss/self_distill/loop_{i}"] = sd[i].detach()
            loss_i = loss_i + sd[i]
        if kd is not None and i == last:
            parts["loss/kd"] = kd.detach()
            loss_i = loss_i + kd_weight * kd
        parts[f"weight/loop_{i}"] = weight
        total = total + weight * loss_i
    parts["loss"] = total.detach()
    return total, parts


# ---- helpers ---------------------------------------------------------------------------------

def _divergence_sum(student_logits, teacher_logits, kind, temperature):
    """Return the divergence summed over rows of logits [n, V], at temperature T (no T², no mean)."""
    student, teacher = _upcast(student_logits), _upcast(teacher_logits)
    if temperature != 1:  # T = 1 needs no [n, V] copy
        student, teacher = student / temperature, teacher / temperature
    log_q, log_p = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    return _DIVERGENCES[kind](log_p, log_q).sum()


def _fkl(log_p, log_q):
    # KL(P‖Q) = Σ p (log p − log q); xlogy-style guard so p = 0 terms are 0, not nan
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _rkl(log_p, log_q):
    return _fkl(log_q, log_p)


def _jsd(log_p, log_q):
    # log M = log((P+Q)/2), computed in log space for stability
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * _fkl(log_p, log_m) + 0.5 * _fkl(log_q, log_m)


def _tvd(log_p, log_q):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_DIVERGENCES = {"fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "tvd": _tvd}


def _kept(x, keep):
    # x[keep] gathers (and its backward scatters into zeros) even when every position is kept, as in packed training
    # batches: a reshape there instead, the same values (a view, or one dense copy of the shifted logits); CE forward +
    # backward 0.21 → 0.14 s on SmolLM2-135M's [4, 127, 49152] bf16 logits, CPU
    return x.reshape(-1, *x.shape[keep.dim():]) if bool(keep.all()) else x[keep]


def _upcast(x):
    # bf16/fp16 log_softmax over a 32K–256K vocab loses the tail the divergences depend on
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_kind(kind):
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; valid: {KD_KINDS}")


def _check_leading(logits, target, name):
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"{name} shape {tuple(target.shape)} must equal logits shape without "
                         f"the vocab dim {tuple(logits.shape[:-1])}")
