"""Notebook parameters: params files match the notebooks, and bad values stop the run in its first cell."""
import ast
from pathlib import Path

import papermill
import pytest
import yaml

from rrt.params import SCALES, SCHEMAS, resolve

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def notebook_defaults(name):
    return {k: v["default"] for k, v in papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb")).items()}


def test_every_notebook_has_a_schema_matching_its_parameters_cell():
    assert NOTEBOOKS == sorted(SCHEMAS)
    for name in NOTEBOOKS:
        assert set(notebook_defaults(name)) == set(SCHEMAS[name]), name


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_params_files_hold_known_keys_and_say_how_to_run(name):
    files = {p.stem: p for p in (ROOT / "params" / name).glob("*.yaml")}
    assert set(files) == set(SCALES)
    allowed = set(notebook_defaults(name))
    for scale, path in files.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"make run NB={name} SCALE={scale}" in first
        values = yaml.safe_load(path.read_text())
        assert set(values) <= allowed, set(values) - allowed
        assert values["scale"] == scale


def _defaults(name):
    return {k: ast.literal_eval(v) for k, v in notebook_defaults(name).items()}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_defaults_and_every_params_file_validate(name):
    resolve(name, _defaults(name))
    for path in (ROOT / "params" / name).glob("*.yaml"):
        resolve(name, {**_defaults(name), **yaml.safe_load(path.read_text())})


def test_misspelt_key_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'num_blcks' \(did you mean 'num_blocks'\?\).*allowed: scale"):
        resolve("00_explore", {**_defaults("00_explore"), "num_blcks": 2})


@pytest.mark.parametrize("override,error,match", [
    ({"num_blocks": "2"}, TypeError, "num_blocks='2' must be int"),
    ({"init": "stepwize"}, ValueError, "allowed: stepwise, average, lower, random"),
    ({"exit_threshold": 1.5}, ValueError, r"out of range \[0, 1\]"),
    ({"scale": "gpu"}, ValueError, "allowed: smoke, cpu"),
    ({"untie_norms": 1}, TypeError, "must be bool"),
])
def test_bad_values_are_named(override, error, match):
    with pytest.raises(error, match=match):
        resolve("00_explore", {**_defaults("00_explore"), **override})


def test_a_list_passed_as_text_says_how_to_pass_lists():
    with pytest.raises(TypeError, match=r"must be list, got str; papermill -p passes text, pass lists with -y '\{inits: "):
        resolve("01_init_ablation", {**_defaults("01_init_ablation"), "inits": '["stepwise"]'})


def test_bad_list_items_are_named():
    with pytest.raises(ValueError, match="holds 'hellaswagg'; allowed items"):
        resolve("01_init_ablation", {**_defaults("01_init_ablation"), "tasks": ["hellaswagg"]})
