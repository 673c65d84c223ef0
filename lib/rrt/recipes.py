"""The paper's training recipes as data (App. G, L, M; Tables 5, 9, 11, 13), held against every `paper-*` plan.

tests/test_recipes.py checks each params/<notebook>/paper-*.yaml plan against these values: a
recipe that drifts from the paper fails in CI, not after a cluster's week.
"""
from __future__ import annotations

MODELS = {  # params scale -> hub id and the B values the paper ran (Table 5: B=3 only where it divides L)
    "paper-gemma-2b": {"model": "google/gemma-2b", "num_blocks": (2, 3)},
    "paper-tinyllama-1.1b": {"model": "TinyLlama/TinyLlama-1.1B-intermediate-step-50K-105b", "num_blocks": (2,)},
    "paper-pythia-1b": {"model": "EleutherAI/pythia-1b", "num_blocks": (2,)},
}
UPTRAIN = {  # App. G
    "tokens": 15e9, "long_tokens": 60e9, "seq_len": 2048, "tokens_per_step": 2e6, "lr": 2e-4,
    "warmup_steps": 200, "long_warmup_steps": 800, "corpus": "slimpajama", "gpus": 8,
}
EARLY_EXIT_TOKENS = 15e9  # App. M: post-training on 15B tokens
TABLE9_RANKS = (64, 128, 256, 512)  # relaxed models, SVD init; the zero-init control at 512
TABLE9_ZERO_INIT_RANKS = (512,)
TABLE9_INITS = ("stepwise", "average", "lower")
TABLE11_KDS = (None, "fkl", "rkl", "jsd", "tvd")  # None: CE only
TABLE11_RELAXED = ("average", 256)  # Table 11's relaxed rows: Average, rank 256
TABLE13_HEAD_LORA_RANK = 128
# Table 13, one row each: (training, loss, coefficient, KD = self-distillation from the detached last
# loop, frozen uptrained weights + LM-head LoRA, data: "ovlp" = the uptraining's tokens, "new" = others)
TABLE13 = (
    ("post", "weighted", None, False, False, "ovlp"),
    ("post", "aggressive", 0.3, False, False, "ovlp"),
    ("post", "aggressive", 0.1, False, False, "ovlp"),
    ("post", "aggressive", 0.05, False, False, "ovlp"),
    ("post", "aggressive", 0.01, False, False, "ovlp"),
    ("post", "weighted", None, True, False, "ovlp"),
    ("post", "aggressive", 0.1, True, False, "ovlp"),
    ("post", "standard", None, False, True, "ovlp"),
    ("post", "standard", None, True, True, "ovlp"),
    ("co", "aggressive", 0.1, False, False, "ovlp"),
    ("post", "aggressive", 0.1, False, False, "new"),
)
