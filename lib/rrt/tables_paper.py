"""Tables 3, 8, 15, 18 and 19 as DataFrames: ours where the scale measures them, the paper's numbers beside them.

Where a table needs data this scale (or this project) does not produce (Table 3: the pretrained model's own
evaluation; Table 8: per-module LoRA ranks; Tables 18/19: the 64/256 workload), the table is still rendered:
the paper's rows, our columns empty, and the `note` column saying what was not measured and why. `save` puts that
note in the caption as well. Tables 5, 9, 11–14, 16, 17 are `rrt.tables`.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from rrt import paper, tables as T
from rrt.runs.store import label_of, tag_is_true

NAN = float("nan")
NOTE = "note"
NOT_MEASURED = "not measured at this scale"
ACC, PARAMS, PAPER_ACC = T.ACC, T.PARAMS, T.PAPER_ACC


def save(df: pd.DataFrame, run_dir, name: str, caption: str):
    """`rrt.tables.save`, with the table's "not measured" note appended to the caption when no row was measured."""
    notes = df[NOTE].dropna().unique() if NOTE in df else []
    if len(notes) and not measured(df):
        caption = f"{caption} — {NOT_MEASURED.upper()}: {notes[0].split(': ', 1)[-1]}"
    return T.save(df, run_dir, name, caption)


def measured(df: pd.DataFrame) -> bool:
    """Whether any row of a paper table holds our own numbers (`source` "ours")."""
    return "source" in df and df["source"].eq("ours").any()


