"""The paper's figures and tables added for issue 30 (plots_paper.py, tables_paper.py) on synthetic frames, and the
tables' reading style (tables_style.py): Fig. 7a's frontier, Fig. 15's pairs, each table with the paper's numbers or
its "not measured" note; float noise never coloured, empty cells a grey "–", no numpy reprs."""
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from rrt import paper, plots_paper as PP, tables_paper as TP, tables_style as TS  # noqa: E402
from rrt import plots, tables as T  # noqa: E402
from tests.test_tables import early_exit_final_study  # noqa: E402
from rrt.plots_base import save  # noqa: E402

CORPORA = ("wikitext2/test", "tinystories/test")
STUDY = SimpleNamespace(model="tiny-llama", scale="cpu", num_blocks=(2,), train_corpus="wikitext2",
                        eval_corpora=CORPORA)
PAPER_SCALE = SimpleNamespace(**{**vars(STUDY), "scale": "paper-gemma-2b"})
# run → (role, baseline, init, lora_rank, lora_init, non-embedding, perplexity on wikitext2, accuracy)
MODELS = {"full-size": ("baseline", "full", None, None, None, 100e6, 20.0, 0.60),
          "reduced-size B=2": ("baseline", "reduced", None, None, None, 50e6, 900.0, 0.40),
          "stepwise B=2": ("baseline", None, "stepwise", 0, None, 50e6, 200.0, 0.50),
          "average B=2 r=0": ("study", None, "average", 0, "-", 50e6, 700.0, 0.45),
          "average B=2 r=64 svd": ("study", None, "average", 64, "svd", 70e6, 400.0, 0.52),
          "average B=2 r=64 zero": ("study", None, "average", 64, "zero", 70e6, 650.0, 0.47)}
TASKS = ("arc_easy", "piqa")


def frames(models=MODELS, seeds=(0,)):
    runs, ppl, acc = [], [], []
    for name, (role, base, init, rank, lora_init, size, p, a) in models.items():
        for seed in seeds:
            run = name if seed == 0 else f"{name} seed={seed}"
            tags = {"run": run, "seed": seed, "role": role, "baseline": base, "init": init, "num_blocks": 2,
                    "lora_rank": rank, "lora_init": lora_init, "untie_norms": False}
            runs.append({**tags, "non_embedding": size})
            ppl += [{**tags, "corpus": c, "loop_idx": np.nan, "perplexity": p * (1 + i) * (1 + 0.01 * seed)}
                    for i, c in enumerate(CORPORA)]
            acc += [{**tags, "task": t, "loop_idx": np.nan, "value": a, "stderr": 0.01, "n": 100} for t in TASKS]
    return {"runs": pd.DataFrame(runs), "perplexity": pd.DataFrame(ppl), "accuracy": pd.DataFrame(acc),
            "curves": pd.DataFrame()}


# ---------------------------------------------------------------- quality_metric, Fig. 7a, Fig. 15

def test_quality_metric_is_perplexity_at_small_scales_and_accuracy_at_the_papers():
    assert PP.quality_metric(STUDY) == "perplexity"
    assert PP.quality_metric(SimpleNamespace(scale="smoke")) == "perplexity"
    assert PP.quality_metric(PAPER_SCALE) == "avg_accuracy"


def test_fig7a_pareto_one_labelled_point_per_model_and_the_frontier(tmp_path):
    f = frames(seeds=(0, 1))
    plot = PP.fig7a_pareto(f["runs"], f["accuracy"], f["perplexity"], study=STUDY)
    assert plot.figure is not None and "Fig. 7a" in plot.figure.get_suptitle()
    ax = plot.figure.axes[0]
    assert ax.get_yscale() == "log" and "perplexity" in ax.get_ylabel()
    assert {t.get_text() for t in ax.texts} == set(MODELS)  # every model labelled on the plot
    front = plot.table.groupby("label")["pareto"].first()
    # lower perplexity is better: stepwise is the best at 50M and beats every 70M model; full-size the best overall
    assert front.to_dict() == {"full-size": True, "stepwise B=2": True, "reduced-size B=2": False,
                               "average B=2 r=0": False, "average B=2 r=64 svd": False,
                               "average B=2 r=64 zero": False}
    line = [ln for ln in ax.lines if ln.get_label() == "Pareto frontier"][0]
    assert list(line.get_xdata()) == [50e6, 100e6]
    save(plot, tmp_path, "fig7a_pareto")
    assert (tmp_path / "figures" / "fig7a_pareto.png").stat().st_size > 0


