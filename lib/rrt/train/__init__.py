"""Uptraining and early-exit training (§3.6–3.7): the loop (loop.py), the models a config describes
(build.py), checkpoints and resume (resume.py). `python -m rrt.train` trains one ad-hoc run (cli.py)."""
from rrt.train.build import build_student, build_teacher
from rrt.train.loop import EXIT_INTERRUPTED, Interrupted, RunResult, train
from rrt.train.resume import latest_checkpoint

__all__ = ["EXIT_INTERRUPTED", "Interrupted", "RunResult", "build_student", "build_teacher", "latest_checkpoint",
           "train"]
