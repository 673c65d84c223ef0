"""Figures: error bars where there is a stderr, a chance line, one palette per study, a table instead of
a one-point plot, and source tables whose tag columns never hold a metric."""
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

import rrt.plots as plots  # noqa: E402
from rrt.plots_base import GOLD_MISSING, SIGMAS, human, points, signal, signal_caption, versus_chance  # noqa: E402
from rrt.evaluation import CHANCE, chance_level  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = SimpleNamespace(model="tiny-llama", scale="smoke", num_blocks=(2,), train_corpus="wikitext2",
                        eval_corpora=("wikitext2/test", "tinystories/test"), corpora=("wikitext2/test",))
RUNS = ["full-size", "stepwise B=2", "average B=2", "stepwise B=2 seed=1", "average B=2 seed=1", "reduced-size B=2"]
TASKS = ["arc_easy", "piqa"]
# What each figure's source table must hold, by the Plot.kind written in its `plot` column.
NEEDS = {"loss_curves": {"label", "seed", "tokens"}, "accuracy": {"label", "seed", "avg_accuracy", "stderr", "chance"},
         "task_accuracy": {"label", "seed", "task", "accuracy", "stderr", "chance"},
         "perplexity": {"label", "seed", "corpus", "perplexity"},
         "size_vs_quality": {"label", "seed", "non_embedding", "perplexity"},
         "final_models": {"label", "seed", "variant", "non_embedding", "avg_accuracy", "stderr", "chance", "pareto"},
         "rank_accuracy": {"label", "init", "lora_rank", "lora_init", "avg_accuracy", "stderr"},
         "init_perplexity": {"init", "lora_rank", "untie_norms", "perplexity", "reference"},
         "init_variants": {"label", "seed", "variant", "tokens", "loss"},
         "throughput": {"label", "system", "kv_policy", "delta_v", "avg_accuracy", "accuracy_stderr"},
         "step_costs": {"model", "rows", "ms_per_token"}, "real_over_bound": {"label", "system", "real_over_bound"},
         # rrt.plots_paper's figures (kind = name): each also holds its study's quality metric (`quality_metric`)
         "fig7a_pareto": {"label", "seed", "non_embedding", "pareto"},
         "fig15_svd_vs_zero": {"label", "seed", "lora_rank", "lora_init", "reference"}}
STRING_TAGS = {"plot", "label", "run", "role", "baseline", "init", "lora_init", "kd", "exit_scheme", "training", "trainable", "data",
               "config", "system", "exit_policy", "kv_policy", "model", "corpus", "task", "variant"}


def _seed(run):
    return int(run.rsplit("seed=", 1)[1]) if "seed=" in run else 0


def runs_table(names=RUNS, sizes=None):
    sizes = sizes or {"full-size": 40_000}
    return pd.DataFrame([{"run": r, "seed": _seed(r), "non_embedding": sizes.get(r, 20_000)} for r in names])


def accuracy_table(names=RUNS, tasks=TASKS, loops=(None,), **tags):
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"run": r, "seed": _seed(r), "task": t, "loop_idx": b, "value": rng.uniform(0.3, 0.7),
                          "stderr": 0.05, "n": 20, **tags} for r in names for t in tasks for b in loops])


def gold_table(names=RUNS, tasks=TASKS, loops=(None,)):
    """accuracy_table's rows at chance (0.375 ± 0.1), with the gold answer's log-likelihood: -1 nat per run apart."""
    acc = accuracy_table(names, tasks, loops).assign(value=0.375, stderr=0.1)
    rank = {label: i for i, label in enumerate(dict.fromkeys(plots.label_of(r) for r in names))}
    return acc.assign(gold_ll=-2.0 - acc["run"].map(plots.label_of).map(rank), gold_ll_stderr=0.05, gold_margin=-0.1)


def perplexity_table(names=RUNS, loops=(None,)):
    return pd.DataFrame([{"run": r, "seed": _seed(r), "corpus": c, "loop_idx": b, "perplexity": 10.0 ** (1 + i)}
                         for i, r in enumerate(names) for c in STUDY.eval_corpora for b in loops])


