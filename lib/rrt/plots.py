"""The paper's figures from the studies' tidy tables; each returns a `Plot` (figure + its source table).

Every figure takes the study config (for its title: model, B, data, scale) and the study's palette
(`palette(tables["runs"]["run"])`: one colour and one order per run in every figure). Where the data
cannot make a readable plot (one point, a line through two ranks) the result is the table instead.
`save(plot, run_dir, name)` writes figures/<name>.png, .svg, the source table <name>.csv and the caption <name>.txt.

Accuracy figures below paper scale (`smoke`, `cpu`: every model is at chance there) plot the mean log-likelihood
of the gold answer instead (`rrt.evaluation.gold_summary`: the quantity whose argmax accuracy is), accuracy and
chance kept in the table; at `paper-*` scales they plot accuracy as the paper does. Each carries a computed
caption (`rrt.plots_base.signal_caption`): whether its differences exceed their error bars.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import ticker

from rrt.evaluation import CHANCE
from rrt.runs.store import tag_is_true
from rrt.plots_base import (GOLD_LABEL, MIN_LINE_POINTS, METRIC_COLUMNS, TAG_COLUMNS, Plot, figure, final_exit,
                            human, label_of, labelled, log_axis, ordered, palette, panels, paper_scale, points, save,
                            scored_caption, signal_caption, table_only, title)
from rrt.plots_serving import energy_heatmap, real_over_bound, step_costs, throughput
from rrt.tables_style import plain
from rrt.verdicts import pooled_stderr

__all__ = ["Plot", "save", "palette", "label_of", "title", "TAG_COLUMNS", "METRIC_COLUMNS", "loss_curves",
           "accuracy", "task_accuracy", "perplexity", "size_vs_quality", "final_models", "rank_accuracy",
           "init_perplexity", "init_variants", "throughput", "step_costs", "real_over_bound", "energy_heatmap"]

LOSS_LABELS = {"loss": "training loss (nats/token, smoothed)",
               "loss/ce": "CE part of the loss (nats/token)"}  # the KD term left out; smoothed like the total


def loss_curves(curves: pd.DataFrame, *, study, colours: dict | None = None, metric: str = "loss", smooth: int = 3,
                what: str = "Training loss (Fig. 5a)") -> Plot:
    """Fig. 5a / 6a / 14 (and 7b's curves with metric="loss/ce"): a metric against training tokens, one
    line per run label (mean over seeds, band = min–max over seeds), rolling mean over `smooth` steps."""
    d = _smoothed_curves(curves, metric, smooth)
    table = d[["label", "seed", "step", "tokens", metric]].reset_index(drop=True)
    if table.groupby(["label", "seed"])["step"].nunique().max() < MIN_LINE_POINTS:
        return table_only("loss_curves", table, f"fewer than {MIN_LINE_POINTS} logged steps per run: no curve")
    colours = colours or palette(table["label"])
    fig, axes = figure(6.8, 3.6)
    ax = axes[0][0]
    _curve_lines(ax, table, metric, colours)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title="band: min–max over seeds" if table["seed"].nunique() > 1 else None, title_fontsize=7)
    fig.suptitle(title(study, what), fontsize=9)
    return Plot("loss_curves", table, fig)


def _smoothed_curves(curves: pd.DataFrame, metric: str, smooth: int) -> pd.DataFrame:
    d = labelled(curves)
    d = d[d["kind"] == "train"] if "kind" in d else d
    if metric not in d or d[metric].isna().all():
        raise ValueError(f"curves have no {metric!r} column with values; columns: {sorted(curves.columns)}")
    d = d.dropna(subset=[metric]).sort_values("step")
    d[metric] = d.groupby(["label", "seed"])[metric].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    return d


def _curve_lines(ax, table: pd.DataFrame, metric: str, colours: dict) -> None:
    """One line per label against tokens (mean over seeds, band = min–max over seeds)."""
    for label in ordered(table["label"], colours):
        by_tokens = table[table["label"] == label].groupby("tokens")[metric]
        mean = by_tokens.mean()
        ax.plot(mean.index, mean.values, color=colours.get(label), lw=1.4, label=label)
        if table.loc[table["label"] == label, "seed"].nunique() > 1:
            ax.fill_between(mean.index, by_tokens.min(), by_tokens.max(), color=colours.get(label), alpha=0.2, lw=0)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(human))
    ax.set(xlabel="training tokens", ylabel=LOSS_LABELS.get(metric, metric))


VARIANT_PANELS = {  # Fig. 11's panels: which runs each compares, and how the legend names them
    "(a) Stepwise: which layers": {"stepwise": "fixed ends (first and last layer; our Stepwise)",
                                   "stepwise_start": "fixed start (layer 0, then every B-th)"},
    "(b) Average: the tied norms": {"average": "LN-avg (averaged; our Average)", "choice": "LN-choice (one layer's)",
                                    "zero": "LN-zero (zeros)"},
}


def init_variants(curves: pd.DataFrame, *, study, smooth: int = 3,
                  what: str = "Init variants: training loss (Fig. 11)") -> Plot:
    """Fig. 11: training loss of Stepwise fixed ends vs fixed start (a) and of Average with averaged,
    picked and zeroed tied norms (b), at the variants' B (band = min–max over seeds)."""
    d = _smoothed_curves(curves, "loss", smooth)
    b = d.loc[d["role"] == "variant", "num_blocks"] if "role" in d else pd.Series(dtype=float)
    if b.empty:
        return table_only("init_variants", d, "no init variants in this plan (InitAblation.variants)")
    d = d[(d["num_blocks"] == b.iloc[0]) & d["init"].isin(["stepwise", "stepwise_start", "average"])]
    norm = d["norm_init"].fillna("-") if "norm_init" in d else pd.Series("-", index=d.index)
    d = d.assign(variant=np.where(d["init"] == "average", norm.replace({"-": "average"}), d["init"]))
    names = {k: v for panel in VARIANT_PANELS.values() for k, v in panel.items()}
    table = d.assign(label=d["variant"].map(names))[["label", "run", "seed", "init", "variant", "step", "tokens", "loss"]]
    colours = palette(table["label"])
    fig, axes = figure(9.6, 3.6, ncols=2, sharey=False)
    for ax, (panel, members) in zip(axes[0], VARIANT_PANELS.items()):
        part = table[table["variant"].isin(members)]
        _curve_lines(ax, part, "loss", colours)
        ax.set_title(panel, fontsize=9)
        if part.empty:
            ax.text(0.5, 0.5, "not in this plan", ha="center", va="center", transform=ax.transAxes)
            continue
        late = part[part["tokens"] >= 0.2 * part["tokens"].max()]["loss"]  # the first steps' loss would flatten the rest
        ax.set_ylim(late.min() - 0.05 * (late.max() - late.min() or 1), late.max() + 0.1 * (late.max() - late.min() or 1))
        ax.legend(fontsize=7, loc="upper right", title_fontsize=7,
                  title="band: min–max over seeds" if part.groupby("label")["seed"].nunique().max() > 1 else None)
    fig.suptitle(title(study, what), fontsize=9)
    return Plot("init_variants", table, fig)


def accuracy(acc: pd.DataFrame, *, study, colours: dict | None = None, per_loop: bool = False,
             what: str = "Average few-shot accuracy (Fig. 5b, Table 5)") -> Plot:
    """Fig. 5b / 6b / 7b, Tables 5, 9, 11 (per_loop: Table 13, one panel per exit loop): average accuracy
    over tasks per run label, ± stderr (lm-eval's, propagated over tasks and seeds), seeds as dots,
    and the tasks' chance accuracy dashed; below paper scale the gold answer's log-likelihood instead."""
    if acc.empty:
        return table_only("accuracy", acc, "no few-shot evaluation in this study")
    rows = _accuracy_rows(acc, by=["loop"] if per_loop else [])
    rows["chance"] = _chance(acc["task"].unique())
    if rows["label"].nunique() < 2:
        return table_only("accuracy", rows, "one model only: nothing to compare")
    loops = rows["loop"].max() if per_loop else None
    value, err, gold = _plotted(acc, study, "avg_accuracy")
    chance = None if gold else rows["chance"].iloc[0]
    fig = panels(rows, panel="loop" if per_loop else None, value=value, err=err, colours=colours or palette(rows["label"]),
                 xlabel="average " + (GOLD_LABEL if gold else "few-shot accuracy"), chance=chance, dots=gold,
                 panel_title=lambda b: f"exit at loop {b} of {loops}", sharex=per_loop)
    fig.suptitle(title(study, _what(what, gold), where=_tasks(acc)), fontsize=9)
    caption = _caption(acc, rows, study, accuracy="avg_accuracy", panel="loop" if per_loop else None,
                       chance=rows["chance"].iloc[0])
    return Plot("accuracy", rows, fig, caption=caption)


def task_accuracy(acc: pd.DataFrame, *, study, colours: dict | None = None,
                  what: str = "Few-shot accuracy per task (Fig. 13)") -> Plot:
    """Fig. 13: one panel per task (and the average), a bar per run label ± lm-eval stderr, seeds as
    dots, each task's chance accuracy dashed; below paper scale the gold answer's log-likelihood instead."""
    if acc.empty:
        return table_only("task_accuracy", acc, "no few-shot evaluation in this study")
    d = final_exit(labelled(acc))
    columns = ["label", "seed", "task", "accuracy", "stderr", *(c for c in GOLD_COLUMNS if c in d)]
    rows = d.rename(columns={"value": "accuracy"})[columns]
    avg = _accuracy_rows(d).rename(columns={"avg_accuracy": "accuracy"}).assign(task="average")
    rows = pd.concat([rows, avg[rows.columns]], ignore_index=True)
    chance = {t: CHANCE.get(t) for t in d["task"].unique()} | {"average": _chance(d["task"].unique())}
    rows["chance"] = rows["task"].map(chance)
    if rows["label"].nunique() < 2:
        return table_only("task_accuracy", rows, "one model only: nothing to compare")
    value, err, gold = _plotted(acc, study, "accuracy")
    fig = panels(rows, panel="task", value=value, err=err, colours=colours or palette(rows["label"]),
                 xlabel=GOLD_LABEL.replace(" (", "\n(") if gold else "accuracy", chance=None if gold else chance,
                 width_per_panel=2.2, dots=gold)
    fig.suptitle(title(study, _what(what, gold), where=f"{int(d['n'].max()) if 'n' in d else '?'} examples per task"),
                 fontsize=9)
    caption = _caption(acc, rows, study, accuracy="accuracy", panel="task", chance=chance)
    return Plot("task_accuracy", rows, fig, caption=caption)


def perplexity(ppl: pd.DataFrame, *, study, colours: dict | None = None, per_loop: bool = False,
               what: str = "Held-out perplexity") -> Plot:
    """Held-out perplexity per run label on log axes, one panel per corpus (per_loop: one panel per exit
    loop on the study's first held-out corpus); dot = mean over seeds, whisker = min–max over seeds."""
    d = labelled(ppl)
    if per_loop:
        d = d[(d["corpus"] == study.eval_corpora[0]) & d["loop"].notna()]
    else:
        d = final_exit(d)
    rows = d[["label", "seed", "corpus", "loop", "perplexity"]].reset_index(drop=True)
    if not per_loop:
        rows = rows.drop(columns="loop")
    if rows["label"].nunique() < 2:
        return table_only("perplexity", rows, "one model only: nothing to compare")
    loops = rows["loop"].max() if per_loop else None
    fig = panels(rows, panel="loop" if per_loop else "corpus", value="perplexity", err=None,
                 colours=colours or palette(rows["label"]), xlabel="held-out perplexity (log)", log=True,
                 panel_title=(lambda b: f"exit at loop {b} of {loops}") if per_loop else str, sharex=per_loop)
    where = study.eval_corpora[0] if per_loop else "held-out: " + ", ".join(study.eval_corpora)
    fig.suptitle(title(study, what, where=where), fontsize=9)
    return Plot("perplexity", rows, fig)


def size_vs_quality(runs: pd.DataFrame, acc: pd.DataFrame, ppl: pd.DataFrame, *, study, colours: dict | None = None,
                    what: str = "Size vs quality (Fig. 4, 7c)") -> Plot:
    """Fig. 4 / 7c: average accuracy (± stderr, chance dashed) and held-out perplexity (log; min–max over
    seeds) against non-embedding parameters (LoRA included), one point per run label."""
    corpus = study.eval_corpora[0]
    table = labelled(runs)[["label", "seed", "non_embedding"]]
    if not acc.empty:
        table = table.merge(_accuracy_rows(acc), on=["label", "seed"], how="left")
    p = labelled(ppl)
    p = final_exit(p[p["corpus"] == corpus])[["label", "seed", "perplexity"]]
    table = table.merge(p, on=["label", "seed"], how="left").assign(corpus=corpus)
    if table["non_embedding"].nunique() < 2:
        return table_only("size_vs_quality", table, "every model has the same size: no size axis")
    colours = colours or palette(table["label"])
    score, score_err, gold = _plotted(acc, study, "avg_accuracy")
    metrics = [m for m in (score, "perplexity") if m in table and table[m].notna().any()]
    fig, axes = figure(3.4 * len(metrics) + 2.2, 3.4, ncols=len(metrics), sharex=True)
    for ax, metric in zip(axes[0], metrics):
        for k, label in enumerate(ordered(table["label"], colours)):
            rows = table[table["label"] == label]
            y = rows[metric].mean()
            yerr = (np.sqrt((rows[score_err] ** 2).mean() / len(rows)) if metric == score
                    else [[y - rows[metric].min()], [rows[metric].max() - y]])
            ax.errorbar(rows["non_embedding"].iloc[0], y, yerr=yerr, fmt="osD^vP*X"[k % 8], ms=7, capsize=3, mfc="none",
                        mew=1.5, color=colours.get(label), label=label)  # hollow, one marker each: equal sizes overlap
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(human))
        ax.set_xlabel("non-embedding parameters (LoRA included)")
        if metric == "avg_accuracy":
            ax.axhline(_chance(acc["task"].unique()), color="black", ls="--", lw=1, label="chance")
            ax.set_ylabel("average few-shot accuracy")
        elif metric == score:
            ax.set_ylabel("average " + GOLD_LABEL.replace(" (", "\n("))
        else:
            log_axis(ax, "y")
            ax.set_ylabel(f"held-out perplexity (log), {corpus}")
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center left",
                       bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, what), fontsize=9)
    caption = (_caption(acc, table, study, accuracy="avg_accuracy", chance=_chance(acc["task"].unique()))
               if score in metrics else "")
    return Plot("size_vs_quality", table, fig, caption=caption)


