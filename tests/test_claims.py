"""rrt.verdicts' three answers, each notebook's claims from CSVs shaped like its own, and the README's table."""
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rrt import claims
from rrt.evidence import PPL_NOISE
from rrt.verdicts import NO, NOISE, YES, better, combine, combined_error, not_worse, same

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "outputs" / "examples" / "cpu"
SETS = ("wikitext2/test", "tinystories/test")


# ---------------------------------------------------------------- verdicts

@pytest.mark.parametrize("higher, a, b, expected", [
    (True, 0.60, 0.50, YES), (True, 0.50, 0.60, NO), (True, 0.52, 0.50, NOISE),
    (False, 5.0, 5.5, YES), (False, 5.5, 5.0, NO), (False, 5.0, 5.02, NOISE)])
def test_better_says_yes_no_or_within_noise(higher, a, b, expected):
    assert better(a, b, error=0.02, higher_is_better=higher) == expected


def test_the_threshold_is_k_errors():
    assert better(1.0, 0.0, error=0.49, higher_is_better=True) == YES
    assert better(1.0, 0.0, error=0.51, higher_is_better=True) == NOISE
    assert better(1.0, 0.0, error=0.51, higher_is_better=True, k=1) == YES
    assert better(1.0, 1.0, error=0.0, higher_is_better=True) == NOISE  # no difference at no error: not a yes


def test_not_worse_and_same():
    assert not_worse(5.0, 5.0, error=0.1, higher_is_better=False) == YES
    assert not_worse(4.0, 5.0, error=0.1, higher_is_better=False) == YES
    assert not_worse(6.0, 5.0, error=0.1, higher_is_better=False) == NO
    assert same(5.0, 5.1, error=0.1) == YES and same(5.0, 5.3, error=0.1) == NO
    assert same(1.0, 1.0 + 1e-4, error=1e-3, k=1) == YES


def test_combine_and_errors():
    assert combine([YES, YES]) == YES
    assert combine([YES, NOISE]) == NOISE
    assert combine([YES, NO, NOISE]) == NO
    assert combined_error(3.0, 4.0) == 5.0
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="unknown verdicts"):
        combine(["maybe"])
    with pytest.raises(ValueError, match="finite error"):
        better(1.0, 0.0, error=math.nan, higher_is_better=True)
    with pytest.raises(ValueError, match="finite values"):
        same(math.inf, 0.0, error=0.1)


# ---------------------------------------------------------------- synthetic run dirs

def ppl(run, ppls, *, seed=0, loop=None, **tags):
    """Rows of perplexity.csv: one per held-out set (ppls in SETS' order)."""
    return [{"run": run, "seed": seed, "corpus": c, "loop_idx": loop, "perplexity": p, **tags}
            for c, p in zip(SETS, ppls)]


def write(run_dir: Path, **tables):
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        pd.DataFrame(rows).to_csv(run_dir / f"{name}.csv", index=False)
    return run_dir


def curves(run, final_loss, **tags):
    return [{"run": run, "seed": 0, "kind": "train", "step": s, "loss": final_loss + 2.0 / s + 0.01 * (s % 2), **tags}
            for s in range(1, 31)]


def nb01(tmp_path, *, reduced=(900.0, 5400.0), variants=True):
    def init(name, **t):
        return {"role": "study", "baseline": None, "init": name, "num_blocks": 2.0, **t}
    rows = (ppl("full-size", (18.0, 15.0), role="baseline", baseline="full")
            + ppl("stepwise B=2", (232.0, 1740.0), **init("stepwise"))
            + ppl("stepwise B=2 seed=1", (228.0, 1875.0), seed=1, **init("stepwise"))
            + ppl("average B=2", (759.0, 4292.0), **init("average"))
            + ppl("lower B=2", (498.0, 2128.0), **init("lower"))
            + ppl("reduced-size B=2", reduced, role="baseline", baseline="reduced", num_blocks=2.0))
    if variants:
        rows += (ppl("stepwise_start B=2", (418.0, 2489.0), role="variant", init="stepwise_start", num_blocks=2.0,
                     norm_init="-")
                 + ppl("average B=2 norm=zero", (6585.0, 18379.0), role="variant", init="average", num_blocks=2.0,
                       norm_init="zero"))
    loss = (curves("stepwise B=2", 5.5, **init("stepwise")) + curves("average B=2", 6.5, **init("average"))
            + curves("lower B=2", 6.3, **init("lower"))
            + curves("reduced-size B=2", 6.7, role="baseline", baseline="reduced", num_blocks=2.0))
    return write(tmp_path / "01_init_ablation", perplexity=rows, curves=loss)


