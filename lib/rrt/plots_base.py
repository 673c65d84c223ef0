"""What every figure shares: the `Plot` result, `save`, one palette per study, titles, log ticks, bar panels.

The figures themselves are in `rrt.plots` (training studies) and `rrt.plots_serving` (05); import
them from `rrt.plots`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure

from rrt.rundir import replacing, write_csv
from rrt.runs.store import label_of  # noqa: F401 (re-exported as rrt.plots.label_of)
from rrt.tables_style import plain, style

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
                  "ms_per_token", "real_over_bound", "reference")


@dataclass
class Plot:
    """A figure and the tidy table it draws (`figure` is None when the data cannot make a readable plot:
    then the table is the result). Displays itself in a notebook: the figure, or the table with a note."""
    kind: str                 # the rrt.plots function that made it
    table: pd.DataFrame       # one row per drawn mark: tag columns, then metric columns
    figure: Figure | None = None
    note: str = ""            # why there is no figure
    extra: dict = field(default_factory=dict)

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
    """Write <run_dir>/figures/<name>.png and .svg, and for a `Plot` its source table as <name>.csv.

    A Plot without a figure is written as a rendered table, so every named figure exists at every scale."""
    out = Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(plot, Plot):
        write_csv(out / f"{name}.csv", plot.table.assign(plot=plot.kind)[["plot", *plot.table.columns]])
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
           chance=None, log=False, panel_title=str, width_per_panel=3.2, sharex=False) -> Figure:
    """One horizontal panel per `panel` value: a bar (a dot on log axes) per label = mean over seeds,
    whisker = `err` (stderr of that mean; min–max over seeds when err is None), seed values as dots.

    chance: a number, or {panel value: number}: the dashed "chance" line of each panel.
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
            if log:
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
        else:
            ax.set_xlim(min(0, ax.dataLim.x0), max(1e-9, ax.get_xlim()[1]))  # a whisker below 0 drawn whole
    handles = [matplotlib.lines.Line2D([], [], color="black", ls="--", lw=1, label="chance")] if chance is not None else []
    if table["seed"].nunique() > 1:
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="x" if log else "o", color="black", mfc="white",
                                               label="one seed"))
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside lower right", ncols=len(handles))
    return fig


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
