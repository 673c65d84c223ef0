"""lm-eval task YAMLs for the offline benchmarks (data/tasks), with the helpers they name (utils.py)."""
