"""What every figure shares: the `Plot` result, `save`, one palette per study, titles, log ticks, bar panels, and
the computed caption saying whether a figure's differences exceed their error bars (`signal`, `versus_chance`,
`signal_caption`).

The figures themselves are in `rrt.plots` (training studies) and `rrt.plots_serving` (05); import
them from `rrt.plots`.
"""
from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure

from rrt.rundir import replacing, write_csv, write_text
from rrt.runs.store import label_of  # noqa: F401 (re-exported as rrt.plots.label_of)
from rrt.tables_style import plain, style
from rrt.verdicts import K

# Paper-like: white grid, small sans fonts. Figures are built with matplotlib.figure.Figure, not pyplot:
# nothing is drawn twice by the inline backend and nothing leaks between cells or tests.
STYLE = {"style": "whitegrid", "context": "paper", "font_scale": 1.0}
MIN_LINE_POINTS = 3  # a line through fewer distinct x values shows no trend: the table is shown instead
BASELINE_COLOURS = {"full-size": "#333333", "reduced-size": "#999999"}

# The vocabulary of figure source tables: tags say which run/variant a row is, metrics are measured.
TAG_COLUMNS = ("plot", "label", "run", "seed", "role", "init", "num_blocks", "lora_rank", "lora_init", "untie_norms",
               "kd", "exit_scheme", "exit_coefficient", "self_distill", "training", "trainable", "data", "config",
               "system", "exit_policy", "kv_policy", "model", "corpus", "task", "loop", "variant", "rows", "step",
               "baseline", "pareto")
METRIC_COLUMNS = ("tokens", "loss", "loss/ce", "perplexity", "avg_accuracy", "accuracy", "stderr", "chance",
                  "non_embedding", "delta_v", "delta_v_min", "delta_v_max", "accuracy_stderr", "tokens_per_s",
                  "ms_per_token", "real_over_bound", "reference", "gold_ll", "gold_ll_stderr", "gold_margin")
# A difference (or a distance from chance) counts when it exceeds SIGMAS standard errors (about 95%, two-sided):
# rrt.verdicts' K, so a figure's caption and a claim's verdict read a difference alike.
SIGMAS = K
# What accuracy figures plot below paper scale (`rrt.evaluation.gold_summary`), and their caption where rows lack it.
GOLD_LABEL = "gold answer's log-likelihood (nats; per char. for acc_norm tasks)"
GOLD_MISSING = ("gold_ll is missing from these rows (evaluated before it was logged): accuracy is plotted, "
                "as at paper scale.")


@dataclass
class Plot:
    """A figure and the tidy table it draws (`figure` is None when the data cannot make a readable plot:
    then the table is the result). Displays itself in a notebook: the figure with its caption under it, or the
    table with a note."""
    kind: str                 # the rrt.plots function that made it
    table: pd.DataFrame       # one row per drawn mark: tag columns, then metric columns
    figure: Figure | None = None
    note: str = ""            # why there is no figure
    extra: dict = field(default_factory=dict)
    caption: str = ""         # computed: whether the differences drawn exceed their error bars (`signal_caption`)

    def __post_init__(self):
        if self.figure is not None and self.caption:  # under the axes, in the notebook and in the saved PNG / SVG
            width = max(40, int(self.figure.get_figwidth() * 15))  # characters of 7 pt text per line
            self.figure.supxlabel(textwrap.fill(self.caption, width), fontsize=7, ha="center")

    def _repr_png_(self):
        if self.figure is None:
            return None
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.05)
        return buf.getvalue()

    def _repr_html_(self):
        if self.figure is not None:
            return None
        return f"<p><i>{self.note}</i></p>" + style(self.table).to_html()

    def __repr__(self):
        return f"Plot({self.kind}, {len(self.table)} rows, {'figure' if self.figure is not None else 'table only'})"


def save(plot, run_dir: Path, name: str) -> None:
    """Write <run_dir>/figures/<name>.png and .svg, and for a `Plot` its source table as <name>.csv and its
    caption as <name>.txt.

    A Plot without a figure is written as a rendered table, so every named figure exists at every scale."""
    out = Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(plot, Plot):
        write_csv(out / f"{name}.csv", plot.table.assign(plot=plot.kind)[["plot", *plot.table.columns]])
        if plot.caption:
            write_text(out / f"{name}.txt", plot.caption + "\n")
        fig = plot.figure if plot.figure is not None else _table_figure(plot)
    else:  # a bare matplotlib figure (00_explore's heatmap)
        fig = plot
    for suffix, options in ((".png", {"dpi": 150}), (".svg", {})):
        options |= {"bbox_inches": "tight", "pad_inches": 0.05}  # legends outside the axes, long tick labels: never cut
        with replacing(out / f"{name}{suffix}") as tmp:
            fig.savefig(tmp, **options)
    return None