def curves_table(names=RUNS, steps=6):
    return pd.DataFrame([{"run": r, "seed": _seed(r), "kind": "train", "step": s, "tokens": 64 * s,
                          "loss": 5.0 - 0.1 * s + i, "loss/ce": 4.0 - 0.1 * s + i}
                         for i, r in enumerate(names) for s in range(1, steps + 1)])


def rank_table(ranks=(0, 4, 16)):
    rows = []
    for rank in ranks:
        for lora_init in (("svd", "zero") if rank else ("-",)):
            name = f"average B=2 r={rank}" + (f" {lora_init}" if rank else "")
            rows.append(dict(run=name, init="average", lora_rank=rank, lora_init=lora_init, untie_norms=False))
    return pd.concat([accuracy_table([r["run"]], **{k: v for k, v in r.items() if k != "run"}) for r in rows],
                     ignore_index=True)


def init_curve(ranks=(0, 4, 32)):
    rows = [{"model": "original", "init": "-", "lora_rank": "-", "untie_norms": "-", "perplexity": 90.0,
             "non_embedding": 40_000}]
    rows += [{"model": "B=2", "init": init, "lora_rank": r, "untie_norms": untie, "perplexity": 1e4 / (1 + r),
              "non_embedding": 20_000 + 100 * r} for init in ("average", "lower") for untie in (False, True)
             for r in ranks]
    return pd.DataFrame(rows)


def variant_curves():
    """01's Stepwise (two seeds) and Average with their Fig. 11 variants, and one run no panel shows."""
    runs = [("stepwise B=2", "study", "stepwise", "-"), ("stepwise B=2 seed=1", "study", "stepwise", "-"),
            ("average B=2", "study", "average", "-"), ("lower B=2", "study", "lower", "-"),
            ("stepwise_start B=2", "variant", "stepwise_start", "-"), ("average B=2 norm=zero", "variant", "average", "zero")]
    tags = pd.DataFrame([{"run": r, "role": role, "init": i, "norm_init": n, "num_blocks": 2} for r, role, i, n in runs])
    return curves_table([r[0] for r in runs]).merge(tags, on="run")


# Fig. 17's final models: (run, role, init, B, rank, non-embedding size, accuracy); the last run is not final.
FINAL = [("full-size 60B", "pretrained", None, None, None, 40_000, 0.7),  # TinyLlama's: the original checkpoint
         ("full-size 75B", "baseline", None, None, None, 40_000, 0.65),
         ("reduced-size B=2", "baseline", None, 2, None, 20_000, 0.3),
         ("stepwise B=3", "study", "stepwise", 3, 0, 14_000, 0.4),
         ("stepwise B=2", "study", "stepwise", 2, 0, 20_000, 0.5),
         ("average B=2 r=64", "study", "average", 2, 64, 24_000, 0.55),
         ("average B=2 r=128", "study", "average", 2, 128, 28_000, 0.52),
         ("stepwise B=2 ce", "study", "stepwise", 2, 0, 20_000, 0.9)]


def final_tables(final=FINAL):
    runs = pd.DataFrame([{"run": r, "seed": 0, "role": role, "baseline": r.split(" ")[0].removesuffix("-size")
                          if role != "study" else None, "init": init, "num_blocks": b, "lora_rank": rank,
                          "non_embedding": n, "final": True if r != "stepwise B=2 ce" else None}
                         for r, role, init, b, rank, n, _ in final])
    acc = pd.DataFrame([{"run": r, "seed": 0, "task": t, "loop_idx": None, "value": a, "stderr": 0.05, "n": 20}
                        for r, *_, a in final for t in TASKS])
    return runs, acc


