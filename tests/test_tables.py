"""The paper's tables (tables.py): Δ columns, seeds averaged with their spread, the paper's numbers on the right rows,
missing reference rows tolerated, 1-based loop labels, the Styler; then every table over the example outputs."""
from pathlib import Path

import pandas as pd
import pytest
from pandas.io.formats.style import Styler

from rrt import tables as T
from rrt.runs.execute import by_role
from rrt.runs.store import label_of, tag_is_true

EXAMPLES = Path(__file__).resolve().parents[1] / "outputs" / "examples" / "cpu"
TASKS = ("arc_easy", "piqa")
CORPORA = ("wikitext2/test", "tinystories/test")
ACC = "avg acc (%)"


def run(name, role="study", *, acc=0.5, ppl=10.0, non_embedding=53_102_016, **tags):
    """One run: acc per task (a float: every task; a tuple: one per task) or {loop_idx: that} for per-loop studies;
    ppl on wikitext2 (tinystories gets twice it), a float or {loop_idx: float}."""
    accs = acc if isinstance(acc, dict) else {None: acc}
    ppls = ppl if isinstance(ppl, dict) else {b: ppl for b in accs}
    return {"run": name, "role": role, **tags, "seed": tags.get("seed", 0)}, accs, ppls, non_embedding


def study(*runs):
    """run_plan's tables (runs, curves, perplexity, accuracy) in the example CSVs' schema, plus the seed tag."""
    rows = {"runs": [], "curves": [], "perplexity": [], "accuracy": []}
    for tags, accs, ppls, params in runs:
        rows["runs"].append({**tags, "run_dir": "smollm2-135m-abc", "config_hash": "abc", "tokens": 2560,
                             "checkpoint": "checkpoints/step-00000010", "non_embedding": params,
                             "embedding": 28_311_552, "lora": 0, "total": params + 28_311_552})
        rows["perplexity"] += [{**tags, "corpus": corpus, "loop_idx": b, "perplexity": p * (i + 1)}
                               for b, p in ppls.items() for i, corpus in enumerate(CORPORA)]
        rows["accuracy"] += [{**tags, "model": "model", "task": task, "loop_idx": b, "metric": "acc_norm", "value": v,
                              "stderr": 0.1, "n": 20, "num_fewshot": 0, "source": "offline"}
                             for b, a in accs.items() for task, v in zip(TASKS, a if isinstance(a, tuple) else (a, a))]
    return {k: pd.DataFrame(v) for k, v in rows.items()}


FULL = run("full-size", "baseline", acc=0.6, baseline="full", non_embedding=106_000_000)


def recursive(name, init, acc, b=2, **tags):
    return run(name, acc=acc, init=init, num_blocks=b, **tags)


# ---------------------------------------------------------------- Table 5

def table5_example():
    return study(FULL, recursive("stepwise B=2", "stepwise", 0.4),
                 recursive("stepwise B=2 seed=1", "stepwise", 0.5, ppl=30.0, seed=1),
                 recursive("average B=2", "average", (0.3, 0.5)), recursive("random B=2", "random", 0.25),
                 run("reduced-size B=2", "baseline", acc=0.3, baseline="reduced", num_blocks=2))


