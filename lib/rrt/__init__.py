"""rrt: Relaxed Recursive Transformers (Bae et al., 2024, arXiv 2410.20672).

The public API, what notebooks, scripts and users call: load a model, convert and relax it, save and
load it, train it, evaluate it, serve it. The notebooks' studies are rrt.plans (and rrt.notebook),
their runs rrt.runs, their tables and figures rrt.tables and rrt.plots. Training is
`rrt.train.train(TrainConfig(...), train_seqs=...)` (the package rrt.train, so not a name here).
"""
from rrt.checkpoint import load, save
from rrt.data import load_corpus, load_packed, pack
from rrt.evaluation import few_shot, per_loop_few_shot, per_loop_perplexity, perplexity, save_results, token_nll
from rrt.losses import cross_entropy, early_exit_loss, kd_loss, loop_weights, shift_for_next_token, uptrain_loss
from rrt.models import load_model
from rrt.recursive import convert, count_parameters, loop_logits
from rrt.relax import merge
from rrt.serving.engine import Engine, Request
from rrt.spec import RecursiveSpec, num_loops, spec_of
from rrt.trainconfig import TrainConfig

__all__ = ["Engine", "RecursiveSpec", "Request", "TrainConfig", "convert", "count_parameters", "cross_entropy",
           "early_exit_loss", "few_shot", "kd_loss", "load", "load_corpus", "load_model", "load_packed", "loop_logits",
           "loop_weights", "merge", "num_loops", "pack", "per_loop_few_shot", "per_loop_perplexity", "perplexity",
           "save", "save_results", "shift_for_next_token", "spec_of", "token_nll", "uptrain_loss"]
