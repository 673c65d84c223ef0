"""`python -m rrt.train`: one ad-hoc training run (its flags: rrt.cli.train_parser)."""
from rrt.cli import train_main

train_main()
