"""Multi-process data (train.py): under torchrun the processes split every epoch without reading a
block twice, and together read, step by step, the blocks one process reads alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rrt
from rrt.checkpoint import TRAINING_STATE
from rrt.train import train
from rrt.train.resume import check_layout
from rrt.trainconfig import TrainConfig
from tests.test_train import EVAL, TRAIN, train_losses

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

N_BLOCKS, BLOCK_LEN = 24, 8
# block i is token id i repeated (tiny-llama's vocabulary is 99): every block the trainer reads names itself
BLOCKS = torch.arange(N_BLOCKS).unsqueeze(1).expand(N_BLOCKS, BLOCK_LEN).contiguous()  # [n_blocks, seq]
# 8 blocks a step (2 processes × batch 2, or 1 process × batch 4; × 2 micro-batches): an epoch is 3 steps
STEPS, GRAD_ACCUM, STEPS_PER_EPOCH = 6, 2, 3


def tiny_config(out, batch_size, num_processes=1):
    # kd: the trainer feeds each micro-batch to the teacher, where record_reads sees it
    return TrainConfig(out=str(out), model="tiny-llama", num_blocks=2, steps=STEPS, grad_accum=GRAD_ACCUM,
                       batch_size=batch_size, num_processes=num_processes, kd="fkl", lr=1e-3, save_every=STEPS)


def record_reads(original) -> list[list[int]]:
    """Return a list that fills with the block ids of each micro-batch `train` reads, in order.

    With kd set and teacher_dtype equal to `original`'s dtype, the teacher is `original` itself
    (build_teacher), so a forward pre-hook on it sees every micro-batch x [batch, seq]. The student,
    a deep copy made by convert, inherits the hook: the identity check leaves its calls out.
    """
    reads = []

    def hook(module, args, kwargs):
        if module is original:
            x = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            assert torch.equal(x, x[:, :1].expand_as(x)), "a micro-batch row is not one whole block"
            reads.append(x[:, 0].tolist())

    original.register_forward_pre_hook(hook, with_kwargs=True)
    return reads


def per_step(reads: list[list[int]]) -> list[list[int]]:
    """Return the block ids read in each step: GRAD_ACCUM micro-batches a step, joined."""
    assert len(reads) == STEPS * GRAD_ACCUM
    return [sum(reads[s * GRAD_ACCUM:(s + 1) * GRAD_ACCUM], []) for s in range(STEPS)]


RUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import rrt
from rrt.checkpoint import TRAINING_STATE
from rrt.train import train
from rrt.train.resume import check_layout
from rrt.trainconfig import TrainConfig
from tests.test_multiprocess import BLOCKS, record_reads
original = rrt.load_model("tiny-llama")[0]
reads = record_reads(original)
train(TrainConfig.from_dict({config!r}), train_seqs=BLOCKS, original=original)
with open(os.path.join({out!r}, "reads-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(reads, f)
"""


