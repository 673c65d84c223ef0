"""The paper's reference numbers for Tables 3, 8, 15, 18 and 19 (Bae et al. 2024, arXiv 2410.20672, App. F, J, M, N).

Read from the full text (`paper/relaxed-recursive-transformers.txt`); where our text copy of a table is garbled
the entry is left out rather than guessed. Tables 5, 9, 11–14, 16 and 17 keep theirs in `rrt.tables.PAPER`.
Accuracies in %, times in ms per token, throughput ratios as plain floats (×).
"""
from __future__ import annotations

TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# Table 3 (App. F): few-shot accuracy (%) of the pretrained models, per task (TASKS order) and their average;
# N-emb in billions; TinyLlama at its 105B-token checkpoint (the one the paper converts).
TABLE3 = {
    "Gemma 2B": {"n_emb_b": 1.99, "tokens": "3T",
                 "acc": (63.13, 71.38, 78.13, 65.04, 72.26, 41.89, 40.20), "avg": 61.72},
    "TinyLlama 1.1B (105B)": {"n_emb_b": 0.97, "tokens": "105B",
                              "acc": (43.26, 42.23, 66.81, 53.35, 44.74, 23.21, 29.20), "avg": 43.26},
    "Pythia 1B": {"n_emb_b": 0.81, "tokens": "300B",
                  "acc": (57.52, 49.10, 70.40, 52.80, 51.89, 26.71, 33.40), "avg": 48.83},
}

# Table 8 (App. J): relaxed recursive Gemma, Average B=2, SVD LoRA, 15B tokens; LoRA rank per module
# (q, kv, out, FFN) → (N-emb in billions, SlimPajama perplexity, avg few-shot accuracy %).
TABLE8 = {
    (256, 256, 256, 256): (1.30, 12.10, 54.2),
    (128, 256, 128, 256): (1.28, 12.27, 53.9),
    (256, 128, 256, 256): (1.29, 12.33, 54.1),
    (256, 256, 256, 128): (1.18, 12.56, 53.3),
    (128, 128, 128, 256): (1.27, 12.36, 53.7),
    (128, 128, 128, 128): (1.15, 12.52, 52.5),
    (64, 128, 64, 128): (1.14, 12.61, 52.8),
    (128, 64, 128, 128): (1.14, 12.72, 52.6),
    (128, 128, 128, 64): (1.08, 12.80, 51.9),
    (64, 64, 64, 128): (1.13, 12.77, 52.3),
}

# Table 15 (App. M): TinyLlama 1.1B, B=2, 60B tokens + KD, before and after early-exit post-training (aggressive 0.1
# + SD on 15B tokens): (init or baseline, B, LoRA rank, stage) → last-loop avg accuracy (%). Stages as
# `rrt.tables.PAPER["table12"]`; "pretrained": the original checkpoint (TinyLlama's full-size reference).
TABLE15 = {
    ("full", 1, 0, "pretrained"): 43.3,
    ("stepwise", 2, 0, "60B"): 44.3, ("average", 2, 64, "60B"): 45.0, ("average", 2, 128, "60B"): 45.0,
    ("average", 2, 512, "60B"): 45.6,
    ("stepwise", 2, 0, "post 0.1"): 44.8, ("average", 2, 64, "post 0.1"): 45.1, ("average", 2, 128, "post 0.1"): 45.2,
}

# Table 18 (App. N; A100, prefix 64 / decode 256, 16 GB cap): Gemma 2B Transformer-block ms per token,
# (loops, LoRA rank) → {batch: ms} at batch 1 and at the largest batch within the cap.
TABLE18 = {
    (1, 0): {1: 20.937, 111: 0.188},
    (2, 0): {1: 10.819, 123: 0.091}, (2, 64): {1: 12.675, 117: 0.112}, (2, 128): {1: 12.899, 115: 0.113},
    (2, 256): {1: 12.639, 111: 0.115}, (2, 512): {1: 12.692, 103: 0.127},
    (3, 0): {1: 7.411, 131: 0.058}, (3, 64): {1: 8.855, 123: 0.075}, (3, 128): {1: 8.787, 121: 0.074},
    (3, 256): {1: 8.654, 117: 0.076}, (3, 512): {1: 8.856, 107: 0.090},
}

# Table 19 (App. N; simulated on Table 18's times): Gemma 2B, (system, served config; None = any) → (Δ_V, Δ_Seq),
# the early-exit models post-trained with aggressive 0.1 + SD. NaN-free: a Δ_Seq our text copy lost is left out (None).
TABLE19 = {
    ("vanilla_static", None): (1.00, 0.63), ("vanilla_continuous", None): (1.58, 1.00),
    ("cdb_oracle", "B=2 r=0"): (2.50, None), ("cdb_oracle", "B=2 r=64"): (1.87, None),
    ("cdb_oracle", "B=2 r=128"): (1.87, None), ("cdb_oracle", "B=2 r=256"): (1.86, None),
    ("cdb_oracle", "B=2 r=512"): (1.73, 1.10),
    ("cdb_oracle", "B=3 r=0"): (2.62, 1.66), ("cdb_oracle", "B=3 r=64"): (1.87, 1.19),
    ("cdb_oracle", "B=3 r=128"): (1.90, 1.20), ("cdb_oracle", "B=3 r=256"): (1.86, 1.18),
    ("cdb_oracle", "B=3 r=512"): (1.62, 1.03),
}

# Fig. 15 / Table 9 (§3.5, App. J): SVD beats zero init of the relaxation LoRA by up to 6.5 points (Gemma, Average,
# rank 512: 55.5 vs 49.0); Stepwise is the exception where SVD init can hurt (Gemma, TinyLlama).
FIG15_SVD_GAIN_PTS = 6.5
