"""The paper's models and training recipes as data (Table 2; App. G, L, M; Tables 5, 9, 11, 13).

`PAPER_MODELS` is the one table of the paper's models: which hub id each `paper-*` scale converts,
the B values the paper ran on it, and its shape (so a plan, a cost estimate or a dummy-weight serving
benchmark needs neither the hub nor the weights). tests/test_recipes.py checks each
params/<notebook>/paper-*.yaml plan against these values: a recipe that drifts from the paper fails
in CI, not after a cluster's week.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperModel:
    """One of the paper's models (Table 2)."""
    model: str                # hub id
    num_blocks: tuple         # the B values the paper ran (Table 5: B=3 only where it divides L)
    model_type: str           # transformers' model_type of its config
    shape: dict               # the config's fields (transformers' defaults for the rest)


PAPER_MODELS = {  # params scale -> the paper's model
    "paper-gemma-2b": PaperModel("google/gemma-2b", (2, 3), "gemma", dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh")),
    "paper-tinyllama-1.1b": PaperModel("TinyLlama/TinyLlama-1.1B-intermediate-step-50K-105b", (2,), "llama", dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)),
    "paper-pythia-1b": PaperModel("EleutherAI/pythia-1b", (2,), "gpt_neox", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8,
        rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)),
}
UPTRAIN = {  # App. G
    "tokens": 15e9, "long_tokens": 60e9, "seq_len": 2048, "tokens_per_step": 2e6, "lr": 2e-4,
    "warmup_steps": 200, "long_warmup_steps": 800, "corpus": "slimpajama", "gpus": 8,
}
EARLY_EXIT_TOKENS = 15e9  # App. M: post-training on 15B tokens
TABLE9_RANKS = (64, 128, 256, 512)  # relaxed models, SVD init; the zero-init control at 512
TABLE9_ZERO_INIT_RANKS = (512,)
TABLE9_INITS = ("stepwise", "average", "lower")
TABLE8_INIT = "average"  # Table 8: Average + SVD LoRA, B=2, per-module ranks (q, kv, o, mlp) on Gemma
# Table 8's rows whose ranks differ by module (its uniform 256 and 128 rows are Table 9's Average runs)
TABLE8_MODULE_RANKS = ((128, 256, 128, 256), (256, 128, 256, 256), (256, 256, 256, 128), (128, 128, 128, 256),
                       (64, 128, 64, 128), (128, 64, 128, 128), (128, 128, 128, 64), (64, 64, 64, 128))
TABLE11_KDS = (None, "fkl", "rkl", "jsd", "tvd")  # None: CE only
TABLE11_RELAXED = ("average", 256)  # Table 11's relaxed rows: Average, rank 256
TABLE12_KD = "fkl"  # Table 12's final models: 60B tokens + forward KL from the full-size model (App. L)
TABLE12_RANKS = (0, 64, 128, 256, 512)  # 0: Stepwise, the recursive model; r > 0: Average + SVD LoRA of rank r
# Table 12 / Fig. 17's full-size reference: "the pretrained model itself for TinyLlama, but for other models, it
# is further uptrained on 60 billion tokens" (Tables 14-15: and 15B more, 75B)
TABLE12_FULL_SIZE = {"paper-gemma-2b": "uptrained", "paper-tinyllama-1.1b": "pretrained", "paper-pythia-1b": "uptrained"}
TABLE14_COEFFICIENTS = {"recursive": (0.1,), "relaxed": (0.1, 0.3)}  # App. M: aggressive CE + self-distillation
TABLE14_NO_SELF_DISTILL = {"paper-gemma-2b": (3,)}  # B whose relaxed models ran without it (Table 14: out of memory)
ABLATIONS_GEMMA_ONLY = ("paper-gemma-2b",)  # Table 11's KD grid and Table 13's early-exit rows: Gemma only
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