def test_table5_deltas_seeds_and_paper_numbers():
    t = T.table5(table5_example()).set_index("model")
    assert list(t.index) == ["full-size", "stepwise B=2", "average B=2", "random B=2", "reduced-size B=2"]
    step, avg = t.loc["stepwise B=2"], t.loc["average B=2"]
    assert step[ACC] == pytest.approx(45.0) and step["seeds"] == 2
    assert step["acc std over seeds (pts)"] == pytest.approx(50 ** 0.5)  # std of 40 and 50 (ddof 1)
    assert step["ppl wikitext2/test"] == pytest.approx(20.0) and step["ppl tinystories/test"] == pytest.approx(40.0)
    assert t["acc std over seeds (pts)"].drop("stepwise B=2").isna().all()
    assert avg[ACC] == pytest.approx(40.0)  # mean over tasks
    assert avg["Δ acc vs full-size (pts)"] == pytest.approx(-20.0)  # 0.40 vs 0.60
    assert step["Δ acc vs full-size (pts)"] == pytest.approx(-15.0)
    assert avg["Δ acc vs random (pts)"] == pytest.approx(15.0)
    assert t.loc["full-size", "non-emb params (M)"] == pytest.approx(106.0)
    assert t["paper avg acc (%)"].to_dict() == {"full-size": 60.1, "stepwise B=2": 51.7, "average B=2": 46.7,
                                                 "random B=2": 37.6, "reduced-size B=2": 38.2}
    assert step["paper Δ acc vs full-size (pts)"] == pytest.approx(-8.4)
    assert step["paper Δ acc vs random (pts)"] == pytest.approx(14.1)
    assert pd.isna(t.loc["full-size", "Δ acc vs random (pts)"])


def test_table5_missing_rows_leave_deltas_nan():
    t = T.table5(study(recursive("stepwise B=3", "stepwise", 0.4, b=3), recursive("lower B=3", "lower", 0.3, b=3)))
    assert list(t["model"]) == ["stepwise B=3", "lower B=3"]  # no full-size, no random, no B=2
    cols = ["Δ acc vs full-size (pts)", "Δ acc vs random (pts)", "paper avg acc (%)",
            "paper Δ acc vs full-size (pts)"]
    assert t[cols].isna().all().all()
    assert (t["seeds"] == 1).all()


def test_table5_without_accuracy_or_seed_column():
    tables = table5_example()
    tables["accuracy"] = pd.DataFrame()  # a study run with tasks=()
    tables = {k: v.drop(columns="seed", errors="ignore") for k, v in tables.items()}
    t = T.table5(tables)
    assert len(t) == 5 and t[ACC].isna().all() and t["ppl wikitext2/test"].notna().all()


# ---------------------------------------------------------------- Table 9

def relaxed(name, init, rank, lora_init, acc, untie=False):
    return recursive(name, init, acc, lora_rank=rank, lora_init=lora_init, untie_norms=untie)


def test_table9_deltas_vs_rank_zero_and_svd_vs_zero():
    t = T.table9(study(relaxed("average B=2 r=0", "average", 0, "-", 0.40),
                       relaxed("average B=2 r=512 svd", "average", 512, "svd", 0.55),
                       relaxed("average B=2 r=512 zero", "average", 512, "zero", 0.45),
                       relaxed("stepwise B=2 r=0", "stepwise", 0, "-", 0.50),
                       relaxed("stepwise B=2 r=64 svd", "stepwise", 64, "svd", 0.45),
                       relaxed("average B=2 r=0 untied", "average", 0, "-", 0.30, untie=True),
                       relaxed("average B=2 r=64 svd untied", "average", 64, "svd", 0.35, untie=True)))
    t = t.set_index("model")
    d = t["Δ acc vs rank 0 (pts)"]
    assert d["average B=2 r=512 svd"] == pytest.approx(15.0) and d["average B=2 r=512 zero"] == pytest.approx(5.0)
    assert d["stepwise B=2 r=64 svd"] == pytest.approx(-5.0)  # vs Stepwise's own rank 0
    assert d["average B=2 r=64 svd untied"] == pytest.approx(5.0)  # vs the untied rank 0
    svd = t["Δ acc SVD vs zero (pts)"]
    assert svd["average B=2 r=512 svd"] == pytest.approx(10.0) and svd.drop("average B=2 r=512 svd").isna().all()
    paper = t["paper avg acc (%)"].dropna().to_dict()
    assert paper == {"average B=2 r=0": 46.7, "average B=2 r=512 svd": 55.5, "average B=2 r=512 zero": 49.0,
                     "stepwise B=2 r=0": 51.7}
    assert t.loc["average B=2 r=512 svd", "paper Δ acc SVD vs zero (pts)"] == pytest.approx(6.5)  # PAPER.md
    assert t.loc["average B=2 r=512 svd", "paper Δ acc vs rank 0 (pts)"] == pytest.approx(8.8)