def palette(labels) -> dict[str, tuple]:
    """Return {label: colour} in the given order (the order every figure of a study uses).

    Seed repeats collapse onto one label; full-size is always dark grey and reduced-size light grey;
    the rest take the colour-blind palette in order (tab20 beyond ten)."""
    order = list(dict.fromkeys(label_of(x) for x in labels))
    others = [x for x in order if not _baseline(x)]
    cb = sns.color_palette("colorblind", 10)
    colours = cb[:7] + cb[8:] + sns.color_palette("tab20", 20)  # colour-blind's grey is the baselines' own
    cycle = iter(colours * (1 + len(others) // len(colours)))
    return {x: matplotlib.colors.to_rgb(_baseline(x)) if _baseline(x) else next(cycle) for x in order}


def _baseline(label: str) -> str | None:
    return next((c for k, c in BASELINE_COLOURS.items() if label.startswith(k)), None)


def title(study, what: str, where: str | None = None) -> str:
    """Figure title: what it shows (the paper's figure), then model, B, data and scale from the study config."""
    blocks = getattr(study, "num_blocks", None)
    blocks = "B=" + ",".join(str(b) for b in blocks) if isinstance(blocks, (tuple, list)) else (
        f"B={blocks}" if blocks else None)
    where = where or getattr(study, "train_corpus", None) or getattr(study, "corpus", None)
    parts = [study.model, blocks, where, f"{study.scale} scale"]
    return f"{what}\n" + ", ".join(p for p in parts if p)


def human(value, _pos=None) -> str:
    """Tick label without offsets or exponents: 20, 500, 1.5k, 20k, 1.5M, 2B."""
    if value >= 1e9:
        return f"{value / 1e9:g}B"
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:.4g}"


def log_axis(ax, which: str = "y") -> None:
    """Log scale with readable ticks: 1-2-5 steps within three decades, decades beyond; plain numbers."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    lo, hi = (ax.get_ylim() if which == "y" else ax.get_xlim())
    decades = np.log10(max(hi, 1e-12) / max(lo, 1e-12))
    subs = (1.0, 2.0, 5.0) if decades > 0.7 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs if decades <= 3 else (1.0,), numticks=12))
    axis.set_major_formatter(ticker.FuncFormatter(human))
    axis.set_minor_formatter(ticker.NullFormatter())


def figure(width=5.4, height=3.4, ncols=1, nrows=1, **kw):
    """A constrained-layout Figure and its axes (not registered with pyplot)."""
    sns.set_theme(**STYLE)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def ordered(labels, colours: dict) -> list:
    """Labels present, in the palette's order (labels it lacks go last)."""
    present = list(dict.fromkeys(labels))
    return [x for x in colours if x in present] + [x for x in present if x not in colours]


def panels(table: pd.DataFrame, *, panel: str | None, value: str, err: str | None, colours: dict, xlabel: str,
           chance=None, log=False, panel_title=str, width_per_panel=3.2, sharex=False, dots=False) -> Figure:
    """One horizontal panel per `panel` value: a bar (a dot on log axes, or with dots=True) per label = mean over
    seeds, whisker = `err` (stderr of that mean; min–max over seeds when err is None), seed values as dots.

    chance: a number, or {panel value: number}: the dashed "chance" line of each panel.
    dots: values that need not start at 0 (log-likelihoods are negative): a dot, the x range fitted to them.
    sharex: one x range for all panels (exits of one model are compared across panels)."""
    keys = list(dict.fromkeys(table[panel])) if panel else [None]
    labels = ordered(table["label"], colours)
    fig, axes = figure(min(2.2 + width_per_panel * len(keys), 13), 1.0 + 0.32 * len(labels), ncols=len(keys),
                       sharey=True, sharex=sharex)
    for ax, key in zip(axes[0], keys):
        d = table if key is None else table[table[panel] == key]
        for i, label in enumerate(labels):
            rows = d[d["label"] == label]
            if rows.empty:
                continue
            mean = rows[value].mean()
            if err is not None:
                whisker = np.sqrt((rows[err] ** 2).mean() / len(rows))
                xerr = [[whisker], [whisker]]
            else:
                xerr = [[mean - rows[value].min()], [rows[value].max() - mean]]
            colour = colours.get(label, "C0")
            if log or dots:
                ax.errorbar(mean, i, xerr=xerr, fmt="o", color=colour, ms=7, capsize=3, lw=1.2)
            else:
                ax.barh(i, mean, color=colour, height=0.7)
                ax.errorbar(mean, i, xerr=xerr, fmt="none", ecolor="black", capsize=3, lw=1)
            if len(rows) > 1:
                ax.plot(rows[value], [i] * len(rows), "x" if log else "o", color="black", ms=4, mfc="white")
        line = chance.get(key) if isinstance(chance, dict) else chance
        if line is not None:
            ax.axvline(line, color="black", ls="--", lw=1, label="chance")
        ax.set(yticks=range(len(labels)), yticklabels=labels, ylim=(len(labels) - 0.4, -0.6), xlabel=xlabel)
        if key is not None:
            ax.set_title(panel_title(key), fontsize=9)
        if log:
            log_axis(ax, "x")
        elif not dots:
            ax.set_xlim(min(0, ax.dataLim.x0), max(1e-9, ax.get_xlim()[1]))  # a whisker below 0 drawn whole
    handles = [matplotlib.lines.Line2D([], [], color="black", ls="--", lw=1, label="chance")] if chance is not None else []
    if table["seed"].nunique() > 1:
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="x" if log else "o", color="black", mfc="white",
                                               label="one seed"))
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside lower right", ncols=len(handles))
    return fig