def serving_tables():
    points = pd.DataFrame([{"config": c, "system": s, "exit_policy": e, "kv_policy": "propagate",
                            "tokens_per_s": 100.0, "delta_v": d, "delta_v_min": d - 0.05, "delta_v_max": d + 0.05,
                            "avg_accuracy": 0.6, "accuracy_stderr": 0.04}
                           for c in ("B=2 r=0", "B=3 r=0")
                           for s, e, d in (("vanilla_static", "none", 1.0), ("vanilla_continuous", "none", 1.3),
                                           ("cdb_oracle", "oracle", 2.0))])
    costs = pd.DataFrame([{"rows": n, "block_s": 1e-3 * n, "head_s": 1e-4 * n, "model": m, "config": c}
                          for c in ("B=2 r=0", "B=3 r=0") for m in ("vanilla", f"recursive {c}") for n in (1, 4, 16)])
    throughput = points.assign(real_over_bound=0.95)
    return points, costs, throughput


def every_plot():
    """One Plot per figure function on synthetic tables (the figures' contract, whatever the committed outputs)."""
    colours = plots.palette(RUNS)
    acc, ppl = accuracy_table(), perplexity_table()
    points, costs, throughput = serving_tables()
    return [plots.loss_curves(curves_table(), study=STUDY, colours=colours),
            plots.loss_curves(curves_table(), study=STUDY, colours=colours, metric="loss/ce"),
            plots.accuracy(acc, study=STUDY, colours=colours),
            plots.accuracy(accuracy_table(loops=(0, 1)), study=STUDY, colours=colours, per_loop=True),
            plots.task_accuracy(acc, study=STUDY, colours=colours),
            plots.perplexity(ppl, study=STUDY, colours=colours),
            plots.perplexity(perplexity_table(loops=(0, 1)), study=STUDY, colours=colours, per_loop=True),
            plots.size_vs_quality(runs_table(), acc, ppl, study=STUDY, colours=colours),
            plots.final_models(*final_tables(), study=STUDY),
            plots.rank_accuracy(rank_table(), study=STUDY),
            plots.init_perplexity(init_curve(), study=STUDY),
            plots.init_variants(variant_curves(), study=STUDY),
            plots.throughput(points, study=STUDY, chance=0.5),
            plots.step_costs(costs, study=STUDY),
            plots.real_over_bound(throughput, study=STUDY)]


def caps(fig):
    """Error-bar whiskers drawn on a figure (errorbar's LineCollections)."""
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]


def dashed_lines(fig, label="chance"):
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label and ln.get_linestyle() == "--"]


def bar_colours(fig):
    """{y tick label: bar colour} of the first axes of a horizontal bar figure."""
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    bars = sorted(ax.patches, key=lambda p: p.get_y())
    return {label: to_rgb(bar.get_facecolor()) for label, bar in zip(labels, bars)}


@pytest.mark.parametrize("make", [
    lambda: plots.accuracy(accuracy_table(), study=STUDY),
    lambda: plots.accuracy(accuracy_table(loops=(0, 1)), study=STUDY, per_loop=True),
    lambda: plots.task_accuracy(accuracy_table(), study=STUDY),
    lambda: plots.size_vs_quality(runs_table(), accuracy_table(), perplexity_table(), study=STUDY),
    lambda: plots.rank_accuracy(rank_table(), study=STUDY),
    lambda: plots.throughput(serving_tables()[0], study=STUDY, chance=0.5),
    lambda: plots.final_models(*final_tables(), study=STUDY),
], ids=["accuracy", "per_loop", "task_accuracy", "size_vs_quality", "rank_accuracy", "throughput", "final_models"])
def test_accuracy_figures_have_error_bars_and_a_chance_line(make):
    plot = make()
    assert plot.figure is not None
    assert caps(plot.figure), "no error bars"
    assert dashed_lines(plot.figure), "no dashed line labelled 'chance'"


def test_chance_line_sits_at_each_tasks_chance():
    plot = plots.task_accuracy(accuracy_table(), study=STUDY)
    lines = {ax.get_title(): ln.get_xdata()[0] for ax in plot.figure.axes for ln in ax.get_lines()
             if ln.get_label() == "chance"}
    assert lines == pytest.approx({"arc_easy": CHANCE["arc_easy"], "piqa": CHANCE["piqa"],
                                   "average": chance_level(TASKS)})


