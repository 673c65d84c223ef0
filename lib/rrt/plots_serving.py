"""05_throughput's figures (Fig. 8, Tables 16–18) and 00_explore's heatmap; import them from `rrt.plots`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from rrt.plots_base import (GOLD_LABEL, MIN_LINE_POINTS, Plot, figure, log_axis, palette, paper_scale, scored_caption,
                            table_only, title)

# Systems that serve the unconverted model: measured once per served config, drawn once (the first config's).
VANILLA = ("hf_generate_static", "vanilla_static", "vanilla_continuous")
KV_MARKERS = {"propagate": "o", "copy_kv": "s"}


def throughput(points: pd.DataFrame, *, study, chance: float | None = None,
               what: str = "Throughput vs accuracy (Fig. 8)") -> Plot:
    """Fig. 8: accuracy (± stderr) against measured throughput / vanilla static batching (min–max over
    repeats); one colour per system (vanilla systems drawn once), one marker per KV policy; dashed:
    vanilla static (x = 1) and chance accuracy. Below paper scale, where the points have it, the gold
    answer's log-likelihood (± stderr) instead of accuracy (accuracy stays in the table); a computed caption."""
    df = _vanilla_once(points.dropna(subset=["avg_accuracy"]), key="system")
    label = np.where(df["system"].isin(VANILLA), df["system"],
                     df["system"] + " (" + df["config"] + ", " + df["exit_policy"] + ")") + _shape_label(df)
    gold = [c for c in ("gold_ll", "gold_ll_stderr") if c in df]
    table = df.assign(label=label)[["label", "config", "system", "exit_policy", "kv_policy", "delta_v", "delta_v_min",
                                    "delta_v_max", "avg_accuracy", "accuracy_stderr", *gold]].reset_index(drop=True)
    if len(table) < 2:
        return table_only("throughput", table, "one system only: nothing to compare")
    plots_gold = not paper_scale(study) and bool(gold) and table["gold_ll"].notna().all()
    y, y_err = ("gold_ll", "gold_ll_stderr") if plots_gold else ("avg_accuracy", "accuracy_stderr")
    colours = palette(table["label"])
    fig, axes = figure(7.4, 3.8)
    ax = axes[0][0]
    for row in table.itertuples():
        xerr = [[row.delta_v - row.delta_v_min], [row.delta_v_max - row.delta_v]]
        ax.errorbar(row.delta_v, getattr(row, y), xerr=xerr, yerr=getattr(row, y_err),
                    fmt=KV_MARKERS.get(row.kv_policy, "D"), color=colours[row.label], ms=6, capsize=2, lw=0.8,
                    label=row.label if row.exit_policy == "none" else f"{row.label}, KV {row.kv_policy}")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--", label="vanilla static batching")
    if chance is not None and not plots_gold:
        ax.axhline(chance, color="black", lw=1, ls="--", label="chance")
    ax.set(xlabel="throughput / vanilla static batching (measured, min–max over repeats)",
           ylabel=GOLD_LABEL.replace(" (", " as served\n(") if plots_gold
           else "few-shot accuracy as served")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    scored = ": the gold answer's log-likelihood ± stderr (accuracy in the table)" if plots_gold else " ± stderr"
    fig.suptitle(title(study, what + scored, where=" + ".join(study.corpora)), fontsize=9)
    return Plot("throughput", table, fig, caption=_throughput_caption(table, study, chance, plots_gold))


def _throughput_caption(table: pd.DataFrame, study, chance, plots_gold: bool) -> str:
    """Fig. 8's computed caption (`scored_caption`): whether the served models' scores (y) differ beyond their error
    bars."""
    marks = table.assign(panel="", label=table["label"] + " [KV " + table["kv_policy"] + "]")
    accs = marks.assign(value=marks["avg_accuracy"], error=marks["accuracy_stderr"])
    scores = marks.assign(value=marks["gold_ll"], error=marks["gold_ll_stderr"]) if plots_gold else accs
    return scored_caption(scores, accs, chance=chance, study=study, gold=plots_gold, who="system")


