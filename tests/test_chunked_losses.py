"""Token-chunked losses (losses.chunked_*, recursive.loop_heads, train's loss_chunk_tokens), gradient
checkpointing with tied layers, and the bf16 teacher: the same values and gradients as the whole-logits path,
without ever saving a batch's logits for backward."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rrt
import rrt.train.loop as rtrain
from rrt.losses import (chunked_early_exit_loss, chunked_uptrain_loss, early_exit_loss, kd_loss,
                        uptrain_loss)
from rrt.models import _tiny_model
from rrt.recursive import convert, loop_heads, loop_hidden_states, loop_logits
from rrt.spec import RecursiveSpec
from rrt.train import latest_checkpoint, train
from rrt.train.build import build_student, build_teacher
from tests.test_recursive import assert_tied
from tests.test_train import RUN_SCRIPT, TRAIN, tiny_config, train_losses

KINDS = ("fkl", "rkl", "jsd", "tvd")
VOCAB = 99  # the tiny models'
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids():
    """[2, 17] token ids: 2 × 16 = 32 aligned tokens, which chunks of 7 do not divide."""
    return torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))


def _recursive(name, num_blocks=2, head_lora_rank=0):
    """Return (the tiny original, its recursive conversion with per-loop LoRA, in train mode), fp32."""
    original, _ = _tiny_model(name)
    spec = RecursiveSpec(num_blocks=num_blocks, lora_rank=4, head_lora_rank=head_lora_rank)
    return original, convert(original, spec).train()


def _loss_and_grads(model, fn):
    """Return (loss, parts, {name: grad}) of fn() over every trainable parameter of model."""
    model.zero_grad(set_to_none=True)
    loss, parts = fn()
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(ref, got, rtol):
    """Loss, part names and values, and every parameter's gradient (atol scaled to that gradient's size)."""
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = ref, got
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0)
    assert list(parts_b) == list(parts_a)
    for k in parts_a:
        torch.testing.assert_close(torch.as_tensor(parts_b[k]), torch.as_tensor(parts_a[k]), rtol=rtol, atol=rtol)
    assert grads_b.keys() == grads_a.keys()
    for name, g in grads_a.items():
        assert grads_b[name] is not None and g is not None, name
        torch.testing.assert_close(grads_b[name], g, rtol=rtol, atol=rtol * float(g.abs().max()), msg=name)


# ---- the losses alone: chunked == unchunked ----------------------------------------------------

@pytest.mark.parametrize("kind", (None,) + KINDS)
def test_chunked_uptrain_loss_matches_the_whole_logits(ids, kind):
    """CE alone, and CE + KD of each kind at T = 2, with chunks of 7 over 32 tokens (fp32, rtol 1e-5)."""
    teacher, student = _recursive("tiny-llama")
    labels = ids[:, 1:]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1] if kind else None
        t_hidden = loop_hidden_states(teacher, ids)[-1][:, :-1] if kind else None
    t_head = loop_heads(teacher)[-1] if kind else None
    opts = dict(kd_weight=0.7, kind=kind or "fkl", temperature=2.0)

    def whole():
        return uptrain_loss(student(input_ids=ids).logits[:, :-1], labels, t_logits, **opts)

    def chunked():
        hidden = loop_hidden_states(student, ids)[-1][:, :-1]
        return chunked_uptrain_loss(hidden, loop_heads(student)[-1], labels, t_hidden, t_head, chunk_tokens=7, **opts)

    ref, got = _loss_and_grads(student, whole), _loss_and_grads(student, chunked)
    assert ("loss/kd" in got[1]) == (kind is not None)
    _assert_same(ref, got, rtol=1e-5)


@pytest.mark.parametrize("name, num_blocks, scheme, coefficient, sd_kind, kd_kind", [
    ("tiny-llama", 2, "aggressive", 0.1, "fkl", "fkl"),
    ("tiny-llama", 3, "weighted", None, "jsd", "rkl"),
    ("tiny-gemma2", 3, "aggressive", 0.3, "tvd", "jsd"),  # final logit softcapping inside the head
    ("tiny-gpt-neox", 2, "weighted", None, "rkl", "tvd"),
])
def test_chunked_early_exit_loss_matches_the_whole_logits(ids, name, num_blocks, scheme, coefficient, sd_kind,
                                                          kd_kind):
    """Every loop's CE, self-distillation from the detached last loop, teacher KD on the last loop, head LoRA at
    the intermediate exits, T = 1.5, chunks of 7 over 32 tokens (fp32, rtol 1e-5)."""
    teacher, student = _recursive(name, num_blocks, head_lora_rank=3)
    with torch.no_grad():  # a head LoRA starts with B = 0: give it a delta so the intermediate heads differ
        student.head_lora.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    labels = ids[:, 1:]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
        t_hidden = loop_hidden_states(teacher, ids)[-1][:, :-1]
    opts = dict(scheme=scheme, coefficient=coefficient, self_distill=True, self_distill_kind=sd_kind,
                kd_weight=0.5, kd_kind=kd_kind, temperature=1.5)

    def whole():
        return early_exit_loss([lg[:, :-1] for lg in loop_logits(student, ids)], labels, teacher_logits=t_logits,
                               **opts)

    def chunked():
        hidden = [h[:, :-1] for h in loop_hidden_states(student, ids)]
        return chunked_early_exit_loss(hidden, loop_heads(student), labels, chunk_tokens=7, teacher_hidden=t_hidden,
                                       teacher_head=loop_heads(teacher)[-1], **opts)

    ref, got = _loss_and_grads(student, whole), _loss_and_grads(student, chunked)
    assert {f"loss/self_distill/loop_{i}" for i in range(num_blocks - 1)} | {"loss/kd"} <= got[1].keys()
    assert float(got[2]["head_lora.lora_A"].abs().max()) > 0  # the head LoRA is in the intermediate heads
    _assert_same(ref, got, rtol=1e-5)


def _float64_exits(padded):
    """Three exits' hidden states [3, 8, 13] with a linear head, a teacher's [3, 8, 11] with its own, labels."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(13, 23, dtype=torch.float64)
    t_head = torch.nn.Linear(11, 23, dtype=torch.float64)
    hidden = [torch.randn(3, 8, 13, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    t_hidden = torch.randn(3, 8, 11, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 23, (3, 8), generator=g)
    if padded:
        labels[0, :3] = -100
    return head, hidden, t_head, t_hidden, labels


EXIT_OPTS = dict(scheme="weighted", self_distill=True, self_distill_kind="jsd", kd_kind="fkl", temperature=0.7)


def test_chunked_losses_are_bit_exact_in_float64_with_one_chunk_and_no_padding():
    """One chunk over a packed batch (every token kept) runs the unchunked sums in their order: values, parts
    and gradients are equal bit for bit."""
    head, hidden, t_head, t_hidden, labels = _float64_exits(padded=False)
    whole = early_exit_loss([head(h) for h in hidden], labels, teacher_logits=t_head(t_hidden), **EXIT_OPTS)
    chunked = chunked_early_exit_loss(hidden, [head] * 3, labels, chunk_tokens=1000, teacher_hidden=t_hidden,
                                      teacher_head=t_head, **EXIT_OPTS)
    assert chunked[0].item() == whole[0].item()
    assert {k: float(v) for k, v in chunked[1].items()} == {k: float(v) for k, v in whole[1].items()}
    grads = [torch.autograd.grad(loss, hidden + list(head.parameters())) for loss, _ in (whole, chunked)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_chunked_losses_skip_padding_before_the_head():
    """Padded targets: chunks of 5 over 21 kept tokens agree with the whole logits to float64 rounding, and
    garbage (inf) hidden states at padded positions never reach the value or any gradient."""
    head, hidden, t_head, t_hidden, labels = _float64_exits(padded=True)
    whole = early_exit_loss([head(h) for h in hidden], labels, teacher_logits=t_head(t_hidden), **EXIT_OPTS)[0]
    with torch.no_grad():
        for h in hidden + [t_hidden]:
            h[0, :3] = float("inf")
    chunked = chunked_early_exit_loss(hidden, [head] * 3, labels, chunk_tokens=5, teacher_hidden=t_hidden,
                                      teacher_head=t_head, **EXIT_OPTS)[0]
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(chunked, hidden + list(head.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(g[0, :3], torch.zeros_like(g[0, :3])) for g in grads[:3])


def test_chunked_uptrain_of_all_padding_is_zero_with_a_graph():
    head = torch.nn.Linear(5, 7)
    hidden = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss, parts = chunked_uptrain_loss(hidden, head, labels, chunk_tokens=2)
    loss.backward()
    assert loss.item() == 0.0 and parts["loss/ce"].item() == 0.0
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


@pytest.mark.parametrize("overrides, message", [
    (dict(chunk_tokens=0), "chunk_tokens must be an int >= 1"),
    (dict(chunk_tokens=True), "chunk_tokens must be an int >= 1"),
    (dict(teacher_hidden=torch.zeros(2, 3, 5)), "teacher_hidden and teacher_head go together"),
    (dict(teacher_hidden=torch.zeros(2, 4, 5), teacher_head=F.relu), "teacher_hidden"),
    (dict(kind="kl"), "unknown KD loss kind 'kl'"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(kd_weight=-1.0), "kd_weight must be >= 0"),
])
def test_chunked_losses_refuse_bad_arguments_before_any_head_runs(overrides, message):
    def head(_h):
        raise AssertionError("a head ran before the arguments were checked")

    args = dict(student_hidden=torch.zeros(2, 3, 5), student_head=head, labels=torch.zeros(2, 3, dtype=torch.long),
                chunk_tokens=2) | overrides
    with pytest.raises(ValueError, match=message):
        chunked_uptrain_loss(**args)


def test_chunked_early_exit_loss_wants_one_head_per_exit():
    with pytest.raises(ValueError, match="one callable head per hidden-state tensor; got 1 heads for 2"):
        chunked_early_exit_loss([torch.zeros(2, 3, 5)] * 2, [F.relu], torch.zeros(2, 3, dtype=torch.long),
                                chunk_tokens=2, coefficient=0.1)


def test_kd_loss_keeps_its_value_after_sharing_the_divergence_with_the_chunked_path():
    """kd_loss now sums through _divergence_sum: still the hand-checkable T² scaling of the mean divergence."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 9, dtype=torch.float64, generator=g), torch.randn(2, 5, 9, dtype=torch.float64,
                                                                                 generator=g)
    log_q, log_p = F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 9
    torch.testing.assert_close(kd_loss(s, t, kind="fkl", temperature=3.0), expected, rtol=1e-12, atol=0)


# ---- what backward keeps: no batch of logits ---------------------------------------------------

def _saved_shapes(fn):
    """Return the shapes of every tensor autograd saves for backward while fn() runs (outside checkpoints)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


class _NoAccelerator:
    """What `_loss` uses of accelerate's Accelerator, without one (fp32, no autocast)."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


@pytest.mark.parametrize("objective", ("uptrain", "early_exit"))
def test_the_chunked_loop_saves_no_tensor_of_more_than_chunk_tokens_logits(tmp_path, ids, objective):
    """Through train's own _loss: with loss_chunk_tokens=5 no tensor saved for backward has a vocab-sized last dim
    and more than 5 rows; with 0 the whole micro-batch's logits are saved (so the check can fail)."""
    original, _ = _tiny_model("tiny-llama")
    extra = dict(self_distill=True, objective="early_exit") if objective == "early_exit" else {}
    for chunk in (5, 0):
        config = tiny_config(tmp_path, kd="fkl", loss_chunk_tokens=chunk, **extra)
        student = build_student(config, original)
        exits = rtrain._Exits(student, every_loop=config.objective == "early_exit")
        teacher = build_teacher(config, original, "cpu")
        shapes = _saved_shapes(lambda: rtrain._loss(exits, teacher, ids, config, _NoAccelerator())[0].backward())
        rows = [torch.Size(s[:-1]).numel() for s in shapes if s and s[-1] == VOCAB]  # tokens' logits saved
        assert len(shapes) > 10  # the hook sees the model's own saves
        if chunk:
            assert max(rows, default=0) <= chunk, rows
        else:
            assert max(rows) >= ids[:, 1:].numel(), rows


# ---- through the training loop -----------------------------------------------------------------

@pytest.mark.parametrize("regime", [
    dict(objective="uptrain", kd="jsd", temperature=2.0),
    dict(objective="early_exit", kd="fkl", self_distill=True, exit_scheme="weighted", exit_coefficient=None,
         head_lora_rank=2),
    dict(objective="early_exit", kd="rkl", num_blocks=3, gradient_checkpointing=True),
])
def test_train_with_loss_chunk_tokens_repeats_the_whole_logits_losses(tmp_path, regime):
    """3 steps of rrt.train.train, loss_chunk_tokens=5 (4 × 16 tokens: not a multiple) vs 0, fp32."""
    original, _ = _tiny_model("tiny-llama")
    runs = {chunk: train(tiny_config(tmp_path, f"chunk{chunk}", steps=3, precision="fp32", loss_chunk_tokens=chunk,
                                     **regime), train_seqs=TRAIN, original=original)
            for chunk in (0, 5)}
    whole, chunked = (train_losses(runs[c].metrics) for c in (0, 5))
    assert len(whole) == 3
    assert chunked == pytest.approx(whole, rel=1e-5)
    assert runs[5].metrics[-1].keys() == runs[0].metrics[-1].keys()


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ("none", "fsdp"))
def test_two_processes_with_chunked_losses_follow_the_single_process_whole_logits_losses(tmp_path, sharding):
    """The heads run outside the wrapped forward (in the loss, and again in backward): under DDP and under the FSDP2
    root unit their gradients still reach the all-reduce / reduce-scatter. 2 processes × batch 2,
    loss_chunk_tokens=5, vs 1 process × batch 4 unchunked."""
    two = tiny_config(tmp_path, "two", steps=3, batch_size=2, kd="fkl", objective="early_exit", self_distill=True,
                      num_processes=2, precision="fp32", loss_chunk_tokens=5, sharding=sharding)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(root=str(Path(__file__).parents[1]), config=two.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script)], check=True, capture_output=True,
                   env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    got = train_losses([json.loads(line) for line in (Path(two.out) / "metrics.jsonl").read_text().splitlines()])
    one = train(tiny_config(tmp_path, "one", steps=3, batch_size=4, kd="fkl", objective="early_exit",
                            self_distill=True, precision="fp32"), train_seqs=TRAIN, original=_tiny_model("tiny-llama")[0])
    assert len(got) == 3
    assert got == pytest.approx(train_losses(one.metrics), abs=1e-5)
    # the weights only the heads use (final norm; head LoRA would be too) trained as in one process
    trained = rrt.load(latest_checkpoint(two.out)).state_dict()
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-3, atol=1e-5, msg=key)


# ---- gradient checkpointing of tied layers; the bf16 teacher -------------------------------------

def test_gradient_checkpointing_with_tied_layers_and_loop_lora_gives_the_same_gradients(ids):
    """HF per-layer checkpointing (non-reentrant) on a recursive model (B=3, per-loop LoRA, tied layers): every
    parameter's gradient as without it (fp32, 1e-6), and the shared tensors are still shared after a step."""
    _, model = _recursive("tiny-llama", num_blocks=3)
    params = dict(model.named_parameters())

    def grads():
        model.zero_grad(set_to_none=True)
        saved.append(_saved_shapes(lambda: early_exit_loss([lg[:, :-1] for lg in loop_logits(model, ids)],
                                                           ids[:, 1:], coefficient=0.1)[0].backward()))
        return {n: p.grad.clone() for n, p in params.items()}

    saved = []
    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert len(saved[1]) < len(saved[0]) / 2  # the layers' activations are recomputed, not saved
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-6, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for n, g in checkpointed.items() if "lora_B" in n)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert_tied(model, num_blocks=3)
    assert dict(model.named_parameters()) == params  # the very same Parameter objects


def test_bf16_teacher_is_frozen_and_a_step_builds_no_graph_through_it(tmp_path, ids):
    original, _ = _tiny_model("tiny-llama")
    for chunk in (0, 5):
        config = tiny_config(tmp_path, kd="fkl", teacher_dtype="bfloat16", loss_chunk_tokens=chunk)
        teacher = build_teacher(config, original, "cpu")
        assert teacher is not original and next(original.parameters()).dtype == torch.float32
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
        assert not teacher.training
        outputs = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
                 for m in teacher.modules()]
        student = build_student(config, original)
        exits = rtrain._Exits(student, every_loop=False)
        loss, parts = rtrain._loss(exits, teacher, ids, config, _NoAccelerator())
        loss.backward()
        for h in hooks:
            h.remove()
        assert outputs and all(o.grad_fn is None and not o.requires_grad for o in outputs if torch.is_tensor(o))
        assert all(p.grad is None for p in teacher.parameters())
        assert parts["loss/kd"] > 0