# ---------------------------------------------------------------- Table 11

def kd_run(kd, steps, acc):
    return recursive(f"stepwise B=2 {kd}" + (f" {steps} steps" if steps > 10 else ""), "stepwise", acc, lora_rank=0,
                     kd=kd, uptrain_steps=steps)


def test_table11_kd_and_longer_uptraining():
    t = T.table11(study(FULL, kd_run("ce", 10, 0.50), kd_run("fkl", 10, 0.55), kd_run("rkl", 10, 0.45),
                        kd_run("ce", 20, 0.60), kd_run("fkl", 20, 0.65))).set_index("model")
    assert t["Δ acc vs CE (pts)"].drop("full-size").tolist() == pytest.approx([0.0, 5.0, -5.0, 0.0, 5.0])
    longer = t["Δ acc vs shortest (pts)"]
    assert longer[["stepwise B=2 ce 20 steps", "stepwise B=2 fkl 20 steps"]].tolist() == pytest.approx([10.0, 10.0])
    assert longer[["full-size", "stepwise B=2 ce", "stepwise B=2 fkl"]].isna().all()
    assert t["paper avg acc (%)"].dropna().to_dict() == {"stepwise B=2 ce": 51.7, "stepwise B=2 fkl": 53.4,
                                                         "stepwise B=2 rkl": 53.3, "stepwise B=2 ce 20 steps": 53.4}
    assert t.loc["stepwise B=2 fkl", "paper Δ acc vs CE (pts)"] == pytest.approx(1.7)  # PAPER.md: FKL +1.7
    assert t.loc["stepwise B=2 ce 20 steps", "paper Δ acc vs shortest (pts)"] == pytest.approx(1.7)  # 60B +1.7


def test_table11_and_13_leave_the_final_models_to_tables_12_and_14():
    t11 = T.table11(final_models_study())
    assert list(t11["model"]) == ["full-size", "stepwise B=2 ce", "stepwise B=2 fkl", "stepwise B=2 ce 20 steps",
                                  "average B=2 r=64 ce"]
    assert t11.set_index("model").loc["stepwise B=2 ce 20 steps", "Δ acc vs shortest (pts)"] == pytest.approx(6.0)
    t13 = T.table13(early_exit_final_study())
    assert list(t13["model"].unique()) == ["B=2 post weighted"]


def test_table11_without_ce_reference():
    t = T.table11(study(kd_run("fkl", 10, 0.55)))
    assert len(t) == 1 and t["Δ acc vs CE (pts)"].isna().all() and t["paper Δ acc vs CE (pts)"].isna().all()


# ---------------------------------------------------------------- Tables 13 and 1

def exit_run(name, acc, training="post", scheme="aggressive", coef=0.1, sd=False, trainable="all", data="ovlp", b=2):
    return recursive(name, "stepwise", acc, b=b, training=training, exit_scheme=scheme, exit_coefficient=coef,
                     self_distill=sd, trainable=trainable, data=data)


def early_exit_study():
    return study(*early_exit_study_runs())


def early_exit_study_runs():
    return (run("stepwise B=2", "uptrained", acc={0: 0.3, 1: 0.5}, ppl={0: 100.0, 1: 10.0}, init="stepwise",
                num_blocks=2),
            exit_run("B=2 post weighted", {0: 0.45, 1: 0.45}, scheme="weighted", coef="-"),
            exit_run("B=2 post aggressive 0.1 +SD", {0: 0.40, 1: 0.52}, sd=True),
            exit_run("B=2 co aggressive 0.1", {0: 0.35, 1: 0.50}, training="co"),
            exit_run("B=3 post weighted", {0: 0.2, 1: 0.3, 2: 0.4}, scheme="weighted", coef="-", b=3))


