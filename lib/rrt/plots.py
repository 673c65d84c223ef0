"""The paper's figures from tidy tables (seaborn), each saved as PNG and SVG beside the results."""
from __future__ import annotations

from pathlib import Path


import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

# Paper-like: white grid, small serif-free fonts, one colour per method.
STYLE = {"style": "whitegrid", "context": "paper", "palette": "colorblind", "font_scale": 1.1}


def _figure(width=5.0, height=3.4):
    sns.set_theme(**STYLE)
    return plt.subplots(figsize=(width, height), constrained_layout=True)


def save(fig, run_dir: Path, name: str) -> list[Path]:
    """Write fig as <run_dir>/figures/<name>.png and .svg; return the paths."""
    out = Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def loss_curves(curves: pd.DataFrame, title="Training loss (Fig. 5a)", smooth: int = 3):
    """Fig. 5a: training loss against tokens seen, one line per run (rolling mean over `smooth` steps)."""
    fig, ax = _figure()
    df = curves.sort_values("step").copy()
    df["loss (smoothed)"] = df.groupby("run")["loss"].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    sns.lineplot(df, x="tokens", y="loss (smoothed)", hue="run", ax=ax)
    ax.set(title=title, xlabel="training tokens")
    ax.legend(fontsize=7, ncols=2)
    return fig


def accuracy_bars(avg: pd.DataFrame, y="avg_accuracy", title="Few-shot accuracy (Fig. 5b)", hue=None):
    """Fig. 5b/6: average few-shot accuracy per run as bars."""
    fig, ax = _figure()
    sns.barplot(avg, x="run", y=y, hue=hue, ax=ax)
    ax.set(title=title, xlabel="", ylabel="average accuracy")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    return fig


def perplexity_bars(ppl: pd.DataFrame, title="Held-out perplexity"):
    """Perplexity per run and held-out set (log scale: conversions start orders of magnitude apart)."""
    fig, ax = _figure(6.0, 3.4)
    sns.barplot(ppl, x="run", y="perplexity", hue="corpus", ax=ax)
    ax.set(title=title, xlabel="", yscale="log")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    return fig


def rank_curve(df: pd.DataFrame, x="lora_rank", y="perplexity", hue="init", style=None, logy=True,
               title="Perplexity at initialisation vs LoRA rank", reference: float | None = None):
    """Fig. 7a / 16: a metric against LoRA rank, one line per init (and style, e.g. norm tying).

    reference: a horizontal line labelled "original" (the unconverted model's value)."""
    fig, ax = _figure()
    sns.lineplot(df, x=x, y=y, hue=hue, style=style, marker="o", ax=ax)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="original")
        ax.legend(fontsize=8)
    ax.set(title=title, yscale="log" if logy else "linear")
    return fig


def pareto(df: pd.DataFrame, x="non_embedding", y="avg_accuracy", hue="init", title="Size vs accuracy (Fig. 7c)"):
    """Fig. 7c: accuracy against non-embedding parameters, one point per model."""
    fig, ax = _figure()
    sns.scatterplot(df, x=x, y=y, hue=hue, s=60, ax=ax)
    ax.set(title=title, xlabel="non-embedding parameters")
    return fig


def per_loop(df: pd.DataFrame, y="value", hue="run", title="Accuracy per loop exit (Table 13)"):
    """Static exiting: a metric at every loop exit, one line per run."""
    fig, ax = _figure()
    d = df.assign(loop=df["loop_idx"].astype(int) + 1)
    sns.lineplot(d, x="loop", y=y, hue=hue, marker="o", ax=ax)
    ax.set(title=title, xticks=sorted(d["loop"].unique()))
    ax.legend(fontsize=7)
    return fig


def throughput(points: pd.DataFrame, *, chance: float | None = None, title="Throughput vs accuracy (Fig. 8)"):
    """Fig. 8: accuracy (± stderr) against measured throughput × vanilla static batching (min–max over repeats).

    One colour per system, one marker per KV policy; the dashed lines are vanilla static batching
    (x = 1) and the tasks' chance accuracy.
    """
    df = points.dropna(subset=["avg_accuracy"])
    fig, ax = _figure(6.4, 3.8)
    systems = list(dict.fromkeys(df["system"]))
    colours = dict(zip(systems, sns.color_palette("tab10", len(systems))))
    markers = dict(zip(dict.fromkeys(df["kv_policy"]), "osD^v"))
    for row in df.itertuples():
        xerr = [[row.delta_v - row.delta_v_min], [row.delta_v_max - row.delta_v]]
        ax.errorbar(row.delta_v, row.avg_accuracy, xerr=xerr, yerr=row.accuracy_stderr, fmt=markers[row.kv_policy],
                    color=colours[row.system], ms=6, capsize=2, lw=0.8,
                    label=f"{row.system} ({row.config}, {row.exit_policy}, KV {row.kv_policy})")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label=f"chance ({chance:.2f})")
    ax.set(title=title, xlabel="throughput / vanilla static batching (measured)", ylabel="average accuracy")
    ax.legend(fontsize=5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def step_costs(costs: pd.DataFrame, title="Time per token by batch size (Tables 16, 18)"):
    """ms per token through every loop (block × B + LM head, per row) against rows per call, per model."""
    df = costs.copy()
    loops = df["model"].str.extract(r"B=(\d+)")[0].fillna(1).astype(int)
    df["ms_per_token"] = 1e3 * (df["block_s"] * loops + df["head_s"]) / df["rows"]
    fig, ax = _figure(5.4, 3.4)
    sns.lineplot(df, x="rows", y="ms_per_token", hue="model", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", title=title, xlabel="rows per call (batch size)",
           ylabel="ms per token (all loops + head)")
    ax.legend(fontsize=6)
    return fig


def real_over_bound(df: pd.DataFrame, title="Measured throughput / the engine's own bound"):
    """One bar per system (and KV policy): real / bound, with the 0.9 target."""
    d = df.assign(label=df["system"] + " [" + df["kv_policy"] + "]")
    fig, ax = _figure(6.0, 3.4)
    sns.barplot(d, y="label", x="real_over_bound", hue="config" if "config" in d else None, ax=ax)
    ax.axvline(0.9, color="k", lw=0.8, ls="--")
    ax.set(title=title, xlabel="real / bound", ylabel="", xlim=(0, 1.1))
    ax.legend(fontsize=6)
    return fig


def energy_heatmap(energy: pd.DataFrame, rank: int):
    """Share of each depth's residual ‖Wℓ − W′‖² captured by a rank-r SVD, depth × linear."""
    fig, ax = _figure(6.0, 3.6)
    grid = energy.pivot(index="linear", columns="depth", values="energy_captured")
    sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "energy captured"})
    ax.set(title=f"Residual energy captured at rank {rank} (eq. 4)")
    return fig
