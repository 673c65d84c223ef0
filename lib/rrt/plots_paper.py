"""Fig. 7a (size vs performance, the Pareto frontier) and Fig. 15 (SVD vs zero init of the relaxation LoRA), each
plotting the study's quality metric (`quality_metric`): accuracy where the budget separates the models, held-out
perplexity where it does not (cpu scale: every accuracy sits at chance). Each returns a `Plot`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import ticker

from rrt.plots_base import (Plot, figure, final_exit, human, labelled, log_axis, ordered, palette, paper_scale,
                            table_only, title)
from rrt.runs.store import tag_is_true
from rrt.verdicts import pooled_stderr

__all__ = ["quality_metric", "fig7a_pareto", "fig15_svd_vs_zero", "QUALITY_LABELS", "LOWER_IS_BETTER"]

QUALITY_LABELS = {"perplexity": "held-out perplexity (log)", "avg_accuracy": "average few-shot accuracy"}
LOWER_IS_BETTER = {"perplexity"}
TAGS = ["label", "seed", "role", "baseline", "init", "num_blocks", "lora_rank", "lora_init", "untie_norms"]


def quality_metric(study) -> str:
    """The column the paper-figure plots read as "performance": "perplexity" (held-out, the study's first corpus) at
    the small scales, "avg_accuracy" (mean over the few-shot tasks) at the paper's."""
    return "avg_accuracy" if paper_scale(study) else "perplexity"


def fig7a_pareto(runs: pd.DataFrame, acc: pd.DataFrame, ppl: pd.DataFrame, *, study, colours: dict | None = None,
                 metric: str | None = None, what: str = "Model size vs performance, Pareto frontier (Fig. 7a)") -> Plot:
    """Fig. 7a: performance (`quality_metric`, or `metric`) against non-embedding parameters (LoRA included), one
    labelled point per model (full-size, reduced-size, recursive, relaxed at each rank and LoRA init; mean over seeds,
    whisker = stderr for accuracy, min–max over seeds for perplexity), the Pareto frontier (no smaller model at least
    as good) dotted."""
    metric = metric or quality_metric(study)
    table = quality_rows(runs, acc, ppl, study=study)
    if metric not in table or table[metric].isna().all():
        return table_only("fig7a_pareto", table, f"no {metric} measured in this study: no performance axis")
    table = table.dropna(subset=[metric])
    means = _means(table, metric)
    if means["x"].nunique() < 2:
        return table_only("fig7a_pareto", table, "every model has the same size: no size axis")
    front = pareto(means, lower_is_better=metric in LOWER_IS_BETTER)
    table["pareto"] = table["label"].map(front)
    colours = colours or palette(table["label"])
    fig, axes = figure(7.2, 4.2)
    ax = axes[0][0]
    for k, label in enumerate(ordered(table["label"], colours)):
        m = means.loc[label]
        ax.errorbar(m["x"], m["y"], yerr=[[m["y"] - m["lo"]], [m["hi"] - m["y"]]], fmt="osD^vP*X"[k % 8], ms=7,
                    capsize=3, mfc="none", mew=1.5, color=colours.get(label), label=label)
        above = m["y"] >= means.loc[means["x"] == m["x"], "y"].max()  # equal sizes: the top label above, others below
        ax.annotate(label, (m["x"], m["y"]), textcoords="offset points", xytext=(7, 4 if above else -11), fontsize=7)
    line = means[means.index.map(front)].sort_values("x")
    ax.plot(line["x"], line["y"], ":", color="black", lw=1.2, label="Pareto frontier")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(human))
    ax.set(xlabel="non-embedding parameters (LoRA included)", ylabel=_ylabel(metric, study))
    if metric in LOWER_IS_BETTER:
        log_axis(ax, "y")
    ax.margins(x=0.15)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, what + f"; {'lower' if metric in LOWER_IS_BETTER else 'higher'} is better"), fontsize=9)
    return Plot("fig7a_pareto", table, fig)