def table3(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 3 (App. F): few-shot accuracy (%) of the pretrained models per task and their average: ours for runs
    with role / tag `pretrained` (the original checkpoint, evaluated as is), the paper's Gemma 2B, TinyLlama (105B)
    and Pythia 1B below."""
    runs = tables["runs"]
    pre = runs[runs.get("role", pd.Series(dtype=object)).eq("pretrained")
               | runs.get("pretrained", pd.Series(False, index=runs.index)).map(tag_is_true)] if len(runs) else runs
    acc = tables["accuracy"]
    ours = []
    if len(pre) and len(acc):
        a = acc[acc["run"].isin(pre["run"]) & acc["loop_idx"].isna()]
        for run, rows in a.groupby("run", sort=False):
            per_task = rows.groupby("task")["value"].mean() * 100
            size = pre.loc[pre["run"] == run, "non_embedding"].iloc[0] / 1e6 if "non_embedding" in pre else NAN
            ours.append({"source": "ours", "model": label_of(run), PARAMS: size,
                         **{f"acc {t} (%)": per_task.get(t, NAN) for t in paper.TASKS}, ACC: per_task.mean()})
    why = (f"{NOT_MEASURED}: no pretrained (unconverted, not uptrained) model is evaluated in this plan; the nearest "
           "row is the full-size baseline uptrained on the same tokens (Table 5)")
    rows = [{"source": "paper", "model": name, PARAMS: p["n_emb_b"] * 1e3,
             **{f"acc {t} (%)": v for t, v in zip(paper.TASKS, p["acc"])}, ACC: p["avg"]}
            for name, p in paper.TABLE3.items()]
    df = pd.DataFrame(ours + rows)
    return df.assign(**{NOTE: NAN if ours else why})


def table8(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 8 (App. J): relaxed models by LoRA rank per module (q, kv, out, FFN): ours are 02's SVD-initialised relaxed
    models (tag `module_ranks` "q/kv/o/mlp" for `module_rank_sets`' runs, the uniform `lora_ranks` ones with that rank
    in every module), the paper's Gemma Average B=2 rows below (SlimPajama perplexity, average accuracy)."""
    t9 = T.table9(tables)
    runs = tables["runs"]
    sets = (runs.assign(model=runs["run"].map(label_of)).groupby("model")["module_ranks"].first()
            if "module_ranks" in runs else pd.Series(dtype=object))
    ppl = [c for c in t9 if c.startswith("ppl ")]
    mine = t9[pd.to_numeric(t9["lora_rank"], errors="coerce").gt(0) & t9["lora_init"].eq("svd")]
    ours = []
    for _, r in mine.iterrows():
        per_module = sets.get(r["model"])
        ranks = ([int(x) for x in str(per_module).split("/")] if isinstance(per_module, str)
                 else [int(float(r["lora_rank"]))] * 4)
        ours.append({"source": "ours", "model": r["model"], "init": r["init"], "num_blocks": r["num_blocks"],
                     **dict(zip(MODULES, ranks)), PARAMS: r[PARAMS], **{c: r[c] for c in ppl}, ACC: r[ACC]})
    rows = [{"source": "paper", "model": "Gemma 2B, Average B=2, SVD", "init": "average", "num_blocks": 2,
             **dict(zip(MODULES, ranks)), PARAMS: n * 1e3, "paper ppl SlimPajama": p, ACC: a}
            for ranks, (n, p, a) in paper.TABLE8.items()]
    df = pd.DataFrame(ours + rows)
    varied = df["source"].eq("ours") & df[list(MODULES)].nunique(axis=1).gt(1)
    why = (NAN if varied.any() else
           f"{NOT_MEASURED}: per-module ranks (module_rank_sets is empty at this scale); our rows are the uniform-rank "
           "relaxed models" if ours else f"{NOT_MEASURED}: no SVD-initialised relaxed model (lora_ranks > 0) in this plan")
    return df.assign(**{NOTE: why})


MODULES = ("rank q", "rank kv", "rank out", "rank FFN")  # Table 8's columns; our tag's order (q, kv, o, mlp)


def table15(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table 15 (App. M): Table 14's rows (the final models before and after early-exit post-training, every loop)
    with the paper's TinyLlama 1.1B numbers on the last loop beside ours instead of Gemma's."""
    t14 = T.table14(tables)
    gemma = [c for c in t14 if c.startswith("paper ")]
    if t14.empty:
        rows = [{"source": "paper", "model": f"TinyLlama 1.1B: {kind} B={b} r={r}, {stage}", "loop": "last loop",
                 "paper TinyLlama avg acc (%)": v} for (kind, b, r, stage), v in paper.TABLE15.items()]
        why = (f"{NOT_MEASURED}: no final models (tag `final`: 03's long uptraining + KD, then 04's post-training) "
               "in this plan")
        return pd.DataFrame(rows).assign(**{NOTE: why})
    df = t14.drop(columns=gemma).assign(source="ours")
    last = df["loop_idx"].eq(df.groupby("model")["loop_idx"].transform("max"))
    keys = [_key15(row) for _, row in df.iterrows()]
    df["paper TinyLlama avg acc (%)"] = [paper.TABLE15.get(k, NAN) if is_last else NAN for k, is_last in zip(keys, last)]
    before = [paper.TABLE15.get((k[0], k[1], k[2], "60B"), NAN) if k[3].startswith("post") else NAN for k in keys]
    df["paper TinyLlama Δ last loop vs before (pts)"] = df["paper TinyLlama avg acc (%)"] - np.array(before, float)
    return df.assign(**{NOTE: NAN})


def table18(step_costs: pd.DataFrame, *, shapes=((64, 256),)) -> pd.DataFrame:
    """Table 18 (App. N): Table 16's per-token block times measured on the 64/256 workload under the memory cap, with
    the paper's Gemma 2B A100 times (16 GB cap) at batch 1 and at the largest batch that fits."""
    costs = _at_shape(step_costs, "64/256", shapes)
    if costs is None or costs.empty:
        rows = [{"source": "paper", "model": _model_name(loops, rank), "paper batch size": b, "paper block ms/token": ms}
                for (loops, rank), times in paper.TABLE18.items() for b, ms in times.items()]
        why = f"{NOT_MEASURED}: the 64/256 workload is not in this study's shapes ({', '.join(f'{p}/{d}' for p, d in shapes)})"
        return pd.DataFrame(rows).assign(**{NOTE: why})
    df = T.table16(costs).drop(columns=["paper batch size", "paper block ms/token", "paper block time × vanilla"],
                               errors="ignore")
    shape = [_loops_rank(m) for m in df["model"]]
    fits = df["fits"].astype(bool) if "fits" in df else pd.Series(True, index=df.index)
    keys = [df[k] for k in ("shape", "config", "model") if k in df]
    top = df["batch size"].where(fits).groupby(keys).transform("max")
    batch = []
    for s, n, t in zip(shape, df["batch size"], top):
        times = paper.TABLE18.get(s, {})
        batch.append(1 if n == 1 and times else max(times) if n == t and times else NAN)
    df["paper batch size"] = batch
    df["paper block ms/token"] = [paper.TABLE18.get(s, {}).get(b, NAN) for s, b in zip(shape, batch)]
    v = paper.TABLE18[(1, 0)]
    vanilla = {1: v[1], "max": v[max(v)]}  # the paper's vanilla at batch 1 and at its own largest batch
    df["paper block time × vanilla"] = [ms / (vanilla[1] if b == 1 else vanilla["max"]) for ms, b in
                                        zip(df["paper block ms/token"], batch)]
    return df.assign(source="ours", **{NOTE: NAN})


def table19(deltas: pd.DataFrame, *, shapes=((64, 256),)) -> pd.DataFrame:
    """Table 19 (App. N): Table 17's measured tokens/s, Δ_V and Δ_Seq on the 64/256 workload, with the paper's
    simulated Gemma 2B Δs on the same workload (Table 18's times) beside the matching systems."""
    d = _at_shape(deltas, "64/256", shapes)
    if d is None or d.empty:
        rows = [{"source": "paper", "system": s, "config": c or "any", "paper Δ_V (×)": dv,
                 "paper Δ_Seq (×)": NAN if ds is None else ds} for (s, c), (dv, ds) in paper.TABLE19.items()]
        why = f"{NOT_MEASURED}: the 64/256 workload is not in this study's shapes ({', '.join(f'{p}/{d}' for p, d in shapes)})"
        return pd.DataFrame(rows).assign(**{NOTE: why})
    df = T.table17(d).drop(columns=["paper tokens/s", "paper Δ_V (×)", "paper Δ_Seq (×)"], errors="ignore")
    ref = [paper.TABLE19.get((s, c), paper.TABLE19.get((s, None), (NAN, None))) for s, c in zip(df["system"], df["config"])]
    df["paper Δ_V (×)"] = [dv for dv, _ in ref]
    df["paper Δ_Seq (×)"] = [NAN if ds is None else ds for _, ds in ref]
    return df.assign(source="ours", **{NOTE: NAN})


# ---------------------------------------------------------------- helpers

def _at_shape(df: pd.DataFrame, shape: str, shapes) -> pd.DataFrame | None:
    """The rows of workload `shape` ("64/256"): by the `shape` column, or all rows when the study ran only that one."""
    if "shape" in df:
        return df[df["shape"].astype(str).eq(shape)]
    ran = [f"{p}/{d}" for p, d in shapes]
    return df if ran == [shape] else None


def _loops_rank(model: str) -> tuple[int, int]:
    found = re.search(r"B=(\d+) r=(\d+)", str(model))
    return (int(found[1]), int(found[2])) if found else (1, 0)


def _model_name(loops: int, rank: int) -> str:
    return "vanilla" if loops == 1 else f"recursive B={loops} r={rank}"


def _key15(row) -> tuple:
    """A Table 14 row's key of paper.TABLE15: (init or baseline, B, LoRA rank, stage)."""
    kind = row.get("baseline") if isinstance(row.get("baseline"), str) else row.get("init")
    b = pd.to_numeric(pd.Series([row.get("num_blocks")]), errors="coerce").iloc[0]
    r = pd.to_numeric(pd.Series([row.get("lora_rank")]), errors="coerce").iloc[0]
    if row.get("training") == "post":
        stage = f"post {float(row.get('exit_coefficient')):g}"
    else:
        stage = "pretrained" if row.get("role") == "pretrained" else "60B"
    return (kind, 1 if kind == "full" or np.isnan(b) else int(b), 0 if np.isnan(r) else int(r), stage)
