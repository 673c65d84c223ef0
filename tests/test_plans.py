"""Study plans (plans.py): one typed schema per notebook, validated before any compute, expanded into runs."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
import yaml

from rrt.notebook import from_dict, load_params, resolve
from rrt.plans import Distillation, EarlyExit, Explore, InitAblation, RelaxationSweep, STUDIES
from rrt.study import SCALES
from rrt.runs.cost import plan_table

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
TINYLLAMA = "TinyLlama/TinyLlama-1.1B-intermediate-step-50K-105b"


def notebook_defaults(name):
    return {k: ast.literal_eval(v["default"])
            for k, v in papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb")).items()}


def as_field(value):
    return tuple(as_field(v) for v in value) if isinstance(value, list) else value  # nested lists: tuples of tuples


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_parameters_cell_is_the_study_dataclass(name):
    """One schema: the cell's names, and its values, are the dataclass's fields and defaults."""
    cell = notebook_defaults(name)
    study = STUDIES[name]()
    assert list(cell) == [k for k in study.to_dict() if k != "notebook"]
    assert {k: as_field(v) for k, v in cell.items()} == {k: getattr(study, k) for k in cell}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_params_files_validate_and_say_how_to_run(name):
    files = {p.stem: p for p in (ROOT / "params" / name).glob("*.yaml")}
    assert set(files) == set(SCALES)
    for scale, path in files.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"make run NB={name} SCALE={scale}" in first
        study = load_params(name, scale)  # every key known, every value valid, every B dividing L
        assert study.scale == scale


def test_a_misspelt_key_names_the_closest_field_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'num_blcks' \(did you mean 'num_blocks'\?\).*allowed: scale"):
        resolve("00_explore", {**notebook_defaults("00_explore"), "num_blcks": 2})


@pytest.mark.parametrize("override,error,match", [
    ({"num_blocks": "2"}, TypeError, "num_blocks='2' must be int"),
    ({"init": "stepwize"}, ValueError, "valid: stepwise, average, lower, random"),
    ({"exit_threshold": 1.5}, ValueError, r"out of range \[0, 1\]"),
    ({"scale": "gpu"}, ValueError, "valid: smoke, cpu"),
    ({"untie_norms": 1}, TypeError, "must be bool"),
    ({"num_blocks": 4}, ValueError, "num_blocks=4 does not divide the 30 layers"),
])
def test_bad_values_are_named(override, error, match):
    with pytest.raises(error, match=match):
        Explore(**override)


def test_a_list_passed_as_text_says_how_to_pass_lists():
    with pytest.raises(TypeError, match=r"must be a list of str, got str; papermill -p passes text, pass lists with -y '\{inits: "):
        InitAblation(inits='["stepwise"]')


@pytest.mark.parametrize("cls,values,match", [
    (InitAblation, {"model": TINYLLAMA, "num_blocks": [2, 3]}, r"num_blocks: .*22 layers"),  # Table 5 on TinyLlama
    (InitAblation, {"model": "EleutherAI/pythia-1b", "num_blocks": [3]}, r"num_blocks: .*16 layers"),
    (InitAblation, {"lr": 0.0}, "lr must be > 0"),
    (InitAblation, {"warmup_steps": 70}, "warmup_steps=70 exceeds steps=60"),
    (InitAblation, {"tasks": ["hellaswagg"]}, "holds 'hellaswagg'; valid"),
    (InitAblation, {"global_batch_size": 6}, "not a multiple of batch_size × gpus_per_run"),
    (Distillation, {"long_warmup_steps": 100}, "long_warmup_steps=100 exceeds long_steps=90"),
    (Distillation, {"kds": ["kl"]}, "holds 'kl'"),
    (RelaxationSweep, {"zero_init_ranks": [128]}, r"zero_init_ranks \[128\] must be nonzero members of lora_ranks"),
    (EarlyExit, {"num_blocks": [1]}, "early exit needs B >= 2"),
])
def test_impossible_plans_fail_naming_the_key(cls, values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**values)


def test_make_plan_works_for_every_notebook_and_scale_without_weights(monkeypatch, capsys):
    """`make plan` reads shapes only: loading any weights would raise here."""
    import transformers

    from rrt.cli import plan_main as main

    def no_weights(*args, **kwargs):
        raise AssertionError("make plan loaded weights")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    for name in NOTEBOOKS:
        for scale in SCALES:
            table = main([name, scale])
            out = capsys.readouterr().out
            if isinstance(load_params(name, scale), (InitAblation, RelaxationSweep, Distillation, EarlyExit)):
                assert len(table) and "H100 hours" in out and table.flops.gt(0).eq(table.role != "pretrained").all()
                assert {"run", "init", "num_blocks", "lora_rank", "objective", "exit_coefficient", "kd", "teacher",
                        "data", "tokens", "steps", "warmup_steps", "tokens_per_step", "flops",
                        "h100_hours"} <= set(table.columns)


@pytest.mark.slow
def test_make_plan_target_prints_the_plan():
    ok = subprocess.run(["make", "-s", "plan", "NB=04_early_exit", "SCALE=paper-gemma-2b"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "B=2 post aggressive 0.1 new-data" in ok.stdout and "H100 hours" in ok.stdout


@pytest.mark.parametrize("change,named", [
    ({"num_blocks": [2, 3]}, "num_blocks: num_blocks=3 does not divide the 22 layers"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"warmup_steps": 9000}, "warmup_steps=9000 exceeds steps=7153"),
    ({"num_block": [2]}, "unknown parameter 'num_block' (did you mean 'num_blocks'?)"),
])
@pytest.mark.slow
def test_a_bad_plan_file_fails_in_make_plan_naming_the_key(tmp_path, change, named):
    values = {**yaml.safe_load((ROOT / "params/01_init_ablation/paper-tinyllama-1.1b.yaml").read_text()), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    bad = subprocess.run([sys.executable, "-m", "rrt", "plan", "01_init_ablation", str(path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and named in bad.stderr and "Traceback" not in bad.stderr


def test_runs_share_the_run_store_by_config_hash(tmp_path):
    """01's full-size run is 03's teacher, 01's Stepwise run is 04's starting point: one directory each."""
    common = dict(model="tiny-llama", runs_root=str(tmp_path))
    init, distil = InitAblation(**common), Distillation(**common, final_num_blocks=[2])
    exits = EarlyExit(**common, scale="smoke")  # 03's smoke params: its final models at B=2 (4 layers)
    full = {r.name: r for r in init.runs()}["full-size"]
    kd_runs = [r for r in distil.runs() if r.config.kd]
    assert kd_runs and all(r.config.teacher == str(full.final_checkpoint) and r.needs == ("full-size",) for r in kd_runs)
    assert {r.name: r for r in distil.runs()}["full-size"].dir == full.dir
    stepwise = {r.name: r for r in init.runs()}["stepwise B=2"]
    up = exits.runs()[0]
    assert up.role == "uptrained" and up.dir == stepwise.dir
    assert all(r.config.init_from == str(up.final_checkpoint) for r in exits.runs() if r.name.startswith("B=2 post"))
    # 03's final models are 04's starting points (the params of one scale: 04 reads 03's)
    finals = {r.name: r for r in load_params("03_distillation", "smoke", runs_root=str(tmp_path)).runs()}
    ups = [r for r in load_params("04_early_exit", "smoke", runs_root=str(tmp_path)).runs() if r.tags.get("final")]
    assert ups and all(finals[r.name].dir == r.dir for r in ups if r.role in ("uptrained", "baseline"))
    table = plan_table(distil.runs())
    assert table.set_index("run").loc["stepwise B=2 fkl", "teacher"].startswith("full-size (tiny-llama-")


def test_tokens_per_run_hold_for_any_process_count():
    one, eight = (load_params("01_init_ablation", "paper-gemma-2b").__class__(
        **{**yaml.safe_load((ROOT / "params/01_init_ablation/paper-gemma-2b.yaml").read_text()), "gpus_per_run": g})
        for g in (1, 8))
    for a, b in zip(one.runs(), eight.runs()):
        # the memory model may pick another micro-batch per GPU count; the global batch (so the tokens) never moves
        assert a.tokens == b.tokens and a.tokens_per_step == b.tokens_per_step
        for c in (a.config, b.config):
            assert c.batch_size * c.grad_accum * c.num_processes == one.global_batch_size
        assert a.config.num_processes == 1 and b.config.num_processes == 8


def test_new_data_post_training_starts_past_the_uptraining():
    study = EarlyExit(model="tiny-llama", scale="smoke")
    runs = {r.name: r for r in study.runs()}
    up, new = runs["stepwise B=2"], runs["B=2 post aggressive 0.1 new-data"]
    assert new.config.data_offset == up.samples and runs["B=2 post aggressive 0.1"].config.data_offset == 0


def test_from_dict_keeps_every_field_typed():
    study = from_dict("02_relaxation_rank_sweep", {"lora_ranks": [0, 8], "zero_init_ranks": [8], "model": "tiny-llama",
                                                   "baselines": False})
    assert study.lora_ranks == (0, 8)
    assert [r.name for r in study.runs()] == ["average B=2 r=0", "average B=2 r=8 svd", "average B=2 r=8 zero"]


def test_05_serves_04s_app_m_runs():
    """05's (B, r) model is 04's App. M pair (the same run directories): 03's final model (Stepwise at r = 0,
    Average relaxed at r > 0), post-trained with aggressive exit_coefficient + self-distillation on new tokens."""
    from rrt.notebook import load_params
    for scale in ("smoke", "cpu", "paper-gemma-2b"):
        study = load_params("05_throughput", scale)
        ee = study.training()
        four = {r.name: r for r in load_params("04_early_exit", scale).runs()}
        c = ee.exit_coefficient
        assert study.runs()[0].name == "full-size"  # the KD teacher of the uptrained models, first
        for (b, r), (up, run) in study.served().items():
            assert run.config.init_from == str(up.final_checkpoint) and run.needs == (up.name,)
            assert (run.config.lora_rank, up.config.lora_rank, run.config.num_blocks) == (r, r, b)
            assert run.config.objective == "early_exit" and run.config.data_offset == up.samples
            assert (run.config.exit_scheme, run.config.exit_coefficient) == ("aggressive", c)
            assert run.config.self_distill == (not (r and b in ee.no_self_distill_blocks))
            assert (up.config.init, up.config.kd) == ("average" if r else "stepwise", "fkl")
            assert four[run.name].dir == run.dir and four[up.name].dir == up.dir
    assert load_params("05_throughput", "cpu", checkpoint="some/dir").runs() == []
    assert load_params("05_throughput", "cpu", model="paper-gemma-2b").runs() == []  # dummy weights: no training


def test_05_refuses_bad_serving_parameters():
    from rrt.notebook import load_params
    with pytest.raises(ValueError, match="kv_policies holds 'skip'; valid: propagate, copy_kv, copy_hidden"):
        load_params("05_throughput", "cpu", kv_policies=["skip"])
    with pytest.raises(ValueError, match="corpora: 'wikitext2' must be 'corpus/split'"):
        load_params("05_throughput", "cpu", corpora=["wikitext2"])
    with pytest.raises(ValueError, match=r"shapes holds \[64\]: each is \[prompt tokens, output tokens\]"):
        load_params("05_throughput", "cpu", shapes=[[64]])
    with pytest.raises(ValueError, match="must each name at least one"):
        load_params("05_throughput", "cpu", corpora=[])
    with pytest.raises(ValueError, match="target_agreement=1.5 out of range"):
        load_params("05_throughput", "cpu", target_agreement=1.5)


def test_repeat_seeds_run_every_init_again_and_tag_each_run_with_its_seed():
    study = InitAblation(inits=["stepwise", "lower"], repeat_seeds=[1, 2], repeat_inits=["stepwise", "lower"])
    inits = [r for r in study.runs() if r.role == "study"]
    assert [(r.name, r.config.seed, r.tags["seed"]) for r in inits] == [
        ("stepwise B=2", 0, 0), ("lower B=2", 0, 0), ("stepwise B=2 seed=1", 1, 1), ("lower B=2 seed=1", 1, 1),
        ("stepwise B=2 seed=2", 2, 2), ("lower B=2 seed=2", 2, 2)]
    assert len({r.key for r in inits}) == 6  # another seed is another run directory
    # seed 0's run is the one 03 and 04 share (same config hash), whatever the repeats
    assert inits[0].key == InitAblation(inits=["stepwise"], repeat_seeds=[]).runs()[1].key
    with pytest.raises(ValueError, match=r"repeat_seeds \[0\] must be distinct and differ from seed=0"):
        InitAblation(repeat_seeds=[0])


def test_repeat_inits_limit_the_repeats_and_must_be_inits():
    study = InitAblation(inits=["stepwise", "average", "lower"], repeat_seeds=[1], repeat_inits=["stepwise"])
    assert [r.name for r in study.runs() if r.role == "study"] == ["stepwise B=2", "average B=2", "lower B=2",
                                                                    "stepwise B=2 seed=1"]
    with pytest.raises(ValueError, match=r"repeat_inits \['random'\] are not in inits"):
        InitAblation(inits=["stepwise"], repeat_inits=["random"])


def test_init_variants_are_fig11_runs_at_the_first_b():
    study = InitAblation(num_blocks=[2, 3], variants=["stepwise_start", "norm_choice", "norm_zero"], repeat_seeds=[])
    variants = [r for r in study.runs() if r.role == "variant"]
    assert [(r.name, r.config.init, r.config.norm_init, r.config.num_blocks, r.tags["norm_init"]) for r in variants] == [
        ("stepwise_start B=2", "stepwise_start", None, 2, "-"), ("average B=2 norm=choice", "average", "choice", 2, "choice"),
        ("average B=2 norm=zero", "average", "zero", 2, "zero")]
    assert len({r.key for r in study.runs()}) == len(study.runs())  # each variant is its own run
    with pytest.raises(ValueError, match="variants holds 'norm_avg'"):
        InitAblation(variants=["norm_avg"])


def test_relaxation_sweep_reads_01s_baselines_and_stepwise_run_by_config_hash():
    sweep = {r.name: r for r in RelaxationSweep().runs()}
    ablation = {r.name: r for r in InitAblation().runs()}
    for name in ("full-size", "reduced-size B=2", "stepwise B=2"):
        assert sweep[name].key == ablation[name].key and sweep[name].role == "baseline"
    assert [r.name for r in RelaxationSweep(baselines=False).runs()] == [
        n for n in sweep if n not in ("full-size", "reduced-size B=2", "stepwise B=2")]
    # a sweep over Stepwise already has that run (r=0): it is planned once, as the sweep's
    names = [r.name for r in RelaxationSweep(inits=["stepwise", "average"]).runs()]
    assert "stepwise B=2" not in names and names.count("stepwise B=2 r=0") == 1 and names[0] == "full-size"


def test_every_plan_is_the_runs_it_was_under_the_same_config_hashes(tmp_path):
    """Run stores written before the run layer (rrt.runs) stay readable: every plan of every notebook and scale
    has the same runs, in the same order, in the same <model>-<config hash> directories, and is evaluated and fed
    as before (the results file of a run is keyed by its evaluation). tests/data/plan_keys.json was written by
    the plans at fa1d171, and rewritten where a plan changed on purpose (issue 28: Table 8 and 12's runs, App. M's,
    05's served models, the 75B packed set; the cpu and smoke runs of 01-04 kept their directories)."""
    from rrt.notebook import planned
    expected = json.loads((ROOT / "tests" / "data" / "plan_keys.json").read_text())
    assert {k.split("/")[1] for k in expected} >= {"cpu", *SCALES[2:]}
    for key, want in expected.items():
        notebook, scale = key.split("/")
        study = load_params(notebook, scale, **({} if notebook == "00_explore" else {"runs_root": str(tmp_path)}))
        assert [[r.name, r.role, r.dir.name] for r in study.runs()] == want["runs"], key
        recipe = planned(study)
        assert (recipe and recipe.data_spec().to_dict()) == (want["data"] or None), key
        assert (recipe and recipe.eval_spec().to_dict()) == (want["evaluation"] or None), key