def test_fig7a_pareto_at_the_paper_scale_plots_accuracy_higher_is_better():
    f = frames()
    plot = PP.fig7a_pareto(f["runs"], f["accuracy"], f["perplexity"], study=PAPER_SCALE)
    ax = plot.figure.axes[0]
    assert ax.get_yscale() == "linear" and "accuracy" in ax.get_ylabel()
    front = plot.table.set_index("label")["pareto"]
    assert front["stepwise B=2"] and front["full-size"] and front["average B=2 r=64 svd"]  # 0.52 > 0.50 at 70M
    assert not front["average B=2 r=64 zero"] and not front["reduced-size B=2"]
    assert "higher is better" in plot.figure.get_suptitle()


def test_fig7a_pareto_without_a_size_axis_or_the_metric_is_the_table_with_a_note():
    f = frames({k: v for k, v in MODELS.items() if v[5] == 50e6})
    plot = PP.fig7a_pareto(f["runs"], f["accuracy"], f["perplexity"], study=STUDY)
    assert plot.figure is None and "same size" in plot.note
    plot = PP.fig7a_pareto(f["runs"], f["accuracy"], f["perplexity"].iloc[:0], study=STUDY)
    assert plot.figure is None and "no perplexity" in plot.note


def test_fig15_pairs_svd_and_zero_and_fills_only_gains_over_rank_zero():
    f = frames()
    plot = PP.fig15_svd_vs_zero(f["accuracy"], f["perplexity"], study=STUDY)
    assert plot.figure is not None and "Fig. 15" in plot.figure.get_suptitle()
    t = plot.table.set_index("lora_init")
    assert t.loc["svd", "perplexity"] == 400.0 and t.loc["zero", "perplexity"] == 650.0
    assert (t["reference"] == 700.0).all()  # the rank-0 model of the same init
    assert [m.get_ydata()[0] for m in markers(plot)] == [400.0, 650.0]
    assert [filled(m) for m in markers(plot)] == [True, True]  # both beat rank 0 (lower perplexity)
    worse = {**MODELS, "average B=2 r=64 zero": MODELS["average B=2 r=64 zero"][:6] + (800.0, 0.4)}
    g = frames(worse)
    assert [filled(m) for m in markers(PP.fig15_svd_vs_zero(g["accuracy"], g["perplexity"], study=STUDY))] == [True, False]


def markers(plot):
    """The data markers of each errorbar, in drawing order."""
    return [c.lines[0] for c in plot.figure.axes[0].containers]


def filled(line):
    return line.get_markerfacecolor() != "white" and tuple(matplotlib.colors.to_rgb(line.get_markerfacecolor())) != (1, 1, 1)


def test_fig15_without_zero_init_runs_is_the_table_with_a_note():
    f = frames({k: v for k, v in MODELS.items() if not k.endswith("zero")})
    plot = PP.fig15_svd_vs_zero(f["accuracy"], f["perplexity"], study=STUDY)
    assert plot.figure is None and "zero-init" in plot.note


# ---------------------------------------------------------------- Tables 3, 8, 15, 18, 19

def test_table3_not_measured_gives_the_papers_rows_and_the_note(tmp_path):
    t = TP.table3(frames())
    assert t["source"].eq("paper").all() and len(t) == len(paper.TABLE3)
    assert t.set_index("model").loc["Gemma 2B", "avg acc (%)"] == 61.72
    assert t[TP.NOTE].str.startswith(TP.NOT_MEASURED).all()
    html = TP.save(t, tmp_path, "table3", caption="Table 3").to_html()
    assert "NOT MEASURED AT THIS SCALE" in html and (tmp_path / "tables" / "table3.csv").exists()


def test_table3_measures_a_pretrained_run():
    f = frames()
    f["runs"].loc[0, "role"] = "pretrained"
    f["accuracy"].loc[f["accuracy"]["run"] == "full-size", "role"] = "pretrained"
    t = TP.table3(f)
    ours = t[t["source"] == "ours"]
    assert ours["model"].tolist() == ["full-size"] and ours["avg acc (%)"].iloc[0] == pytest.approx(60.0)
    assert ours["acc piqa (%)"].iloc[0] == pytest.approx(60.0) and t[TP.NOTE].isna().all()
    assert TP.measured(t)


