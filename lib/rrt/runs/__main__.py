"""`python -m rrt.runs <run dir>/run.json`: train and evaluate one planned run (its flags: rrt.cli.runs_parser).
Exit status 75 (EXIT_INTERRUPTED) when a stop signal interrupted training after a checkpoint: a sweep's job
requeues on it, and the same command resumes."""
import sys

from rrt.cli import runs_main
from rrt.train.loop import EXIT_INTERRUPTED, Interrupted

try:
    runs_main()
except Interrupted as stopped:
    print(stopped, file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
