"""Every `paper-*` plan held against the paper's recipes (rrt.recipes: App. G, L, M; Tables 5, 9, 11, 12, 13, 14-15;
05's served models of Tables 16-19), and hours counted once over the suite."""
from pathlib import Path

import pandas as pd
import pytest

from rrt import recipes
from rrt.notebook import load_params
from rrt.runs.cost import _shape, plan_table, totals_text
from rrt.suite import owners, suite_plans, suite_table

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(recipes.PAPER_MODELS)
TRAINING = ("01_init_ablation", "02_relaxation_rank_sweep", "03_distillation", "04_early_exit")


def close(value, target, tol=0.01):
    return abs(value - target) <= tol * target


def long_run(study, run):
    return getattr(study, "long_steps", None) == run.config.steps


def long_steps(scale):
    return load_params("03_distillation", scale).long_steps


def trained(runs):
    """The runs that train (the original checkpoint as a run, Table 12's TinyLlama full-size, trains nothing)."""
    return [r for r in runs if r.role != "pretrained"]


@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("scale", PAPER)
@pytest.mark.parametrize("notebook", TRAINING)
def test_every_run_trains_the_papers_tokens_at_its_step_size_for_any_process_count(notebook, scale, gpus):
    study = load_params(notebook, scale, gpus_per_run=gpus)
    up = recipes.UPTRAIN
    longer = long_steps(scale)
    assert study.model == recipes.PAPER_MODELS[scale].model
    for run in trained(study.runs()):
        c = run.config
        long = c.steps == longer
        # 15B: uptraining; 60B: Table 12's models (long_steps); 15B more past 60B: App. M and the 75B full-size
        tokens = up["long_tokens"] if long else (
            recipes.EARLY_EXIT_TOKENS if c.objective == "early_exit" or c.init_from else up["tokens"])
        assert close(run.tokens, tokens), (run.name, run.tokens)
        assert c.seq_len == up["seq_len"] and close(run.tokens_per_step, up["tokens_per_step"], tol=0.05)
        assert c.num_processes == gpus and c.batch_size * c.grad_accum * gpus == run.tokens_per_step // c.seq_len
        assert c.lr == up["lr"] and c.warmup_steps == (up["long_warmup_steps"] if long else up["warmup_steps"])
        assert c.data.startswith(f"hub:{up['corpus']}/train@")


@pytest.mark.parametrize("scale", PAPER)
def test_every_notebook_of_a_scale_packs_the_same_training_set_of_75b_tokens(scale):
    """A run shared between notebooks (01's models in 02, 03 and 04; 03's in 04 and 05) must read the same sequences;
    the set holds 60B + 15B new tokens (App. M), and no run reads past it."""
    runs = [r for nb in TRAINING + ("05_throughput",) for r in trained(load_params(nb, scale).runs())]
    assert len({r.config.data for r in runs}) == 1, {r.config.data for r in runs}
    packed = int(runs[0].config.data.rsplit("[:", 1)[1].rstrip("]"))
    assert close(packed * recipes.UPTRAIN["seq_len"], recipes.UPTRAIN["long_tokens"] + recipes.EARLY_EXIT_TOKENS)
    assert max(r.config.data_offset + r.samples for r in runs) == packed  # App. M's runs read it to the end


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


# Table 8's N-emb column (billions: the shared layers + every LoRA), by (q, kv, o, mlp) ranks
TABLE8_N_EMB = {(256, 256, 256, 256): 1.30, (128, 256, 128, 256): 1.28, (256, 128, 256, 256): 1.29,
                (256, 256, 256, 128): 1.18, (128, 128, 128, 256): 1.27, (128, 128, 128, 128): 1.15,
                (64, 128, 64, 128): 1.14, (128, 64, 128, 128): 1.14, (128, 128, 128, 64): 1.08, (64, 64, 64, 128): 1.13}