def test_table8_our_uniform_rank_models_beside_the_papers_per_module_ranks():
    f = frames()
    study = {k: v[v["role"] == "study"] if "role" in v else v for k, v in f.items()}
    t = TP.table8(study)
    ours = t[t["source"] == "ours"]
    assert ours["model"].tolist() == ["average B=2 r=64 svd"]
    assert ours[["rank q", "rank kv", "rank out", "rank FFN"]].iloc[0].tolist() == [64] * 4
    assert ours["ppl wikitext2/test"].iloc[0] == 400.0
    p = t[t["source"] == "paper"]
    assert len(p) == len(paper.TABLE8) and p["avg acc (%)"].max() == 54.2
    assert t[TP.NOTE].str.contains("per-module ranks").all()


def test_table8_per_module_runs_are_measured():
    f = frames()
    extra = frames({"average B=2 ranks=64/128/64/128": ("study", None, "average", 128, "svd", 60e6, 500.0, 0.5)})
    extra["runs"]["module_ranks"] = "64/128/64/128"
    study = {k: pd.concat([f[k][f[k]["role"] == "study"], extra[k]], ignore_index=True) if len(f[k]) else f[k]
             for k in f}
    t = TP.table8(study)
    row = t[t["model"] == "average B=2 ranks=64/128/64/128"].iloc[0]
    assert [row[c] for c in TP.MODULES] == [64, 128, 64, 128] and row["ppl wikitext2/test"] == 500.0
    assert t[TP.NOTE].isna().all() and TP.measured(t)


def test_table15_without_final_models_is_the_papers_tinyllama_rows_with_the_note():
    t = TP.table15(frames())
    assert t["source"].eq("paper").all() and t[TP.NOTE].str.startswith(TP.NOT_MEASURED).all()
    assert t["paper TinyLlama avg acc (%)"].tolist() == list(paper.TABLE15.values())


def test_table15_puts_the_papers_tinyllama_numbers_on_our_final_models_last_loop():
    t = TP.table15(early_exit_final_study()).set_index(["model", "loop"])
    assert not any(c.startswith("paper avg") or c.startswith("paper Δ") for c in t.columns)  # Gemma's left to Table 14
    paper_acc = t["paper TinyLlama avg acc (%)"]
    assert paper_acc[("stepwise B=2", "loop 2")] == 44.3 and pd.isna(paper_acc[("stepwise B=2", "loop 1")])
    assert paper_acc[("average B=2 r=64", "loop 2")] == 45.0
    assert paper_acc[("stepwise B=2 post", "loop 2")] == 44.8 and paper_acc[("average B=2 r=64 post 0.1", "loop 2")] == 45.1
    d = t["paper TinyLlama Δ last loop vs before (pts)"].dropna()
    assert d.to_dict() == pytest.approx({("stepwise B=2 post", "loop 2"): 0.5, ("average B=2 r=64 post 0.1", "loop 2"): 0.1})
    assert t["source"].eq("ours").all() and t[TP.NOTE].isna().all()
    assert t.loc[("stepwise B=2 post", "loop 2"), "avg acc (%)"] == pytest.approx(53.0)


def step_costs():
    rows = [("vanilla", 1, 0.02, True), ("vanilla", 8, 0.01, True), ("vanilla", 16, 0.01, False),
            ("recursive B=2 r=0", 1, 0.01, True), ("recursive B=2 r=0", 8, 0.004, True)]
    return pd.DataFrame([{"rows": n, "block_s": s, "fill_s": None, "head_s": 0.002, "kv_bytes": 1, "fits": f,
                          "model": m, "config": "B=2 r=0", "num_blocks": 2} for m, n, s, f in rows])


