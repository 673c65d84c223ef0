"""Every notebook runs headless at smoke scale through papermill and writes its results and figures."""
from pathlib import Path

import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLES = ["runs", "curves", "perplexity", "accuracy", "average_accuracy"]
EXPECTED = {  # results (CSV + JSON unless named with a suffix) and figures (PNG + SVG)
    "00_explore": (["residual_energy.csv", "loop_predictions.csv", "generation.txt"], ["residual_energy"]),
    "01_init_ablation": (TABLES, ["fig5a_loss_curves", "perplexity", "fig5b_accuracy"]),
    "02_relaxation_rank_sweep": (TABLES + ["init_perplexity"],
                                 ["init_perplexity_vs_rank", "fig6_accuracy", "fig7a_rank", "fig7c_pareto"]),
    "03_distillation": (TABLES, ["loss_curves", "fig7b_accuracy"]),
    "04_early_exit": (TABLES, ["table13_per_loop_accuracy", "per_loop_perplexity"]),
    "05_throughput": (["throughput", "simulated"], ["fig8_throughput"]),
}


def execute(name, run_dir, **extra):
    params = yaml.safe_load((ROOT / "params" / name / "smoke.yaml").read_text())
    return papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(run_dir / f"{name}.ipynb"),
                                      parameters={**params, "run_dir": str(run_dir), **extra},
                                      kernel_name="python3", progress_bar=False, cwd=str(ROOT))


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
    assert f'rrt.params.resolve("{name}", globals())' in code[1].source  # validation right after parameters
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "run `make strip` before committing"
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines()), \
            "functions belong in lib/rrt, not in a notebook"