@pytest.mark.parametrize("scale", PAPER)
def test_rank_sweep_plans_table_8s_per_module_ranks_on_gemma_only(scale):
    """Table 8: Average + SVD, B=2, 15B tokens, ranks per module; the uniform rows are Table 9's runs. Each model's
    non-embedding size (shared layers + LoRA, from shapes alone) is the paper's to its printed 0.01B."""
    runs = load_params("02_relaxation_rank_sweep", scale).runs()
    per_module = {r.config.module_ranks: r for r in runs if r.config.module_ranks}
    if scale not in recipes.ABLATIONS_GEMMA_ONLY:
        assert not per_module
        return
    assert set(per_module) == set(recipes.TABLE8_MODULE_RANKS)
    uniform = {(r.config.lora_rank,) * 4: r for r in runs if r.config.init == "average" and r.config.lora_init == "svd"
               and r.config.num_blocks == 2 and r.config.module_ranks is None}
    for ranks, n_emb in TABLE8_N_EMB.items():
        run = per_module.get(ranks) or uniform[ranks]
        c = run.config
        assert (c.init, c.num_blocks, c.lora_init, c.lora_rank, close(run.tokens, recipes.UPTRAIN["tokens"])) == (
            "average", 2, "svd", max(ranks), True)
        shape = _shape(c.model, 1, c.lora_rank, 2, c.module_ranks)
        assert abs((shape["layers"] / 2 + shape["lora"]) / 1e9 - n_emb) <= 0.01 + 1e-9, (ranks, shape)
        if c.module_ranks:
            assert run.tags["module_ranks"] == "/".join(map(str, ranks))


@pytest.mark.parametrize("scale", PAPER)
def test_distillation_is_table_11_with_the_full_size_teacher_on_gemma_only(scale):
    study = load_params("03_distillation", scale)
    runs = {r.name: r for r in study.runs()}
    full = runs["full-size"]
    short = [r for r in runs.values() if r.role == "study" and not long_run(study, r)]
    if scale not in recipes.ABLATIONS_GEMMA_ONLY:  # Table 11 is opt-in there: kd_ablation switches it on
        assert not short and not study.kd_ablation
        assert len(load_params("03_distillation", scale, kd_ablation=True).runs()) > len(runs)
    else:
        init, rank = recipes.TABLE11_RELAXED
        for model in ((study.init, 0), (init, rank)):
            assert sorted(r.config.kd or "" for r in short if (r.config.init, r.config.lora_rank) == model) == sorted(
                k or "" for k in recipes.TABLE11_KDS)
        # Table 11's 60B rows: CE, and FKL (Table 12's Stepwise B=2 model, listed once)
        long = {r.config.kd for r in runs.values() if long_run(study, r) and r.config.num_blocks == 2
                and r.config.init == "stepwise" and not r.config.baseline}
        assert long == {None, "fkl"}
    for run in runs.values():  # App. L: the full-size model uptrained 15B on the same tokens, never the pretrained one
        assert (run.config.teacher == str(full.final_checkpoint)) == bool(run.config.kd)
    assert full.config.baseline == "full" and full.config.kd is None and close(full.tokens, recipes.UPTRAIN["tokens"])