def test_table13_per_loop_deltas_and_labels():
    t = T.table13(early_exit_study())
    assert len(t) == 2 + 2 + 2 + 2 + 3  # one row per run and loop
    assert "one pass" not in set(t["loop"])
    with_full = T.table13(study(run("full-size", "baseline", acc={0: 0.6}, ppl={0: 8.0}, baseline="full",
                                    num_blocks=1), *early_exit_study_runs()))
    assert with_full["loop"].tolist()[0] == "one pass" and with_full["model"].tolist()[0] == "full-size"
    assert with_full["loop"].tolist()[1:] == t["loop"].tolist()  # the full-size model has no loops to label
    assert t["loop"].tolist()[-3:] == ["loop 1", "loop 2", "loop 3"] and t["loop_idx"].tolist()[-3:] == [0, 1, 2]
    sd = t[t["model"] == "B=2 post aggressive 0.1 +SD"].set_index("loop")
    assert sd["Δ acc vs uptrained (pts)"].tolist() == pytest.approx([10.0, 2.0])
    assert sd["paper avg acc (%)"].tolist() == [48.0, 52.6]  # PAPER.md: loop 1 reaches 48.0
    assert pd.isna(sd.loc["loop 1", "paper Δ acc vs uptrained (pts)"])
    assert sd.loc["loop 2", "paper Δ acc vs uptrained (pts)"] == pytest.approx(0.9)  # keeps the last loop (+0.9)
    up = t[t["role"] == "uptrained"]
    assert up["ppl wikitext2/test"].tolist() == [100.0, 10.0] and up["paper avg acc (%)"].iloc[1] == 51.7
    b3 = t[t["num_blocks"] == 3]
    assert b3[["Δ acc vs uptrained (pts)", "paper avg acc (%)"]].isna().all().all()  # no B=3 uptrained run


def test_table1_uptrained_vs_recipes():
    t = T.table1(early_exit_study()).set_index("model")
    assert list(t.index) == ["stepwise B=2", "B=2 post weighted", "B=2 post aggressive 0.1 +SD", "B=3 post weighted"]
    sd = t.loc["B=2 post aggressive 0.1 +SD"]
    assert sd["acc loop 1 (%)"] == pytest.approx(40.0) and sd["acc last loop (%)"] == pytest.approx(52.0)
    assert sd["Δ last loop vs uptrained (pts)"] == pytest.approx(2.0)
    assert (sd["paper acc loop 1 (%)"], sd["paper acc last loop (%)"]) == (48.0, 52.6)
    assert sd["paper Δ last loop vs uptrained (pts)"] == pytest.approx(0.9)
    assert t.loc["B=3 post weighted", "acc last loop (%)"] == pytest.approx(40.0)  # loop 3


# ---------------------------------------------------------------- Tables 12, 14 and 15 (the final models)

def final_run(name, acc, role="study", **tags):
    return run(name, role, acc=acc, final=True, **tags)


def final_models_study():
    """03's tables: the 15B teacher, Table 11's runs (CE and FKL at 10 steps, CE at 20) and Table 12's final runs."""
    return study(FULL, final_run("full-size 40 steps", 0.62, "baseline", baseline="full", uptrain_steps=40),
                 final_run("full-size 50 steps", 0.61, "baseline", baseline="full", uptrain_steps=50),
                 final_run("reduced-size B=2 fkl 40 steps", 0.35, "baseline", baseline="reduced", num_blocks=2,
                           kd="fkl", uptrain_steps=40),
                 recursive("stepwise B=2 ce", "stepwise", (0.4, 0.6), lora_rank=0, kd="ce", uptrain_steps=10),
                 recursive("stepwise B=2 fkl", "stepwise", 0.55, lora_rank=0, kd="fkl", uptrain_steps=10),
                 recursive("stepwise B=2 ce 20 steps", "stepwise", 0.56, lora_rank=0, kd="ce", uptrain_steps=20),
                 recursive("average B=2 r=64 ce", "average", 0.45, lora_rank=64, kd="ce", uptrain_steps=10),
                 *[final_run(f"{init} B={b} r={r} fkl 40 steps", a, init=init, num_blocks=b, lora_rank=r, kd="fkl",
                             uptrain_steps=40)
                   for init, b, r, a in (("stepwise", 2, 0, 0.58), ("average", 2, 64, 0.52), ("average", 3, 64, 0.4))])


