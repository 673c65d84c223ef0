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
from rrt.train import train
from rrt.trainconfig import TrainConfig

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
from rrt.train import train
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