def test_accuracy_whisker_is_the_propagated_stderr():
    acc = accuracy_table(["full-size", "stepwise B=2"])
    plot = plots.accuracy(acc, study=STUDY)
    assert plot.table["stderr"].tolist() == pytest.approx([np.sqrt(2 * 0.05 ** 2) / 2] * 2)
    segments = caps(plot.figure)[0].get_segments()
    assert segments[0][1][0] - segments[0][0][0] == pytest.approx(2 * np.sqrt(2 * 0.05 ** 2) / 2)


def test_seeds_share_a_label_and_the_spread_is_drawn():
    plot = plots.accuracy(accuracy_table(), study=STUDY)
    assert set(plot.table["label"]) == {"full-size", "stepwise B=2", "average B=2", "reduced-size B=2"}
    assert plot.table.groupby("label")["seed"].nunique()["stepwise B=2"] == 2
    seed_dots = [ln for ln in plot.figure.axes[0].get_lines() if ln.get_marker() == "o" and len(ln.get_xdata()) == 2]
    assert len(seed_dots) == 2  # stepwise and average: two seeds each


def test_palette_is_one_colour_per_label_in_every_figure():
    colours = plots.palette(RUNS)
    assert list(colours) == ["full-size", "stepwise B=2", "average B=2", "reduced-size B=2"]
    assert len(set(colours.values())) == len(colours)
    assert plots.palette(["average B=2", "full-size"])["full-size"] == colours["full-size"]  # baselines fixed
    acc = bar_colours(plots.accuracy(accuracy_table(), study=STUDY, colours=colours).figure)
    subset = accuracy_table(["stepwise B=2", "average B=2"])
    sub = bar_colours(plots.accuracy(subset, study=STUDY, colours=colours).figure)
    assert acc == {k: to_rgb(v) for k, v in colours.items()}
    assert sub == {k: acc[k] for k in ("stepwise B=2", "average B=2")}
    lines = {ln.get_label(): to_rgb(ln.get_color()) for ln in
             plots.loss_curves(curves_table(), study=STUDY, colours=colours).figure.axes[0].get_lines()}
    assert {k: lines[k] for k in acc} == acc