@pytest.mark.parametrize("scale", PAPER)
def test_distillation_plans_table_12s_final_models_and_references(scale):
    """Table 12 / Fig. 17: 60B tokens + FKL for Stepwise (r=0) and Average + SVD LoRA r = 64..512 at each B of the
    paper; the full-size model 60B (CE) and 75B (60B + 15B new), or TinyLlama's original; reduced-size 60B + KD."""
    study = load_params("03_distillation", scale)
    runs = [r for r in study.runs() if r.tags.get("final")]
    teacher = {r.name: r for r in study.runs()}["full-size"]
    long_tokens = recipes.UPTRAIN["long_tokens"]
    models = [r for r in runs if not r.config.baseline]
    assert sorted((r.config.init, r.config.num_blocks, r.config.lora_rank) for r in models) == sorted(
        ("average" if k else "stepwise", b, k) for b in recipes.PAPER_MODELS[scale].num_blocks
        for k in recipes.TABLE12_RANKS)
    for r in models:
        c = r.config
        assert (c.kd, c.teacher, c.lora_init, close(r.tokens, long_tokens), r.role) == (
            recipes.TABLE12_KD, str(teacher.final_checkpoint), "svd", True, "study")
        assert r.tags == {"init": c.init, "num_blocks": c.num_blocks, "lora_rank": c.lora_rank, "kd": "fkl",
                          "uptrain_steps": c.steps, "final": True, "seed": 0}
    reduced = [r for r in runs if r.config.baseline == "reduced"]
    assert [(r.config.num_blocks, r.config.kd, r.config.teacher, close(r.tokens, long_tokens)) for r in reduced] == [
        (2, "fkl", str(teacher.final_checkpoint), True)]  # Table 12: 0.99B / 0.48B / 0.40B, "X 60B ✓"
    assert reduced[0].tags == {"baseline": "reduced", "num_blocks": 2, "kd": "fkl",
                               "uptrain_steps": reduced[0].config.steps, "final": True, "seed": 0}
    full = [r for r in runs if r.config.baseline == "full"]
    if recipes.TABLE12_FULL_SIZE[scale] == "pretrained":
        [run] = full
        assert run.role == "pretrained" and run.trained() and run.tokens == 0 and not run.needs
        assert run.tags == {"baseline": "full", "pretrained": True, "final": True, "seed": 0}
        assert plan_table([run]).h100_hours.item() == 0
    else:
        sixty, seventy_five = full
        assert (sixty.config.kd, close(sixty.tokens, long_tokens), sixty.config.init_from) == (None, True, None)
        c = seventy_five.config  # "uptrained with 60 billion tokens and then post-trained with 15 billion tokens"
        assert (c.init_from, c.data_offset, seventy_five.needs, c.kd) == (
            str(sixty.final_checkpoint), sixty.samples, (sixty.name,), None)
        assert close(sixty.tokens + seventy_five.tokens, long_tokens + recipes.EARLY_EXIT_TOKENS)
        assert sixty.tags == {"baseline": "full", "uptrain_steps": sixty.config.steps, "final": True, "seed": 0}
        assert seventy_five.tags == {"baseline": "full", "uptrain_steps": sixty.config.steps + c.steps, "final": True,
                                     "seed": 0}


@pytest.mark.parametrize("scale", PAPER)
def test_early_exit_is_table_13_row_for_row_on_gemma_only(scale):
    study = load_params("04_early_exit", scale)
    runs = [r for r in study.runs() if not r.tags.get("final") and r.role != "baseline"]
    if scale not in recipes.ABLATIONS_GEMMA_ONLY:  # Table 13 is opt-in there: exit_ablation switches it on
        assert not runs and not study.exit_ablation
        assert len(load_params("04_early_exit", scale, exit_ablation=True).runs()) > len(study.runs())
        return
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