def test_01_claims_from_its_csvs(tmp_path):
    table = claims.for_notebook("01_init_ablation", nb01(tmp_path))
    assert table.columns.tolist() == claims.COLUMNS
    assert table["reproduces"].tolist() == [YES] * 5
    assert table["ours"][0].startswith("Stepwise 230 / 1806 (2 seeds)")  # the geometric mean over seeds
    assert "51.7" in table["paper"][0] and "perplexity on wikitext2 / tinystories" in table["measured as"][0]
    assert "its seeds" in table["measured as"][0] and "the run's seed spread" in table["measured as"][4]


def test_01_a_reversed_or_close_pair_and_a_missing_variant(tmp_path):
    worse = claims.for_notebook("01", nb01(tmp_path / "a", reduced=(150.0, 1000.0)))
    assert worse["reproduces"][2] == NO  # the recursive model against the reduced-size one
    close = claims.for_notebook("01", nb01(tmp_path / "b", reduced=(231.0, 1800.0)))
    assert close["reproduces"][2] == NOISE
    missing = claims.for_notebook("01", nb01(tmp_path / "c", variants=False))
    assert missing["reproduces"].tolist()[3:] == [claims.NOT_RUN] * 2
    assert missing["ours"][3] == "not run at this scale"


def test_accuracy_decides_where_it_is_above_chance(tmp_path):
    run_dir = nb01(tmp_path)
    acc = [{"run": run, "seed": seed, "task": t, "value": v, "stderr": 0.02, "role": role, "baseline": base,
            "init": init, "num_blocks": 2.0}
           for run, seed, role, base, init, v in [("stepwise B=2", 0, "study", None, "stepwise", 0.72),
                                                  ("stepwise B=2 seed=1", 1, "study", None, "stepwise", 0.68),
                                                  ("reduced-size B=2", 0, "baseline", "reduced", None, 0.45)]
           for t in ("arc_easy", "piqa")]
    write(run_dir, accuracy=acc)
    row = claims.for_notebook("01", run_dir).iloc[2]
    assert row["measured as"].startswith("avg accuracy")
    assert row["ours"] == "Stepwise 70.0 (2 seeds) vs reduced-size 45.0"
    assert row["reproduces"] == YES
    write(run_dir, accuracy=[{**a, "value": 0.4} for a in acc])  # at piqa's chance: perplexity decides
    assert claims.for_notebook("01", run_dir).iloc[2]["measured as"].startswith("log-perplexity")


def test_02_claims(tmp_path):
    tags = {"role": "study", "num_blocks": 2.0, "init": "average", "untie_norms": False}
    rows = (ppl("average B=2 r=0", (759.0, 3450.0), lora_rank=0.0, lora_init="-", **tags)
            + ppl("average B=2 r=64 svd", (385.0, 3322.0), lora_rank=64.0, lora_init="svd", **tags)
            + ppl("average B=2 r=64 zero", (736.0, 3400.0), lora_rank=64.0, lora_init="zero", **tags))
    init = [{"model": "original", "init": "-", "lora_rank": "-", "untie_norms": "-", "perplexity": 49.0861}]
    init += [{"model": "B=2", "init": i, "lora_rank": r, "untie_norms": u, "perplexity": p}
             for i, r, u, p in [("average", 576, True, 49.0861), ("average", 576, False, 13271.0),
                                ("average", 64, True, 2.4e6), ("lower", 576, True, 49.09)]]
    table = claims.for_notebook("02", write(tmp_path / "02", perplexity=rows, init_perplexity=init))
    assert table["reproduces"].tolist() == [NOISE + " (yes 2, within noise 2 of 4 tests)", YES]
    assert table["ours"][0] == "Average r=64: SVD 385 / 3322 vs zero init 736 / 3400; r=0 759 / 3450"
    assert f"{PPL_NOISE} assumed" in table["measured as"][0]
    assert "r=576 49.09 (tied norms 13271)" in table["ours"][1]
    init[-1]["perplexity"] = 52.0  # Lower's full rank not the original: not exact
    table = claims.for_notebook("02", write(tmp_path / "02", init_perplexity=init))
    assert table["reproduces"][1] == NO + " (yes 1, no 1 of 2 tests)"


