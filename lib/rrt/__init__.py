"""rrt: Relaxed Recursive Transformers (Bae et al., 2024, arXiv 2410.20672)."""
from rrt.checkpoint import load, save
from rrt.models import load_model
from rrt.recursive import RecursiveSpec, convert, count_parameters, loop_logits

__all__ = ["RecursiveSpec", "convert", "count_parameters", "load", "load_model", "loop_logits", "save"]