@pytest.mark.parametrize("scale", PAPER)
def test_early_exit_post_trains_table_12s_models_on_15b_new_tokens_as_app_m(scale):
    """Tables 14-15: each final model post-trained 15B tokens past the 60B it read (aggressive CE at 0.1, relaxed also
    0.3; self-distillation but for Gemma's B=3 relaxed rows), starting from 03's very run; the full-size references."""
    study = load_params("04_early_exit", scale)
    runs = {r.name: r for r in study.runs()}
    finals = {r.key: r for r in load_params("03_distillation", scale).runs() if r.tags.get("final")}
    ups = [r for r in runs.values() if r.role == "uptrained" and r.tags.get("final")]
    assert {r.key for r in ups} == {k for k, r in finals.items() if not r.config.baseline}  # 03's final models
    assert {r.key for r in runs.values() if r.role in ("baseline", "pretrained") and r.tags.get("final")} == {
        k for k, r in finals.items() if r.config.baseline == "full"}
    posts = [r for r in runs.values() if r.tags.get("training") == "post" and r.tags.get("final")]
    no_sd = recipes.TABLE14_NO_SELF_DISTILL.get(scale, ())
    got = sorted((r.config.num_blocks, r.config.lora_rank, r.config.exit_coefficient, r.config.self_distill) for r in posts)
    assert got == sorted((u.config.num_blocks, k, c, not (k and u.config.num_blocks in no_sd)) for u in ups
                         for k in [u.config.lora_rank]
                         for c in recipes.TABLE14_COEFFICIENTS["relaxed" if k else "recursive"])
    for r in posts:
        c, up = r.config, runs[r.needs[0]]
        assert (c.objective, c.exit_scheme, c.init_from, c.init, c.kd) == (
            "early_exit", "aggressive", str(up.final_checkpoint), up.config.init, None)
        assert c.data_offset == up.samples and close(up.tokens, recipes.UPTRAIN["long_tokens"])  # new tokens: past 60B
        assert close(r.tokens, recipes.EARLY_EXIT_TOKENS) and c.warmup_steps == recipes.UPTRAIN["warmup_steps"]
        assert r.tags == {"init": c.init, "num_blocks": c.num_blocks, "lora_rank": c.lora_rank, "training": "post",
                          "exit_scheme": "aggressive", "exit_coefficient": c.exit_coefficient,
                          "self_distill": c.self_distill, "data": "new", "final": True, "seed": 0}


@pytest.mark.parametrize("scale", ["cpu", *PAPER])
def test_05_serves_app_ms_models_post_trained_at_0_1_on_new_tokens(scale):
    """Tables 16-19: B = 2 and 3 (where B divides L), r = 0 (Stepwise) and the relaxed Average ranks; each served pair
    is 04's uptrained final model and its App. M run at aggressive 0.1 (the same run directories)."""
    study = load_params("05_throughput", scale)
    four = {r.key for r in load_params("04_early_exit", scale).runs()}
    blocks = (2, 3) if scale in ("cpu", "paper-gemma-2b") else (2,)
    ranks = (0, 64) if scale == "cpu" else recipes.TABLE12_RANKS
    served = study.served()
    assert set(served) == {(b, r) for b in blocks for r in ranks}
    for (b, r), (up, post) in served.items():
        assert {up.key, post.key} <= four and post.needs == (up.name,) and post.config.init_from == str(up.final_checkpoint)
        assert (up.config.init, up.config.kd, up.tags["final"]) == ("average" if r else "stepwise", "fkl", True)
        assert (post.config.exit_scheme, post.config.exit_coefficient, post.config.data_offset) == (
            "aggressive", 0.1, up.samples)
        assert post.config.self_distill == (not (r and b in recipes.TABLE14_NO_SELF_DISTILL.get(scale, ())))


@pytest.mark.parametrize("scale", ["cpu", "paper-gemma-2b"])
def test_hours_count_each_run_once_per_notebook_and_for_the_suite(scale):
    """A run several notebooks list (01's full-size as 03's teacher, 03's final models in 04, 04's in 05) is owned by
    the first and counted there only: the notebooks' own hours add up to the suite's, every run once."""
    table = suite_table(scale)
    notebooks, total = table.iloc[:-1], table.iloc[-1]
    unique = {r.key: r for runs in suite_plans(scale).values() for r in runs}
    assert total.runs == total.owned_runs == len(unique) == notebooks.owned_runs.sum()
    assert total.h100_hours == pytest.approx(notebooks.h100_hours.sum(), rel=1e-12)
    assert total.tokens == notebooks.tokens.sum() == sum(r.tokens for r in unique.values())
    assert notebooks.set_index("notebook").loc["05_throughput", "owned_runs"] == 0  # 04's App. M runs, served
    four = plan_table(load_params("04_early_exit", scale).runs(), owners=owners(scale))
    assert set(four.owner) == {"01_init_ablation", "03_distillation", "04_early_exit"}
    text = totals_text(four, "04_early_exit")
    assert f"{(four.owner != '04_early_exit').sum()} runs another notebook owns" in text


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