def test_table18_on_the_64_256_workload_with_the_papers_16gb_times():
    t = TP.table18(step_costs())
    assert t["paper batch size"].iloc[:2].tolist() == [1, 111] and pd.isna(t["paper batch size"].iloc[2])  # no fit
    assert t["paper block ms/token"].iloc[0] == 20.937 and t["paper block ms/token"].iloc[1] == 0.188
    assert t["paper block ms/token"].iloc[3:].tolist() == [10.819, 0.091]
    assert t["paper block time × vanilla"].iloc[4] == pytest.approx(0.091 / 0.188)
    assert t["block ms/token"].iloc[4] == pytest.approx(1000 * 0.004 * 2 / 8)
    with_shapes = step_costs().assign(shape="512/2048")
    missing = TP.table18(with_shapes)
    assert missing["source"].eq("paper").all() and missing[TP.NOTE].str.contains("64/256").all()
    assert TP.table18(step_costs(), shapes=((512, 2048),))[TP.NOTE].str.startswith(TP.NOT_MEASURED).all()


def test_table19_paper_deltas_on_matching_systems_or_the_note():
    systems = [("vanilla_static", "none", 10.0, 1.0, 0.8), ("vanilla_continuous", "none", 12.5, 1.25, 1.0),
               ("cdb_oracle", "oracle", 20.0, 2.0, 1.6)]
    deltas = pd.DataFrame([{"config": "B=2 r=512", "system": s, "exit_policy": e, "kv_policy": "copy_kv",
                            "tokens_per_s": v, "delta_v": dv, "delta_seq": ds} for s, e, v, dv, ds in systems])
    t = TP.table19(deltas).set_index("system")
    assert t.loc["vanilla_static", ["paper Δ_V (×)", "paper Δ_Seq (×)"]].tolist() == [1.00, 0.63]
    assert t.loc["cdb_oracle", ["paper Δ_V (×)", "paper Δ_Seq (×)"]].tolist() == [1.73, 1.10]
    assert "paper tokens/s" not in t and t.loc["cdb_oracle", "Δ_V (×)"] == 2.0
    assert TP.table19(deltas, shapes=((512, 2048),))["source"].eq("paper").all()


# ---------------------------------------------------------------- style

def test_float_noise_is_not_coloured_and_a_real_gain_is():
    df = pd.DataFrame({"model": ["r=0", "r=64 svd", "r=64 zero"], "avg acc (%)": [30.0, 30.000000000000004, 30.0],
                       "Δ acc vs rank 0 (pts)": [0.0, 3.552713678800501e-15, 0.0]})
    assert "background-color" not in TS.style(df).to_html()
    df.loc[1, "Δ acc vs rank 0 (pts)"] = 2.5
    html = TS.style(df).to_html()
    assert html.count("background-color") == 1 and "+2.5" in html


def test_tolerance_per_column_such_as_a_stderr():
    df = pd.DataFrame({"Δ acc (pts)": [0.5, 3.0]})
    assert TS.style(df, tolerance={"Δ acc (pts)": 1.0}).to_html().count("background-color") == 1


def test_empty_cells_are_a_grey_dash_never_black():
    df = pd.DataFrame({"model": ["a", None], "Δ acc (pts)": [1.0, np.nan], "Δ_V (×)": [np.nan, 2.0]})
    html = T.style(df).to_html()
    assert ">–<" in html and ">nan<" not in html.lower() and ">None<" not in html
    assert "#000000;" not in html.replace("color: #000000;", "")  # no black background anywhere
    assert TS.EMPTY_CSS.strip(";") in html


def test_plain_numbers_have_no_numpy_repr():
    assert TS.plain([np.float64(0.0), np.float64(64.0)]) == "[0, 64]"
    assert TS.plain(np.float64(0.125)) == "0.125" and TS.plain(np.nan) == "–" and TS.plain(np.int64(3)) == "3"


def test_rank_plot_note_and_title_without_numpy_reprs():
    f = frames()
    acc = f["accuracy"][f["accuracy"]["role"] == "study"].assign(lora_rank=lambda d: d["lora_rank"].astype(float))
    plot = plots.rank_accuracy(acc, study=STUDY)
    assert plot.figure is None and "np." not in plot.note and "[0, 64]" in plot.note
    assert "np." not in plot._repr_html_()


def test_styled_headers_wrap():
    html = TS.style(pd.DataFrame({"paper Δ acc SVD vs zero (pts)": [1.0]})).to_html()
    assert "white-space: normal" in html and "max-width: 9em" in html