def test_table12_final_models_beside_their_15b_counterparts():
    t = T.table12(final_models_study()).set_index("model")
    assert list(t.index) == ["full-size", "full-size 40 steps", "full-size 50 steps", "reduced-size B=2 fkl 40 steps",
                             "stepwise B=2 ce", "average B=2 r=64 ce", "stepwise B=2 r=0 fkl 40 steps",
                             "average B=2 r=64 fkl 40 steps", "average B=3 r=64 fkl 40 steps"]  # no KD / longer 15B
    d = t["Δ acc vs 15B (pts)"]
    assert d["stepwise B=2 r=0 fkl 40 steps"] == pytest.approx(8.0)  # 58 vs CE's mean over tasks, (40 + 60) / 2
    assert d["average B=2 r=64 fkl 40 steps"] == pytest.approx(7.0)
    assert d.drop(["stepwise B=2 r=0 fkl 40 steps", "average B=2 r=64 fkl 40 steps"]).isna().all()  # B=3: no 15B
    assert t.loc["stepwise B=2 ce", ["acc arc_easy (%)", "acc piqa (%)", ACC]].tolist() == pytest.approx([40, 60, 50])
    assert t.loc["stepwise B=2 ce", "ppl tinystories/test"] == pytest.approx(20.0)
    assert t.loc["full-size 40 steps", "non-emb params (M)"] == pytest.approx(53.102016)
    assert t["paper avg acc (%)"].tolist() == [60.1, 58.6, 57.3, 44.9, 51.7, 52.1, 54.9, 55.8, 53.3]
    paper = t["paper Δ acc vs 15B (pts)"]
    assert paper["stepwise B=2 r=0 fkl 40 steps"] == pytest.approx(3.2)  # Table 12's Δ
    assert paper["average B=2 r=64 fkl 40 steps"] == pytest.approx(3.7)
    assert paper.isna().sum() == 7


def test_table12_original_checkpoint_as_full_size():
    """TinyLlama's full-size reference is the original checkpoint: a baseline first, not a 60B row of the paper's."""
    t = T.table12(study(kd_run("ce", 10, 0.5),
                        final_run("stepwise B=2 fkl 40 steps", 0.6, init="stepwise", num_blocks=2, lora_rank=0,
                                  kd="fkl", uptrain_steps=40),
                        final_run("full-size (pretrained)", 0.7, "pretrained", baseline="full", pretrained=True)))
    assert list(t["model"]) == ["full-size (pretrained)", "stepwise B=2 ce", "stepwise B=2 fkl 40 steps"]
    assert [c for c in t if c.startswith("acc ")] == ["acc arc_easy (%)", "acc piqa (%)"]
    assert t["Δ acc vs 15B (pts)"].tolist()[2] == pytest.approx(10.0)
    assert pd.isna(t["paper avg acc (%)"].iloc[0]) and t["paper avg acc (%)"].tolist()[1:] == [51.7, 54.9]


def test_table12_without_final_runs_keeps_the_15b_rows():
    t = T.table12(study(FULL, kd_run("ce", 10, 0.5), kd_run("fkl", 10, 0.55)))
    assert list(t["model"]) == ["full-size", "stepwise B=2 ce"] and t["Δ acc vs 15B (pts)"].isna().all()