def final_models(runs: pd.DataFrame, acc: pd.DataFrame, *, study,
                 what: str = "Few-shot accuracy vs size, the final models (Fig. 17)") -> Plot:
    """Fig. 17: average few-shot accuracy (± stderr, chance dashed) of the final models (tag `final`: 60B tokens + KD;
    full-size 60B / 75B or the original checkpoint) against non-embedding parameters (LoRA included): one line per B
    through its recursive (r=0) and relaxed models in order of size, the full- and reduced-size references as grey
    points, and the Pareto frontier (no smaller model as accurate) dotted."""
    d = labelled(runs)
    d = d[_tag(d, "final").map(tag_is_true)]
    keys = ["label", "seed", "role", "baseline", "init", "num_blocks", "lora_rank", "non_embedding"]
    table = d.reindex(columns=keys).merge(_accuracy_rows(acc), on=["label", "seed"]) if not acc.empty else d.iloc[:0]
    if table.empty:
        return table_only("final_models", d.reindex(columns=keys), "no evaluated final (60B + KD) models in this plan")
    baseline = table["baseline"].notna()  # full-size (uptrained or the original checkpoint), reduced-size
    table["variant"] = np.where(baseline, table["label"], "B=" + _tag(table, "num_blocks").astype(str).str.replace(
        r"\.0$", "", regex=True))
    table["chance"] = _chance(acc["task"].unique())
    means = table.groupby("label", sort=False).agg(x=("non_embedding", "first"), y=("avg_accuracy", "mean"))
    on_front = _pareto(means)
    table["pareto"] = table["label"].map(on_front)
    if table["non_embedding"].nunique() < 2:
        return table_only("final_models", table, "every final model has the same size: no size axis")
    fig, axes = figure(6.6, 3.8)
    ax = axes[0][0]
    colours = palette(table["variant"])
    markers = iter("sD^vP*X" * len(table))  # one per reference: the full-size runs share a colour
    for variant, rows in table.groupby("variant", sort=False):
        per = rows.groupby("label", sort=False).agg(x=("non_embedding", "first"), y=("avg_accuracy", "mean"),
                                                    se=("stderr", lambda s: np.sqrt((s ** 2).mean() / len(s))),
                                                    rank=("lora_rank", "first")).sort_values("x")
        is_base = variant in set(table.loc[baseline, "variant"])
        ax.errorbar(per["x"], per["y"], yerr=per["se"], fmt=next(markers) if is_base else "-o", ms=6, capsize=3,
                    color=colours[variant], label=variant if is_base else f"recursive / relaxed, {variant}")
        for x, y, rank in zip(per["x"], per["y"], per["rank"]):
            if not is_base and not np.isnan(rank):
                ax.annotate(f"r={rank:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    front = means[means.index.map(on_front)].sort_values("x")
    ax.plot(front["x"], front["y"], ":", color="black", lw=1.2, label="Pareto frontier")
    ax.axhline(table["chance"].iloc[0], color="black", ls="--", lw=1, label="chance")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(human))
    ax.set(xlabel="non-embedding parameters (LoRA included)", ylabel="average few-shot accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, what + " ± stderr", where=_tasks(acc)), fontsize=9)
    marks = points(table.assign(value=table["avg_accuracy"]), value="value", err="stderr")
    return Plot("final_models", table, fig, caption=signal_caption(marks, chance=table["chance"].iloc[0]))


def rank_accuracy(acc: pd.DataFrame, *, study, what: str = "Accuracy vs LoRA rank (Fig. 16)") -> Plot:
    """Fig. 16 (Fig. 7a's size axis is `rrt.plots_paper.fig7a_pareto`): average accuracy (± stderr, chance dashed) against LoRA rank, one line per init ×
    LoRA init (× norm tying); rank 0 (the recursive model) starts every line of its init.
    A table instead when fewer than MIN_LINE_POINTS ranks were run."""
    rows = _accuracy_rows(acc, by=["init", "lora_rank", "lora_init", "untie_norms"]) if not acc.empty else acc
    if acc.empty:
        return table_only("rank_accuracy", rows, "no few-shot evaluation in this study")
    rows = _rank_zero_in_every_line(rows)
    rows["chance"] = _chance(acc["task"].unique())
    if rows["lora_rank"].nunique() < MIN_LINE_POINTS:
        return table_only("rank_accuracy", rows, f"ranks {plain(sorted(rows['lora_rank'].unique()))}: fewer than "
                          f"{MIN_LINE_POINTS} ranks make no curve, so the table")
    value, err, gold = _plotted(acc, study, "avg_accuracy")
    fig = _rank_lines(rows, y=value, err=err, ylabel="average " + (GOLD_LABEL if gold else "few-shot accuracy"))
    ax = fig.axes[0]
    if not gold:
        ax.axhline(rows["chance"].iloc[0], color="black", ls="--", lw=1, label="chance")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, _what(what, gold), where=_tasks(acc)), fontsize=9)
    marks = rows.drop_duplicates(subset=["label", "seed"])  # rank 0 is drawn in every line, counted once
    caption = _caption(acc, marks, study, accuracy="avg_accuracy", chance=rows["chance"].iloc[0])
    return Plot("rank_accuracy", rows, fig, caption=caption)


