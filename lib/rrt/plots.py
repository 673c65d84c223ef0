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


def throughput(df: pd.DataFrame, x="throughput_ratio", y="avg_accuracy", hue="system", style=None,
               title="Throughput vs accuracy (Fig. 8)"):
    """Fig. 8: accuracy against throughput relative to vanilla static batching."""
    fig, ax = _figure(6.0, 3.6)
    sns.scatterplot(df, x=x, y=y, hue=hue, style=style, s=70, ax=ax)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set(title=title, xlabel="throughput / vanilla static batching", ylabel="average accuracy")
    ax.legend(fontsize=6, loc="best")
    return fig


def energy_heatmap(energy: pd.DataFrame, rank: int):
    """Share of each depth's residual ‖Wℓ − W′‖² captured by a rank-r SVD, depth × linear."""
    fig, ax = _figure(6.0, 3.6)
    grid = energy.pivot(index="linear", columns="depth", values="energy_captured")
    sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "energy captured"})
    ax.set(title=f"Residual energy captured at rank {rank} (eq. 4)")
    return fig