def test_03_claims(tmp_path):
    def student(kd, steps):
        return {"role": "study", "init": "stepwise", "num_blocks": 2.0, "lora_rank": 0.0, "kd": kd,
                "uptrain_steps": float(steps)}
    rows = (ppl("stepwise B=2 ce", (232.0, 1740.0), **student("ce", 60))
            + ppl("stepwise B=2 fkl", (189.0, 1443.0), **student("fkl", 60))
            + ppl("stepwise B=2 fkl 90 steps", (122.0, 751.0), **student("fkl", 90))
            + ppl("average B=2 r=64 fkl 90 steps", (100.0, 700.0), **{**student("fkl", 90), "init": "average",
                                                                         "lora_rank": 64.0}))
    table = claims.for_notebook("03_distillation", write(tmp_path / "03", perplexity=rows))
    assert table["reproduces"].tolist() == [YES, YES]
    assert table["ours"].tolist() == ["FKL 189 / 1443 vs CE 232 / 1740 (both 60 steps)",
                                      "FKL 90 steps 122 / 751 vs 60 steps 189 / 1443"]


def nb04(tmp_path, new_last=(184.0, 1458.0)):
    def recipe(run, loop1, last, scheme, coef="-", sd=False, trainable="all", data="ovlp", training="post"):
        tags = {"role": "study", "num_blocks": 2, "training": training, "exit_scheme": scheme, "exit_coefficient": coef,
                "self_distill": sd, "trainable": trainable, "data": data}
        return ppl(run, loop1, loop=0, **tags) + ppl(run, last, loop=1, **tags)
    rows = (ppl("stepwise B=2", (1268.0, 12838.0), loop=0, role="uptrained", num_blocks=2)
            + ppl("stepwise B=2", (232.5, 1740.0), loop=1, role="uptrained", num_blocks=2)
            + recipe("B=2 post weighted", (180.0, 1100.0), (260.0, 2000.0), "weighted")
            + recipe("B=2 post aggressive 0.1", (226.0, 1364.0), (200.0, 1332.0), "aggressive", 0.1)
            + recipe("B=2 post weighted +SD", (180.0, 1100.0), (300.0, 2400.0), "weighted", sd=True)
            + recipe("B=2 post aggressive 0.1 +SD", (222.0, 1327.0), (204.0, 1390.0), "aggressive", 0.1, True)
            + recipe("B=2 post standard frozen+head-LoRA", (1244.0, 12646.0), (232.5, 1740.0), "standard",
                     trainable="head_lora")
            + recipe("B=2 co aggressive 0.1", (3264.0, 10564.0), (2004.0, 7514.0), "aggressive", 0.1, training="co")
            + recipe("B=2 post aggressive 0.1 new-data", (225.0, 1511.0), new_last, "aggressive", 0.1, data="new"))
    # 03's final models (Tables 14, 15) are uptrained too: not the uptrained model of Table 13's rows
    rows += [{**r, "final": True, "kd": "fkl"} for r in ppl("stepwise B=2 fkl 90 steps", (90.0, 600.0), loop=1,
                                                             role="uptrained", num_blocks=2)]
    return write(tmp_path, perplexity=rows)


