"""Sweeps: grid expansion, skipping complete runs, the SLURM array script."""
from pathlib import Path

import pytest

from rrt import sweep

GRID = Path(__file__).resolve().parents[1] / "params" / "grids" / "explore-smoke.yaml"


def test_expand_combines_grid_over_base():
    notebook, runs = sweep.expand(GRID)
    assert notebook == "00_explore" and len(runs) == 4
    assert {(r["num_blocks"], r["init"]) for r in runs} == {(2, "stepwise"), (2, "average"), (3, "stepwise"),
                                                            (3, "average")}
    assert all(r["model"] == "tiny-gemma3" for r in runs)  # from the base params file


def test_rerun_skips_complete_runs(tmp_path):
    executed = []

    def fake_run(notebook, run_dir, params):
        executed.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / sweep.DONE).write_text("ok")
    first = sweep.run_local(GRID, tmp_path, run=fake_run)
    assert len(first) == 4 and 'num_blocks=2,init="stepwise"' in executed
    (first[1] / sweep.DONE).unlink()  # an interrupted run
    assert sweep.run_local(GRID, tmp_path, run=fake_run) == [first[1]]


def test_grid_slurm_script_has_one_task_per_grid_point(tmp_path):
    script = sweep.write_slurm(GRID, tmp_path).read_text()
    assert "#SBATCH --array=0-3" in script and "--task \"$SLURM_ARRAY_TASK_ID\"" in script


def test_bad_grid_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebook: 00_explore\ngrids: {seed: [0]}\n")
    with pytest.raises(ValueError, match="unknown keys: \\['grids'\\]"):
        sweep.expand(bad)


def test_report_links_every_executed_notebook_and_its_figures(tmp_path):
    import nbformat

    from rrt.report import write_index
    run = tmp_path / "01_init_ablation" / "smoke-1"
    (run / "figures").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nbformat.write(nb, run / "01_init_ablation.ipynb")
    (run / "figures" / "fig5a.png").write_bytes(b"\x89PNG")
    (run / "config.json").write_text('{"scale": "smoke"}')
    index = write_index(tmp_path).read_text()
    assert (run / "01_init_ablation.html").exists()
    assert 'href="01_init_ablation/smoke-1/01_init_ablation.html"' in index
    assert 'src="01_init_ablation/smoke-1/figures/fig5a.png"' in index and "<td>smoke</td>" in index


def test_a_plan_becomes_one_array_task_per_run_in_waves_then_a_collect_job(tmp_path):
    """04 at paper scale: the uptrained model and co-training first; the post-training rows wait for it."""
    submit = sweep.write_plan_jobs("04_early_exit", "paper-gemma-2b", tmp_path, runs_root=str(tmp_path / "runs"))
    root = submit.parent
    wave0, wave1 = (root / "wave0.sbatch").read_text(), (root / "wave1.sbatch").read_text()
    assert "#SBATCH --array=0-1" in wave0 and "#SBATCH --array=0-9" in wave1  # 2 + 10 runs of Table 13
    for script in (wave0, wave1):
        assert "#SBATCH --gres=gpu:8" in script
        assert script.count("accelerate launch --config_file params/accelerate/ddp.yaml --num_processes 8 "
                            "-m rrt.runs ") == script.count(") .venv/")
    text = submit.read_text()
    assert "w1=$(sbatch --parsable --dependency=afterok:$w0 " in text
    assert "sbatch --dependency=afterany:$w0:$w1 " in text and "collect.sbatch" in text
    collect = (root / "collect.sbatch").read_text()
    assert "--gres" not in collect and "make run NB=04_early_exit SCALE=paper-gemma-2b" in collect
    assert len(list((tmp_path / "runs").glob("*/run.json"))) == 12


def test_plan_waves_put_every_run_after_what_it_reads():
    from rrt.plans import Distillation
    runs = Distillation(model="tiny-llama").runs()
    first, second = sweep.waves(runs)
    assert [r.name for r in first if r.name == "full-size"] == ["full-size"]
    assert all(r.config.kd for r in second) and all(not r.needs for r in first)