def step_costs(costs: pd.DataFrame, *, study, what: str = "Time per token by batch size (Tables 16, 18)") -> Plot:
    """Tables 16 / 18: ms per token through every loop (block × B + LM head, per row) against rows per
    call, one line per model (vanilla once), log–log with plain-number ticks."""
    df = _vanilla_once(costs, key="model")
    loops = df["model"].str.extract(r"B=(\d+)")[0].fillna("1").astype(int)
    df = df.assign(ms_per_token=1e3 * (df["block_s"] * loops + df["head_s"]) / df["rows"],
                   model=df["model"] + _shape_label(df))
    table = df[["model", "rows", "ms_per_token"]].reset_index(drop=True)
    if table["rows"].nunique() < MIN_LINE_POINTS:
        return table_only("step_costs", table, f"fewer than {MIN_LINE_POINTS} batch sizes: no curve")
    colours = palette(table["model"])
    fig, axes = figure(6.4, 3.6)
    ax = axes[0][0]
    for model, d in table.groupby("model", sort=False):
        ax.plot(d["rows"], d["ms_per_token"], marker="o", ms=4, color=colours[model], label=model)
    ax.set(xlabel="rows per call (batch size)", ylabel="ms per token (all loops + LM head, log)")
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, what, where=" + ".join(study.corpora)), fontsize=9)
    return Plot("step_costs", table, fig)


def real_over_bound(df: pd.DataFrame, *, study, what: str = "Measured throughput / the engine's own bound") -> Plot:
    """One bar per system and KV policy (vanilla systems once): measured / bound, with the 0.9 target dashed."""
    d = _vanilla_once(df, key="system")
    d = d.assign(label=np.where(d["system"].isin(VANILLA), d["system"], d["system"] + " (" + d["config"] + ")")
                 + " [KV " + d["kv_policy"] + "]" + _shape_label(d))
    table = d[["label", "config", "system", "kv_policy", "real_over_bound"]].reset_index(drop=True)
    colours = palette(table["system"])
    fig, axes = figure(6.4, 1.0 + 0.28 * len(table))
    ax = axes[0][0]
    values = table["real_over_bound"]
    ax.barh(range(len(table)), values, color=[colours[s] for s in table["system"]])
    for i, v in enumerate(values):  # the value at each bar's end: above 1 the sweep priced calls above the run's
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=6)
    ax.axvline(0.9, color="black", lw=1, ls="--", label="0.9 target")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":", label="the bound")
    ax.set(yticks=range(len(table)), yticklabels=table["label"], ylim=(len(table) - 0.4, -0.6),
           xlabel="measured throughput / bound\n(the schedule replayed at measured call costs)",
           xlim=(0, max(1.1, 1.12 * values.max())))
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title(study, what, where=" + ".join(study.corpora)), fontsize=9)
    return Plot("real_over_bound", table, fig)


def energy_heatmap(energy: pd.DataFrame, rank: int):
    """00_explore: share of each depth's residual ‖Wℓ − W′‖² captured by a rank-r SVD (eq. 4), depth × linear."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6.0, 3.6), constrained_layout=True)
    grid = energy.pivot(index="linear", columns="depth", values="energy_captured")
    sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "energy captured"})
    ax.set(title=f"Residual energy captured at rank {rank} (eq. 4)")
    return fig


def _shape_label(df: pd.DataFrame) -> pd.Series | str:
    """" 64/256" per row where the table holds more than one App. N setting; else nothing."""
    if "shape" in df and df["shape"].nunique() > 1:
        return " " + df["shape"].astype(str)
    return ""


def _vanilla_once(df: pd.DataFrame, *, key: str) -> pd.DataFrame:
    """Drop the repeat measurements of the unconverted model under the second and later served configs."""
    if "config" not in df or df.empty:
        return df
    vanilla = df[key].isin(VANILLA) | (df[key] == "vanilla")
    first = df["config"] == df["config"].iloc[0]
    return df[~vanilla | first]
