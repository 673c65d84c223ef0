"""The paper's tables as DataFrames: our numbers, the paper's Δ columns, and the paper's own numbers beside them.

Each `tableN` takes what a notebook already has (`rrt.runs.run_plan`'s tables; 05's `deltas` or
`step_costs`) and returns one tidy DataFrame: one row per model (per model and loop for Tables 13, 14),
its tags, numeric metric columns, Δ columns, and `paper …` columns (NaN where the paper has no such
row, or the row is not Gemma's B=2; Tables 12 and 14 quote B=3 too). Units follow the paper: accuracy in
% (mean over the few-shot tasks we ran: the paper's "Avg", as `rrt.runs.average_accuracy`), Δ in percentage points
("pts"), throughput ratios as ×. A model run at several seeds (01: "stepwise B=2 seed=1" beside
"stepwise B=2") is one row: the mean over seeds, with the spread as its own column. A reference row
this scale lacks (no full-size run, no random init) leaves its Δ column NaN. `style` renders any of them.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from rrt.rundir import write_csv
from rrt.runs.execute import average_accuracy
from rrt.runs.store import label_of, tag_is_true
from rrt import tables_style

NAN = float("nan")

# The paper's own numbers (Bae et al. 2024, arXiv 2410.20672; Gemma 2B, 15B uptraining tokens), kept in one
# place. "PAPER.md" below marks its headline numbers (abstract, §3); "full text" an entry read from the
# table itself and checked against the Δ that table prints.
PAPER = {
    # Table 5 (PAPER.md): avg few-shot accuracy (%) at B=2; "full" / "reduced" are the baselines.
    "table5": {"full": 60.1, "reduced": 38.2, "stepwise": 51.7, "average": 46.7, "lower": 47.1, "random": 37.6},
    # Table 9, B=2, (init, LoRA rank, LoRA init): rank 0 is Table 5's rows (PAPER.md). Average r=512 SVD / zero:
    # full text (Δ +8.8 / +2.3 over 46.7); their gap is PAPER.md's "SVD beats zero by up to 6.5 points".
    "table9": {("stepwise", 0, "-"): 51.7, ("average", 0, "-"): 46.7, ("lower", 0, "-"): 47.1,
               ("average", 512, "svd"): 55.5, ("average", 512, "zero"): 49.0},
    # Table 11, Stepwise B=2, (KD loss, longer uptraining = 60B tokens): PAPER.md's FKL +1.7 and 60B +1.7;
    # RKL, JSD, TVD: full text (Δ +1.6, +1.2, +1.3 over CE).
    "table11": {("ce", False): 51.7, ("fkl", False): 53.4, ("rkl", False): 53.3, ("jsd", False): 52.9,
                ("tvd", False): 53.0, ("ce", True): 53.4},
    # Table 13 (Table 1 is four of its rows), B=2: (training, exit scheme, coefficient, self-distill, trainable,
    # data) → avg acc (%) at (loop 1, last loop). PAPER.md: aggressive 0.1 + SD 48.0 / 52.6 (+0.9); the rest:
    # full text (each last-loop value = 51.7 + the Δ printed).
    "table13": {"uptrained": (NAN, 51.7),
                ("post", "weighted", None, False, "all", "ovlp"): (49.8, 50.5),
                ("post", "aggressive", 0.3, False, "all", "ovlp"): (48.5, 52.2),
                ("post", "aggressive", 0.1, False, "all", "ovlp"): (47.1, 52.5),
                ("post", "aggressive", 0.05, False, "all", "ovlp"): (46.0, 52.6),
                ("post", "aggressive", 0.01, False, "all", "ovlp"): (42.1, 52.4),
                ("post", "weighted", None, True, "all", "ovlp"): (49.9, 50.4),
                ("post", "aggressive", 0.1, True, "all", "ovlp"): (48.0, 52.6),
                ("post", "standard", None, False, "head_lora", "ovlp"): (35.0, 51.7),
                ("post", "standard", None, True, "head_lora", "ovlp"): (35.3, 51.7),
                ("co", "aggressive", 0.1, False, "all", "ovlp"): (49.2, 50.2),
                ("post", "aggressive", 0.1, False, "all", "new"): (46.9, 52.3)},
    # Tables 12 and 14 (full text; Gemma 2B, FKL): avg acc (%) of the final models, keyed (init or baseline, B,
    # LoRA rank, stage). Stages: "15B" (CE, Tables 5 / 9), "60B" / "75B" (uptrained, + KD for the recursive and
    # reduced-size models), "post <coef>" (App. M: aggressive CE + self-distillation on 15B new tokens; "no SD":
    # the B=3 relaxed rows the paper ran without it). Each 60B row = its 15B row + the Δ Table 12 prints; B=3
    # Average r=256 and full-size 75B from Table 14.
    "table12": {("full", 1, 0, "15B"): 60.1, ("reduced", 2, 0, "15B"): 38.2, ("reduced", 3, 0, "15B"): 37.4,
                ("stepwise", 2, 0, "15B"): 51.7, ("stepwise", 3, 0, "15B"): 47.8, ("average", 2, 64, "15B"): 52.1,
                ("average", 2, 128, "15B"): 52.5, ("average", 2, 256, "15B"): 54.2, ("average", 2, 512, "15B"): 55.5,
                ("full", 1, 0, "60B"): 58.6, ("full", 1, 0, "75B"): 57.3, ("reduced", 2, 0, "60B"): 44.9,
                ("stepwise", 2, 0, "60B"): 54.9, ("average", 2, 64, "60B"): 55.8, ("average", 2, 128, "60B"): 56.6,
                ("average", 2, 256, "60B"): 57.0, ("average", 2, 512, "60B"): 58.4, ("stepwise", 3, 0, "60B"): 53.3,
                ("average", 3, 64, "60B"): 53.3, ("average", 3, 128, "60B"): 54.1, ("average", 3, 256, "60B"): 56.1,
                ("average", 3, 512, "60B"): 57.7},
    # Table 14, post-trained rows: {loop (1-based) or "last": avg acc}. Each last loop = the 60B row + the Δ
    # printed. Left out where our text copy of the table is garbled: B=2 r=256 at 0.1's loop 1, every B=3 relaxed row.
    "table14": {("stepwise", 2, 0, "post 0.1"): {1: 48.8, "last": 54.0},
                ("average", 2, 64, "post 0.1"): {1: 40.8, "last": 54.0},
                ("average", 2, 128, "post 0.1"): {1: 40.2, "last": 54.6},
                ("average", 2, 256, "post 0.1"): {"last": 55.2},
                ("average", 2, 512, "post 0.1"): {1: 41.7, "last": 56.2},
                ("average", 2, 64, "post 0.3"): {1: 43.3, "last": 53.1},
                ("average", 2, 128, "post 0.3"): {1: 43.4, "last": 53.6},
                ("average", 2, 256, "post 0.3"): {1: 43.2, "last": 54.6},
                ("average", 2, 512, "post 0.3"): {1: 44.0, "last": 55.2},
                ("stepwise", 3, 0, "post 0.1"): {1: 43.5, 2: 49.0, "last": 51.9}},
    # Table 16 (A100, prefix 512, decode 2048): Transformer-block ms per token, (loops, LoRA rank) → {batch: ms};
    # PAPER.md gives max batch 43; batch 1: full text.
    "table16": {(1, 0): {1: 21.344, 43: 0.616}, (2, 0): {1: 11.059, 43: 0.265}},
    # Table 17 (PAPER.md; simulated on A100): (system, served config; None = any) → (tokens/s, Δ_V, Δ_Seq);
    # vanilla's Δ_Seq 0.71 (= 1080 / 1528): full text.
    "table17": {("vanilla_static", None): (1080, 1.00, 0.71), ("vanilla_continuous", None): (1528, 1.41, 1.00),
                ("cdb_oracle", "B=2 r=0"): (2877, 2.66, NAN), ("cdb_oracle", "B=2 r=64"): (NAN, 2.00, NAN),
                ("cdb_oracle", "B=2 r=128"): (NAN, 1.99, NAN), ("cdb_oracle", "B=2 r=256"): (NAN, 1.78, NAN),
                ("cdb_oracle", "B=2 r=512"): (NAN, 1.59, NAN)},
}

ACC, SPREAD, PARAMS = "avg acc (%)", "acc std over seeds (pts)", "non-emb params (M)"
PAPER_ACC = "paper " + ACC


def table5(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 5 (01_init_ablation): one row per init × B and per baseline, with Δ accuracy vs full-size and vs
    random init (the paper's own Δ), and the paper's Gemma-2B B=2 accuracies (15B tokens) beside ours."""
    df = _per_model(tables)
    df[PAPER_ACC] = [PAPER["table5"].get(row.get("baseline") if row["role"] == "baseline" else row.get("init"), NAN)
                     if row.get("baseline") == "full" or _at_b2(row) else NAN for _, row in df.iterrows()]
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ acc vs full-size (pts)"] = _delta(df, col, _col(df, "baseline").eq("full"), [])
        df[f"{prefix}Δ acc vs random (pts)"] = _delta(df, col, _col(df, "init").eq("random"), ["num_blocks"])
    tags = ["model", "role", "init", "num_blocks", "seeds", PARAMS, ACC, SPREAD]
    return _select(df, tags, "Δ acc vs full-size (pts)", "Δ acc vs random (pts)")