def early_exit_final_study():
    """04's tables at App. M: the full-size references, the final models before and after post-training, per loop."""
    post = dict(training="post", exit_scheme="aggressive", data="new")
    return study(final_run("full-size 40 steps", {0: 0.62}, "baseline", baseline="full", uptrain_steps=40),
                 final_run("full-size 50 steps", {0: 0.60}, "baseline", baseline="full", uptrain_steps=50),
                 final_run("stepwise B=2", {0: 0.3, 1: 0.55}, "uptrained", init="stepwise", num_blocks=2, lora_rank=0,
                           kd="fkl", uptrain_steps=40),
                 final_run("average B=2 r=64", {0: 0.2, 1: 0.5}, "uptrained", init="average", num_blocks=2,
                           lora_rank=64, kd="fkl", uptrain_steps=40),
                 final_run("stepwise B=2 post", {0: 0.45, 1: 0.53}, init="stepwise", num_blocks=2, lora_rank=0,
                           exit_coefficient=0.1, self_distill=True, **post),
                 final_run("average B=2 r=64 post 0.1", {0: 0.35, 1: 0.47}, init="average", num_blocks=2, lora_rank=64,
                           exit_coefficient=0.1, self_distill=True, **post),
                 final_run("average B=2 r=64 post 0.3", {0: (0.3, 0.5), 1: 0.46}, init="average", num_blocks=2,
                           lora_rank=64, exit_coefficient=0.3, self_distill=True, **post),
                 final_run("stepwise B=3 post", {0: 0.3, 1: 0.4, 2: 0.5}, init="stepwise", num_blocks=3, lora_rank=0,
                           exit_coefficient=0.1, self_distill=True, **post),
                 exit_run("B=2 post weighted", {0: 0.45, 1: 0.45}, scheme="weighted", coef="-"))  # Table 13: not final


def test_table14_loops_deltas_vs_before_post_training_and_the_75b_reference():
    t = T.table14(early_exit_final_study())
    assert t["model"].unique().tolist() == ["full-size 40 steps", "full-size 50 steps", "stepwise B=2",
                                            "average B=2 r=64", "stepwise B=2 post", "average B=2 r=64 post 0.1",
                                            "average B=2 r=64 post 0.3", "stepwise B=3 post"]
    assert len(t) == 1 + 1 + 2 * 5 + 3 and t["loop"].tolist()[-3:] == ["loop 1", "loop 2", "loop 3"]
    at = t.set_index(["model", "loop"])
    d = at["Δ last loop vs before (pts)"].dropna()
    assert d.to_dict() == pytest.approx({("stepwise B=2 post", "loop 2"): -2.0,
                                         ("average B=2 r=64 post 0.1", "loop 2"): -3.0,
                                         ("average B=2 r=64 post 0.3", "loop 2"): -4.0})  # B=3: no run before
    assert at["Δ 75B vs 60B (pts)"].dropna().to_dict() == pytest.approx({("full-size 50 steps", "loop 1"): -2.0})
    assert at.loc[("average B=2 r=64 post 0.3", "loop 1"), ["acc arc_easy (%)", "acc piqa (%)", ACC]].tolist() == \
        pytest.approx([30.0, 50.0, 40.0])
    paper = at["paper avg acc (%)"]
    assert paper[("full-size 40 steps", "loop 1")] == 58.6 and paper[("full-size 50 steps", "loop 1")] == 57.3
    assert pd.isna(paper[("stepwise B=2", "loop 1")]) and paper[("stepwise B=2", "loop 2")] == 54.9
    assert paper["stepwise B=2 post"].tolist() == [48.8, 54.0]
    assert paper["average B=2 r=64 post 0.3"].tolist() == [43.3, 53.1]
    assert paper["stepwise B=3 post"].tolist() == [43.5, 49.0, 51.9]
    assert at.loc[("stepwise B=2 post", "loop 2"), "paper Δ last loop vs before (pts)"] == pytest.approx(-0.9)
    assert at.loc[("average B=2 r=64 post 0.3", "loop 2"), "paper Δ last loop vs before (pts)"] == pytest.approx(-2.7)
    assert at.loc[("full-size 50 steps", "loop 1"), "paper Δ 75B vs 60B (pts)"] == pytest.approx(-1.3)