@pytest.mark.parametrize("make", [
    lambda: plots.loss_curves(curves_table(steps=2), study=STUDY),
    lambda: plots.rank_accuracy(rank_table(ranks=(0, 64)), study=STUDY),
    lambda: plots.init_perplexity(init_curve(ranks=(0, 64)), study=STUDY),
    lambda: plots.size_vs_quality(runs_table(sizes={"full-size": 20_000}), accuracy_table(), perplexity_table(),
                                  study=STUDY),
    lambda: plots.accuracy(accuracy_table(["stepwise B=2"]), study=STUDY),
    lambda: plots.step_costs(serving_tables()[1].query("rows == 4"), study=STUDY),
], ids=["two_steps", "two_ranks", "two_init_ranks", "one_size", "one_model", "one_batch"])
def test_too_few_points_give_the_table(make, tmp_path):
    plot = make()
    assert plot.figure is None and not plot.table.empty and plot.note
    assert plot._repr_html_().count("<tr") == len(plot.table) + 1
    plots.save(plot, tmp_path, "x")
    assert (tmp_path / "figures" / "x.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "figures" / "x.csv")["plot"].iloc[0] == plot.kind


def test_final_models_pareto_frontier_and_only_final_runs():
    plot = plots.final_models(*final_tables(), study=STUDY)
    t = plot.table.set_index("label")
    assert "stepwise B=2 ce" not in t.index and len(t) == 7  # not a final model
    front = {"stepwise B=3", "stepwise B=2", "average B=2 r=64", "full-size 60B"}  # the rest: smaller and better exists
    assert set(t.index[t["pareto"]]) == front
    dotted = [ln for ln in plot.figure.axes[0].get_lines() if ln.get_label() == "Pareto frontier"]
    assert len(dotted) == 1 and dotted[0].get_linestyle() == ":"
    assert list(dotted[0].get_xdata()) == [14_000, 20_000, 24_000, 40_000]
    assert t.loc["average B=2 r=64", "variant"] == "B=2" and t.loc["full-size 75B", "variant"] == "full-size 75B"
    assert t["chance"].iloc[0] == pytest.approx(chance_level(TASKS))
    texts = [x.get_text() for x in plot.figure.axes[0].texts]
    assert sorted(texts) == ["r=0", "r=0", "r=128", "r=64"]


@pytest.mark.parametrize("final", [FINAL[-1:], FINAL[:2]], ids=["none_final", "one_size"])
def test_final_models_without_a_size_axis_give_the_table(final):
    plot = plots.final_models(*final_tables(final), study=STUDY)
    assert plot.figure is None and plot.note and plot.kind == "final_models"


def test_vanilla_is_drawn_once_whatever_the_configs():
    points, costs, throughput = serving_tables()
    fig8 = plots.throughput(points, study=STUDY, chance=0.5)
    assert fig8.table["label"].tolist().count("vanilla_static") == 1
    assert (fig8.table["system"] == "cdb_oracle").sum() == 2
    assert plots.step_costs(costs, study=STUDY).table.groupby("model").size().to_dict() == {
        "vanilla": 3, "recursive B=2 r=0": 3, "recursive B=3 r=0": 3}
    assert plots.real_over_bound(throughput, study=STUDY).table["system"].tolist().count("vanilla_continuous") == 1


def test_real_over_bound_shows_every_bar_whole():
    _, _, throughput = serving_tables()
    throughput = throughput.assign(real_over_bound=np.linspace(0.5, 1.4, len(throughput)))
    plot = plots.real_over_bound(throughput, study=STUDY)
    ax = plot.figure.axes[0]
    assert ax.get_xlim()[1] > plot.table["real_over_bound"].max()  # bars above the bound are not clipped
    labels = [t.get_text().strip() for t in ax.texts]
    assert labels == [f"{v:.2f}" for v in plot.table["real_over_bound"]]


def test_log_axes_have_plain_tick_labels():
    plot = plots.perplexity(perplexity_table(), study=STUDY)
    ax = plot.figure.axes[0]
    plot.figure.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ax.get_xscale() == "log" and labels
    assert not any("e" in x or "^" in x for x in labels), labels
    assert human(20_000) == "20k" and human(1.5e6) == "1.5M"


def test_titles_name_model_blocks_data_and_scale():
    for plot in every_plot():
        if plot.figure is not None:
            text = plot.figure.get_suptitle()
            assert all(s in text for s in ("tiny-llama", "B=2", "smoke scale")), (plot.kind, text)


def test_loss_curves_plot_the_named_metric():
    ce = plots.loss_curves(curves_table(), study=STUDY, metric="loss/ce")
    assert "loss/ce" in ce.table and "loss" not in ce.table
    assert "CE" in ce.figure.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="loss/kd"):
        plots.loss_curves(curves_table(), study=STUDY, metric="loss/kd")


def test_save_writes_figure_and_source_table_and_returns_nothing(tmp_path):
    plot = plots.accuracy(accuracy_table(), study=STUDY)
    assert plots.save(plot, tmp_path, "fig5b") is None
    for ext in ("png", "svg", "csv"):
        assert (tmp_path / "figures" / f"fig5b.{ext}").stat().st_size > 0
    saved = pd.read_csv(tmp_path / "figures" / "fig5b.csv")
    assert saved.drop(columns="plot").round(9).equals(plot.table.round(9))


def check_source_table(table: pd.DataFrame, where: str):
    kind = table["plot"].iloc[0]
    assert NEEDS[kind] <= set(table.columns), f"{where}: {kind} lacks {NEEDS[kind] - set(table.columns)}"
    unknown = set(table.columns) - set(plots.TAG_COLUMNS) - set(plots.METRIC_COLUMNS) - {"loss", "loss/ce"}
    assert not unknown, f"{where}: columns neither tag nor metric: {unknown}"
    for col in set(table.columns) & STRING_TAGS:
        numeric = pd.to_numeric(table[col].dropna(), errors="coerce").notna()
        assert not numeric.any(), f"{where}: tag column {col!r} holds numbers {table[col][numeric].tolist()[:3]}"
    for col in set(table.columns) & (set(plots.TAG_COLUMNS) - STRING_TAGS):
        values = pd.to_numeric(table[col].dropna().replace({"full": np.nan, "True": 1, "False": 0}), errors="coerce")
        fractional = values.dropna() % 1 != 0
        if col != "exit_coefficient":  # the one fractional tag (0.1); every other numeric tag counts something
            assert not fractional.any(), f"{where}: tag column {col!r} holds a metric-like value"
    for col in set(table.columns) & set(plots.METRIC_COLUMNS):
        assert pd.api.types.is_numeric_dtype(table[col]) or table[col].isna().all(), f"{where}: metric {col!r}"


