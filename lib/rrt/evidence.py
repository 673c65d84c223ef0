"""The numbers a claim compares, read from a notebook's own CSVs: each model's value and error, and the verdicts.

A model is a set of tags (`{"init": "stepwise", "num_blocks": 2}`), matched as text against a table's columns
(2.0 == 2, NaN == ""). `compare` decides on accuracy when both models are above chance by more than `K` stderr,
else on every held-out set's perplexity, in logs: the error of a model is the spread of its seeds, or, at one
seed, the largest seed spread of the same run, or `PPL_NOISE`. A model the run lacks raises `Missing`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rrt.evaluation import chance_level
from rrt.verdicts import K, better, combined_error, not_worse, pooled_stderr, same

# log-perplexity's error for a run at one seed where no model of the run has two: 01's two Stepwise seeds at `cpu`
# scale differ by 0.02 (WikiText-2) and 0.08 (TinyStories) in log-perplexity, a std of up to 0.05.
PPL_NOISE = 0.05


class Missing(Exception):
    """A model a claim compares was not run at this scale."""


@dataclass(frozen=True)
class Stat:
    """One model's number on one test: `value` in the compared scale (log-perplexity, accuracy, log tokens/s),
    `error` its error there, `shown` as printed, `error_from` where the error comes from."""
    value: float
    error: float
    shown: str
    error_from: str = ""


@dataclass(frozen=True)
class Comparison:
    """Two models compared on every held-out set (or once, on accuracy): their printed numbers and the verdicts."""
    measure: str
    a: list[str]
    b: list[str]
    verdicts: list[str]

    def text(self, side: str) -> str:
        return " / ".join(self.a if side == "a" else self.b)


# ---------------------------------------------------------------- reading a run's CSVs

class RunCSVs:
    """A notebook's output directory: its CSVs by name, each read once; None for one this scale did not write."""

    def __init__(self, run_dir: Path):
        self.dir, self._tables = run_dir, {}

    def table(self, name: str) -> pd.DataFrame | None:
        if name not in self._tables:
            path = self.dir / f"{name}.csv"
            self._tables[name] = pd.read_csv(path) if path.exists() else None
        return self._tables[name]


