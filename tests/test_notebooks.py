"""Every notebook runs headless at smoke scale through papermill and writes its results and figures."""
from pathlib import Path

import papermill
import pandas as pd
import pytest
import yaml

from rrt.claims import BUILDERS
from rrt.plans import STUDIES

ROOT = Path(__file__).resolve().parents[1]
TABLES = ["runs", "curves", "perplexity", "accuracy", "average_accuracy"]
EXPECTED = {  # results (CSV + JSON unless named with a suffix) and figures (PNG + SVG)
    "00_explore": (["residual_energy.csv", "loop_predictions.csv", "generation.txt"], ["residual_energy"]),
    "01_init_ablation": (TABLES, ["fig5a_loss_curves", "perplexity", "fig5b_accuracy", "fig11_init_variants"]),
    "02_relaxation_rank_sweep": (TABLES + ["init_perplexity"],
                                 ["init_perplexity_vs_rank", "fig6_accuracy", "fig16_rank_accuracy", "fig4_size_vs_quality",
                                  "fig7a_pareto", "fig15_svd_vs_zero"]),
    "03_distillation": (TABLES, ["loss_curves", "fig7b_accuracy", "fig17_final_models"]),
    "04_early_exit": (TABLES, ["table13_per_loop_accuracy", "per_loop_perplexity"]),
    "05_throughput": (["throughput", "step_costs", "paper_sim", "latency", "calibration", "quality", "accuracy",
                       "deltas", "targets", "max_batch", "throughput_vs_accuracy"],
                      ["real_over_bound", "table16_step_costs", "fig8_throughput"]),
}


def execute(name, run_dir, **extra):
    params = yaml.safe_load((ROOT / "params" / name / "smoke.yaml").read_text())
    if "runs_root" in STUDIES[name]().to_dict():  # never the repository's shared run store
        params["runs_root"] = str(run_dir / "runs")
    return papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(run_dir / f"{name}.ipynb"),
                                      parameters={**params, "run_dir": str(run_dir), **extra},
                                      kernel_name="python3", progress_bar=False, cwd=str(ROOT))


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_smoke(name, tmp_path):
    execute(name, tmp_path)
    results, figures = EXPECTED[name]
    paths = [tmp_path / f"{name}.ipynb", tmp_path / "config.json", tmp_path / "versions.json"]
    paths += [tmp_path / r for r in results if "." in r]
    paths += [tmp_path / f"{r}.{ext}" for r in results if "." not in r for ext in ("csv", "json")]
    paths += [tmp_path / "figures" / f"{f}.{ext}" for f in figures for ext in ("png", "svg")]
    for path in paths:
        assert path.exists() and path.stat().st_size > 0, path
    if name[:2] in BUILDERS:  # the last cell's claims table: one row per claim, each with a verdict
        claims = pd.read_csv(tmp_path / "claims.csv")
        assert claims["claim"].tolist() == [claim for claim, _, _ in BUILDERS[name[:2]]]
        assert claims["reproduces"].str.match("yes|no|within noise|not run").all(), claims["reproduces"].tolist()
    if (tmp_path / "runs.csv").exists():
        check_tables(tmp_path)


def check_tables(run_dir):
    """The tables a reviewer reads: one row per planned run, tags equal across tables, loops from 0."""
    plan, runs = pd.read_csv(run_dir / "plan.csv"), pd.read_csv(run_dir / "runs.csv")
    assert runs["run"].tolist() == plan["run"].tolist()
    assert (runs["config_hash"].astype(str) == plan["config_hash"].astype(str)).all()
    tags = [c for c in runs.columns if c not in ("run_dir", "config_hash", "tokens", "checkpoint", "non_embedding",
                                                   "embedding", "lora")]
    for name in ("curves", "perplexity", "accuracy"):
        table = pd.read_csv(run_dir / f"{name}.csv")
        shared = [c for c in tags if c in table.columns]
        assert "run" in shared
        merged = table[shared].drop_duplicates().merge(runs[shared], how="left", indicator=True)
        assert (merged["_merge"] == "both").all(), f"{name}: tag values differ from runs.csv"
    curves = pd.read_csv(run_dir / "curves.csv")
    if "kd" in curves:  # the tag, never the KD loss value (that metric is named loss/kd)
        assert set(curves["kd"].dropna()) <= {"ce", "fkl", "rkl", "jsd", "tvd"}
    loops = int(runs["num_blocks"].max()) if "num_blocks" in runs else 1
    per_loop = {c for c in curves.columns if c.startswith("loss/ce/loop_")}
    if per_loop:  # early-exit runs: loops numbered from 0 in every stored key
        assert per_loop == {f"loss/ce/loop_{i}" for i in range(loops)}
    ppl = pd.read_csv(run_dir / "perplexity.csv")
    assert set(ppl["loop_idx"].dropna().astype(int)) <= set(range(loops))


@pytest.mark.notebook
def test_misspelt_parameter_stops_the_first_cell(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter 'num_blcks'"):
        execute("00_explore", tmp_path, num_blcks=2)
    assert not (tmp_path / "config.json").exists()  # stopped before anything was written


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_is_stripped_and_keeps_logic_in_the_library(name):
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert f'rrt.notebook.resolve("{name}", globals())' in code[1].source  # validation right after parameters
    if name[:2] in BUILDERS:  # the verdicts are the last cell's, computed from this run's CSVs
        assert nb.cells[-1] is code[-1] and f'rrt.claims.save("{name}", run_dir)' in code[-1].source
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "run `make strip` before committing"
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines()), \
            "functions belong in lib/rrt, not in a notebook"
