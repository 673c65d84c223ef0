"""The project's promises: conda and pip recipes agree, README shows the commands, CI runs them."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_names(specs):
    return {re.split(r"[=<>!~\[ ]", s.strip())[0].lower(): s.strip() for s in specs}


def test_environment_yml_and_pyproject_name_the_same_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _pip_names(project["dependencies"] + project["optional-dependencies"]["embedded"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pip_names([s for s in pip_section if not s.startswith("-")])
    assert conda == pyproject  # same names and the same pins


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in ("make setup", "make test"):
        assert command in ci and command in readme
    assert readme.index("make setup") < 400  # the two commands open the README