def norm(value) -> str:
    """Return a tag as text: NaN and None as "", a whole float as an int ("2.0" written by pandas → "2")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def rows_of(df: pd.DataFrame | None, tags: dict) -> pd.DataFrame:
    """Rows of `df` whose columns equal `tags` (compared as text: 2.0 == 2, NaN == ""; a column the table lacks is
    empty in every row)."""
    if df is None or df.empty:
        return pd.DataFrame()
    mask = pd.Series(True, index=df.index)
    for col, value in tags.items():
        if col not in df:
            mask &= norm(value) == ""
            continue
        mask &= df[col].map(norm) == norm(value)
    return df[mask]


def at_loop(rows: pd.DataFrame, loop) -> pd.DataFrame:
    """Rows at `loop` (0-based; "last": the largest loop_idx); None: every row (a model without loops)."""
    if loop is None or rows.empty:
        return rows
    loops = rows["loop_idx"].dropna()
    if loops.empty:
        return rows.iloc[0:0]
    return rows[rows["loop_idx"] == (loops.max() if loop == "last" else loop)]


def short(corpus: str) -> str:
    return corpus.split("/")[0]


# ---------------------------------------------------------------- the numbers compared

def perplexity(run: RunCSVs, tags: dict, loop=None) -> dict[str, Stat]:
    """{held-out set: Stat of log-perplexity over the model's seeds}."""
    df = run.table("perplexity")
    rows = at_loop(rows_of(df, tags), loop)
    if rows.empty:
        raise Missing
    if rows.duplicated(["seed", "corpus"]).any():  # two models under one set of tags would pass for seeds
        raise ValueError(f"tags {tags} match several models: {sorted(rows['run'].unique())}")
    noise = _seed_noise(df)
    out = {}
    for corpus, g in rows.groupby("corpus", sort=False):
        logs = np.log(g["perplexity"].to_numpy(float))
        if len(logs) > 1:
            spread, source = logs.std(ddof=1), "its seeds"
        elif corpus in noise:
            spread, source = noise[corpus], "the run's seed spread"
        else:
            spread, source = PPL_NOISE, f"{PPL_NOISE} assumed"
        out[corpus] = Stat(float(logs.mean()), float(spread / math.sqrt(len(logs))), fmt(math.exp(logs.mean())),
                           source)
    return out


def _seed_noise(df: pd.DataFrame) -> dict[str, float]:
    """{held-out set: the largest std of log-perplexity over the seeds of one model} in this run."""
    keys = [c for c in df.columns if c not in ("run", "seed", "perplexity", "run_dir", "config_hash")]
    d = df.assign(**{c: df[c].map(norm) for c in keys}, log=np.log(df["perplexity"].astype(float)))
    stds = d.groupby(keys)["log"].std(ddof=1).dropna()
    return stds.groupby(level="corpus").max().to_dict() if not stds.empty else {}


def accuracy(run: RunCSVs, tags: dict, loop=None) -> tuple[Stat, float] | None:
    """(Stat of the average accuracy over tasks, mean over seeds; the tasks' chance), or None if not evaluated."""
    rows = at_loop(rows_of(run.table("accuracy"), tags), loop)
    if rows.empty or rows["stderr"].isna().all():
        return None
    per_seed = rows.groupby("seed") if "seed" in rows else [(0, rows)]
    means, errors = [], []
    for _, g in per_seed:
        means.append(g["value"].mean())
        errors.append(pooled_stderr(g["stderr"]))
    value = float(np.mean(means))
    error = float(np.sqrt(np.mean(np.square(errors))) / math.sqrt(len(means)))
    return Stat(value, error, f"{100 * value:.1f}", "lm-eval stderr"), chance_level(rows["task"].unique())


def compare(run: RunCSVs, a: dict, b: dict, *, how: str = "better", loop=None, loop_b="same") -> Comparison:
    """Compare model `a` (the paper's better one, or the one that should match) with model `b`: on accuracy when
    both are above chance beyond 2 stderr, else on every held-out set's perplexity."""
    loop_b = loop if loop_b == "same" else loop_b
    acc = [accuracy(run, a, loop), accuracy(run, b, loop_b)]
    if all(x is not None and x[0].value - x[1] > K * x[0].error for x in acc):
        pairs, measure, higher = {"accuracy": (acc[0][0], acc[1][0])}, "avg accuracy (%)", True
    else:
        pa, pb = perplexity(run, a, loop), perplexity(run, b, loop_b)
        pairs = {c: (pa[c], pb[c]) for c in pa if c in pb}
        if not pairs:
            raise Missing
        measure, higher = "log-perplexity on " + " / ".join(short(c) for c in pairs), False
    sources = dict.fromkeys(s.error_from for pair in pairs.values() for s in pair)
    measure += f", error: {' / '.join(sources)}"
    verdicts = [_verdict(how, sa, sb, higher) for sa, sb in pairs.values()]
    return Comparison(measure, [sa.shown for sa, _ in pairs.values()], [sb.shown for _, sb in pairs.values()], verdicts)


def _verdict(how: str, a: Stat, b: Stat, higher: bool) -> str:
    error = combined_error(a.error, b.error)
    if how == "same":
        return same(a.value, b.value, error=error)
    return (better if how == "better" else not_worse)(a.value, b.value, error=error, higher_is_better=higher)


def final_loss(run: RunCSVs, tags: dict) -> Stat:
    """Training loss over the last tenth of the steps (at least 3), seeds pooled, ± its stderr."""
    rows = rows_of(run.table("curves"), tags)
    rows = rows[rows["kind"] == "train"] if not rows.empty else rows
    col = "loss/ce" if "loss/ce" in rows else "loss"
    if rows.empty or rows[col].isna().all():
        raise Missing
    window = max(3, int(rows["step"].max()) // 10)
    last = rows[rows["step"] > rows["step"].max() - window][col].dropna().to_numpy(float)
    error = last.std(ddof=1) / math.sqrt(len(last)) if len(last) > 1 else 0.0
    return Stat(float(last.mean()), float(error), f"{last.mean():.2f}", "stderr over the window")


def fmt(x: float) -> str:
    """Return a perplexity or rate as printed: 4 significant digits below 1000, whole numbers to 1e6, then 1.2e+07."""
    return f"{x:.4g}" if abs(x) < 1e3 else f"{x:.0f}" if abs(x) < 1e6 else f"{x:.1e}"


def many(comparisons: list[Comparison]) -> tuple[str, list[str]]:
    """Return (the comparisons' measures, distinct, joined; every verdict) for a claim tested several ways."""
    return " · ".join(dict.fromkeys(c.measure for c in comparisons)), [v for c in comparisons for v in c.verdicts]


def values(df: pd.DataFrame | None, col: str, tags: dict) -> list[str]:
    """Return the distinct non-empty values of `col` (as text, in order) in the rows matching `tags`."""
    rows = rows_of(df, tags)
    return [] if rows.empty or col not in rows else [v for v in dict.fromkeys(rows[col].map(norm)) if v]