def test_table14_without_final_runs_is_empty():
    t = T.table14(early_exit_study())
    assert t.empty and "Δ last loop vs before (pts)" in t


# ---------------------------------------------------------------- Tables 17 and 16

def test_table17_paper_numbers_on_matching_systems():
    systems = [("vanilla_static", "none", 10.0, 1.0, 0.8), ("vanilla_continuous", "none", 12.5, 1.25, 1.0),
               ("recursive_no_exit", "none", 9.0, 0.9, 0.72), ("cdb_oracle", "oracle", 20.0, 2.0, 1.6)]
    deltas = pd.DataFrame([{"config": "B=2 r=64", "system": s, "exit_policy": e, "kv_policy": "copy_kv",
                            "tokens_per_s": v, "tokens_per_s_min": v - 1, "tokens_per_s_max": v + 1, "delta_v": dv,
                            "delta_seq": ds, "ratio_vs_hf_generate": 1.0, "real_over_bound": 0.9,
                            "mean_loops_per_token": 1.5} for s, e, v, dv, ds in systems])
    t = T.table17(deltas).set_index("system")
    assert t["Δ_V (×)"].tolist() == [1.0, 1.25, 0.9, 2.0] and t["tokens/s"].tolist() == [10.0, 12.5, 9.0, 20.0]
    paper = ["paper tokens/s", "paper Δ_V (×)", "paper Δ_Seq (×)"]
    assert t.loc["vanilla_static", paper].tolist() == [1080, 1.0, 0.71]
    assert t.loc["vanilla_continuous", "paper tokens/s"] == 1528
    assert t.loc["cdb_oracle", "paper Δ_V (×)"] == 2.00 and pd.isna(t.loc["cdb_oracle", "paper tokens/s"])
    assert t.loc["recursive_no_exit", ["paper tokens/s", "paper Δ_V (×)"]].isna().all()


def test_table16_per_token_block_time():
    costs = [("vanilla", 1, 0.02, True), ("vanilla", 10, 0.01, True), ("vanilla", 16, 0.012, False),
             ("recursive B=2 r=0", 1, 0.01, True), ("recursive B=2 r=0", 10, 0.004, True),
             ("recursive B=2 r=64", 10, 0.005, True)]
    step_costs = pd.DataFrame([{"rows": n, "block_s": s, "fill_s": None, "head_s": 0.002, "kv_bytes": 1, "fits": f,
                                "model": m, "config": "B=2 r=0", "num_blocks": 2, "mean_loops_replayed": 1.3}
                               for m, n, s, f in costs])
    t = T.table16(step_costs)
    assert t["block ms/token"].tolist() == pytest.approx([20.0, 1.0, 0.75, 20.0, 0.8, 1.0])  # × B loops
    assert t["head ms/token"].iloc[1] == pytest.approx(0.2)
    assert t["block time × vanilla"].iloc[4] == pytest.approx(0.8)
    assert t["paper batch size"].iloc[:2].tolist() == [1, 43] and pd.isna(t["paper batch size"].iloc[2])  # 16 won't fit
    assert t["paper block ms/token"].tolist()[:2] == [21.344, 0.616] and pd.isna(t["paper block ms/token"].iloc[2])
    assert t["paper block ms/token"].iloc[3:5].tolist() == [11.059, 0.265]  # PAPER.md: 0.616 vanilla vs 0.265
    assert t["paper block time × vanilla"].iloc[4] == pytest.approx(0.265 / 0.616)
    assert t["block time × vanilla"].iloc[5] == pytest.approx(1.0)
    assert t[["paper batch size", "paper block ms/token"]].iloc[5].isna().all()  # PAPER.md has no relaxed times


# ---------------------------------------------------------------- style