def init_perplexity(curve: pd.DataFrame, *, study, what: str = "Perplexity right after conversion, no training "
                    "(Fig. 16 at rank r, before training)") -> Plot:
    """Held-out perplexity at initialisation (SVD LoRA, no training) against rank, one line per init,
    solid tied / dashed per-depth norms; the unconverted model dotted. A table below MIN_LINE_POINTS ranks."""
    original = curve.loc[curve["model"] == "original", "perplexity"]
    rows = curve[curve["model"] != "original"].assign(lora_init="svd", seed=0)
    rows = rows.rename(columns={"model": "variant"})[["variant", "init", "untie_norms", "lora_rank", "lora_init",
                                                      "perplexity", "non_embedding"]]
    rows["reference"] = original.iloc[0] if len(original) else np.nan
    if rows["lora_rank"].nunique() < MIN_LINE_POINTS:
        return table_only("init_perplexity", rows, f"fewer than {MIN_LINE_POINTS} ranks: no curve")
    fig = _rank_lines(rows, y="perplexity", err=None, ylabel="held-out perplexity (log)")
    ax = fig.axes[0]
    if len(original):
        ax.axhline(original.iloc[0], color="black", ls=":", lw=1.2, label="original model")
    log_axis(ax, "y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title(study, what, where=study.eval_corpora[0]), fontsize=9)
    return Plot("init_perplexity", rows.drop(columns="lora_init"), fig)


# ---------------------------------------------------------------- helpers

def _accuracy_rows(acc: pd.DataFrame, by=()) -> pd.DataFrame:
    """Per label × seed (× by): mean accuracy over tasks and its stderr, √(Σ stderr²) / tasks (tasks independent);
    the same for the gold answer's log-likelihood where the rows have it (GOLD_COLUMNS)."""
    d = labelled(acc)
    d = d if "loop" in by else final_exit(d)
    keys = ["label", "seed", *by]
    gold = {"gold_ll": ("gold_ll", "mean"), "gold_ll_stderr": ("gold_ll_stderr", pooled_stderr),
            "gold_margin": ("gold_margin", "mean")} if "gold_ll" in d else {}
    return (d.groupby(keys, sort=False, dropna=False)
            .agg(avg_accuracy=("value", "mean"), stderr=("stderr", pooled_stderr), **gold)
            .reset_index())


GOLD_COLUMNS = ("gold_ll", "gold_ll_stderr", "gold_margin")


def _plotted(acc: pd.DataFrame, study, accuracy: str) -> tuple[str, str, bool]:
    """(value column, its stderr column, whether it is the gold answer's log-likelihood): accuracy at paper scale
    (or where the rows lack gold_ll), gold_ll below it, where accuracy is at chance."""
    if paper_scale(study) or not _has_gold(acc):
        return accuracy, "stderr", False
    return "gold_ll", "gold_ll_stderr", True


def _has_gold(acc: pd.DataFrame) -> bool:
    return not acc.empty and "gold_ll" in acc and bool(acc["gold_ll"].notna().all())


def _what(what: str, gold: bool) -> str:
    return what + (": the gold answer's log-likelihood ± stderr (accuracy in the table)" if gold else " ± stderr")


def _caption(acc: pd.DataFrame, rows: pd.DataFrame, study, *, accuracy: str, chance, panel: str | None = None) -> str:
    """The figure's computed caption (`scored_caption`) from the rows it draws."""
    value, err, gold = _plotted(acc, study, accuracy)
    accs = points(rows, value=accuracy, err="stderr", panel=panel)
    scores = points(rows, value=value, err=err, panel=panel) if gold else accs
    return scored_caption(scores, accs, chance=chance, study=study, gold=gold)


def _tag(d: pd.DataFrame, name: str) -> pd.Series:
    return d[name] if name in d else pd.Series(np.nan, index=d.index, dtype=object)


def _pareto(points: pd.DataFrame) -> dict:
    """{label: on the frontier}: no model of at most its size (x) is at least as accurate (y) and better in one."""
    return {label: not ((points["x"] <= x) & (points["y"] >= y) & ((points["x"] < x) | (points["y"] > y))).any()
            for label, x, y in zip(points.index, points["x"], points["y"])}


def _chance(tasks) -> float:
    return float(np.mean([CHANCE[t] for t in tasks]))


def _tasks(acc: pd.DataFrame) -> str:
    n = f", {int(acc['n'].max())} examples each" if "n" in acc and acc["n"].notna().any() else ""
    return ", ".join(dict.fromkeys(acc["task"])) + n


def _rank_zero_in_every_line(rows: pd.DataFrame) -> pd.DataFrame:
    """Rank 0 has no LoRA init ("-"): copy its rows into every LoRA-init line of the same init and tying."""
    zero = rows[rows["lora_rank"].astype(int) == 0]
    rest = rows[rows["lora_rank"].astype(int) != 0]
    copies = [zero.assign(lora_init=li) for li in rest["lora_init"].unique()] or [zero]
    return pd.concat([*copies, rest], ignore_index=True)


def _rank_lines(rows: pd.DataFrame, *, y: str, err: str | None, ylabel: str):
    """One line per init × LoRA init × norm tying against rank (ranks evenly spaced, labelled)."""
    rows = rows.assign(variant=rows["init"] + ", " + rows["lora_init"].astype(str) + " LoRA init"
                       + np.where(rows["untie_norms"].map(tag_is_true), ", per-depth norms", ""))
    ranks = sorted(rows["lora_rank"].unique(), key=lambda r: float("inf") if r == "full" else int(r))
    x_of = {r: i for i, r in enumerate(ranks)}
    colours = palette(rows["init"])
    fig, axes = figure(6.4, 3.6)
    ax = axes[0][0]
    for variant, d in rows.groupby("variant", sort=False):
        d = d.assign(x=d["lora_rank"].map(x_of)).sort_values("x")
        ls = "--" if tag_is_true(d["untie_norms"].iloc[0]) else "-"
        marker = "s" if d["lora_init"].iloc[0] == "zero" else "o"
        ax.errorbar(d["x"], d[y], yerr=None if err is None else d[err], color=colours[d["init"].iloc[0]], ls=ls,
                    marker=marker, ms=5, capsize=3, label=variant)
    ax.set(xticks=range(len(ranks)), xticklabels=[str(r) for r in ranks], xlabel="LoRA rank per depth (0: recursive)",
           ylabel=ylabel)
    return fig