def fig15_svd_vs_zero(acc: pd.DataFrame, ppl: pd.DataFrame, *, study, metric: str | None = None,
                      what: str = "SVD vs zero init of the relaxation LoRA (Fig. 15)") -> Plot:
    """Fig. 15: per init and LoRA rank, the SVD- and the zero-initialised relaxed model side by side (mean over seeds,
    whisker as in `fig7a_pareto`); filled where relaxation beats the recursive model of the same init (rank 0,
    dotted), hollow where it does not (the paper's Fig. 15: hatched bars vs dotted outlines)."""
    metric = metric or quality_metric(study)
    table = quality_rows(None, acc, ppl, study=study)
    if metric not in table or table[metric].isna().all():
        return table_only("fig15_svd_vs_zero", table, f"no {metric} measured in this study")
    rank = pd.to_numeric(table["lora_rank"], errors="coerce")
    relaxed = table[rank.gt(0) & table["lora_init"].isin(["svd", "zero"])].assign(lora_rank=rank.astype("Int64"))
    if not relaxed["lora_init"].eq("zero").any() or not relaxed["lora_init"].eq("svd").any():
        return table_only("fig15_svd_vs_zero", relaxed, "the plan has no zero-init (or no SVD-init) relaxed model at a "
                          "rank it also runs the other way (zero_init_ranks): nothing to compare")
    base = table[rank.eq(0)].groupby("init")[metric].mean()
    relaxed = relaxed.assign(variant=relaxed["init"] + " r=" + relaxed["lora_rank"].astype(str)
                             + np.where(relaxed["untie_norms"].map(tag_is_true), ", per-depth norms", ""))
    relaxed["reference"] = relaxed["init"].map(base)
    groups = list(dict.fromkeys(relaxed["variant"]))
    colours = {"svd": "#0173b2", "zero": "#de8f05"}
    fig, axes = figure(max(4.8, 1.6 * len(groups) + 2.4), 3.8)
    ax = axes[0][0]
    lower = metric in LOWER_IS_BETTER
    for i, group in enumerate(groups):
        d = relaxed[relaxed["variant"] == group]
        for j, how in enumerate(("svd", "zero")):
            rows = d[d["lora_init"] == how]
            if rows.empty:
                continue
            y, lo, hi = _spread(rows, metric)
            ref = rows["reference"].iloc[0]
            gains = not np.isnan(ref) and (y < ref if lower else y > ref)
            ax.errorbar(i + (j - 0.5) * 0.3, y, yerr=[[y - lo], [hi - y]], fmt="os"[j], ms=8, capsize=3, mew=1.5,
                        color=colours[how], mfc=colours[how] if gains else "white",
                        label=f"{how} init" if i == 0 else None)
        ref = d["reference"].iloc[0]
        if not np.isnan(ref):
            ax.hlines(ref, i - 0.4, i + 0.4, colors="black", linestyles=":", lw=1.4,
                      label="recursive (rank 0), same init" if i == 0 else None)
    # points, not bars from 0: perplexities that differ by 1% would look equal on bars
    ax.set(xticks=range(len(groups)), xticklabels=groups, xlim=(-0.7, len(groups) - 0.3),
           ylabel=_ylabel(metric, study).replace(" (log)", ""))
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title="filled: beats rank 0", title_fontsize=7)
    fig.suptitle(title(study, what + f"; {'lower' if lower else 'higher'} is better"), fontsize=9)
    keep = [c for c in ["label", "seed", "variant", "init", "lora_rank", "lora_init", "untie_norms", "corpus", metric,
                        "stderr", "reference"] if c in relaxed]
    return Plot("fig15_svd_vs_zero", relaxed[keep].reset_index(drop=True), fig)


def quality_rows(runs: pd.DataFrame | None, acc: pd.DataFrame, ppl: pd.DataFrame, *, study) -> pd.DataFrame:
    """Per run label × seed: its tags, non-embedding parameters (from `runs`), held-out perplexity on the study's first
    corpus and average accuracy with its stderr (√Σ stderr² / tasks), both at the model's own (last) exit."""
    corpus = study.eval_corpora[0]
    parts = []
    if ppl is not None and len(ppl):
        p = final_exit(labelled(ppl[ppl["corpus"] == corpus]))
        parts.append(p.groupby(["label", "seed"], sort=False).agg(perplexity=("perplexity", "mean")))
    if acc is not None and len(acc):
        a = final_exit(labelled(acc)).groupby(["label", "seed", "task"], sort=False)[["value", "stderr"]].mean()
        parts.append(a.groupby(["label", "seed"], sort=False).agg(
            avg_accuracy=("value", "mean"), stderr=("stderr", pooled_stderr)))
    sources = [f for f in (runs, ppl, acc) if f is not None and len(f)]
    tags = pd.concat([labelled(f).reindex(columns=TAGS) for f in sources]).drop_duplicates(["label", "seed"])
    table = tags.set_index(["label", "seed"])
    for part in parts:
        table = table.join(part, how="left")
    if runs is not None and "non_embedding" in runs:
        sizes = labelled(runs).groupby(["label", "seed"])["non_embedding"].first()
        table = table.join(sizes, how="left")
    return table.reset_index().assign(corpus=corpus)


def pareto(points: pd.DataFrame, *, lower_is_better: bool) -> dict:
    """{label: on the frontier}: no model of at most its size (x) is at least as good (y) and strictly better in one."""
    y = -points["y"] if lower_is_better else points["y"]
    return {label: not ((points["x"] <= xi) & (y >= yi) & ((points["x"] < xi) | (y > yi))).any()
            for label, xi, yi in zip(points.index, points["x"], y)}


# ---------------------------------------------------------------- helpers

def _spread(rows: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    """(mean, low, high): ± the propagated stderr for accuracy, min–max over seeds otherwise."""
    y = rows[metric].mean()
    if metric == "avg_accuracy" and "stderr" in rows:
        se = np.sqrt((rows["stderr"] ** 2).mean() / len(rows))
        return y, y - se, y + se
    return y, rows[metric].min(), rows[metric].max()


def _means(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = {}
    for label, rows in table.groupby("label", sort=False):
        y, lo, hi = _spread(rows, metric)
        out[label] = {"x": rows["non_embedding"].iloc[0], "y": y, "lo": lo, "hi": hi}
    return pd.DataFrame.from_dict(out, orient="index")


def _ylabel(metric: str, study) -> str:
    label = QUALITY_LABELS.get(metric, metric)
    return f"{label}, {study.eval_corpora[0]}" if metric == "perplexity" else label