def points(table: pd.DataFrame, *, value: str, err: str, panel: str | None = None) -> pd.DataFrame:
    """The marks `panels` draws: per (panel and) label, the mean of `value` over seeds and its stderr
    √(mean err² / seeds); columns panel ("" without one), label, value, error."""
    d = table.assign(_panel=table[panel] if panel else "")
    by = d.groupby(["_panel", "label"], sort=False, dropna=False)
    out = by.agg(value=(value, "mean"), ms=(err, lambda e: (e ** 2).mean()), seeds=(value, "size")).reset_index()
    return pd.DataFrame({"panel": out["_panel"], "label": out["label"], "value": out["value"],
                         "error": np.sqrt(out["ms"] / out["seeds"])})


@dataclass(frozen=True)
class Signal:
    """The most separated pair of values: `high` - `low` = gap ± error (their stderrs combined), and whether
    the gap exceeds SIGMAS errors."""
    separated: bool
    high: str
    low: str
    gap: float
    error: float


def signal(values: pd.Series, errors: pd.Series) -> Signal:
    """Returns the pair of `values` (indexed by label, ± `errors`, standard errors) whose gap is the most
    standard errors of the difference, √(e₁² + e₂²), apart; separated when that is over SIGMAS.

    Unpaired, so conservative: models scored on the same examples differ by less noise than this."""
    best = Signal(False, "", "", 0.0, float("nan"))
    z_best = -1.0
    for a in values.index:
        for b in values.index:
            gap, error = values[a] - values[b], float(np.hypot(errors[a], errors[b]))
            z = gap / error if error > 0 else (float("inf") if gap > 0 else 0.0)
            if a != b and gap >= 0 and z > z_best:  # NaN errors give NaN z: never the best, never separated
                z_best, best = z, Signal(bool(z > SIGMAS), str(a), str(b), float(gap), error)
    return best


def versus_chance(values: pd.Series, errors: pd.Series, chance: float) -> bool:
    """Returns whether every value is within SIGMAS of its standard errors of `chance` (the figure shows nothing)."""
    return bool(((values - chance).abs() <= SIGMAS * errors).all())