def test_04_claims_per_loop(tmp_path):
    table = claims.for_notebook("04_early_exit", nb04(tmp_path / "a"))
    assert table["reproduces"].tolist() == [YES] * 5
    assert table["ours"][0] == ("loop 1 1268 / 12838 → 222 / 1327, last loop 232.5 / 1740 → 204 / 1390 "
                                "(uptrained → post-trained)")
    assert "48.0 / 52.6" in table["paper"][0]
    other = claims.for_notebook("04", nb04(tmp_path / "b", new_last=(120.0, 900.0)))  # new tokens far better
    assert other["reproduces"][4] == NO + " (yes 2, no 2 of 4 tests)"  # loop 1 the same, the last loop not


def test_05_claim_from_deltas(tmp_path):
    rows = [{"config": "B=2 r=0", "system": s, "kv_policy": kv, "tokens_per_s": t, "tokens_per_s_min": lo,
             "tokens_per_s_max": hi}
            for s, kv, t, lo, hi in [("vanilla_static", "propagate", 100.0, 95.0, 105.0),
                                     ("cdb_oracle", "propagate", 200.0, 190.0, 210.0),
                                     ("cdb_oracle", "copy_kv", 102.0, 80.0, 120.0)]]
    table = claims.for_notebook("05_throughput", write(tmp_path / "05", deltas=rows))
    assert table["ours"][0] == "CDB + oracle / vanilla static: B=2 r=0 propagate 2.00×, B=2 r=0 copy_kv 1.02×"
    assert table["reproduces"][0] == NOISE + " (yes 1, within noise 1 of 2 tests)"
    assert "2.66×" in table["paper"][0]


@pytest.mark.parametrize("name", ["01", "02", "03", "04", "05"])
def test_a_run_without_the_csvs_is_not_run_never_a_crash(tmp_path, name):
    table = claims.for_notebook(name, tmp_path)
    assert table["reproduces"].eq(claims.NOT_RUN).all() and len(table) == len(claims.BUILDERS[name])


def test_unknown_notebook_and_missing_markers():
    with pytest.raises(ValueError, match="valid: .*'01'"):
        claims.for_notebook("00_explore", ".")
    with pytest.raises(ValueError, match="markers"):
        claims.replace_between_markers("no table here", "| a |")


# ---------------------------------------------------------------- the README and the command

def example_dirs():
    return sorted(d for d in EXAMPLES.iterdir() if d.name[:2] in claims.BUILDERS)


def test_the_readme_claims_table_is_the_examples(tmp_path):
    """The README's table is what `python -m rrt claims outputs/examples/cpu/* --readme README.md` writes."""
    text = (ROOT / "README.md").read_text()
    found = re.search(re.escape(claims.BEGIN) + r"\n(.*?)\n" + re.escape(claims.END), text, re.S)
    assert found, "README.md has no claims markers"
    assert found.group(1) == claims.readme_table(example_dirs())


def test_claims_command_rewrites_only_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{claims.BEGIN}\n| old |\n{claims.END}\nafter\n")
    dirs = [tmp_path / "05_throughput", tmp_path / "00_explore"]
    shutil.copytree(EXAMPLES / "05_throughput", dirs[0])
    table = claims.claims_main([*map(str, dirs), "--readme", str(readme)])
    assert readme.read_text() == f"# title\nbefore\n{claims.BEGIN}\n{table}\n{claims.END}\nafter\n"
    assert table.splitlines()[0] == "| " + " | ".join(claims.COLUMNS) + " |" and len(table.splitlines()) == 3
    assert table in capsys.readouterr().out


def test_two_models_under_one_set_of_tags_are_an_error_not_seeds(tmp_path):
    tags = {"role": "study", "init": "stepwise", "num_blocks": 2.0}
    rows = ppl("stepwise B=2", (232.0, 1740.0), **tags) + ppl("stepwise B=2 other", (100.0, 900.0), **tags)
    with pytest.raises(ValueError, match="match several models"):
        claims.for_notebook("01", write(tmp_path / "01", perplexity=rows))