def test_figure_source_tables_put_metrics_in_metric_columns(tmp_path):
    """Every committed figure table (outputs/examples/**/figures/*.csv) and every table the figure
    functions write from synthetic data: the columns its plot needs, metrics never in tag columns."""
    made = every_plot()
    for i, plot in enumerate(made):
        plots.save(plot, tmp_path, f"f{i}")
    written = sorted((tmp_path / "figures").glob("*.csv"))
    assert len(written) == len(made)
    committed = sorted((ROOT / "outputs" / "examples").glob("**/figures/*.csv"))
    for path in committed + written:
        check_source_table(pd.read_csv(path), path.name)


def test_the_check_catches_a_metric_in_a_tag_column():
    bad = pd.DataFrame({"plot": ["accuracy"], "label": ["a"], "seed": [0], "avg_accuracy": [0.5], "stderr": [0.1],
                        "chance": [0.25], "kd": [3.21]})
    with pytest.raises(AssertionError, match="kd"):
        check_source_table(bad, "bad")


def test_init_variants_compare_each_variant_with_its_init_in_its_own_panel():
    plot = plots.init_variants(variant_curves(), study=STUDY)
    a, b = plot.figure.axes[:2]
    assert [ln.get_label() for ln in a.get_lines()] == ["fixed ends (first and last layer; our Stepwise)",
                                                        "fixed start (layer 0, then every B-th)"]
    assert [ln.get_label() for ln in b.get_lines()] == ["LN-avg (averaged; our Average)", "LN-zero (zeros)"]
    assert len(a.collections) == 1  # Stepwise ran at two seeds: its band; the variant ran at one
    assert "lower" not in set(plot.table["init"])
    fallback = plots.init_variants(curves_table(), study=STUDY)
    assert fallback.figure is None and "no init variants" in fallback.note


def test_signal_names_the_most_separated_pair_and_whether_it_exceeds_its_error_bars():
    values, errors = pd.Series({"a": -2.0, "b": -1.5, "c": -1.9}), pd.Series({"a": 0.05, "b": 0.05, "c": 0.5})
    found = signal(values, errors)
    assert (found.separated, found.high, found.low) == (True, "b", "a")
    assert found.gap == pytest.approx(0.5) and found.error == pytest.approx(np.hypot(0.05, 0.05))
    # the same gap under wide error bars: not separated (gap / error = 0.5 / 0.28 < SIGMAS)
    close = signal(values, pd.Series({"a": 0.2, "b": 0.2, "c": 0.5}))
    assert not close.separated and close.gap / close.error < SIGMAS
    assert not signal(pd.Series({"a": 1.0, "b": 1.0}), pd.Series({"a": 0.1, "b": 0.1})).separated


def test_versus_chance_is_every_value_within_its_error_bars_of_chance():
    assert versus_chance(pd.Series([0.30, 0.42]), pd.Series([0.05, 0.05]), 0.375)
    assert not versus_chance(pd.Series([0.30, 0.60]), pd.Series([0.05, 0.05]), 0.375)


def test_caption_says_whether_differences_exceed_error_bars_and_whether_all_is_at_chance():
    table = pd.DataFrame({"label": ["Stepwise", "Average"], "seed": 0, "v": [-1.5, -1.91], "e": [0.05, 0.06]})
    text = signal_caption(points(table, value="v", err="e"), unit=" nats")
    assert text == "Differences exceed their error bars (gap > 2σ): Stepwise vs Average, gap 0.41 ± 0.078 nats."
    at_chance = table.assign(v=[0.35, 0.40], e=[0.1, 0.1])
    text = signal_caption(points(at_chance, value="v", err="e"), chance=0.375)
    assert text.startswith("Every value is within 2σ of chance (0.375): this figure shows no accuracy difference")
    assert "No difference exceeds its error bars" in text


