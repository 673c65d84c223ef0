"""`python -m rrt.runs <run dir>/run.json`: train and evaluate one planned run (its flags: rrt.cli.runs_parser)."""
from rrt.cli import runs_main

runs_main()
