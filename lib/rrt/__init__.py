"""rrt: Relaxed Recursive Transformers (Bae et al., 2024, arXiv 2410.20672)."""
from rrt.checkpoint import load, save
from rrt.data import load_corpus, load_packed, pack
from rrt.evaluation import few_shot, per_loop_few_shot, per_loop_perplexity, perplexity, save_results, token_nll
from rrt.losses import cross_entropy, early_exit_loss, kd_loss, loop_weights, shift_for_next_token, uptrain_loss
from rrt.models import load_model
from rrt.recursive import RecursiveSpec, convert, count_parameters, loop_logits
from rrt.relax import merge

__all__ = ["RecursiveSpec", "convert", "count_parameters", "cross_entropy", "early_exit_loss", "few_shot",
           "kd_loss", "load", "load_corpus", "load_model", "load_packed", "loop_logits", "loop_weights",
           "merge", "pack", "per_loop_few_shot", "per_loop_perplexity", "perplexity", "save", "save_results",
           "shift_for_next_token", "token_nll", "uptrain_loss"]
