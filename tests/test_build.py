"""The models a TrainConfig describes (rrt.train.build): a Random student keeps its KD teacher the original."""
import torch

import rrt
from rrt.train.build import build_student, build_teacher
from rrt.trainconfig import TrainConfig


def test_random_student_with_kd_distils_from_the_original():
    original, _ = rrt.load_model("tiny-llama")
    before = {n: p.clone() for n, p in original.state_dict().items()}
    config = TrainConfig(out="", model="tiny-llama", num_blocks=2, init="random", kd="fkl", seed=3)
    student = build_student(config, original)
    teacher = build_teacher(config, original, "cpu")
    assert teacher is original and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.state_dict().items())  # the pretrained weights
    assert not any(torch.equal(p, before[n]) for n, p in student.state_dict().items() if p.ndim == 2)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # tied stays tied
    assert all(p.requires_grad for p in student.parameters()) and student.training
