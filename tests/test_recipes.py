"""Every `paper-*` plan held against the paper's recipes (rrt.recipes: App. G, L, M; Tables 5, 9, 11, 13)."""
from pathlib import Path

import pandas as pd
import pytest

from rrt import recipes
from rrt.notebook import load_params
from rrt.runs.cost import plan_table

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(recipes.PAPER_MODELS)
TRAINING = ("01_init_ablation", "02_relaxation_rank_sweep", "03_distillation", "04_early_exit")


def close(value, target, tol=0.01):
    return abs(value - target) <= tol * target


def long_run(study, run):
    return getattr(study, "long_steps", None) == run.config.steps


@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("scale", PAPER)
@pytest.mark.parametrize("notebook", TRAINING)
def test_every_run_trains_the_papers_tokens_at_its_step_size_for_any_process_count(notebook, scale, gpus):
    study = load_params(notebook, scale, gpus_per_run=gpus)
    up = recipes.UPTRAIN
    assert study.model == recipes.PAPER_MODELS[scale].model
    for run in study.runs():
        c = run.config
        tokens = up["long_tokens"] if long_run(study, run) else (
            recipes.EARLY_EXIT_TOKENS if c.objective == "early_exit" else up["tokens"])
        assert close(run.tokens, tokens), (run.name, run.tokens)
        assert c.seq_len == up["seq_len"] and close(run.tokens_per_step, up["tokens_per_step"], tol=0.05)
        assert c.num_processes == gpus and c.batch_size * c.grad_accum * gpus == run.tokens_per_step // c.seq_len
        assert c.lr == up["lr"] and c.warmup_steps == (up["long_warmup_steps"] if long_run(study, run) else
                                                      up["warmup_steps"])
        assert c.data.startswith(f"hub:{up['corpus']}/train@")


@pytest.mark.parametrize("scale", PAPER)
def test_every_notebook_of_a_scale_packs_the_same_training_set(scale):
    """A run shared between notebooks (01's models in 02, 03 and 04) must read the same sequences."""
    data = {r.config.data for nb in TRAINING for r in load_params(nb, scale).runs()}
    assert len(data) == 1, data


@pytest.mark.parametrize("scale", PAPER)
def test_init_ablation_runs_the_papers_block_counts_and_baselines(scale):
    study = load_params("01_init_ablation", scale)
    runs = study.runs()
    assert tuple(study.num_blocks) == recipes.PAPER_MODELS[scale].num_blocks
    assert {(r.config.init, r.config.num_blocks) for r in runs if r.role == "study"} == {
        (i, b) for i in ("stepwise", "average", "lower", "random") for b in recipes.PAPER_MODELS[scale].num_blocks}
    assert {r.name for r in runs if r.role == "baseline"} == {"full-size"} | {
        f"reduced-size B={b}" for b in recipes.PAPER_MODELS[scale].num_blocks}
    assert all(r.config.kd is None for r in runs)  # Table 5: CE only


@pytest.mark.parametrize("scale", PAPER)
def test_rank_sweep_is_table_9(scale):
    runs = load_params("02_relaxation_rank_sweep", scale).runs()
    svd = {(r.config.init, r.config.lora_rank) for r in runs if r.config.lora_init == "svd" and r.config.lora_rank}
    zero = {(r.config.init, r.config.lora_rank) for r in runs if r.config.lora_init == "zero"}
    assert svd == {(i, k) for i in recipes.TABLE9_INITS for k in recipes.TABLE9_RANKS}
    assert zero == {(i, k) for i in recipes.TABLE9_INITS for k in recipes.TABLE9_ZERO_INIT_RANKS}
    assert not any(r.config.untie_norms for r in runs)  # the paper ties every norm


@pytest.mark.parametrize("scale", PAPER)
def test_distillation_is_table_11_with_the_full_size_teacher(scale):
    study = load_params("03_distillation", scale)
    runs = {r.name: r for r in study.runs()}
    full = runs["full-size"]
    short = [r for r in runs.values() if r.role == "study" and not long_run(study, r)]
    init, rank = recipes.TABLE11_RELAXED
    for model in ((study.init, 0), (init, rank)):
        assert sorted(r.config.kd or "" for r in short if (r.config.init, r.config.lora_rank) == model) == sorted(
            k or "" for k in recipes.TABLE11_KDS)
    assert {r.config.kd for r in runs.values() if long_run(study, r)} == {None, "fkl"}  # Table 11 and 12
    for run in runs.values():  # App. L: the full-size model uptrained on the same tokens, never the pretrained one
        assert (run.config.teacher == str(full.final_checkpoint)) == bool(run.config.kd)
        assert full.config.baseline == "full" and full.config.kd is None and full.tokens == run.tokens or long_run(study, run)


@pytest.mark.parametrize("scale", PAPER)
def test_early_exit_is_table_13_row_for_row(scale):
    study = load_params("04_early_exit", scale)
    runs = study.runs()
    up = runs[0]
    assert up.role == "uptrained" and up.config.objective == "uptrain" and up.config.init == "stepwise"
    assert up.dir == {r.name: r for r in load_params("01_init_ablation", scale).runs()}["stepwise B=2"].dir
    rows = []
    for r in runs[1:]:
        c = r.config
        assert c.kd is None and c.teacher is None  # Table 13's KD is self-distillation from the detached last loop
        frozen = c.trainable == "head_lora"
        loss = "standard" if frozen else c.exit_scheme
        coefficient = c.exit_coefficient if c.exit_scheme == "aggressive" and not frozen else None
        data = "new" if c.data_offset else "ovlp"
        rows.append(("post" if c.init_from else "co", loss, coefficient, c.self_distill, frozen, data))
        assert (c.init_from == str(up.final_checkpoint)) == (rows[-1][0] == "post")
        assert c.data_offset in (0, up.samples)
        assert c.head_lora_rank == (recipes.TABLE13_HEAD_LORA_RANK if frozen else 0)
    assert sorted(rows, key=str) == sorted(recipes.TABLE13, key=str)


def test_the_committed_example_plans_are_what_the_params_plan_today():
    """outputs/examples/plans/<notebook>-paper-gemma-2b.csv: the plan.csv a cluster user reviews first."""
    for notebook in TRAINING + ("05_throughput",):  # 05 trains the models it serves: 04's recipe per LoRA rank
        committed = pd.read_csv(ROOT / "outputs" / "examples" / "plans" / f"{notebook}-paper-gemma-2b.csv")
        study = load_params(notebook, "paper-gemma-2b")
        fresh = plan_table(study.runs())
        keep = ["run", "role", "init", "num_blocks", "lora_rank", "objective", "kd", "teacher", "starts_from",
                "data_offset", "tokens", "steps", "warmup_steps", "tokens_per_step", "gpus", "run_dir", "config_hash"]
        pd.testing.assert_frame_equal(committed[keep], fresh[keep], check_dtype=False)


@pytest.mark.parametrize("scale", PAPER)
@pytest.mark.parametrize("notebook", TRAINING)
def test_every_paper_run_fits_an_80_gb_card_with_10_percent_headroom(notebook, scale):
    """gpu_memory_gb: 80 (H100): the plan sizes each run (rrt.runs.memory) to at most 72 GB per GPU."""
    table = plan_table(load_params(notebook, scale).runs())
    assert (table.memory_gb <= 72).all(), table.loc[table.memory_gb > 72, ["run", "memory_gb"]]
