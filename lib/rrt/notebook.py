"""What a notebook's first cells call: its study from the parameters cell (`resolve`), its run directory
(`start`); and the same study read from a params file by scripts (`load_params`), or as `make run` would build
it, checked before anything is created (`check_params`).

papermill silently accepts a misspelt `-p num_blcks 2` as a new variable: every name that is not a
field of the notebook's study stops the run here, with the closest field and the allowed ones.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import difflib
import types
from pathlib import Path

import papermill

from rrt.params import read_params
from rrt.plans import STUDIES, Throughput
from rrt.study import OUTPUTS, Study, TrainingStudy
from rrt.rundir import new_run_dir, write_config, write_csv, write_versions
from rrt.runs.cost import plan_table
from rrt.runs.store import write_run_files

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def resolve(notebook: str, namespace: dict) -> Study:
    """Return the notebook's study from its namespace (the parameters cell + papermill's overrides)."""
    if notebook not in STUDIES:
        raise ValueError(f"unknown notebook {notebook!r}; known: {', '.join(STUDIES)}")
    return from_dict(notebook, {k: v for k, v in namespace.items() if _is_param(k, v)})


def from_dict(notebook: str, values: dict) -> Study:
    """Return the study of `notebook` with `values` (unknown keys named, with the closest field)."""
    cls = STUDIES[notebook]
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown parameter {key!r}{hint} for {notebook}; allowed: {', '.join(allowed)}")
    return cls(**values)


def load_params(notebook: str, scale: str, **overrides) -> Study:
    """Return the study of params/<notebook>/<scale>.yaml, or of a YAML file's path given as `scale`
    (overrides of the dataclass defaults), then `overrides`."""
    return from_dict(notebook, {**read_params(notebook, scale), **overrides})


def check_params(notebook: str, scale: str, overrides: dict) -> Study:
    """Return the study `make run NB=notebook SCALE=scale P=overrides` builds at its parameters stage: the
    notebook's parameters cell, then params/<notebook>/<scale>.yaml, then `overrides`; raises what the notebook
    would (an unknown name with the closest field, a bad value); creates nothing."""
    return from_dict(notebook, {**parameters_cell(notebook), **read_params(notebook, scale), **overrides})


def parameters_cell(notebook: str) -> dict:
    """Return notebooks/<notebook>.ipynb's parameters cell as {name: value} (its typed literals)."""
    path = NOTEBOOKS / f"{notebook}.ipynb"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")))
        raise ValueError(f"unknown notebook {notebook!r}; known: {known}")
    return {name: ast.literal_eval(p["default"]) for name, p in papermill.inspect_notebook(str(path)).items()}


def start(study: Study) -> Path:
    """Create the notebook's run directory; write config.json, versions.json and (a plan that trains) plan.csv
    and each run's run.json in the run store."""
    if study.run_dir:  # `make run` made it (new_run_dir's rule in the shell): papermill writes the notebook there
        run_dir = Path(study.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(OUTPUTS / study.notebook, f"{study.scale}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    write_config(run_dir, study.to_dict())
    write_versions(run_dir)
    recipe = planned(study)
    if recipe is not None:
        write_csv(run_dir / "plan.csv", plan_table(study.runs()))
        write_run_files(study.runs(), recipe.data_spec(), recipe.eval_spec())
    return run_dir


def planned(study: Study) -> TrainingStudy | None:
    """The training study whose recipe a study's runs follow (itself; 05: 04's at its scale), or None."""
    if isinstance(study, TrainingStudy):
        return study
    if isinstance(study, Throughput) and study.trains():
        return study.training()
    return None


def _is_param(name, value):
    return not (name.startswith("_") or name in {"In", "Out", "get_ipython", "exit", "quit"}
                or isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value))