def signal_caption(marks: pd.DataFrame, *, unit: str = "", chance=None, prefix: str = "") -> str:
    """The caption of a figure of `marks` (`points`: panel, label, value, error): whether its differences
    exceed their error bars (SIGMAS standard errors), naming the most separated pair in each panel; with
    `chance` (a number, or {panel: number}), first whether every value is within its error bar of chance."""
    keys = list(dict.fromkeys(marks["panel"]))
    line = {k: chance.get(k) if isinstance(chance, dict) else chance for k in keys}
    parts = [prefix] if prefix else []
    if chance is not None and all(versus_chance(*_series(marks, k), line[k]) for k in keys if line[k] is not None):
        levels = ", ".join(dict.fromkeys(f"{v:.3g}" for v in line.values() if v is not None))
        parts.append(f"Every value is within {SIGMAS:g}σ of chance ({levels}): this figure shows no accuracy "
                     f"difference at this scale.")
    found = {k: signal(*_series(marks, k)) for k in keys}
    found = {k: s for k, s in found.items() if s.high}
    if not found:
        return " ".join(parts + ["One value per panel: no difference to test."])
    where = {k: (f"{k}: " if len(keys) > 1 else "") for k in found}
    pairs = "; ".join(f"{where[k]}{s.high} vs {s.low}, gap {s.gap:.3g} ± {s.error:.2g}{unit}" for k, s in found.items())
    if any(s.separated for s in found.values()):
        n = sum(s.separated for s in found.values())
        scope = f" in {n} of {len(found)} panels" if len(found) > 1 else ""
        parts.append(f"Differences exceed their error bars (gap > {SIGMAS:g}σ){scope}: {pairs}.")
    else:
        parts.append(f"No difference exceeds its error bars (every gap ≤ {SIGMAS:g}σ); the largest: {pairs}.")
    return " ".join(parts)


def paper_scale(study) -> bool:
    """Whether `study` runs at a `paper-*` scale, where figures plot accuracy as the paper does; below it (`smoke`,
    `cpu`) every model's accuracy is at chance."""
    return str(getattr(study, "scale", "cpu")).startswith("paper")


def scored_caption(scores: pd.DataFrame, accs: pd.DataFrame, *, chance, study, gold: bool, who: str = "model") -> str:
    """The caption of an accuracy figure: `accs` the accuracy marks (`points`: panel, label, value, error), `scores`
    the marks plotted (the gold answer's log-likelihood when `gold`, else the accuracy marks again); says whether
    accuracy is within its error bars of `chance` (a number, or {panel: number}) and whether the plotted
    differences exceed their error bars."""
    if not gold:
        return signal_caption(accs, chance=chance, prefix="" if paper_scale(study) else GOLD_MISSING)
    line = {k: chance.get(k) if isinstance(chance, dict) else chance for k in dict.fromkeys(accs["panel"])}
    at_chance = any(c is not None for c in line.values()) and all(
        versus_chance(*_series(accs, k), c) for k, c in line.items() if c is not None)
    prefix = (f"Accuracy (in the table) is within {SIGMAS:g}σ of chance for every {who}: the gold answer's "
              "log-likelihood is plotted instead." if at_chance else
              "The gold answer's log-likelihood is plotted; accuracy is in the table.")
    return signal_caption(scores, unit=" nats", prefix=prefix)


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """The table with `label` (run name without seed), `seed` (0 where untagged) and `loop` (1-based exit, or NaN)."""
    d = df.copy()
    d["label"] = d["run"].map(label_of)
    d["seed"] = d["seed"].fillna(0).astype(int) if "seed" in d else 0
    d["loop"] = d["loop_idx"] + 1 if "loop_idx" in d else np.nan
    return d


def final_exit(d: pd.DataFrame) -> pd.DataFrame:
    """Rows (of `labelled`) of the model's own output: loop NaN, or (tables evaluated at every exit only) the last
    loop."""
    if d["loop"].isna().any() or d.empty:
        return d[d["loop"].isna()]
    return d[d["loop"] == d["loop"].max()]


def _series(marks: pd.DataFrame, key) -> tuple[pd.Series, pd.Series]:
    d = marks[marks["panel"] == key]
    return d.set_index("label")["value"], d.set_index("label")["error"]


def table_only(kind: str, table: pd.DataFrame, why: str) -> Plot:
    """A Plot with no figure: the table is the result, and `why` says so."""
    return Plot(kind=kind, table=table.reset_index(drop=True), note=why)


def _table_figure(plot: Plot) -> Figure:
    shown = plot.table.head(30).round(4).map(plain)
    if shown.empty:
        shown = pd.DataFrame({"": ["(no rows)"]})
    fig, axes = figure(min(2 + 1.3 * shown.shape[1], 16), 1.2 + 0.25 * len(shown))
    ax = axes[0][0]
    ax.axis("off")
    ax.table(cellText=shown.values, colLabels=list(shown.columns), loc="center", cellLoc="left").auto_set_font_size(True)
    ax.set_title(f"{plot.kind}: table, no plot — {plot.note}", fontsize=8)
    return fig