def test_style_caption_precision_nan_and_colours():
    styler = T.style(T.table5(table5_example()), caption="Table 5 at the smoke scale (tiny-llama, 2 steps)")
    assert isinstance(styler, Styler)
    html = styler.to_html()
    assert "Table 5 at the smoke scale (tiny-llama, 2 steps)" in html
    assert ">–<" in html and ">nan<" not in html.lower()
    assert "-20.0" in html and "+14.1" in html and "45.0" in html  # Δ signed, 1 decimal
    assert "background-color" in html  # Δ columns coloured


def test_style_ratio_columns_center_on_one():
    df = pd.DataFrame({"system": ["a", "b"], "Δ_V (×)": [1.0, 2.0]})
    html = T.style(df).to_html()
    assert "2.00×" in html and "background-color" in html


def test_style_shows_bools_as_bools():
    html = T.style(pd.DataFrame({"rows": [1, 64], "fits": [True, False]})).to_html()
    assert ">True<" in html and ">False<" in html


# ---------------------------------------------------------------- the example outputs

def example(folder):
    out = {}
    for name in ("runs", "curves", "perplexity", "accuracy"):
        df = pd.read_csv(EXAMPLES / folder / f"{name}.csv")
        out[name] = df if "seed" in df else df.assign(seed=0)
    return out


@pytest.mark.parametrize("folder, table, roles", [("01_init_ablation", T.table5, ("study", "baseline")),
                                                  ("02_relaxation_rank_sweep", T.table9, ("study",)),
                                                  ("03_distillation", T.table11, None)])
def test_examples_one_row_per_model(folder, table, roles):
    """Each table from the runs its notebook passes it (01: without Fig. 11's variants; 02: without Fig. 4's baselines)."""
    tables = example(folder)
    tables = by_role(tables, *roles) if roles else tables
    t = table(tables)
    runs = tables["runs"]
    runs = runs[~runs["final"].map(tag_is_true)] if "final" in runs else runs  # the final models: Table 12
    assert list(t["model"]) == list(runs["run"].map(label_of).unique())
    ours = [ACC] + [c for c in t if c.startswith("ppl ")]
    assert len(ours) == 3 and t[ours].notna().all().all()


def test_examples_early_exit():
    tables = example("04_early_exit")
    t13, t1 = T.table13(tables), T.table1(tables)
    runs = tables["runs"][~tables["runs"]["final"].map(tag_is_true)]  # App. M's final models: Tables 14, 15
    recursive = runs["num_blocks"].notna()
    assert len(t13) == 2 * recursive.sum() + (~recursive).sum()  # the full-size reference once
    assert set(t13["loop"]) == {"loop 1", "loop 2"}
    ours = t13[t13["num_blocks"].notna()]
    assert ours[[ACC, "ppl wikitext2/test", "Δ acc vs uptrained (pts)"]].notna().all().all()
    assert t13.loc[t13["num_blocks"].isna(), ACC].notna().all()
    assert t1["model"].is_unique and t1["role"].iloc[0] == "uptrained"
    assert t1[["acc loop 1 (%)", "acc last loop (%)"]].notna().all().all()


def test_examples_throughput():
    deltas = pd.read_csv(EXAMPLES / "05_throughput" / "deltas.csv")
    step_costs = pd.read_csv(EXAMPLES / "05_throughput" / "step_costs.csv")
    t17, t16 = T.table17(deltas), T.table16(step_costs)
    assert len(t17) == len(deltas) and t17[["tokens/s", "Δ_V (×)", "Δ_Seq (×)"]].notna().all().all()
    assert len(t16) == len(step_costs) and t16["block ms/token"].notna().all()
    for _, group in t16.groupby(["config", "model"]):  # the paper's max batch (43) at each listed model's largest
        paper = group[group["paper batch size"] == 43]
        listed = group["paper batch size"].notna().any()  # Table 16 lists vanilla and B=2 r=0 only
        assert len(paper) == listed and (not listed or paper["batch size"].iloc[0] == group["batch size"].max())
    for df in (t17, t16):
        assert "Table" in T.style(df, caption="Table 17/16 at the cpu scale").to_html()
