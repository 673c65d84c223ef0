"""`make run P="..."` (params.parse_overrides: each value YAML) and `python -m rrt check-params` (notebook.check_params):
a misspelt or invalid parameter is one line naming it, before anything is created."""
import pytest

from rrt.cli import check_params_main
from rrt.notebook import check_params, load_params, parameters_cell
from rrt.params import parse_overrides, read_params
from rrt.study import OUTPUTS


def test_each_value_is_yaml_lists_numbers_booleans_strings():
    assert parse_overrides("num_blocks=[2,3] lr=1e-4 init=stepwise") == {
        "num_blocks": [2, 3], "lr": 1e-4, "init": "stepwise"}
    found = parse_overrides("  num_blocks=[2, 3]  steps=20 read_only=true task_limit=None "
                            "eval_corpora=[wikitext2/test, 'tiny stories/test'] lr=-2.5E+3 model='a b' run_dir=")
    assert found == {"num_blocks": [2, 3], "steps": 20, "read_only": True, "task_limit": None,
                     "eval_corpora": ["wikitext2/test", "tiny stories/test"], "lr": -2500.0, "model": "a b",
                     "run_dir": ""}
    assert type(found["steps"]) is int and type(found["lr"]) is float
    assert parse_overrides("") == {} and parse_overrides("   ") == {}
    assert parse_overrides("lrs=[1e-4, 3]") == {"lrs": [1e-4, 3]}  # exponents inside lists too


@pytest.mark.parametrize("text, message", [
    ("steps", r"override 'steps' is not NAME=VALUE"),
    ("20 steps=3", r"override '20' is not NAME=VALUE"),
    ("num_blocks=[2,3", r"override num_blocks='\[2,3' is not a YAML value \(expected ',' or '\]'"),
    ("steps=1 steps=2", r"override 'steps' given twice"),
])
def test_bad_syntax_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(text)


def test_check_params_builds_what_the_notebook_would():
    """The parameters cell, then the params file, then the overrides: as papermill injects them."""
    study = check_params("01_init_ablation", "smoke", {"num_blocks": [2, 3], "lr": 1e-4})
    assert study.num_blocks == (2, 3) and study.lr == 1e-4
    assert study.steps == read_params("01_init_ablation", "smoke")["steps"]  # the params file over the cell
    assert study.teacher == parameters_cell("01_init_ablation")["teacher"]  # a cell default the file leaves


def one_line(capsys, *argv):
    """Run `python -m rrt check-params argv` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        check_params_main(list(argv))
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.mark.parametrize("override, named", [
    ("stpes=3", "error: 01_init_ablation: unknown parameter 'stpes' (did you mean 'steps'?)"),
    ("steps=0", "error: 01_init_ablation: steps=0 must be >= 1"),
    ("num_blocks=[5]", "error: 01_init_ablation: num_blocks: num_blocks=5 does not divide the 6 layers"),
    ("steps=[3", "error: 01_init_ablation: override steps='[3' is not a YAML value"),
    ("lr=fast", "error: 01_init_ablation: parameter lr='fast' must be float, got str"),  # check_types' TypeError
])
def test_a_bad_parameter_is_one_line_and_exit_2(capsys, override, named):
    before = sorted(OUTPUTS.rglob("*"))
    code, out, err = one_line(capsys, "01_init_ablation", "smoke", "--yaml", override)
    assert code == 2 and out == "" and err.startswith(named) and err.count("\n") == 1, err
    assert sorted(OUTPUTS.rglob("*")) == before  # nothing created


def test_valid_parameters_pass_and_print_papermills_yaml(capsys):
    study = check_params_main(["01_init_ablation", "smoke", "--yaml", "num_blocks=[2, 3] lr=1e-4"])
    assert study.num_blocks == (2, 3)
    assert capsys.readouterr().out == "{num_blocks: [2, 3], lr: 0.0001}\n"  # yaml reads it back as a float
    assert check_params_main(["01_init_ablation", "smoke"]).notebook == "01_init_ablation"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("notebook", sorted(p.stem for p in (OUTPUTS.parent / "notebooks").glob("*.ipynb")))
def test_every_notebooks_cell_and_params_file_check_as_the_study_they_build(notebook):
    for scale in ("smoke", "cpu"):
        assert check_params(notebook, scale, {}) == load_params(notebook, scale)
