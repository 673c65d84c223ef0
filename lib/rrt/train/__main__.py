"""`python -m rrt.train`: one ad-hoc training run (its flags: rrt.cli.train_parser). Exit status 75
(EXIT_INTERRUPTED) when a stop signal interrupted it after a checkpoint: the same command resumes."""
import sys

from rrt.cli import train_main
from rrt.train.loop import EXIT_INTERRUPTED, Interrupted

try:
    train_main()
except Interrupted as stopped:
    print(stopped, file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
