"""`python -m rrt <command>`: plan, sweep, report, bench, targets, init-perplexity (rrt.cli)."""
import sys

from rrt.cli import main

sys.exit(main())
