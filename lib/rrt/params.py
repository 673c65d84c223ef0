"""The params files: params/<notebook>/<scale>.yaml, the overrides of a notebook's parameters at one scale.

`make run P="..."` overrides them (`parse_overrides`). Scripts and the notebooks' first cells read them
(rrt.notebook.load_params; 05 also reads 04's, whose recipe its served models follow); the studies themselves
(rrt.plans) take plain values.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"


def read_params(notebook: str, scale: str) -> dict:
    """Return the overrides of params/<notebook>/<scale>.yaml, or of a YAML file's path given as `scale`."""
    path = Path(scale) if scale.endswith((".yaml", ".yml")) else PARAMS_DIR / notebook / f"{scale}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (PARAMS_DIR / notebook).glob("*.yaml"))
        raise ValueError(f"no params file {path}; scales of {notebook}: {known}")
    return yaml.safe_load(path.read_text()) or {}


# YAML 1.1 (PyYAML) reads `1e-4` as a string (its floats need a dot): a command line's `lr=1e-4` is a float, and
# `task_limit=None` is None, as in the notebook's parameters cell.
class _OverrideLoader(yaml.SafeLoader):
    pass


_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                      list("-+0123456789."))
_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])
_NAME = re.compile(r"(?:^|\s)([A-Za-z_]\w*)=")


def parse_overrides(text: str) -> dict:
    """Return {name: value} of `make run P="num_blocks=[2, 3] lr=1e-4 init=stepwise"`: each value read as YAML
    (lists, numbers, booleans, strings); a value runs to the next ` name=`, so a list may hold spaces."""
    text = text.strip()
    starts = list(_NAME.finditer(text))
    if text and (not starts or text[:starts[0].start(1)].strip()):
        stray = text[:starts[0].start(1)].strip() if starts else text
        raise ValueError(f"override {stray!r} is not NAME=VALUE (e.g. steps=20 num_blocks=[2,3])")
    found = {}
    for here, after in zip(starts, starts[1:] + [None]):
        name, raw = here.group(1), text[here.end():after.start() if after else len(text)].strip()
        if name in found:
            raise ValueError(f"override {name!r} given twice")
        try:
            found[name] = yaml.load(raw, Loader=_OverrideLoader) if raw else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"override {name}={raw!r} is not a YAML value ({problem}); "
                             f"lists: {name}=[2,3], strings with spaces: {name}='a b'") from None
    return found


def overrides_yaml(overrides: dict) -> str:
    """Return `overrides` as one line of YAML (papermill's -y), floats written so that YAML reads them back."""
    return yaml.safe_dump(overrides, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