@pytest.mark.parametrize("scale", ["cpu", "smoke", "paper-gemma-2b"])
def test_accuracy_figures_plot_the_gold_loglik_below_paper_scale_and_save_their_caption(scale, tmp_path):
    study = SimpleNamespace(**{**vars(STUDY), "scale": scale})
    acc = gold_table()
    plot = plots.accuracy(acc, study=study)
    ax = plot.figure.axes[0]
    means = plot.table.groupby("label", sort=False)[["gold_ll", "avg_accuracy"]].mean()
    if scale.startswith("paper"):  # the paper's figure: accuracy bars, chance dashed
        assert "accuracy" in ax.get_xlabel() and dashed_lines(plot.figure)
        assert sorted(p.get_width() for p in ax.patches) == pytest.approx(sorted(means["avg_accuracy"]))
        assert plot.caption.startswith("Every value is within 2σ of chance")
    else:  # a dot per run at its mean gold log-likelihood; accuracy and chance in the table
        assert "log-likelihood" in ax.get_xlabel() and not ax.patches and not dashed_lines(plot.figure)
        drawn = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_marker() == "o" and len(ln.get_xdata()) == 1)
        assert drawn == pytest.approx(sorted(means["gold_ll"]))
        assert {"avg_accuracy", "stderr", "chance"} <= set(plot.table)
        assert plot.caption.startswith("Accuracy (in the table) is within 2σ of chance for every model")
        assert "Differences exceed their error bars" in plot.caption and plot.caption.endswith(" nats.")
    assert plot.figure.get_supxlabel().replace("\n", " ") == plot.caption  # shown under the figure
    plots.save(plot, tmp_path, "fig5b")
    assert (tmp_path / "figures" / "fig5b.txt").read_text() == plot.caption + "\n"


def test_every_accuracy_figure_plots_the_gold_loglik_at_cpu_scale_with_a_caption():
    study = SimpleNamespace(**{**vars(STUDY), "scale": "cpu"})
    acc = gold_table()
    points_, _, _ = serving_tables()
    served = points_.assign(avg_accuracy=0.375, accuracy_stderr=0.1, gold_ll=[-2.0, -2.0, -1.0] * 2, gold_ll_stderr=0.05)
    made = [plots.accuracy(gold_table(loops=(0, 1)), study=study, per_loop=True),
            plots.task_accuracy(acc, study=study),
            plots.size_vs_quality(runs_table(), acc, perplexity_table(), study=study),
            plots.rank_accuracy(rank_table().assign(value=0.375, stderr=0.1, gold_ll=-2.0, gold_ll_stderr=0.05,
                                                    gold_margin=0.0), study=study),
            plots.throughput(served, study=study, chance=0.375)]
    for plot in made:
        labels = " ".join(ax.get_xlabel() + ax.get_ylabel() for ax in plot.figure.axes)
        assert "log-likelihood" in labels, plot.kind
        assert plot.caption.startswith("Accuracy (in the table) is within 2σ of chance"), (plot.kind, plot.caption)
    assert "in 2 of 3 panels" in made[1].caption or "in 3 of 3 panels" in made[1].caption  # per task + average
    assert "No difference exceeds its error bars (every gap ≤ 2σ); the largest:" in made[3].caption  # all at -2.0
    assert "gap 0 ± 0.05 nats" in made[3].caption  # each ± 0.05 √2 / 2 (two tasks pooled)


def test_rows_without_gold_loglik_still_plot_accuracy_and_say_so():
    study = SimpleNamespace(**{**vars(STUDY), "scale": "cpu"})
    for plot in (plots.accuracy(accuracy_table(), study=study), plots.task_accuracy(accuracy_table(), study=study)):
        assert dashed_lines(plot.figure) and plot.caption.startswith(GOLD_MISSING)