def test_two_processes_split_each_epoch_and_read_what_one_process_reads(tmp_path):
    two = tiny_config(tmp_path / "two", batch_size=2, num_processes=2)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(root=str(Path(__file__).parents[1]), config=two.to_dict(),
                                        out=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    by_process = [per_step(json.loads((tmp_path / f"reads-{rank}.json").read_text())) for rank in (0, 1)]
    assert all(len(ids) == 2 * GRAD_ACCUM for steps in by_process for ids in steps)  # batch 2 per micro-batch

    original = rrt.load_model("tiny-llama")[0]
    reads = record_reads(original)
    train(tiny_config(tmp_path / "one", batch_size=4), train_seqs=BLOCKS, original=original)
    one = per_step(reads)

    # each step: the two processes together read exactly the blocks one process reads
    for step in range(STEPS):
        assert sorted(by_process[0][step] + by_process[1][step]) == sorted(one[step]), f"step {step + 1}"
    # each epoch: every block once, across both processes (no block read twice, none skipped)
    epochs = []
    for first in range(0, STEPS, STEPS_PER_EPOCH):
        steps = range(first, first + STEPS_PER_EPOCH)
        both = [i for s in steps for p in (0, 1) for i in by_process[p][s]]
        assert sorted(both) == list(range(N_BLOCKS)), f"epoch {first // STEPS_PER_EPOCH}: {sorted(both)}"
        assert sorted(i for s in steps for i in one[s]) == list(range(N_BLOCKS))
        epochs.append([i for s in steps for i in one[s]])
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch, not one fixed order


# ---- sharding="fsdp": FSDP2 over 2 processes (gloo) against one process of the same global batch ----------

FSDP_STEPS, FSDP_SAVE = 6, 3  # checkpoints at 3 (optimizer state: each rank's shard) and 6 (the model only)


def fsdp_config(out, **overrides):
    """A tiny recursive model with tied layers and per-depth LoRA, KD from the original; fp32 on any CPU."""
    values = dict(out=str(out), model="tiny-llama", num_blocks=2, lora_rank=4, kd="fkl", steps=FSDP_STEPS,
                  save_every=FSDP_SAVE, keep_checkpoints=2, batch_size=2, num_processes=2, sharding="fsdp",
                  grad_accum=2, lr=3e-3, warmup_steps=1, eval_every=FSDP_SAVE, eval_batch_size=2, precision="fp32")
    return TrainConfig(**{**values, **overrides})


FSDP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import rrt.train.loop as loop
from rrt.train import train
from rrt.trainconfig import TrainConfig
from tests.test_train import EVAL, TRAIN
train(TrainConfig.from_dict({whole!r}), train_seqs=TRAIN, eval_seqs=EVAL)
real, calls = loop._optimiser_step, []
def step(*args, **kwargs):  # stopped as step 5 starts (on both processes): resumed from checkpoint 3
    calls.append(1)
    if len(calls) == 5:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
loop._optimiser_step = step
try:
    train(TrainConfig.from_dict({stopped!r}), train_seqs=TRAIN, eval_seqs=EVAL)
except KeyboardInterrupt:
    pass
loop._optimiser_step = real
train(TrainConfig.from_dict({stopped!r}), train_seqs=TRAIN, eval_seqs=EVAL)
"""


def optimizer_numel(rank_file) -> int:
    state = torch.load(rank_file, weights_only=False)["optimizer"]["state"]
    return sum(v.numel() for per_param in state.values() for k, v in per_param.items() if k != "step")


def test_fsdp_on_two_processes_matches_one_process_shards_the_optimizer_and_resumes(tmp_path):
    whole, stopped = fsdp_config(tmp_path / "whole"), fsdp_config(tmp_path / "stopped")
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT.format(root=str(Path(__file__).parents[1]), whole=whole.to_dict(),
                                         stopped=stopped.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(fsdp_config(tmp_path / "one", batch_size=4, num_processes=1, sharding="none"), train_seqs=TRAIN,
                eval_seqs=EVAL)

    records = [json.loads(line) for line in (Path(whole.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, FSDP_STEPS + 1))
    # the same global batch, the same losses, gradient norms and evaluations (float rounding apart)
    assert train_losses(records) == pytest.approx(train_losses(one.metrics), rel=1e-4)
    for key in ("grad_norm",):
        assert [r[key] for r in records if r["kind"] == "train"] == pytest.approx(
            [r[key] for r in one.metrics if r["kind"] == "train"], rel=1e-4)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert [r["ppl/loop_1"] for r in evals] == pytest.approx(
        [r["ppl/loop_1"] for r in one.metrics if r["kind"] == "eval"], rel=1e-4)

    # each process holds about half of the optimizer state, and wrote only that
    ours = Path(whole.out) / "checkpoints" / "step-00000003"
    ref = Path(one.run_dir) / "checkpoints" / "step-00000003"
    shards = [optimizer_numel(ours / f"rank{r}.pt") for r in (0, 1)]
    assert sum(shards) == optimizer_numel(ref / "rank0.pt")  # the shards partition the state exactly
    assert all(0.4 < s / sum(shards) < 0.6 for s in shards), shards
    # each file: its shard's bytes (fp32 moments) plus the part every such file has (RNG states, a zip record per
    # tensor; a third of the file at this tiny size), so about half the unsharded file at scale
    fixed = (ref / "rank0.pt").stat().st_size - 4 * optimizer_numel(ref / "rank0.pt")
    for rank, numel in enumerate(shards):
        assert (ours / f"rank{rank}.pt").stat().st_size - 4 * numel == pytest.approx(fixed, rel=0.05)

    # stopped after step 4, resumed from checkpoint 3's shards: the same trajectory
    resumed = [json.loads(line) for line in (Path(stopped.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed if r["kind"] == "train"] == list(range(1, FSDP_STEPS + 1))
    assert train_losses(resumed) == pytest.approx(train_losses(records), abs=1e-6)

    # the model is written whole, each shared tensor once, and loads with its ties
    model, reference = rrt.load(Path(whole.out) / "checkpoints" / "step-00000006"), one.model
    unique = {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert len(unique) == len({id(t) for t in reference.state_dict(keep_vars=True).values()})
    assert len(unique) < len(model.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, rtol=1e-3, atol=1e-5), key


def test_fsdp_refuses_one_process_another_world_size_and_another_sharding(tmp_path):
    with pytest.raises(ValueError, match=r"sharding='fsdp' splits .* this is one process"):
        train(fsdp_config(tmp_path / "run", num_processes=1), train_seqs=TRAIN)
    torch.save({"step": 3, "scheduler": {}, "world_size": 2, "sharding": "fsdp"}, tmp_path / TRAINING_STATE)
    with pytest.raises(ValueError, match=r"optimizer state sharded over 2 processes; this launch has 4: resume "
                                         r"with 2 processes"):
        check_layout(tmp_path, fsdp_config(tmp_path / "run", num_processes=4), 4)
    with pytest.raises(ValueError, match=r"written with sharding='fsdp', this run has sharding='none'"):
        check_layout(tmp_path, fsdp_config(tmp_path / "run", sharding="none"), 2)
    check_layout(tmp_path, fsdp_config(tmp_path / "run"), 2)  # the same layout: accepted