def table9(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 9 (02_relaxation_rank_sweep): one row per init × B × LoRA rank × LoRA init (svd / zero), with Δ
    accuracy vs the same init at rank 0 (the plain recursive model) and SVD vs zero init at the same rank; the paper's
    Gemma B=2 numbers where PAPER.md gives them (rank 0; Average r=512, where SVD beats zero by 6.5 points)."""
    df = _per_model(tables)
    rank, same = pd.to_numeric(df["lora_rank"]), ["init", "num_blocks", "untie_norms"]
    df[PAPER_ACC] = [PAPER["table9"].get((row["init"], int(r), row["lora_init"]), NAN)
                     if _at_b2(row) and not tag_is_true(row.get("untie_norms")) else NAN
                     for r, (_, row) in zip(rank, df.iterrows())]
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ acc vs rank 0 (pts)"] = _delta(df, col, rank.eq(0), same)
        df[f"{prefix}Δ acc SVD vs zero (pts)"] = _delta(df, col, df["lora_init"].eq("zero"),
                                                        same + ["lora_rank"]).where(df["lora_init"].eq("svd"))
    return _select(df, ["model", "init", "num_blocks", "lora_rank", "lora_init", "untie_norms", PARAMS, ACC],
                   "Δ acc vs rank 0 (pts)", "Δ acc SVD vs zero (pts)")


def table11(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 11 (03_distillation): one row per model × KD loss × uptraining length, with Δ accuracy vs CE at the same
    steps (the KD gain) and vs the same loss at the shortest steps (the longer-uptraining gain); the paper's
    Stepwise B=2 numbers (FKL +1.7, 60B tokens +1.7; RKL/JSD/TVD) on the matching rows. Final models: `table12`."""
    df = _not_final(_per_model(tables))
    steps, study = pd.to_numeric(_col(df, "uptrain_steps")), df["role"].eq("study")
    shortest = study & steps.eq(steps[study].min())
    longer = study & ~shortest
    df[PAPER_ACC] = [PAPER["table11"].get((row.get("kd"), bool(long)), NAN)
                     if row.get("init") == "stepwise" and _num(row.get("lora_rank")) == 0 and _at_b2(row) else NAN
                     for long, (_, row) in zip(longer, df.iterrows())]
    model = ["init", "num_blocks", "lora_rank"]
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ acc vs CE (pts)"] = _delta(df, col, _col(df, "kd").eq("ce"), model + ["uptrain_steps"])
        df[f"{prefix}Δ acc vs shortest (pts)"] = _delta(df, col, shortest, model + ["kd"]).where(longer)
    return _select(df, ["model", "role", "init", "num_blocks", "lora_rank", "kd", "uptrain_steps", PARAMS, ACC],
                   "Δ acc vs CE (pts)", "Δ acc vs shortest (pts)")


def table13(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 13 (04_early_exit): one row per early-exit run and loop (static exiting at that loop; `loop` is the
    1-based label, `loop_idx` the 0-based index), the uptrained model first, with Δ accuracy vs the uptrained model
    at the same loop; the paper's B=2 numbers at loop 1 and the last loop (aggressive 0.1 + SD: 48.0, 52.6, +0.9).
    App. M's final models: `table14`."""
    df = _not_final(_per_model(tables, per_loop=True))
    df = df[df["loop_idx"].notna()].astype({"loop_idx": int}).reset_index(drop=True)  # a run with no metrics
    one_pass = pd.to_numeric(df["num_blocks"], errors="coerce").eq(1)  # the full-size reference: no loops
    df["loop"] = np.where(one_pass, "one pass", "loop " + (df["loop_idx"] + 1).astype(str))
    last = df["loop_idx"].eq(df.groupby("model")["loop_idx"].transform("max"))
    up = df["role"].eq("uptrained")
    pairs = [PAPER["table13"].get("uptrained" if u else _recipe(row)) if _at_b2(row) else None  # (loop 1, last)
             for u, (_, row) in zip(up, df.iterrows())]
    df[PAPER_ACC] = [p[1] if p and is_last else p[0] if p and b == 0 else NAN
                     for p, is_last, b in zip(pairs, last, df["loop_idx"])]
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ acc vs uptrained (pts)"] = _delta(df, col, up, ["num_blocks", "loop_idx"])
    tags = ["model", "role", "num_blocks", *RECIPE, "loop", "loop_idx", PARAMS, ACC]
    return _select(df, tags, "Δ acc vs uptrained (pts)")


def table1(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 1 (04_early_exit, §3.7): the uptrained model vs Table 1's early-exit recipes, one row each: post-training
    all weights on overlapping data with weighted or aggressive CE (every coefficient run; Table 1 shows 0.1), with
    and without self-distillation; accuracy at loop 1 and the last loop, Δ vs the uptrained model, and the paper's
    numbers beside them (PAPER.md gives only the chosen recipe, aggressive 0.1 + SD: 48.0 / 52.6, +0.9; the other
    rows are read from Table 1 / 13). Middle loops (B > 2) are in `table13`."""
    t = table13(tables)
    keep = t["role"].eq("uptrained") | (t["training"].eq("post") & t["trainable"].eq("all") & t["data"].eq("ovlp"))
    t = t[keep]
    first = t[t["loop_idx"].eq(0)].set_index("model")
    last = t[t["loop_idx"].eq(t.groupby("model")["loop_idx"].transform("max"))].set_index("model")
    out = first[["role", "num_blocks", *RECIPE[:4]]].copy()
    for name, rows in (("loop 1", first), ("last loop", last)):
        out[f"acc {name} (%)"] = rows[ACC]
        out[f"Δ {name} vs uptrained (pts)"] = rows["Δ acc vs uptrained (pts)"]
    for name, rows in (("loop 1", first), ("last loop", last)):
        out[f"paper acc {name} (%)"] = rows[PAPER_ACC]
    out["paper Δ last loop vs uptrained (pts)"] = last["paper Δ acc vs uptrained (pts)"]
    return out.reset_index()


def table12(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 12 (03_distillation): the final models (tag `final`: 60B tokens + FKL; full-size 60B / 75B CE, or the
    original checkpoint) beside the 15B rows: baselines and the CE recursive models at the shortest steps. Per row:
    held-out perplexity, each task's accuracy, the average, non-embedding parameters, and Δ = a final recursive
    model vs its 15B CE counterpart (same init, B, rank; NaN where none ran, as the paper's Gemma B=3 relaxed
    rows; the paper gives baselines none); the paper's Gemma numbers beside ours."""
    df = _with_tasks(_per_model(tables), tables["accuracy"])
    final, steps = _col(df, "final").map(tag_is_true), pd.to_numeric(_col(df, "uptrain_steps"))
    baseline = _col(df, "baseline").notna()  # full-size (uptrained, or the original: role "pretrained"), reduced-size
    study = ~baseline & ~final
    fifteen = study & _col(df, "kd").isin(["ce", NAN]) & steps.eq(steps[study].min())
    order = 2 * ~baseline + final  # baselines, then recursive models; 15B rows before final ones
    df = df[final | fifteen | baseline].assign(order=order).sort_values("order", kind="stable")
    df = df.drop(columns="order").reset_index(drop=True)
    final = _col(df, "final").map(tag_is_true)
    df[PAPER_ACC] = [PAPER["table12"].get(k, NAN) for k in _final_keys(df)]
    recursive = final & _col(df, "init").notna()
    is_ref = ~final & _col(df, "init").notna()
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ acc vs 15B (pts)"] = _delta(df, col, is_ref, FINAL_MODEL).where(recursive)
    tags = ["model", "role", "baseline", "init", "num_blocks", "lora_rank", "kd", "uptrain_steps", "final", PARAMS,
            *_task_columns(df), ACC]
    return _select(df, tags, "Δ acc vs 15B (pts)")


def table14(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Tables 14 / 15 (04_early_exit, App. M): the final models (tag `final`) before and after early-exit
    post-training, one row per model and loop (static exiting; `loop` 1-based), the full-size references first.
    Per row: held-out perplexity, each task's accuracy, the average; Δ = the last loop vs the same model before
    post-training, and the full-size 75B vs 60B (the paper's yardstick for those drops); the paper's Gemma numbers."""
    df = _with_tasks(_per_model(tables, per_loop=True), tables["accuracy"], per_loop=True)
    df = df[_col(df, "final").map(tag_is_true) & df["loop_idx"].notna()].astype({"loop_idx": int})
    df = df.assign(order=_col(df, "baseline").isna()).sort_values("order", kind="stable")
    df = df.drop(columns="order").reset_index(drop=True)
    one_pass = pd.to_numeric(df["num_blocks"], errors="coerce").eq(1)  # the full-size reference: no loops
    df["loop"] = np.where(one_pass, "one pass", "loop " + (df["loop_idx"] + 1).astype(str))
    last = df["loop_idx"].eq(df.groupby("model")["loop_idx"].transform("max"))
    post = _col(df, "training").eq("post")
    before = ~post & _col(df, "init").notna() & last
    keys = _final_keys(df)
    df[PAPER_ACC] = [PAPER["table14"].get(k, {}).get("last" if is_last else b + 1, NAN) if k[3].startswith("post")
                     else PAPER["table12"].get(k, NAN) if is_last else NAN
                     for k, is_last, b in zip(keys, last, df["loop_idx"])]
    stage = pd.Series([k[3] for k in keys], index=df.index)
    for prefix, col in (("", ACC), ("paper ", PAPER_ACC)):
        df[f"{prefix}Δ last loop vs before (pts)"] = _delta(df, col, before, FINAL_MODEL).where(post & last)
        df[f"{prefix}Δ 75B vs 60B (pts)"] = _delta(df, col, stage.eq("60B") & _col(df, "baseline").eq("full"),
                                                   ["baseline"]).where(stage.eq("75B"))
    tags = ["model", "role", "baseline", "init", "num_blocks", "lora_rank", "uptrain_steps", *RECIPE[:4], "data",
            "loop", "loop_idx", PARAMS, *_task_columns(df), ACC]
    return _select(df, tags, "Δ last loop vs before (pts)", "Δ 75B vs 60B (pts)")


def table17(deltas: pd.DataFrame) -> pd.DataFrame:
    """Tables 17/19 (05_throughput): per served model and system, measured tokens/s (median, min, max), Δ_V (× vanilla
    static batching) and Δ_Seq (× vanilla continuous sequence-wise batching); the paper's simulated Gemma numbers
    beside the matching systems (its simulation skipped exited tokens' KV compute: nearest our `copy_kv`)."""
    names = {"tokens_per_s": "tokens/s", "tokens_per_s_min": "tokens/s min", "tokens_per_s_max": "tokens/s max",
             "delta_v": "Δ_V (×)", "delta_seq": "Δ_Seq (×)", "delta_seq_bound": "Δ_Seq at the bounds (×)",
             "delta_seq_rows": "Δ_Seq in layer rows (×)", "delta_seq_decode": "Δ_Seq decode only (×)",
             "delta_seq_decode_rows": "Δ_Seq decode only in layer rows (×)", "max_active": "batch",
             "mean_loops_per_token": "mean loops/token",
             "real_over_bound": "real / bound"}
    df = deltas.rename(columns=names)
    if {"exit_policy", "kv_policy"} <= set(df):  # nothing exits: no KV policy applies
        df.loc[df["exit_policy"] == "none", "kv_policy"] = "-"
    paper = [PAPER["table17"].get((s, c), PAPER["table17"].get((s, None), (NAN,) * 3))
             for s, c in zip(df["system"], df["config"])]
    for i, col in enumerate(("paper tokens/s", "paper Δ_V (×)", "paper Δ_Seq (×)")):
        df[col] = [p[i] for p in paper]
    cols = ["shape", "config", "system", "exit_policy", "kv_policy", *names.values(), "paper tokens/s", "paper Δ_V (×)",
            "paper Δ_Seq (×)"]
    return df[[c for c in cols if c in df]].reset_index(drop=True)


def table16(step_costs: pd.DataFrame) -> pd.DataFrame:
    """Table 16 (05_throughput): per served config, model and batch size (rows in one call), the per-token
    Transformer-block and LM-head time (a token passes the block B times) and the block time × vanilla's at the same
    batch; the paper's Gemma-2B A100 times at batch 1 and at the max batch (ours: the largest that fits the cap)."""
    df = step_costs.copy()
    shape = [_shape(m) for m in df["model"]]
    loops = pd.Series([b for b, _ in shape], index=df.index)
    df["block ms/token"] = 1000 * df["block_s"] * loops / df["rows"]
    df["head ms/token"] = 1000 * df["head_s"] / df["rows"]
    vanilla = df["model"].eq("vanilla")
    df["block time × vanilla"] = df["block ms/token"] / _reference(df, "block ms/token", vanilla,
                                                                  [k for k in ("shape", "config", "rows") if k in df])
    fits = df["fits"].astype(bool) if "fits" in df else pd.Series(True, index=df.index)
    top = df["rows"].where(fits).groupby([df[k] for k in ("shape", "config", "model") if k in df]).transform("max")
    batch = np.where(df["rows"].eq(1), 1, np.where(df["rows"].eq(top), 43, NAN))  # the paper's max batch: 43
    df["paper block ms/token"] = [PAPER["table16"].get(s, {}).get(b, NAN) for s, b in zip(shape, batch)]
    df["paper batch size"] = pd.Series(batch, index=df.index).where(df["paper block ms/token"].notna())
    vanilla_ms = df["paper batch size"].map(PAPER["table16"][(1, 0)])
    df["paper block time × vanilla"] = df["paper block ms/token"] / vanilla_ms
    cols = ["shape", "config", "model", "rows", "fits", "block ms/token", "head ms/token", "block time × vanilla",
            "paper batch size", "paper block ms/token", "paper block time × vanilla"]
    return df[[c for c in cols if c in df]].rename(columns={"rows": "batch size"}).reset_index(drop=True)


def save(df: pd.DataFrame, run_dir, name: str, caption: str):
    """Write `df` as <run_dir>/tables/<name>.csv (the source a reader checks) and return its `style` for the notebook."""
    from pathlib import Path

    out = Path(run_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}.csv", df)
    return style(df, caption)


def style(df: pd.DataFrame, caption: str | None = None):
    """Return a Styler for a notebook (`rrt.tables_style.style`): the paper's precision per column kind, NaN as a grey
    "–", Δ columns coloured by sign only beyond float noise, and `caption` (name the paper table and our scale, e.g.
    "Table 5 at the cpu scale: SmolLM2-135M, 10 steps")."""
    return tables_style.style(df, caption)


# ---------------------------------------------------------------- helpers

RECIPE = ["training", "exit_scheme", "exit_coefficient", "self_distill", "trainable", "data"]  # 04's tags
FINAL_MODEL = ["init", "num_blocks", "lora_rank"]  # what a final model shares with its 15B / pre-post-training self


def _per_model(tables: dict, *, per_loop: bool = False) -> pd.DataFrame:
    """One row per model (and loop): its tags, and the mean over seeds of avg accuracy (%), per-corpus perplexity
    ("ppl <corpus>") and non-embedding parameters (M); `seeds` and the accuracy's std over seeds (pts)."""
    runs = tables["runs"].copy()
    runs["model"] = runs["run"].map(label_of)
    if "non_embedding" in runs:
        runs[PARAMS] = runs["non_embedding"] / 1e6
    keys = ["run", "loop_idx"] if per_loop else ["run"]
    acc = average_accuracy(tables["accuracy"])  # the paper's "Avg": mean over tasks
    acc = acc.assign(**{ACC: 100 * acc.pop("avg_accuracy")})
    ppl = tables["perplexity"]
    if len(ppl):
        ppl = ppl.assign(column="ppl " + ppl["corpus"]).pivot_table(index=keys, columns="column",
                                                                     values="perplexity").reset_index()
        ppl.columns.name = None
        on = keys if set(keys) <= set(acc) else ["run"]  # per loop, unless accuracy was not evaluated per loop
        metrics = ppl.merge(acc, on=on, how="outer")
    else:
        metrics = acc if set(keys) <= set(acc) else acc.assign(loop_idx=NAN)
    df = runs.drop(columns=[c for c in keys[1:] if c in runs]).merge(metrics, on="run", how="left")
    group = ["model", *keys[1:]]
    numeric = [c for c in df if c == ACC or c == PARAMS or c.startswith("ppl ")]
    by = df.groupby(group, sort=False, dropna=False)
    out = by.first()
    out[numeric] = by[numeric].mean()
    out[SPREAD] = by[ACC].std()
    out["seeds"] = by["run"].count()
    return out.reset_index().reindex(columns=list(dict.fromkeys([*df.columns, ACC, SPREAD, "seeds"])))


def _with_tasks(df: pd.DataFrame, accuracy: pd.DataFrame, *, per_loop: bool = False) -> pd.DataFrame:
    """`df` (one row per model, and loop) with "acc <task> (%)": each task's accuracy, mean over seeds."""
    if accuracy.empty:
        return df
    keys = ["model", "loop_idx"] if per_loop and accuracy["loop_idx"].notna().any() else ["model"]
    acc = accuracy.assign(model=accuracy["run"].map(label_of), column="acc " + accuracy["task"] + " (%)",
                          value=100 * accuracy["value"])
    wide = acc.pivot_table(index=keys, columns="column", values="value", sort=False).reset_index()
    wide.columns.name = None
    return df.merge(wide.astype({k: df[k].dtype for k in keys[1:]}), on=keys, how="left")


def _not_final(df: pd.DataFrame) -> pd.DataFrame:
    return df[~_col(df, "final").map(tag_is_true)].reset_index(drop=True)


def _task_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df if c.startswith("acc ") and c.endswith(" (%)")]


def _final_keys(df: pd.DataFrame) -> list[tuple]:
    """Each row's key of PAPER["table12"] / ["table14"]: (init or baseline, B, LoRA rank, stage), stage "15B"
    (not final), "60B", "75B" (a full-size run uptrained longer than the final recursive models), "pretrained"
    (the original checkpoint) or "post <coef>" (+ " no SD" without self-distillation)."""
    final, steps = _col(df, "final").map(tag_is_true), pd.to_numeric(_col(df, "uptrain_steps"))
    full = _col(df, "baseline").eq("full")
    own = steps[final & ~full].min()  # the final models' uptraining
    own = steps[final & full].min() if np.isnan(own) else own
    keys = []
    for (_, row), is_final, n in zip(df.iterrows(), final, steps):
        kind = row.get("baseline") if isinstance(row.get("baseline"), str) else row.get("init")
        b, rank = _num(row.get("num_blocks")), _num(row.get("lora_rank"))
        keys.append((kind, 1 if kind == "full" or np.isnan(b) else int(b), 0 if np.isnan(rank) else int(rank),
                     _stage(row, is_final, longer=kind == "full" and n > own)))
    return keys


def _stage(row, is_final: bool, longer: bool) -> str:
    if not is_final:
        return "15B"
    if tag_is_true(row.get("pretrained")):
        return "pretrained"
    if row.get("training") == "post":
        sd = tag_is_true(row.get("self_distill"))
        return f"post {_num(row.get('exit_coefficient')):g}" + ("" if sd else " no SD")
    return "75B" if longer else "60B"


def _select(df: pd.DataFrame, tags: list, *deltas: str) -> pd.DataFrame:
    """The table's columns: tags and our metrics, perplexities, our Δs, then the paper's accuracy and Δs."""
    ppl = [c for c in df if c.startswith("ppl ")]
    return df.reindex(columns=[*tags, *ppl, *deltas, PAPER_ACC, *[f"paper {d}" for d in deltas]])


def _reference(df: pd.DataFrame, col: str, is_ref: pd.Series, on: list) -> pd.Series:
    """Per row, `col` of the reference row (is_ref) with the same values of `on`; NaN where there is none."""
    keys = pd.Series(["|".join(map(str, v)) for v in zip(*(_col(df, c) for c in on))] if on else "", index=df.index)
    is_ref = is_ref.fillna(False).astype(bool)
    return keys.map(df.loc[is_ref, col].groupby(keys[is_ref]).first()).astype(float)


def _delta(df, col, is_ref, on) -> pd.Series:
    return df[col] - _reference(df, col, is_ref, on)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(NAN, index=df.index, dtype=object)


def _num(value) -> float:
    """A tag as a number (CSV round trips turn 2 into 2.0 or "2"); NaN where it is none."""
    return pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]


def _at_b2(row) -> bool:
    """Whether a model has the paper's B=2 (the paper's Gemma rows we quote are all B=2)."""
    return _num(row.get("num_blocks")) == 2


def _recipe(row) -> tuple:
    """04's recipe tags as a key of PAPER["table13"] (exit_coefficient "-" → None, self_distill → bool)."""
    coef = _num(row.get("exit_coefficient"))
    return (row.get("training"), row.get("exit_scheme"), None if np.isnan(coef) else float(coef),
            tag_is_true(row.get("self_distill")), row.get("trainable"), row.get("data"))


def _shape(model: str) -> tuple[int, int]:
    """(loops, LoRA rank) of a step-costs model name: "vanilla" → (1, 0), "recursive B=2 r=64" → (2, 64)."""
    found = re.search(r"B=(\d+) r=(\d+)", model)
    return (int(found[1]), int(found[2])) if found else (1, 0)
